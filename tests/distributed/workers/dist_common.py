"""Shared by the multi-process tests and their worker scripts.

The test side (:func:`launch`) starts ``nproc`` real ``torch.distributed``
processes on a free port, waits for them with a timeout (a hang becomes a
failure, never a stuck CI job) and returns what every rank wrote.  The worker
side (:func:`init`, :func:`finish`) joins the gloo group and always leaves it
with ``destroy_process_group()`` and exits without interpreter teardown
(:func:`exit_process`), which keeps gloo from aborting with "terminate called
without an active exception".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
REPO = HERE.parents[2]


from helpers import free_port, make_model  # noqa: F401  (tests/ is on PYTHONPATH: see launch())


# --------------------------------------------------------------------- test side
def launch(
    script: str,
    args: List[str],
    tmp_path: Path,
    nproc: int = 2,
    timeout: float = 120.0,
    torchrun: bool = False,
    extra_env: Optional[Dict[str, str]] = None,
) -> List[dict]:
    """Run ``tests/distributed/workers/<script>`` on ``nproc`` ranks; return each rank's JSON result.

    ``torchrun=True`` goes through ``torch.distributed.run`` (what DeepSpeed users do);
    otherwise the ranks are plain subprocesses with the rendezvous variables set,
    which starts a little faster.  Raises ``AssertionError`` with every rank's output
    when a rank fails, writes no result, or the run exceeds ``timeout``.
    """
    out_dir = Path(tmp_path) / f"results-{script.replace('.py', '')}-{time.monotonic_ns()}"
    out_dir.mkdir(parents=True)
    env = dict(os.environ)
    env.update(
        {
            "HF_AM_RESULT_DIR": str(out_dir),
            "HF_AM_NO_TRAINER_PATCH": "1",  # workers do not need transformers; saves seconds per rank
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), str(HERE), env.get("PYTHONPATH", "")]),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(nproc),
        }
    )
    env.update(extra_env or {})
    path = str(HERE / script)
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", env["MASTER_PORT"], path, *args]
        procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    else:
        procs = []
        for rank in range(nproc):
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
            procs.append(
                subprocess.Popen([sys.executable, path, *args], env=rank_env, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            )
    outputs, deadline, timed_out = [], time.monotonic() + timeout, False
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for other in procs:  # only the processes this function started
                if other.poll() is None:
                    other.kill()
            out, _ = proc.communicate()
        outputs.append(out)
    log = "\n".join(f"----- process {i} (rc={p.returncode}) -----\n{o[-6000:]}" for i, (p, o) in enumerate(zip(procs, outputs)))
    assert not timed_out, f"{script} {args} did not finish within {timeout} s (hang?)\n{log}"
    assert all(p.returncode == 0 for p in procs), f"{script} {args} failed\n{log}"
    results = []
    for rank in range(nproc):
        f = out_dir / f"rank{rank}.json"
        assert f.exists(), f"rank {rank} of {script} wrote no result\n{log}"
        results.append(json.loads(f.read_text()))
    return results


# ------------------------------------------------------------------- worker side
def init():
    """Join the gloo group from the environment; one thread per rank (2 ranks share 2 cores)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish(result: dict) -> None:
    """Write this rank's result, leave the group cleanly, exit."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    out = Path(os.environ["HF_AM_RESULT_DIR"]) / f"rank{rank}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    exit_process(0)


@contextmanager
def exit_on_error():
    """Around a worker's cases: an exception is printed, the group left and the process ended with
    status 1 (the launcher then reports the rank as failed; no result file is written)."""
    import torch.distributed as dist

    try:
        yield
    except Exception:
        traceback.print_exc()
        if dist.is_initialized():
            dist.destroy_process_group()
        exit_process(1)


def exit_process(code: int) -> None:
    """End a worker whose results are written and whose process group is destroyed, skipping
    interpreter teardown: objects that still hold the group (FSDP modules, pending gloo work)
    are freed there, and gloo's threads can then abort the process with "terminate called
    without an active exception" (seen here once, in the FSDP1 worker, in a full test run)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class CollectiveCounter:
    """Counts calls of the ``torch.distributed`` collectives while active.

    Patches the module attributes, which is what ``hf_am`` calls through
    (``import torch.distributed as dist; dist.all_reduce(...)``).
    """

    NAMES = (
        "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter",
        "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "gather_object",
        "all_to_all", "all_to_all_single", "reduce", "gather", "scatter",
    )

    def __init__(self):
        self.calls: Dict[str, int] = {}
        self._saved = {}

    def __enter__(self):
        import torch.distributed as dist

        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def wrapper(*a, __name=name, __orig=original, **k):
                self.calls[__name] = self.calls.get(__name, 0) + 1
                return __orig(*a, **k)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)
        return False

    @property
    def total(self) -> int:
        return sum(self.calls.values())


