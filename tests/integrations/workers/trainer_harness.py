"""Launching the Trainer test workers (one process, ``torchrun``, ``accelerate launch``) from pytest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch

from helpers import deepspeed_config as ds_config, free_port, max_param_diff  # noqa: F401  (re-exported for the tests)

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(os.path.dirname(HERE))
REPO = os.path.dirname(TESTS)
DIST_WORKERS = os.path.join(TESTS, "distributed", "workers")
WORKERS_DIR = HERE
WORKER = os.path.join(HERE, "trainer_worker.py")
SCRIPT = os.path.join(HERE, "trainer_script.py")

def subprocess_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, HERE, DIST_WORKERS] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_command(cmd: Sequence[str], timeout: float = 300, env: Optional[dict] = None, cwd: str = REPO) -> str:
    proc = subprocess.run(
        list(cmd), cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"command failed (rc={proc.returncode}): {' '.join(cmd)}\n{output[-6000:]}")
    return output


def torchrun(nproc: int) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_worker(tmp_path, model_dir: str, runs: List[dict], nproc: int = 1, launcher: str = "torchrun", timeout: float = 300) -> dict:
    """Run ``trainer_worker.py`` on ``runs`` and return rank 0's results (``{name: result}``)."""
    tmp = str(tmp_path)
    out = os.path.join(tmp, "results.pt")
    spec_path = os.path.join(tmp, "spec.json")
    with open(spec_path, "w") as f:
        json.dump({"model_dir": model_dir, "out": out, "tmp": tmp, "runs": runs}, f)
    if launcher == "python":
        assert nproc == 1
        cmd = [sys.executable, WORKER, spec_path]
    else:
        cmd = torchrun(nproc) + [WORKER, spec_path]
    run_command(cmd, timeout=timeout)
    return torch.load(out, weights_only=False)


def assert_same_training(got: dict, ref: dict, atol: float = 1e-6, beta_atol: float = 1e-5) -> None:
    """Same final parameters (``atol``) and the same beta sequence (mean/min/max/restarts and every scope)."""
    assert "error" not in got, got.get("traceback")
    diff = max_param_diff(got["params"], ref["params"])
    assert diff <= atol, f"parameters differ by {diff:.3g} > {atol:g}"
    assert len(got["steps"]) == len(ref["steps"]) > 0
    steps_got, steps_ref = torch.tensor(got["steps"]), torch.tensor(ref["steps"])
    assert torch.allclose(steps_got, steps_ref, atol=beta_atol, rtol=0), (steps_got, steps_ref)
    for s_got, s_ref in zip(got["per_scope"], ref["per_scope"]):
        assert len(s_got) == len(s_ref)
        assert torch.allclose(torch.tensor(s_got), torch.tensor(s_ref), atol=beta_atol, rtol=0)
    logged = [h for h in got["log_history"] if "loss" in h]
    assert logged and all("am_beta" in h for h in logged), logged
