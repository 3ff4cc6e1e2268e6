#!/usr/bin/env python3
"""The LLaMA study made fair: a learning-rate sweep for each optimizer, warmup and no warmup, seeds, variants.

The recipe (``recipes/pretrain_llama_c4.py``) at its CPU size ``tiny`` (LLaMA, 1.15M parameters,
local corpus and tokenizer, 16 x 256 tokens per step, cosine to 10 %), run through the scale
study's runner (``recipes/scale_study.py``: one subprocess per grid point, resumable). The grid:

  AdamW       --optim adamw_torch                                  at every rate of --rates
  AM-AdamW    --optim am_adamw (lam 0.1, beta_min 0, beta_max 0.9)  at every rate of --rates
  AM-Clip     --optim am_adamw --optim_args beta_min=B              at one rate (below)
  AM-Restart  --optim am_adamw --optim_args restart_threshold=T     at one rate (below)

each with warmup (10 % linear) and without, over --seeds. The variants are the paper's
Section 4.5 ones; the paper does not state B and T, the defaults here (0.5, 0.5) are our choice.
They run at AM-AdamW's best rate of the same warmup setting (lowest mean over seeds, known once
the AdamW/AM-AdamW sweep has finished: the study runs that sweep first), or at --variant-rate.
Reported: final eval loss (mean +- std over seeds) per optimizer, rate and warmup; each
optimizer at its own best rate (lowest mean) and both at the same rates; and the paper's three
claims, each "held" or "not held" by the rule printed next to it, with the numbers.

    python experiments/llama_study.py --quick --out /tmp/llama   # ~1-2 min (tests)
    python experiments/llama_study.py                             # full grid (60 runs), 1-2 h on 2 cores

Writes results.json, results.csv, results.md, final_loss_vs_lr.png, eval_curves.png and
beta.png into --out; the runs themselves live in --out/runs/ (an interrupted study resumes).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "recipes"))
import _common as C  # noqa: E402
import scale_study  # noqa: E402

NAME = "llama_study"
VARIANTS = ("warmup", "no_warmup")
FAMILY_COLORS = {"AdamW": "tab:red", "AM-AdamW": "tab:blue", "AM-Clip": "tab:green", "AM-Restart": "tab:purple"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Writes JSON, CSV, Markdown and PNG into --out.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="small settings for tests (12 steps, rates 1e-2 3e-2, seed 0, small eval)")
    p.add_argument("--out", default=None, help=f"output folder (default experiments/results/{NAME}/)")
    p.add_argument("--size", default="tiny", help="recipe --model_size (default tiny)")
    p.add_argument("--rates", type=float, nargs="+", default=None,
                   help="peak learning rates of AdamW and AM-AdamW (default 1e-3 3e-3 1e-2 3e-2; quick 1e-2 3e-2)")
    p.add_argument("--variant-rate", type=float, default=None,
                   help="the one rate of AM-Clip and AM-Restart (default: AM-AdamW's best rate of the same warmup setting)")
    p.add_argument("--clip-beta-min", type=float, default=0.5, help="AM-Clip's beta_min (default 0.5)")
    p.add_argument("--restart-threshold", type=float, default=0.5, help="AM-Restart's threshold (default 0.5)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; quick 0)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the size's preset; quick 12)")
    p.add_argument("--protocol", default="hf_am", help="recipe --protocol (default hf_am; see docs/recipes.md)")
    p.add_argument("--jobs", type=int, default=2, help="runs at the same time, CPU threads split (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--plot-only", action="store_true", help="rebuild tables and plots from the finished runs only")
    args = p.parse_args(argv)
    args.rates = args.rates or ([1e-2, 3e-2] if args.quick else [1e-3, 3e-3, 1e-2, 3e-2])
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    if args.quick and args.steps is None:
        args.steps = 12
    return args


# ---------------------------------------------------------------------------- the grid
SWEPT = ("AdamW", "AM-AdamW")  # over every rate of --rates; the variants run at one rate per warmup setting


def families(args) -> list[dict]:
    return [
        dict(family="AdamW", optim="adamw_torch", optim_args=None),
        dict(family="AM-AdamW", optim="am_adamw", optim_args=None),
        dict(family="AM-Clip", optim="am_adamw", optim_args=f"beta_min={args.clip_beta_min}"),
        dict(family="AM-Restart", optim="am_adamw", optim_args=f"restart_threshold={args.restart_threshold}"),
    ]


def grid(args, variant_rates: dict | None) -> list[dict]:
    """The sweep of AdamW and AM-AdamW, then (given ``variant_rates``: warmup setting -> rate) the
    variants. Seeds outermost, so that a partial study has every condition at the first seeds."""
    runs = []
    for seed in args.seeds:
        for fam in families(args):
            swept = fam["family"] in SWEPT
            if not swept and variant_rates is None:
                continue
            for variant in VARIANTS:
                for rate in (args.rates if swept else [variant_rates[variant]]):
                    name = f"{args.size}-{fam['family'].lower()}-lr{rate:g}-{variant}-s{seed}"
                    runs.append(dict(size=args.size, optim=fam["optim"], optim_args=fam["optim_args"],
                                     family=fam["family"], learning_rate=rate, variant=variant, seed=seed,
                                     name=name))
    return runs


def runner_args(args, out: Path):
    """The scale study's options for these runs (its parser, so that every default is the recipe's)."""
    extra = ["--protocol", args.protocol]
    if args.quick:  # a short run still evaluates twice and logs beta_t
        extra += ["--eval_steps", "6", "--logging_steps", "2", "--eval_tokens", "4096"]
    # --optims/--variants/--seeds only satisfy the parser: the grid is ours (grid() above)
    argv = ["--sizes", args.size, "--optims", "adamw_torch", "--variants", "warmup", "--seeds", "0",
            "--output_dir", str(out), "--dataset", "local", "--jobs", str(args.jobs),
            "--extra_args", " ".join(extra)]
    if args.steps:
        argv += ["--max_steps", str(args.steps)]
    if args.no_progress:
        argv.append("--no_progress")
    return scale_study.parse_args(argv)


# ---------------------------------------------------------------------------- analysis
def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values) or not finite:
        return float("inf"), float("nan")
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def aggregate(rows: list[dict]) -> list[dict]:
    """One cell per (family, rate, variant): mean +- std of the final eval loss over seeds."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "done":
            cells.setdefault((r["family"], r["learning_rate"], r["variant"]), []).append(r)
    out = []
    order = lambda kv: (list(FAMILY_COLORS).index(kv[0][0]), VARIANTS.index(kv[0][2]), kv[0][1])  # noqa: E731
    for (family, rate, variant), rs in sorted(cells.items(), key=order):
        losses = [float("inf") if r["diverged"] else float(r["final_eval_loss"]) for r in rs]
        mean, std = mean_std(losses)
        out.append(dict(family=family, learning_rate=rate, variant=variant, seeds=len(rs), mean=mean, std=std,
                        diverged=sum(int(r["diverged"]) for r in rs),
                        beta_applied=_avg([r.get("am_beta_applied:avg") for r in rs]),
                        restarts=_avg([r.get("am_restarts:last") for r in rs])))
    return out


