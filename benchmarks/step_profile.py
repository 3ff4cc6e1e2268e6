#!/usr/bin/env python3
"""Where an AM-AdamW step spends its time on the host: kernels, planning, statistics, the callback's read.

Builds a LLaMA from ``recipes/configs`` (no Hub), gives every parameter a fixed random gradient and
steps ``hf_am.AMAdamW`` with the Trainer's two parameter groups (weight decay on matrices, none on
norms), after wrapping the step's parts with timers: the compiled kernels (per call), planning
(``plan_step``, with the tensor gate and the path choice inside it), the sums' reduction, the
coefficient formula, recording the statistics, and ``beta_summary_tensor()`` (what the Trainer
callback reads every step); where the step is one C call (the default here: docs/algorithm.md §10)
that call and its preparation replace the phases, the reduction and the formula, and ``--two-calls``
profiles the two-call sequence instead. Parts a step never reached are left out. Everything not in a
named part is "rest of step()". ``torch.optim.AdamW`` (fused) steps the same tensors for scale. Timers
add a little to every part; read the shares.

The "torch ops" column counts the torch operations each part dispatches in one step (counted in one
extra step, outside the timed ones), leaving out those inside the kernels themselves.  On a GPU each of
them that computes (all but views) is a kernel launch and ~5-20 us of host time, so this column is the
host work of the CUDA path that a CPU can count exactly.  ``--kernels triton`` steps the CPU tensors with the Triton
kernels in Triton's interpreter (``TRITON_INTERPRET=1``; ``bash scripts/setup.sh test`` installs Triton
into ``.triton_interpreter/`` where ``pip install triton`` is not wanted): the Python around the kernels
is then the CUDA path's, line for line, while the kernels' own times are the interpreter's and mean
nothing.

    python benchmarks/step_profile.py                      # tiny and small, 1 thread
    python benchmarks/step_profile.py --two-calls          # the phases as separate calls
    python benchmarks/step_profile.py --scheduler          # a new lr every step, as under the Trainer
    python benchmarks/step_profile.py --sizes w512 --steps 50 --threads 2
    python benchmarks/step_profile.py --kernels triton --steps 20     # the host side of the CUDA path
    python benchmarks/step_profile.py --device cuda --sizes tiny small w512 --steps 50   # on a GPU

Prints one table per size (microseconds per step, share of the step), naming the machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _machine import describe  # noqa: E402  (benchmarks/_machine.py, next to this script)

SIZES = {"tiny": ("llama_tiny.json", {}), "small": ("llama_small.json", {}),
         "w512": ("llama_60m.json", {"num_hidden_layers": 2})}


def build(size: str, device: str = "cpu"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    name, overrides = SIZES[size]
    cfg = json.loads((ROOT / "recipes" / "configs" / name).read_text())
    cfg.pop("architectures", None)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return model, [dict(params=decay, weight_decay=0.01), dict(params=no_decay, weight_decay=0.0)]


class OpCounter:
    """Counts the torch operations dispatched while it is active, except those issued from inside
    Triton (the interpreter runs a kernel's body as torch and numpy calls: they are the kernel, not
    host work around it).  A ``TorchDispatchMode`` sees each call the Python side makes (``stack``
    once, not its ``unsqueeze`` per tensor), which is what becomes a launch on a GPU."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                frame = sys._getframe(1)
                while frame is not None and f"{os.sep}triton{os.sep}" not in frame.f_code.co_filename:
                    frame = frame.f_back
                if frame is None:
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count = 0
        self.mode = _Mode()


class Timers:
    """Wraps module attributes so that each call adds its wall time (ns) to a named total, and the
    torch operations it dispatched (while ``counter`` is active) to another."""

    def __init__(self):
        self.total: Dict[str, int] = {}
        self.calls: Dict[str, int] = {}
        self.ops: Dict[str, int] = {}
        self.order: list = []  # labels in the order they were installed (the step's order)
        self.counter = OpCounter()

    def wrap(self, owner, attr: str, label: str) -> None:
        inner = getattr(owner, attr)
        self.order.append(label)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            ops0, t0 = self.counter.count, time.perf_counter_ns()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total[label] = self.total.get(label, 0) + time.perf_counter_ns() - t0
                self.calls[label] = self.calls.get(label, 0) + 1
                self.ops[label] = self.ops.get(label, 0) + self.counter.count - ops0

        setattr(owner, attr, timed)

    def count_ops(self, step) -> int:
        """Run ``step()`` once under the op counter; the total count (the parts' counts go to ``ops``)."""
        self.ops.clear()
        self.counter.count = 0
        with self.counter.mode:
            step()
        return self.counter.count

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()