# ------------------------------------------------- the problem every worker trains (helpers.make_model)
def global_batches(n: int, size: int = 16, seed: int = 1, out_features: int = 3, same: bool = False):
    """``n`` global batches; ``same=True`` repeats the first (full-batch training, where the
    exact loss difference of ``loss_estimate="exact"`` is meaningful rather than batch noise)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(size, 6, generator=g), torch.randn(size, out_features, generator=g)) for _ in range(n)]
    return [batches[0]] * n if same else batches


def loss_fn(model, x, y):
    import torch

    return torch.nn.functional.mse_loss(model(x), y)


def grouping(kind: str, named_params):
    """``one``: a single group; ``two``: decayed weights / biases at half lr; ``per_tensor``: ``two`` split per tensor."""
    import hf_am

    named = list(named_params)
    if kind == "one":
        return [{"params": [p for _, p in named]}]
    two = [
        {"params": [p for n, p in named if n.endswith("weight")]},
        {"params": [p for n, p in named if not n.endswith("weight")], "weight_decay": 0.0, "lr_scale": 0.5},
    ]
    two = [g for g in two if g["params"]]
    return hf_am.param_groups_per_tensor(two) if kind == "per_tensor" else two


def make_optimizer(name: str, groups, scope: str, **kwargs):
    """AM-AdamW or AM-SGD with coupled/decoupled weight decay on; ``lr_scale`` in a group scales its lr."""
    import hf_am

    # Full-batch runs with the exact loss difference need larger steps, else beta sits at beta_max.
    base_lr = {("adamw", "linear"): 2e-2, ("sgd", "linear"): 5e-2, ("adamw", "exact"): 0.2, ("sgd", "exact"): 2.0}[
        name, kwargs.get("loss_estimate", "linear")]
    groups = [dict(g) for g in groups]
    for g in groups:
        g["lr"] = base_lr * g.pop("lr_scale", 1.0)
    if name == "adamw":
        return hf_am.AMAdamW(groups, lr=base_lr, weight_decay=0.05, scope=scope, **kwargs)
    return hf_am.AMSGD(groups, lr=base_lr, momentum=0.9, weight_decay=0.05, scope=scope, **kwargs)


def decay_lr(optimizer, factor: float = 0.8) -> None:
    """Change the learning rates every step so the eta'/eta weighting of the sums is exercised."""
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * factor


def reference_run(name: str, scope: str, kind: str, steps: int, loss_estimate: str = "linear", model_seed: int = 0,
                  out_features: int = 3, **kwargs):
    """The 1-process run: whole tensors, no process group, the global batch on one process.

    Returns (parameters after every step, betas of every step).  Asserts that it
    ran no collective, so it is a genuine single-process computation even inside
    a distributed worker.
    """
    import torch

    model = make_model(model_seed, out_features=out_features)
    opt = make_optimizer(name, grouping(kind, model.named_parameters()), scope, loss_estimate=loss_estimate, **kwargs)
    params_hist, betas_hist = [], []
    with CollectiveCounter() as counter:
        for x, y in global_batches(steps, out_features=out_features, same=loss_estimate == "exact"):
            def closure():
                opt.zero_grad()
                loss = loss_fn(model, x, y)
                loss.backward()
                return loss

            opt.step(closure)
            params_hist.append([p.detach().clone() for p in model.parameters()])
            betas_hist.append(opt.betas_per_scope().tolist())
            decay_lr(opt)
    assert counter.total == 0, counter.calls
    return params_hist, betas_hist
