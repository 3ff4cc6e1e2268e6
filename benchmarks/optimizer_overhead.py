"""Step time and optimizer-state size of the AM optimizers against torch's, in one run.

Parameters come in LLaMA-like shapes (embedding, attention and MLP matrices,
norm vectors), sized from 1M to 100M.  Each optimizer steps the same tensors
with the same gradients.  In every round all optimizers are built afresh and
stepped in turn, step by step, so that they share the machine's state; the
table gives the median step time over rounds with its range, and the ratio to
the baseline (median and range of the per-round ratios).  AM rows without a
suffix take the default path: compiled kernels (C on CPU, Triton on CUDA) where
they apply; ", foreach" rows force the multi-tensor path.

    python benchmarks/optimizer_overhead.py                 # 1M, 5M, 25M, 100M
    python benchmarks/optimizer_overhead.py --sizes 25 --repeats 20 --markdown out.md
    python benchmarks/optimizer_overhead.py --sizes 25 --only AdamW     # AdamW family only
    python benchmarks/optimizer_overhead.py --sizes 25 100 --only AdamW --deepspeed-cpu-adam

``--deepspeed-cpu-adam`` (CPU, float32) adds DeepSpeed's ``DeepSpeedCPUAdam`` (the
ZeRO-Offload optimizer; JIT-built by DeepSpeed's op builder on first use, about a
minute) and steps every candidate on one flat tensor of the given size as well
(one ZeRO partition, as ZeRO-Offload hands the optimizer), so its column compares
like with like.  DeepSpeed is only needed for this flag.  It also adds the row
"probe: read g, m, v" (no optimizer: one ``torch.sum`` pass over each gradient and two
state-sized tensors), the memory traffic of AM's read-only first phase, and the column
"vs two-pass floor": each time over "AdamW fused" plus the probe in the same round.  AM's
second phase moves what fused AdamW moves (4 reads, 3 writes per element), so fused AdamW
plus one read of g, m, v is what a two-pass step costs where memory is the bottleneck; the
probe pays a ``torch.sum`` dispatch per tensor, so with many small tensors the floor is a
little high.  AM-AdamW's one-call step takes small enough tensors whole on one thread, its
update reading g, m, v from the caches (docs/algorithm.md §10), so in many-tensor layouts it
can run below this floor; one flat partition always takes both passes from memory.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import describe  # noqa: E402  (benchmarks/_machine.py, next to this script)
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


def time_round(candidates: Dict[str, Callable], params, repeats: int, warmup: int = 3):
    """One round: build every candidate afresh, then step them in turn ``repeats`` times.

    Interleaving the candidates step by step exposes all of them to the same
    machine state (other tenants, memory bandwidth, allocator), so their ratio is
    far steadier than that of timings taken one after the other.  Returns
    ``({name: median seconds}, {name: state bytes})``; candidates that cannot run
    here (e.g. no fused kernel for this device) are left out.
    """
    opts = {}
    for name, make in candidates.items():
        try:
            opt = make(params)
            for _ in range(warmup):
                opt.step()
        except (RuntimeError, TypeError, ValueError):
            continue
        opts[name] = opt
    times: Dict[str, List[float]] = {name: [] for name in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if params[0].is_cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    nbytes = {name: state_bytes(opt) for name, opt in opts.items()}
    del opts
    gc.collect()
    return {name: statistics.median(ts) for name, ts in times.items()}, nbytes


def _deepspeed_cpu_adam():
    """A factory for DeepSpeed's CPU Adam in AdamW mode, or ``None`` with the reason printed."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as exc:  # noqa: BLE001 - any import/build failure: skip the candidate
        print(f"DeepSpeedCPUAdam unavailable: {type(exc).__name__}: {exc}")
        return None
    return lambda ps: DeepSpeedCPUAdam(ps, lr=1e-3, adamw_mode=True, fp32_optimizer_states=True)


DS_NAME = "DeepSpeedCPUAdam"
PROBE_NAME = "probe: read g, m, v"