def use_triton_interpreter() -> None:
    """Step CPU tensors with the Triton kernels, run by Triton's interpreter: the one place a kernel set
    is chosen (``hf_am.kernels.select_kernels``) hands them the Triton set, as
    tests/battery/triton_interpret.py does.  Must run before anything imports Triton."""
    os.environ["TRITON_INTERPRET"] = "1"
    local = ROOT / ".triton_interpreter"
    if local.is_dir():
        sys.path.insert(0, str(local))
    import torch

    import hf_am.kernels
    from hf_am.kernels import triton as triton_kernels
    from hf_am.kernels.interface import tensor_problem

    if triton_kernels.triton is None:
        raise SystemExit("--kernels triton: Triton is not importable (`pip install triton`, or "
                         "`bash scripts/setup.sh test`, which installs it into .triton_interpreter/)")

    def triton_on_cpu(lists, mirrored=False):
        reason = tensor_problem(lists, triton_kernels.DTYPES, "cpu", mirrored)
        return (triton_kernels, None) if reason is None else (None, reason)

    hf_am.kernels.select_kernels = triton_on_cpu
    torch.manual_seed(0)


def install(timers: Timers, kernels: str = "default", device: str = "cpu") -> None:
    import hf_am.am_adamw as am_adamw
    import hf_am.optimizer as optimizer
    import hf_am.planning as planning

    if kernels == "triton" or device == "cuda":
        from hf_am.kernels import triton as compiled

        name = "Triton {} kernel" + (" (interpreted)" if device == "cpu" else "")
    else:
        import hf_am.kernels.cpu as compiled

        name = "C {} kernel"

    timers.wrap(optimizer, "revalidate_changed_options", "option re-check")
    timers.wrap(optimizer, "plan_step", "planning (plan_step)")
    timers.wrap(planning, "check_plan_tensors", "  of which: tensor gate")
    timers.wrap(planning, "choose_path", "  of which: path choice")
    timers.wrap(am_adamw.AMAdamW, "_partial_sums", "phase 1 (sums)")
    timers.wrap(compiled, "adamw_sums", "  of which: " + name.format("sums"))
    timers.wrap(optimizer, "scope_sums", "sums per scope (reduction)")
    timers.wrap(optimizer.AMOptimizer, "_step_coefficients", "coefficient formula")
    timers.wrap(am_adamw.AMAdamW, "_apply_update", "phase 2 (update)")
    timers.wrap(compiled, "adamw_update", "  of which: " + name.format("update"))
    timers.wrap(am_adamw.AMAdamW, "_whole_step", "one-call step (sums, coefficients, update)")
    if compiled.NAME == "cpu":
        timers.wrap(compiled, "adamw_step", "  of which: C one-call kernel")
    timers.wrap(optimizer, "record_step", "recording statistics")


