"""What AM-AdamW costs where users train: the real ``transformers.Trainer`` on a tiny LLaMA.

For each model size the Trainer trains the same model (same initial weights, same
synthetic token batches, no Hub access) with ``--optim am_adamw`` and with
``--optim adamw_torch`` (torch's AdamW, set to its multi-tensor ``foreach``
implementation, which torch does not pick by itself on CPU), and optionally
``adamw_torch_fused``; the runs alternate in one process (AB, BA, AB, ...) so that
every pair shares the machine's state.  A callback times each training step
(``on_step_begin`` to ``on_step_end``: forward, backward, clipping, optimizer,
scheduler, zero_grad) and its optimizer part (``on_pre_optimizer_step`` to
``on_optimizer_step``).  Per pair, AM-AdamW's extra optimizer time is
``median(AM optimizer ms) - median(baseline optimizer ms)``, reported as a share of
the baseline's median step; the table gives the median and range over pairs.

Sizes: ``tiny`` and ``small`` are ``recipes/configs/llama_tiny.json`` /
``llama_small.json``; ``w512`` is the width of ``llama_60m.json`` (hidden 512,
vocabulary 32000) with 2 layers instead of 8, so that it trains on a few CPU cores;
``60m`` is ``llama_60m.json`` itself (for a GPU).

On a GPU (``--device cuda``) the host's clock would time only the launches, so the
callback records CUDA events instead (no synchronisation inside the timed steps): a
step and its optimizer part are the device-timeline intervals between the events,
which include the device's idle waits for the host where the step is bound by
launches.  ``--bf16`` trains in the Trainer's bf16 mixed precision (float32
parameters and optimizer state, as the recipes do).  Every run also reports its
throughput, tokens per second of wall time over the timed steps (one synchronisation
before the first and after the last).

    python benchmarks/trainer_overhead.py                      # tiny, small, w512; 3 pairs
    python benchmarks/trainer_overhead.py --sizes tiny small --pairs 5 --steps 20
    python benchmarks/trainer_overhead.py --device cuda --bf16 --sizes 60m --fused --steps 200 --batch-size 64 --seq-len 256
    python benchmarks/trainer_overhead.py --quick --out-dir /tmp/x   # smoke test, < 60 s

Writes ``trainer_overhead_<tag>.md`` (the table, the machine, the command) and
``trainer_overhead_<tag>.png`` to ``--out-dir`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": ("llama_tiny.json", {}),
    "small": ("llama_small.json", {}),
    "w512": ("llama_60m.json", {"num_hidden_layers": 2}),
    "60m": ("llama_60m.json", {}),
}
FOREACH = "adamw_torch"  # run with foreach=True (see module docstring)


def machine(device: str) -> str:
    from _machine import describe  # benchmarks/_machine.py, next to this script

    return describe(device)


def model_config(size: str):
    from transformers import LlamaConfig

    name, overrides = SIZES[size]
    cfg = json.loads((ROOT / "recipes" / "configs" / name).read_text())
    cfg.pop("architectures", None)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


class TokenData:
    """Synthetic token sequences (uniform over the vocabulary), the same for every run."""

    def __init__(self, count: int, seq_len: int, vocab: int, seed: int = 0):
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (count, seq_len), generator=gen)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _HostClock:
    """Marks on the host's clock (CPU training: the work happens where it is launched)."""

    def mark(self):
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return end - start

    def sync(self) -> None:
        """Nothing to wait for: the host's work is done when it returns."""


class _DeviceClock:
    """Marks as CUDA events: recording one does not wait for the device, reading them after the run does."""

    def mark(self):
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3  # ms -> s; valid once the run has synchronised

    def sync(self) -> None:
        """Wait for the device (only at the ends of the timed window, for its wall time)."""
        import torch

        torch.cuda.synchronize()


