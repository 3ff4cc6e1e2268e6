"""Two checkouts of hf_am in one process, stepped in turn: what a host-side change saves per step.

Host-side changes save tenths of a millisecond per step, less than this machine's drift between
two runs (whole runs of ``step_profile.py`` move by 10% from one minute to the next). Here the
"before" checkout's ``hf_am`` is imported beside this one (as a copy under another package name,
in a private temporary directory), each steps its own copy of the same LLaMA with the same
gradients and the Trainer's two parameter groups, and the two alternate with
``torch.optim.AdamW(fused=True)`` step by step (the order reversed every round), so that all three
share the machine's state. Reported per size: each one's median step, AM-AdamW's extra over
fused AdamW (the median of per-round differences), and before minus after (median and quartiles
of per-round differences).

    git worktree add /tmp/before <commit>
    python benchmarks/step_ab.py --before /tmp/before --sizes tiny small --rounds 800 --threads 2
    python benchmarks/step_ab.py --before /tmp/before --sizes tiny --rounds 800 --threads 2 --as-trainer

``--as-trainer`` times each step with what the Trainer adds around it every step: a new lr written into
every group first (its lr scheduler) and, for AM-AdamW, ``beta_summary_tensor()`` read after it (hf_am's
callback).

Prints one table, naming the machine and both checkouts.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402  (benchmarks/_machine.py, next to this script)

BEFORE_PACKAGE = "hf_am_before"


def _revision(checkout: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--", "hf_am"], capture_output=True, text=True)
        return out.stdout.strip() + (" (hf_am modified)" if dirty.stdout.strip() else "") if out.returncode == 0 else "?"
    except OSError:
        return "?"


def import_before(checkout: Path, workdir: Path):
    """``checkout``'s hf_am as the package ``hf_am_before`` (its imports inside are relative)."""
    source = checkout / "hf_am"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"step_ab.py: {checkout} holds no hf_am package (expected {source}/__init__.py)")
    shutil.copytree(source, workdir / BEFORE_PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    sys.path.insert(0, str(workdir))
    return importlib.import_module(BEFORE_PACKAGE)


def measure(size: str, modules: dict, rounds: int, as_trainer: bool = False) -> dict:
    import torch
    from step_profile import build

    steppers = {}
    for name, module in modules.items():
        _, groups = build(size)
        steppers[name] = module.AMAdamW(groups, lr=1e-4)
    _, groups = build(size)
    steppers["AdamW fused"] = torch.optim.AdamW(groups, lr=1e-4, fused=True)
    names = list(steppers)
    for _ in range(10):  # state, kernel library, caches
        for opt in steppers.values():
            opt.step()
    times = {name: [] for name in names}
    for r in range(rounds):
        lr = 1e-4 * (1.0 - r / (2.0 * rounds))  # a linear decay: a new float every step, as a scheduler writes
        for name in names if r % 2 == 0 else reversed(names):
            opt = steppers[name]
            t0 = time.perf_counter()
            if as_trainer:
                for group in opt.param_groups:
                    group["lr"] = lr
            opt.step()
            if as_trainer and hasattr(opt, "beta_summary_tensor"):
                opt.beta_summary_tensor()  # what hf_am's Trainer callback reads after every step
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a checkout of hf_am to compare with (e.g. a git worktree)")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "w512"])
    parser.add_argument("--rounds", type=int, default=600, help="steps of each optimizer per size (default 600)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--as-trainer", action="store_true",
                        help="time each step as the Trainer runs it: a new lr written into every group before it (the "
                             "lr scheduler) and, for AM-AdamW, beta_summary_tensor() read after it (hf_am's callback)")
    args = parser.parse_args(argv)
    if args.rounds < 4:
        parser.error(f"--rounds must be at least 4, got {args.rounds}")
    import torch

    torch.set_num_threads(args.threads)
    import hf_am

    with tempfile.TemporaryDirectory(prefix="hf_am_step_ab_") as workdir:
        before = import_before(args.before.resolve(), Path(workdir))
        modules = {"after": hf_am, "before": before}
        print(describe("cpu"))
        print(f"after = {ROOT} at {_revision(ROOT)}; before = {args.before} at {_revision(args.before)}")
        print(f"`python benchmarks/step_ab.py --before {args.before} --sizes {' '.join(args.sizes)} "
              f"--rounds {args.rounds} --threads {args.threads}{' --as-trainer' if args.as_trainer else ''}`\n")  # fmt: skip
        print("| model | before: step us | after: step us | AdamW fused: step us | before: extra over fused | "
              "after: extra over fused | before - after (quartiles) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for size in args.sizes:
            times = measure(size, modules, args.rounds, args.as_trainer)
            med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            extra = {k: statistics.median(a - f for a, f in zip(times[k], times["AdamW fused"])) * 1e6 for k in modules}
            saved = [b - a for a, b in zip(times["after"], times["before"])]
            q1, q2, q3 = (x * 1e6 for x in statistics.quantiles(saved, n=4))
            print(f"| {size} | {med['before']:.0f} | {med['after']:.0f} | {med['AdamW fused']:.0f} | {extra['before']:.0f} | "
                  f"{extra['after']:.0f} | {q2:+.0f} ({q1:+.0f} to {q3:+.0f}) |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