def profile(size: str, steps: int, two_calls: bool = False, scheduler: bool = False, kernels: str = "default",
            device: str = "cpu") -> str:
    import torch

    import hf_am

    model, groups = build(size, device)
    # On a GPU every timed part starts with an idle device, so each time is the host's own work (its
    # launches included), not a wait for a full launch queue.
    idle = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = sum(p.numel() for p in model.parameters())
    # fresh group dicts for each: an optimizer writes its defaults into the dicts it is given
    # (AM's fused=None would turn AdamW's fused=True off)
    fused = torch.optim.AdamW([dict(params=g["params"], weight_decay=g["weight_decay"]) for g in groups], lr=1e-3,
                              fused=True)
    am = hf_am.AMAdamW([dict(params=g["params"], weight_decay=g["weight_decay"]) for g in groups], lr=1e-3)
    am.one_call_step = not two_calls
    timers = Timers()
    install(timers, kernels, device)
    def new_lr(i: int) -> None:  # what a linear-decay scheduler writes into every group before a step
        if scheduler:
            for group in (*am.param_groups, *fused.param_groups):
                group["lr"] = 1e-3 * (1.0 - i / (steps + 10))

    for i in range(5):
        new_lr(i)
        am.step()
        fused.step()
    per_step, fused_times, summary_times = [], [], []
    timers.reset()
    for i in range(steps):
        new_lr(5 + i)
        idle()
        t0 = time.perf_counter_ns()
        am.step()
        per_step.append(time.perf_counter_ns() - t0)
        idle()
        t0 = time.perf_counter_ns()
        am.beta_summary_tensor()
        summary_times.append(time.perf_counter_ns() - t0)
        idle()
        t0 = time.perf_counter_ns()
        fused.step()
        fused_times.append(time.perf_counter_ns() - t0)
    step_us = statistics.fmean(per_step) / 1e3
    parts = {k: v / steps / 1e3 for k, v in timers.total.items()}
    top_level = [k for k in parts if not k.startswith("  ")]
    rest = step_us - sum(parts[k] for k in top_level)
    new_lr(5 + steps)
    step_ops = timers.count_ops(am.step)  # one more step, untimed, under the op counter
    ops = dict(timers.ops)
    summary_ops = timers.count_ops(am.beta_summary_tensor)
    fused_ops = timers.count_ops(fused.step)
    rest_ops = step_ops - sum(ops.get(k, 0) for k in top_level)
    if device == "cuda":
        kernel_set = f"on {torch.cuda.get_device_name()} (host time: no part waits for the device)"
    else:
        kernel_set = "Triton kernels in Triton's interpreter" if kernels == "triton" else "this machine's kernels"
    lines = [f"### {size}: {n / 1e6:.2f}M parameters, {sum(len(g['params']) for g in groups)} tensors in 2 groups, "
             f"{steps} steps, {'two calls' if two_calls else 'default (one call where it applies)'}"
             f"{', a new lr every step' if scheduler else ''}, {kernel_set}", "",
             "| part | us per step | share of the AM step | torch ops per step |", "|---|---|---|---|"]
    for k in timers.order:
        if k not in parts:  # never reached by this kind of step
            continue
        v = parts[k]
        lines.append(f"| {k} | {v:.0f} | {v / step_us:.1%} | {ops.get(k, 0)} |")
    lines.append(f"| rest of step() | {rest:.0f} | {rest / step_us:.1%} | {rest_ops} |")
    lines.append(f"| **AM-AdamW step** (mean; median {statistics.median(per_step) / 1e3:.0f}) | **{step_us:.0f}** | 100% "
                 f"| **{step_ops}** |")
    lines.append(f"| beta_summary_tensor() (the callback's read) | {statistics.fmean(summary_times) / 1e3:.0f} | | "
                 f"{summary_ops} |")
    lines.append(f"| AdamW fused step (mean; median {statistics.median(fused_times) / 1e3:.0f}) | "
                 f"{statistics.fmean(fused_times) / 1e3:.0f} | | {fused_ops} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=200, help="timed steps per size (default 200)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--two-calls", action="store_true",
                   help="profile the step with its phases as separate calls (one_call_step = False)")
    p.add_argument("--scheduler", action="store_true",
                   help="write a new lr into every group before each step, as the Trainer's lr scheduler does")
    p.add_argument("--kernels", choices=("default", "triton"), default="default",
                   help="default: the kernels this machine picks (C on CPU); triton: the CUDA path's Triton kernels, "
                        "run on the CPU tensors by Triton's interpreter (their host side is then what is profiled)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the model and the steps on the GPU (the Triton kernels, compiled); the times are the "
                        "host's, each part starting with an idle device")
    args = p.parse_args(argv)
    if args.kernels == "triton" and args.device == "cpu":
        use_triton_interpreter()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("step_profile.py: --device cuda, but torch sees no CUDA device here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(describe(args.device))
    print(f"`python benchmarks/step_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    for size in args.sizes:
        print(profile(size, args.steps, args.two_calls, args.scheduler, args.kernels, args.device), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