def timing_callback(store: Dict[str, List], optim: str, clock, warmup: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Marks around each step and its optimizer part; wall time over the timed steps for throughput."""

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optim == FOREACH and optimizer is not None:
                inner = getattr(optimizer, "optimizer", optimizer)
                for group in inner.param_groups:
                    group["foreach"] = True  # torch picks the per-tensor loop on CPU otherwise
                store["optimizer_class"] = [f"{type(inner).__module__}.{type(inner).__name__}, foreach"]
            elif optimizer is not None:
                inner = getattr(optimizer, "optimizer", optimizer)
                store["optimizer_class"] = [f"{type(inner).__module__}.{type(inner).__name__}"]

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:  # the first timed step
                clock.sync()
                store["wall_start"] = [time.perf_counter()]
            self._t_step = clock.mark()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self._t_opt = clock.mark()

        def on_optimizer_step(self, args, state, control, **kwargs):
            store["optimizer_marks"].append((self._t_opt, clock.mark()))

        def on_step_end(self, args, state, control, **kwargs):
            store["step_marks"].append((self._t_step, clock.mark()))

        def on_train_end(self, args, state, control, **kwargs):
            clock.sync()
            store["wall_end"] = [time.perf_counter()]

    return StepTimer()


def train_once(size: str, optim: str, steps: int, warmup: int, batch: int, seq_len: int, workdir: str,
               device: str = "cpu", bf16: bool = False):
    """One Trainer run; returns (median step s, median optimizer s, tokens/s, params, optimizer class) over the timed steps."""
    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    clock = _DeviceClock() if device == "cuda" else _HostClock()

    config = model_config(size)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    data = TokenData((steps + warmup) * batch, seq_len, config.vocab_size)
    store: Dict[str, List] = {"step_marks": [], "optimizer_marks": []}
    args = TrainingArguments(
        output_dir=workdir,
        optim=optim,
        max_steps=steps + warmup,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
        weight_decay=0.1,
        warmup_steps=0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=bf16,
        dataloader_num_workers=0,
        seed=0,
    )
    callback = timing_callback(store, optim, clock, warmup)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    step = [clock.seconds(a, b) for a, b in store["step_marks"][warmup:]]
    opt = [clock.seconds(a, b) for a, b in store["optimizer_marks"][warmup:]]
    if len(step) != steps or len(opt) != steps:
        raise RuntimeError(f"{optim}: timed {len(step)} steps and {len(opt)} optimizer steps, expected {steps}")
    tokens_per_s = steps * batch * seq_len / (store["wall_end"][0] - store["wall_start"][0])
    cls = store.get("optimizer_class", ["?"])[0]
    del trainer, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(step), statistics.median(opt), tokens_per_s, params, cls


def spread(values: List[float], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    vals = [v * scale for v in values]
    return f"{fmt.format(statistics.median(vals))} ({fmt.format(min(vals))} to {fmt.format(max(vals))})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "w512"], choices=sorted(SIZES))
    parser.add_argument("--pairs", type=int, default=3, help="alternating runs per optimizer")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--fused", action="store_true", help="also run adamw_torch_fused in every round")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the Trainer trains (default cpu)")
    parser.add_argument("--bf16", action="store_true", help="the Trainer's bf16 mixed precision (needs --device cuda)")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default="cpu", help="file name suffix")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, 1 pair, 3 steps (< 60 s)")
    args = parser.parse_args(argv)
    if args.bf16 and args.device != "cuda":
        parser.error("--bf16 needs --device cuda (bf16 mixed precision on CPU is not what this measures)")
    if args.quick:
        args.sizes, args.pairs, args.steps, args.warmup, args.batch_size, args.seq_len = ["tiny"], 1, 3, 1, 2, 32

    import torch
    import transformers

    import hf_am  # noqa: F401  registers --optim am_adamw

    transformers.logging.set_verbosity_error()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch here")
    if args.threads:
        torch.set_num_threads(args.threads)
    baselines = [FOREACH] + (["adamw_torch_fused"] if args.fused else [])
    label = {"am_adamw": "am_adamw", FOREACH: "adamw_torch (foreach)", "adamw_torch_fused": "adamw_torch_fused"}
    command = "python benchmarks/trainer_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    where = machine(args.device)
    precision = "bf16 mixed precision" if args.bf16 else "float32"
    timing = "CUDA events" if args.device == "cuda" else "host clock"
    print(where)
    print(f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps after {args.warmup}, "
          f"{args.pairs} pairs; {args.device}, {precision}, timed by {timing}")

    results = {}  # size -> (params, optim -> list of (step s, optimizer s, tokens/s) per pair)
    info = {}
    with tempfile.TemporaryDirectory() as workdir:
        for size in args.sizes:
            runs: Dict[str, List[tuple]] = {o: [] for o in ["am_adamw"] + baselines}
            for pair in range(args.pairs):
                order = ["am_adamw"] + baselines
                if pair % 2:
                    order.reverse()
                for optim in order:
                    step, opt, tps, params, cls = train_once(
                        size, optim, args.steps, args.warmup, args.batch_size, args.seq_len, workdir,
                        args.device, args.bf16,
                    )  # fmt: skip
                    runs[optim].append((step, opt, tps))
                    info[(size, optim)] = cls
                    print(f"  {size} pair {pair} {label[optim]:22s} step {step*1e3:8.1f} ms  optimizer {opt*1e3:7.2f} ms"
                          f"  {tps:9.0f} tokens/s", flush=True)
            results[size] = (params, runs)

    header = (
        "| model | params | optimizer | step ms | optimizer ms | optimizer share of step "
        "| AM-AdamW extra optimizer time, share of this baseline's step | tokens/s | AM-AdamW tokens/s vs this |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|"
    rows = []
    shares: Dict[str, Dict[str, List[float]]] = {}
    for size, (params, runs) in results.items():
        for optim, vals in runs.items():
            steps, opts = [v[0] for v in vals], [v[1] for v in vals]
            extra = throughput = "(this is AM-AdamW)"
            if optim != "am_adamw":
                per_pair = [(a[1] - b[1]) / b[0] for a, b in zip(runs["am_adamw"], vals)]
                shares.setdefault(optim, {})[size] = per_pair
                extra = spread(per_pair, "{:+.2f}%", 100.0)
                throughput = spread([a[2] / b[2] for a, b in zip(runs["am_adamw"], vals)], "{:.1f}%", 100.0)
            own = [o / s for s, o in zip(steps, opts)]
            rows.append(
                f"| {size} | {params/1e6:.2f}M | {label[optim]} | {spread(steps, scale=1e3)} | "
                f"{spread(opts, '{:.2f}', 1e3)} | {spread(own, '{:.1f}%', 100.0)} | {extra} | "
                f"{spread([v[2] for v in vals], '{:.0f}')} | {throughput} |"
            )
    table = "\n".join([header, rule] + rows)
    print(table)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"trainer_overhead_{args.tag}.md"
    md.write_text(
        f"# Trainer step and optimizer time: AM-AdamW vs torch AdamW\n\n{where}\n\n"
        f"Command: `{command}`\n\n"
        f"{args.device}, {precision}, step and optimizer part timed by {timing}. "
        f"Batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps after {args.warmup} untimed, "
        f"{args.pairs} alternating pairs per model; medians over pairs with their range (each pair: the "
        f"median over its timed steps). Optimizer classes: "
        + "; ".join(f"{label[o]} = `{info[(s, o)]}`" for s, o in info if s == args.sizes[0])
        + ".\n\n"
        + table
        + "\n"
    )
    png = out / f"trainer_overhead_{args.tag}.png"
    plot(results, shares, label, png, where)
    print(f"wrote {md} and {png}")
    return 0


def plot(results, shares, label, path: Path, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    optims = list(next(iter(results.values()))[1])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(optims)
    for j, optim in enumerate(optims):
        xs = [i + (j - (len(optims) - 1) / 2) * width for i in range(len(sizes))]
        step = [statistics.median(v[0] for v in results[s][1][optim]) * 1e3 for s in sizes]
        opt = [statistics.median(v[1] for v in results[s][1][optim]) * 1e3 for s in sizes]
        rest = [a - b for a, b in zip(step, opt)]
        bars = ax1.bar(xs, rest, width, label=f"{label[optim]}: rest of step")
        ax1.bar(xs, opt, width, bottom=rest, color=bars.patches[0].get_facecolor(), alpha=0.45, hatch="//",
                label=f"{label[optim]}: optimizer")  # fmt: skip
    ax1.set_xticks(range(len(sizes)))
    ax1.set_xticklabels([f"{s}\n{results[s][0]/1e6:.1f}M" for s in sizes])
    ax1.set_ylabel("median step time (ms)")
    ax1.legend(fontsize=7)
    ax1.set_title("Trainer step (hatched: optimizer)")
    for j, (optim, per_size) in enumerate(shares.items()):
        xs = [i + (j - (len(shares) - 1) / 2) * 0.35 for i in range(len(sizes))]
        med = [statistics.median(per_size[s]) * 100 for s in sizes]
        lo = [m - min(per_size[s]) * 100 for m, s in zip(med, sizes)]
        hi = [max(per_size[s]) * 100 - m for m, s in zip(med, sizes)]
        ax2.bar(xs, med, 0.35, yerr=[lo, hi], capsize=4, label=f"vs {label[optim]}")
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set_xticks(range(len(sizes)))
    ax2.set_xticklabels(sizes)
    ax2.set_ylabel("% of the baseline's step")
    ax2.set_title("AM-AdamW extra optimizer time (median, range over pairs)")
    ax2.legend(fontsize=7)
    fig.suptitle(where, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