def _avg(values) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.fmean(vals) if vals else None


def best_rate(cells: list[dict], family: str, variant: str) -> dict | None:
    candidates = [c for c in cells if c["family"] == family and c["variant"] == variant]
    return min(candidates, key=lambda c: c["mean"]) if candidates else None


def _diff(a: dict, b: dict) -> tuple[float, float]:
    """(a - b, the combined standard deviation of the two means' seeds)."""
    return a["mean"] - b["mean"], math.sqrt((a["std"] or 0.0) ** 2 + (b["std"] or 0.0) ** 2)


def claims(cells: list[dict]) -> list[dict]:
    """The paper's three claims, each held or not by a stated rule on the cells' numbers."""
    def cell_text(c):
        return f"{c['family']} {c['variant']} lr {c['learning_rate']:g}: {C.fmt(c['mean'], 4)} ± {C.fmt(c['std'], 2)}"

    out = []
    am_nw, adamw_w = best_rate(cells, "AM-AdamW", "no_warmup"), best_rate(cells, "AdamW", "warmup")
    adamw_nw = best_rate(cells, "AdamW", "no_warmup")
    if am_nw and adamw_w:
        d, s = _diff(am_nw, adamw_w)
        out.append(dict(claim="AM-AdamW without warmup ≈ AdamW with warmup (each at its best rate)",
                        rule="held if AM-AdamW(no warmup) - AdamW(warmup) <= the combined seed std",
                        numbers=f"{cell_text(am_nw)} vs {cell_text(adamw_w)}; difference {d:+.4f}, std {s:.4f}",
                        held=bool(d <= s)))
    if adamw_nw and adamw_w:
        d, s = _diff(adamw_nw, adamw_w)
        out.append(dict(claim="AdamW without warmup degrades (each at its best rate)",
                        rule="held if AdamW(no warmup) - AdamW(warmup) > the combined seed std",
                        numbers=f"{cell_text(adamw_nw)} vs {cell_text(adamw_w)}; difference {d:+.4f}, std {s:.4f}",
                        held=bool(d > s)))
    for variant in VARIANTS:
        am, base = best_rate(cells, "AM-AdamW", variant), best_rate(cells, "AdamW", variant)
        if am and base:
            d, s = _diff(am, base)
            out.append(dict(claim=f"AM-AdamW beats AdamW, {variant.replace('_', ' ')} (each at its best rate)",
                            rule="held if AdamW - AM-AdamW > the combined seed std",
                            numbers=f"{cell_text(am)} vs {cell_text(base)}; difference {d:+.4f}, std {s:.4f}",
                            held=bool(-d > s)))
        same = {c["learning_rate"]: c for c in cells if c["family"] == "AdamW" and c["variant"] == variant}
        wins = [(c["learning_rate"], c["mean"] - same[c["learning_rate"]]["mean"]) for c in cells
                if c["family"] == "AM-AdamW" and c["variant"] == variant and c["learning_rate"] in same]
        if wins:
            text = ", ".join(f"lr {lr:g}: {d:+.4f}" if math.isfinite(d) else f"lr {lr:g}: "
                             + ("AdamW diverged" if d < 0 else "AM diverged" if d > 0 else "both diverged")
                             for lr, d in wins)
            out.append(dict(claim=f"AM-AdamW beats AdamW at the same rate, {variant.replace('_', ' ')}",
                            rule="held if AM-AdamW's mean is lower at every rate of the grid",
                            numbers=f"AM - AdamW: {text}", held=all(d < 0 for _, d in wins)))
    return out


