"""The machine a benchmark ran on, in one line, for every table and plot that reports a time."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def describe(device: str = "cpu") -> str:
    """``"CPU: <model>, N cores visible, torch threads T; [GPU: <name>;] torch X, [transformers Y,] Python Z"``."""
    import torch

    parts = [f"CPU: {cpu_model()}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"]
    if str(device).startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name(torch.device(device))}")
    versions = [f"torch {torch.__version__}"]
    try:
        import transformers

        versions.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    versions.append(f"Python {platform.python_version()}")
    return "; ".join(parts) + "; " + ", ".join(versions)
