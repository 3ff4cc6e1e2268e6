"""Step time and optimizer-state size of the AM optimizers against torch's, in one run.

Parameters come in LLaMA-like shapes (embedding, attention and MLP matrices,
norm vectors), sized from 1M to 100M.  Each optimizer steps the same tensors
with the same gradients, in several rounds (each optimizer built afresh in
every round); the table gives the median step time over rounds, its range, and
the ratio to the baseline measured in the same process.

    python benchmarks/optimizer_overhead.py                 # 1M, 5M, 25M, 100M
    python benchmarks/optimizer_overhead.py --sizes 25 --repeats 20 --markdown out.md
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from hf_am import AMAdamW, AMSGD  # noqa: E402


def llama_like_shapes(target: int) -> List[tuple]:
    """Tensor shapes of a LLaMA-style decoder with about ``target`` parameters."""
    for hidden in (128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048):
        inter = int(hidden * 8 / 3) // 32 * 32
        per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
        vocab = 8192 if target < 20e6 else 32000
        fixed = 2 * vocab * hidden + hidden
        layers = max(1, round((target - fixed) / per_layer))
        if fixed + layers * per_layer >= 0.8 * target and layers <= 4 * hidden // 64:
            break
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    shapes += [(hidden,), (vocab, hidden)]
    return shapes


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
    )


def time_optimizer(make, params, repeats: int, warmup: int = 3):
    """Median step time of a fresh optimizer over ``repeats`` steps after ``warmup`` steps."""
    opt = make(params)
    times = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        opt.step()
        if params[0].is_cuda:
            torch.cuda.synchronize()
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    nbytes = state_bytes(opt)
    del opt
    gc.collect()
    return statistics.median(times), nbytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 5, 25, 100], help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="fresh optimizers per candidate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    candidates: Dict[str, Callable] = {
        "AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "AM-AdamW tensor": lambda ps: AMAdamW(ps, lr=1e-3, scope="tensor"),
        "AM-AdamW model": lambda ps: AMAdamW(ps, lr=1e-3, scope="model"),
        "SGD (foreach)": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True),
        "AM-SGD model": lambda ps: AMSGD(ps, lr=1e-3, scope="model"),
        "AM-SGD tensor": lambda ps: AMSGD(ps, lr=1e-3, scope="tensor"),
    }
    baseline_of = {"AM-AdamW tensor": "AdamW (foreach)", "AM-AdamW model": "AdamW (foreach)",
                   "AdamW (fused)": "AdamW (foreach)", "AM-SGD model": "SGD (foreach)", "AM-SGD tensor": "SGD (foreach)"}
    rows = []
    header = "| params | tensors | optimizer | step ms (range over rounds) | vs baseline | state MB | state vs baseline |"
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(header)
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        shapes = llama_like_shapes(int(size * 1e6))
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(args.device, dtype)) for s in shapes]
        grads = [torch.randn(s, generator=gen).to(args.device, dtype) * 1e-2 for s in shapes]
        n = sum(p.numel() for p in params)
        for p, g in zip(params, grads):
            p.grad = g
        # Several rounds, each building every optimizer afresh in turn: on a shared or virtual
        # machine one process's step time drifts with where its memory landed, so each
        # figure is the median over rounds of per-round medians.
        trials: Dict[str, List[float]] = {}
        nbytes: Dict[str, int] = {}
        for _ in range(args.rounds):
            for name, make in candidates.items():
                if name in nbytes and nbytes[name] < 0:
                    continue
                try:
                    median, nbytes[name] = time_optimizer(make, params, args.repeats)
                except (RuntimeError, TypeError):  # e.g. no fused kernel for this device/dtype
                    nbytes[name] = -1
                    continue
                trials.setdefault(name, []).append(median)
        medians = {name: statistics.median(ts) for name, ts in trials.items()}
        for name in candidates:
            if name not in medians:
                print(f"| {n/1e6:.1f}M | {len(shapes)} | {name} | n/a | | | |")
                continue
            ms = medians[name] * 1e3
            base = baseline_of.get(name, name)
            ratio = f"{medians[name] / medians[base]:.2f}x" if base in medians else "n/a"
            sratio = f"{nbytes[name] / nbytes[base]:.3f}x" if base in medians else "n/a"
            spread = f"{min(trials[name]) * 1e3:.1f}-{max(trials[name]) * 1e3:.1f}"
            row = f"| {n/1e6:.1f}M | {len(shapes)} | {name} | {ms:.1f} ({spread}) | {ratio} | {nbytes[name]/2**20:.1f} | {sratio} |"
            rows.append(row)
            print(row, flush=True)
        del params, grads
        gc.collect()
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}\n\n")
            fh.write(header + "\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
