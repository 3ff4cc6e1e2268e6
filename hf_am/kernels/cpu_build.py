"""Build and cache the C kernel library (``hf_am/csrc/am_cpu_kernels.c``); :mod:`hf_am.kernels.cpu` calls it.

The kernels are plain C compiled on first use with the system C compiler (about
a second), cached under ``$HF_AM_CACHE`` (default ``~/.cache/hf_am``) keyed by
the source, compiler and flags, and loaded with :mod:`ctypes`.  They cover
contiguous float32/float64 CPU tensors, the case where torch's per-op dispatch
makes the multi-tensor path slow (CPU training, DeepSpeed ZeRO-Offload).

Without a compiler, or with ``HF_AM_CPU_KERNELS=0``, :func:`library` returns
``None`` and the optimizers take the multi-tensor path.  The compiler is
``$HF_AM_CC``, else ``$CC``, else the first of ``cc``, ``gcc``, ``clang``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "am_cpu_kernels.c"
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-pthread"]

_lock = threading.Lock()
_state = {"tried": False, "lib": None, "error": None}


def compiler() -> Optional[str]:
    for candidate in (os.environ.get("HF_AM_CC"), os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate:
            path = shutil.which(candidate)
            if path:
                return path
            if candidate == os.environ.get("HF_AM_CC"):
                return candidate  # an explicit choice that does not exist: let the build report it
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("HF_AM_CACHE") or Path.home() / ".cache" / "hf_am") / "kernels"


def build_error() -> Optional[str]:
    """Why the kernels are unavailable (after :func:`library` returned ``None``)."""
    return _state["error"]


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first use; ``None`` when unavailable."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["lib"] = _load()
            except Exception as exc:  # no compiler, read-only cache, ... : fall back, say why once
                _state["error"] = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"hf_am: fused CPU kernels unavailable ({_state['error']}); using the multi-tensor path",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _state["tried"] = True
    return _state["lib"]


def _load() -> Optional[ctypes.CDLL]:
    if os.environ.get("HF_AM_CPU_KERNELS", "1") == "0":
        raise RuntimeError("disabled by HF_AM_CPU_KERNELS=0")
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set HF_AM_CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), cc.encode(), version.encode(), " ".join(FLAGS).encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"am_cpu_kernels-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: ranks building at once each install a complete file
    lib = ctypes.CDLL(str(target))
    i64, ptr, dbl = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    head = [ctypes.c_int, ctypes.c_int, i64, ptr]  # dtype bits, threads, n, numel
    lib.am_adamw_sums.argtypes = head + [ptr, ptr, ptr, dbl, ptr, ptr, ptr]
    lib.am_adamw_update.argtypes = head + [ptr, ptr, ptr, ptr, dbl, ptr, ptr, ptr, ptr, ptr]
    lib.am_sgd_sums.argtypes = head + [ptr, ptr, ptr, dbl, ptr]
    lib.am_sgd_update.argtypes = head + [ptr, ptr, ptr, dbl, ptr, ptr]
    for fn in (lib.am_adamw_sums, lib.am_adamw_update, lib.am_sgd_sums, lib.am_sgd_update):
        fn.restype = ctypes.c_int
    return lib