class ReadProbe:
    """Not an optimizer: one read-only pass over each gradient and two state-sized tensors
    (``torch.sum``), i.e. the memory traffic of AM's first phase.  ``AdamW fused`` plus this is
    the floor of a two-pass step on a machine where memory is the bottleneck (the "vs two-pass floor"
    column); measured rather than derived from byte counts, because a read-only pass is not 3/7 of
    fused AdamW's time on every machine (0.54-0.78x on the 2-core EPYC of benchmarks/RESULTS.md)."""

    def __init__(self, params):
        self.params = [p for p in params if p.grad is not None]
        self.state = {p: {"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in self.params}

    def step(self):
        for p in self.params:
            p.grad.sum()
            self.state[p]["m"].sum()
            self.state[p]["v"].sum()


def _two_calls(optimizer):
    """The optimizer with its phases as separate kernel calls (``one_call_step = False``): the step before
    the one-call kernel (``hf_am.kernels.cpu.adamw_step``), measured beside it."""
    optimizer.one_call_step = False
    return optimizer


def _default_path(device: str, dtype: torch.dtype) -> str:
    """What AMAdamW(..) without foreach/fused runs on this device and dtype."""
    from hf_am.kernels import select_kernels

    probe = [torch.zeros(2, device=device, dtype=dtype)]
    kernels, reason = select_kernels([probe, probe])
    if kernels is not None:
        return f"compiled kernels ({kernels.__name__})"
    fallback = "per-tensor reference" if dtype not in (torch.float32, torch.float64) else "multi-tensor (foreach)"
    return f"{fallback}; compiled kernels unavailable: {reason}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 5, 25, 100], help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="fresh optimizers per candidate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--markdown", help="also write the table to this file (and the plot beside it, .png)")
    parser.add_argument("--plot", help="write the plot (step time against parameter count, per optimizer and path) here")
    parser.add_argument("--only", nargs="+", help="only candidates whose name contains one of these")
    parser.add_argument("--exclude", nargs="+", help="leave out candidates whose name contains one of these")
    parser.add_argument(
        "--deepspeed-cpu-adam", action="store_true",
        help="also step DeepSpeedCPUAdam, and every candidate on one flat tensor (a ZeRO partition) too",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    candidates: Dict[str, Callable] = {
        "AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "AM-AdamW tensor": lambda ps: AMAdamW(ps, lr=1e-3, scope="tensor"),
        "AM-AdamW tensor (two calls)": lambda ps: _two_calls(AMAdamW(ps, lr=1e-3, scope="tensor")),
        "AM-AdamW model": lambda ps: AMAdamW(ps, lr=1e-3, scope="model"),
        "AM-AdamW tensor, foreach": lambda ps: AMAdamW(ps, lr=1e-3, scope="tensor", foreach=True),
        "AM-AdamW model, foreach": lambda ps: AMAdamW(ps, lr=1e-3, scope="model", foreach=True),
        "SGD (foreach)": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True),
        "AM-SGD model": lambda ps: AMSGD(ps, lr=1e-3, scope="model"),
        "AM-SGD tensor": lambda ps: AMSGD(ps, lr=1e-3, scope="tensor"),
        "AM-SGD model, foreach": lambda ps: AMSGD(ps, lr=1e-3, scope="model", foreach=True),
    }
    if args.only:
        candidates = {k: v for k, v in candidates.items() if any(o in k for o in args.only)}
    if args.exclude:
        candidates = {k: v for k, v in candidates.items() if not any(o in k for o in args.exclude)}
    layouts = ["llama"]
    if args.deepspeed_cpu_adam:
        make_ds = _deepspeed_cpu_adam() if args.device == "cpu" and args.dtype == "float32" else None
        if make_ds is not None:
            candidates[DS_NAME] = make_ds
            candidates[PROBE_NAME] = ReadProbe
            layouts.append("flat")
    baseline_of = {name: ("SGD (foreach)" if "SGD" in name else "AdamW (foreach)") for name in candidates}
    show_ds = DS_NAME in candidates
    show_floor = PROBE_NAME in candidates
    rows = []
    points: Dict[tuple, List[tuple]] = {}  # (candidate, layout) -> [(params, median s, min s, max s)]
    header = (
        "| params | tensors | optimizer | step ms (range over rounds) | vs foreach baseline (range) "
        "| vs AdamW fused (range) |" + (" vs DeepSpeedCPUAdam (range) |" if show_ds else "")
        + (" vs two-pass floor (range) |" if show_floor else "") + " state MB | state vs baseline |"
    )
    rule = "|---|---|---|---|---|---|" + ("---|" if show_ds else "") + ("---|" if show_floor else "") + "---|---|"
    where = describe(args.device)
    print(where)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"AM default path here: {_default_path(args.device, dtype)}")
    print(header)
    print(rule)
    for size, layout in [(size, layout) for size in args.sizes for layout in layouts]:
        shapes = llama_like_shapes(int(size * 1e6))
        if layout == "flat":
            shapes = [(sum(int(torch.Size(s).numel()) for s in shapes),)]
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(args.device, dtype)) for s in shapes]
        grads = [torch.randn(s, generator=gen).to(args.device, dtype) * 1e-2 for s in shapes]
        n = sum(p.numel() for p in params)
        for p, g in zip(params, grads):
            p.grad = g
        medians: Dict[str, List[float]] = {}
        ratios: Dict[str, List[float]] = {}
        fused_ratios: Dict[str, List[float]] = {}
        ds_ratios: Dict[str, List[float]] = {}
        floor_ratios: Dict[str, List[float]] = {}  # over "AdamW fused" + probe of the same round
        nbytes: Dict[str, int] = {}
        for _ in range(args.rounds):
            round_medians, round_bytes = time_round(candidates, params, args.repeats)
            nbytes.update(round_bytes)
            for name, t in round_medians.items():
                medians.setdefault(name, []).append(t)
                base = round_medians.get(baseline_of[name])
                if base:
                    ratios.setdefault(name, []).append(t / base)
                if "AdamW (fused)" in round_medians and ("Adam" in name or name == PROBE_NAME):
                    fused_ratios.setdefault(name, []).append(t / round_medians["AdamW (fused)"])
                if DS_NAME in round_medians:
                    ds_ratios.setdefault(name, []).append(t / round_medians[DS_NAME])
                if {"AdamW (fused)", PROBE_NAME} <= round_medians.keys() and "AM-AdamW" in name:
                    floor = round_medians["AdamW (fused)"] + round_medians[PROBE_NAME]
                    floor_ratios.setdefault(name, []).append(t / floor)
        def spread_of(r):
            return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" if r else "n/a"

        for name in candidates:
            if name not in medians:
                if layout == "llama" or name == DS_NAME:
                    print(f"| {n/1e6:.1f}M | {len(shapes)} | {name} | n/a | | |" + (" |" if show_ds else "")
                          + (" |" if show_floor else "") + " | |")
                continue
            ts = medians[name]
            points.setdefault((name, layout), []).append((n, statistics.median(ts), min(ts), max(ts)))
            spread = f"{statistics.median(ts) * 1e3:.1f} ({min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})"
            ratio = spread_of(ratios.get(name))
            fratio = spread_of(fused_ratios.get(name))
            dcol = f" {spread_of(ds_ratios.get(name))} |" if show_ds else ""
            if show_floor:
                dcol += f" {spread_of(floor_ratios.get(name)) if name in floor_ratios else ''} |"
            base = baseline_of[name]
            sratio = f"{nbytes[name] / nbytes[base]:.3f}x" if base in nbytes else "n/a"
            row = (
                f"| {n/1e6:.1f}M | {len(shapes)} | {name} | {spread} | {ratio} | {fratio} |{dcol} "
                f"{nbytes[name]/2**20:.1f} | {sratio} |"
            )
            rows.append(row)
            print(row, flush=True)
        del params, grads
        gc.collect()
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(f"{where}\n\n`python benchmarks/optimizer_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
            fh.write(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}\n\n")
            fh.write(f"AM default path here: {_default_path(args.device, dtype)}\n\n")
            fh.write(header + "\n" + rule + "\n" + "\n".join(rows) + "\n")
    plot_path = args.plot or (str(Path(args.markdown).with_suffix(".png")) if args.markdown else None)
    if plot_path and points:
        plot(points, where, f"{args.device}, {args.dtype}", plot_path)
        print(f"wrote {plot_path}")
    return 0


def plot(points: Dict[tuple, List[tuple]], where: str, what: str, path: str) -> None:
    """Step time against parameter count, log-log: one line per optimizer and path, solid for the
    LLaMA-like tensors, dashed for one flat tensor (a ZeRO partition), whiskers over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = sorted({name for name, _ in points})
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    for (name, layout), pts in sorted(points.items()):
        pts = sorted(pts)
        xs = [p[0] for p in pts]
        ys = [p[1] * 1e3 for p in pts]
        err = [[(p[1] - p[2]) * 1e3 for p in pts], [(p[3] - p[1]) * 1e3 for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=2, color=colors[name],
                    ls="-" if layout == "llama" else "--", label=name + ("" if layout == "llama" else ", flat"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("step time, ms (median over rounds)")
    ax.set_title(f"optimizer step time ({what})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.text(0.01, 0.005, where, fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
