#!/usr/bin/env python3
"""What one optimizer step costs a GPU's host and its device, eagerly and replayed from a CUDA graph.

Below a few hundred million parameters torch's fused AdamW is bound by launches, so AM-AdamW's
ratio to it is set by the host: how long ``step()`` takes to return (Python, planning, pointer
tables, launches) and how many kernels it launches.  For LLaMA-like tensor lists (the shapes of
``benchmarks/optimizer_overhead.py``) this script reports, per optimizer:

* host ms per step: ``step()``'s wall time on the host with no synchronisation (what the host
  spends launching; the device may still be working),
* device ms per step: CUDA events around a burst of steps (the device timeline, idle waits
  for the host included),
* device operations per step (kernels, copies, memsets) and the host's top operators, from
  ``torch.profiler``.

``--graph`` then captures one step in a ``torch.cuda.CUDAGraph`` (after warm-up steps on a side
stream, as torch's docs prescribe; lr a CUDA tensor) and reports the device ms per replay: what
the step costs once the host's part is gone.  torch's fused AdamW needs ``capturable=True`` for
that; AM-AdamW's step is capturable as it is (tests/gpu/test_cuda_graph.py checks that replays
equal eager steps).

    python benchmarks/gpu_step_anatomy.py --sizes 25 100 --graph --out benchmarks/results/h200_step_anatomy_float32_r10.md

Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402
from optimizer_overhead import llama_like_shapes  # noqa: E402

from hf_am import AMAdamW  # noqa: E402

CANDIDATES = {
    "AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "AM-AdamW tensor": lambda ps: AMAdamW(ps, lr=1e-3, scope="tensor"),
    "AM-AdamW model": lambda ps: AMAdamW(ps, lr=1e-3, scope="model"),
}


def make_tensors(size_m: float, dtype: torch.dtype):
    """LLaMA-like parameters on the GPU with fixed random gradients; ``(params, parameter count)``."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for shape in llama_like_shapes(int(size_m * 1e6)):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device="cuda").to(dtype))
        p.grad = (torch.randn(shape, generator=gen, device="cuda") * 1e-2).to(dtype)
        params.append(p)
    return params, sum(p.numel() for p in params)


def time_steps(opt, steps: int):
    """(median host s per step, device s per step over the burst)."""
    torch.cuda.synchronize()
    host = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        host.append(time.perf_counter() - t)
    end.record()
    torch.cuda.synchronize()
    return statistics.median(host), start.elapsed_time(end) / 1e3 / steps


def profile_steps(opt, steps: int):
    """(device operations per step, top host operators as text)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return kernels / steps, table


def anatomy(sizes, dtype, steps: int, lines: list) -> None:
    lines.append("| params | tensors | optimizer | host ms per step | device ms per step | device ops per step |")
    lines.append("|---|---|---|---|---|---|")
    tables = []
    for size in sizes:
        params, n = make_tensors(size, dtype)
        for name, make in CANDIDATES.items():
            opt = make(params)
            for _ in range(3):  # lazy state, compiled kernels, cached tables
                opt.step()
            host, device = time_steps(opt, steps)
            kernels, table = profile_steps(opt, 5)
            row = f"| {n/1e6:.1f}M | {len(params)} | {name} | {host*1e3:.3f} | {device*1e3:.3f} | {kernels:.0f} |"
            print(row, flush=True)
            lines.append(row)
            if name.startswith("AM-AdamW"):
                tables.append(f"### {name}, {n/1e6:.1f}M: host operators over 5 steps\n\n```\n{table}\n```\n")
            del opt
        del params
        torch.cuda.empty_cache()
    lines.append("")
    lines.extend(tables)


GRAPH_CANDIDATES = {
    "AdamW (fused, capturable)": lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-3, device="cuda"), fused=True,
                                                              capturable=True),
    "AM-AdamW tensor": lambda ps: AMAdamW(ps, lr=torch.tensor(1e-3, device="cuda"), scope="tensor"),
    "AM-AdamW model": lambda ps: AMAdamW(ps, lr=torch.tensor(1e-3, device="cuda"), scope="model"),
}


def graph_replays(sizes, dtype, steps: int, lines: list) -> None:
    """Device ms per replay of one captured step (warm-up on a side stream, then capture, as torch's recipe)."""
    lines.append("## One step captured in a CUDA graph and replayed (lr a CUDA tensor)\n")
    lines.append("| params | tensors | optimizer | device ms per replay |")
    lines.append("|---|---|---|---|")
    for size in sizes:
        params, n = make_tensors(size, dtype)
        for name, make in GRAPH_CANDIDATES.items():
            opt = make(params)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    opt.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            row = f"| {n/1e6:.1f}M | {len(params)} | {name} | {start.elapsed_time(end) / steps:.3f} |"
            print(row, flush=True)
            lines.append(row)
            del graph, opt
        del params
        torch.cuda.empty_cache()
    lines.append("")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[25, 100], help="millions of parameters")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per optimizer (default 50)")
    parser.add_argument("--graph", action="store_true", help="also time replays of one step captured in a CUDA graph")
    parser.add_argument("--out", help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (none is visible to torch here)")
    lines = [f"# One optimizer step on the host and the device\n\n{describe('cuda')}\n",
             f"Command: `python benchmarks/gpu_step_anatomy.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
             f"{args.dtype} parameters; host ms: median wall time of step() with no synchronisation; device ms: "
             f"CUDA events around {args.steps} steps; device ops: torch.profiler's CUDA events (kernels, copies, memsets) over 5 steps.\n"]
    print(lines[0])
    anatomy(args.sizes, getattr(torch, args.dtype), args.steps, lines)
    if args.graph:
        graph_replays(args.sizes, getattr(torch, args.dtype), args.steps, lines)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
