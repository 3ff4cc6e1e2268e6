"""How much of an AM-AdamW step the tensor gate costs (hf_am/gate.py, docs/algorithm.md §10).

Times ``hf_am.gate.check_plan_tensors`` inside real ``step()`` calls on LLaMA-shaped float32 CPU
parameters and reports its median share of the step (with the range over steps):

    python benchmarks/gate_cost.py --size 25 --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.optimizer_overhead import llama_like_shapes  # noqa: E402
import hf_am.planning as planning  # noqa: E402
from hf_am import AMAdamW  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=25, help="millions of parameters (default 25)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps after 3 warm-up steps (default 30)")
    args = parser.parse_args(argv)
    shapes = llama_like_shapes(int(args.size * 1e6))
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = AMAdamW(params, lr=1e-3)
    for _ in range(3):
        opt.step()
    real, gate_times = planning.check_plan_tensors, []

    def timed(optimizer, plan):
        t0 = time.perf_counter()
        real(optimizer, plan)
        gate_times.append(time.perf_counter() - t0)

    planning.check_plan_tensors = timed
    step_times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.step()
        step_times.append(time.perf_counter() - t0)
    planning.check_plan_tensors = real
    gate, step = statistics.median(gate_times), statistics.median(step_times)
    print(
        f"{len(shapes)} tensors, {sum(p.numel() for p in params) / 1e6:.1f}M parameters, {torch.get_num_threads()} threads: "
        f"gate {gate * 1e3:.3f} ms (range {min(gate_times) * 1e3:.3f}-{max(gate_times) * 1e3:.3f}), "
        f"step {step * 1e3:.1f} ms (range {min(step_times) * 1e3:.1f}-{max(step_times) * 1e3:.1f}), "
        f"gate {100 * gate / step:.2f}% of the step"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