# ---------------------------------------------------------------------------- output
def markdown(args, rows: list[dict], cells: list[dict], found: list[dict], grid_size: int, variant_rates) -> str:
    if args.variant_rate is not None:
        variant_text = f"{args.variant_rate:g}"
    elif variant_rates:
        variant_text = "AM-AdamW's best rate of the same warmup setting (" + ", ".join(
            f"{v.replace('_', ' ')} {r:g}" for v, r in variant_rates.items()) + ")"
    else:
        variant_text = "AM-AdamW's best rate (not run: the sweep did not finish)"
    done = sum(r.get("status") == "done" for r in rows)
    steps = next((r["steps"] for r in rows if r.get("status") == "done"), args.steps)
    lines = [
        "# LLaMA study: learning-rate sweep, warmup and no warmup, variants", "",
        f"Recipe size `{args.size}`, protocol `{args.protocol}`, {steps} steps per run, seeds "
        f"{' '.join(map(str, args.seeds))}. Grid: AdamW and AM-AdamW at rates {' '.join(f'{r:g}' for r in args.rates)}, "
        f"AM-Clip (beta_min {args.clip_beta_min:g}) and AM-Restart (threshold {args.restart_threshold:g}) at "
        f"{variant_text}; x {{warmup, no warmup}} x {len(args.seeds)} seeds = {grid_size} runs "
        f"({done} finished). A diverged run (non-finite loss, or final loss >= log(vocab)) counts as inf.", "",
        "## Final eval loss (mean ± std over seeds)", "",
    ]
    table = [[c["family"], f"{c['learning_rate']:g}", c["variant"], c["seeds"], C.fmt(c["mean"], 4),
              C.fmt(c["std"], 2), f"{c['diverged']}/{c['seeds']}",
              C.fmt(c["beta_applied"]) if c["beta_applied"] is not None else "-",
              C.fmt(c["restarts"]) if c["restarts"] is not None else "-"] for c in cells]
    lines.append(C.markdown_table(["optimizer", "lr", "warmup", "seeds", "final eval loss", "std", "diverged",
                                   "applied coefficient (mean)", "restarts"], table))
    lines += ["## Each at its best rate", ""]
    best = []
    for fam in FAMILY_COLORS:
        for variant in VARIANTS:
            c = best_rate(cells, fam, variant)
            if c:
                best.append([fam, variant, f"{c['learning_rate']:g}", C.fmt(c["mean"], 4), C.fmt(c["std"], 2)])
    lines.append(C.markdown_table(["optimizer", "warmup", "best lr", "final eval loss", "std"], best))
    lines += ["## The paper's claims", ""]
    lines.append(C.markdown_table(["claim", "held?", "numbers", "rule"],
                                  [[f["claim"], "held" if f["held"] else "**not held**", f["numbers"], f["rule"]]
                                   for f in found]))
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def plot(results: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    cells = results["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    finite = [c["mean"] for c in cells if math.isfinite(c["mean"])]
    ceiling = max(finite) + 0.3 if finite else 10.0
    for ax, variant in zip(axes, ("warmup", "no_warmup")):
        for fam, color in FAMILY_COLORS.items():
            cs = sorted((c for c in cells if c["family"] == fam and c["variant"] == variant),
                        key=lambda c: c["learning_rate"])
            if not cs:
                continue
            xs = [c["learning_rate"] for c in cs]
            ys = [c["mean"] if math.isfinite(c["mean"]) else ceiling for c in cs]
            es = [c["std"] if math.isfinite(c["std"]) else 0.0 for c in cs]
            style = dict(marker="o", ls="-") if len(cs) > 1 else dict(marker="s", ls="none", ms=8)
            ax.errorbar(xs, ys, yerr=es, color=color, label=fam, capsize=3, **style)
            for c, y in zip(cs, ys):
                if not math.isfinite(c["mean"]):
                    ax.annotate("diverged", (c["learning_rate"], y), color=color, fontsize=7, ha="center",
                                va="bottom")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_title(variant.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final eval loss (mean ± std over seeds)")
    axes[0].legend(fontsize=8)
    C.save_figure(fig, out / "final_loss_vs_lr.png")

    curves = results["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    figb, axb = plt.subplots(figsize=(6, 4))
    for ax, variant in zip(axes, ("warmup", "no_warmup")):
        for fam, color in FAMILY_COLORS.items():
            key = f"{fam}|{variant}"
            if key not in curves:
                continue
            c = curves[key]
            ax.plot(c["eval"]["t"], c["eval"]["v"], color=color, label=f"{fam} lr {c['learning_rate']:g}")
            if c.get("beta"):
                axb.plot(c["beta"]["t"], c["beta"]["v"], color=color, ls="-" if variant == "warmup" else "--",
                         label=f"{fam} {variant} lr {c['learning_rate']:g}")
        ax.set_xlabel("tokens")
        ax.set_title(f"{variant.replace('_', ' ')}, each at its best rate (seed {results['settings']['seeds'][0]})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("eval loss")
    axes[0].legend(fontsize=8)
    C.save_figure(fig, out / "eval_curves.png")
    axb.set_xlabel("tokens")
    axb.set_ylabel("applied momentum coefficient (mean over tensors)")
    axb.grid(alpha=0.3)
    axb.legend(fontsize=7)
    C.save_figure(figb, out / "beta.png")


def best_curves(rows: list[dict], summaries: dict, cells: list[dict], seed: int) -> dict:
    """Eval loss and applied coefficient over tokens for each family at its best rate, one seed."""
    curves = {}
    for fam in FAMILY_COLORS:
        for variant in VARIANTS:
            c = best_rate(cells, fam, variant)
            run = next((r for r in rows if c and r.get("status") == "done" and r["family"] == fam
                        and r["variant"] == variant and r["learning_rate"] == c["learning_rate"]
                        and r["seed"] == seed), None)
            if run is None:
                continue
            s = summaries[run["run"]]
            ev = scale_study.eval_curve(s)
            entry = {"learning_rate": c["learning_rate"], "eval": {"t": [t for t, _ in ev], "v": [v for _, v in ev]}}
            beta = scale_study.am_series(s).get("am_beta_applied")
            if beta:
                entry["beta"] = {"t": [t for t, _ in beta], "v": [v for _, v in beta]}
            curves[f"{fam}|{variant}"] = entry
    return curves


def _execute(args, study, out: Path, runs: list[dict]) -> list[str]:
    todo = [r for r in runs if not (out / "runs" / r["name"] / scale_study.SUMMARY_FILE).exists()]
    print(f"[llama_study] {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run", flush=True)
    return scale_study.run_locally(study, todo, out) if todo and not args.plot_only else []


def _collect(out: Path, runs: list[dict]):
    rows, summaries = scale_study.collect(out, runs, None)
    by_name = {r["name"]: r for r in runs}
    for row in rows:
        row["family"] = by_name[row["run"]]["family"]
        row["learning_rate"] = by_name[row["run"]]["learning_rate"]
        row["optim_args"] = by_name[row["run"]]["optim_args"] or ""
    return rows, summaries


def choose_variant_rates(args, cells: list[dict]) -> dict | None:
    """Warmup setting -> the rate of AM-Clip and AM-Restart (None when AM-AdamW has no finished cell)."""
    if args.variant_rate is not None:
        return {variant: args.variant_rate for variant in VARIANTS}
    best = {variant: best_rate(cells, "AM-AdamW", variant) for variant in VARIANTS}
    if any(b is None for b in best.values()):
        return None
    return {variant: b["learning_rate"] for variant, b in best.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    timer = C.run_timer()
    out = C.prepare_out(args.out, NAME)
    study = runner_args(args, out)
    sweep = grid(args, None)
    failures = _execute(args, study, out, sweep)  # the sweep first: it decides the variants' rates
    rows, _ = _collect(out, sweep)
    variant_rates = choose_variant_rates(args, aggregate(rows))
    runs = grid(args, variant_rates)
    if variant_rates is not None:
        print(f"[llama_study] AM-Clip and AM-Restart at {variant_rates}", flush=True)
        failures += _execute(args, study, out, [r for r in runs if r["family"] not in SWEPT])
    rows, summaries = _collect(out, runs)
    cells = aggregate(rows)
    found = claims(cells)
    settings = {k: v for k, v in vars(args).items()}
    results = {"settings": settings, "grid_size": len(runs), "variant_rates": variant_rates, "failed": failures,
               "cells": cells, "claims": found, "runs": rows,
               "curves": best_curves(rows, summaries, cells, args.seeds[0]) if args.seeds else {},
               "environment": C.environment()}
    write_csv(rows, out / "results.csv")
    text = markdown(args, rows, cells, found, len(runs), variant_rates)
    C.finish(out, results, text + "\n", plot, timer)
    print(text)
    return 0 if variant_rates is not None and all(r.get("status") == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
