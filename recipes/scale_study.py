#!/usr/bin/env python
"""Scale study: model sizes x optimizers x {warmup, no_warmup} x seeds.

Each grid point is one run of ``pretrain_llama_c4.py`` in its own directory
(``<output_dir>/runs/<size>-<optim>-<variant>-s<seed>``), started as a subprocess on this
machine (``--launcher python``) or across devices (``--launcher accelerate`` with
``--accelerate_config``, or ``--launcher torchrun --nproc_per_node N``), or submitted as one
SLURM batch job per grid point (``--launcher slurm``, options ``--slurm-*``; see ``_slurm.py``).
Finished runs (those with a ``run_summary.json``) are skipped, so an interrupted study resumes
where it stopped. At the end (or with ``--report_only``) the runs are collected into

* ``results.csv``: one row per run (final / best eval loss and perplexity, eval loss at
  fixed token counts, divergence events, ``am_*`` beta_t statistics, wall time);
* ``results.md``: the table averaged over seeds, then the per-run table;
* ``plots/``: eval and train loss vs tokens per size, final loss vs model size per
  optimizer/variant, and beta_t over training for the AM runs.

The main job on a fresh machine (offline, 2 CPU cores, about 10 minutes)::

    HF_HUB_OFFLINE=1 python recipes/scale_study.py --preset demo
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent
if str(RECIPES_DIR) not in sys.path:  # _slurm.py, next to this file
    sys.path.insert(0, str(RECIPES_DIR))

import _slurm  # noqa: E402
RECIPE = RECIPES_DIR / "pretrain_llama_c4.py"
SUMMARY_FILE = "run_summary.json"
PROGRESS_FILE = "progress.jsonl"
FAILED_FILE = "failed.json"

# Grids. Learning rates: the same peak for both optimizers (the study's premise). The tiny
# CPU size uses a high peak LR so that the effect of warmup is visible at this scale.
PRESETS: dict[str, dict] = {
    "demo": dict(sizes=["tiny"], optims=["adamw_torch", "am_adamw"], variants=["warmup", "no_warmup"], seeds=[0],
                 output_dir="study_runs/demo", jobs=2),
    "small": dict(sizes=["tiny"], optims=["adamw_torch", "am_adamw"], variants=["warmup", "no_warmup"],
                  seeds=[0, 1, 2], output_dir="study_runs/small", jobs=2),
    "cpu-scales": dict(sizes=["tiny", "small"], optims=["adamw_torch", "am_adamw"],
                       variants=["warmup", "no_warmup"], seeds=[0, 1, 2], output_dir="study_runs/cpu_scales",
                       jobs=2),
    "paper": dict(sizes=["60m", "130m", "350m", "1b"], optims=["adamw_torch", "am_adamw"],
                  variants=["warmup", "no_warmup"], seeds=[0], output_dir="study_runs/paper"),
}
OPTIM_LABELS = {"adamw_torch": "AdamW", "am_adamw": "AM-AdamW", "am_sgd": "AM-SGD", "sgd": "SGD"}
SIZE_ORDER = ["tiny", "small", "60m", "130m", "350m", "1b"]


# --------------------------------------------------------------------------------------
# grid and launching
# --------------------------------------------------------------------------------------


def _csv_list(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x.strip()]


def run_name(size: str, optim: str, variant: str, seed: int) -> str:
    return f"{size}-{optim}-{variant}-s{seed}"


def grid(args) -> list[dict]:
    runs = []
    # seeds outermost: after each seed, every condition has a run to compare
    for seed in args.seeds:
        for size in args.sizes:
            for optim in args.optims:
                for variant in args.variants:
                    runs.append(dict(size=size, optim=optim, variant=variant, seed=seed,
                                     name=run_name(size, optim, variant, seed)))
    return runs


def launcher_prefix(args) -> list[str]:
    if args.launcher == "python":
        return [sys.executable]
    if args.launcher == "accelerate":
        cmd = ["accelerate", "launch"]
        if args.accelerate_config:
            cmd += ["--config_file", args.accelerate_config]
        if args.nproc_per_node:
            cmd += ["--num_processes", str(args.nproc_per_node)]
        return cmd
    if args.launcher == "torchrun":
        return ["torchrun", "--standalone", "--nproc_per_node", str(args.nproc_per_node or 1)]
    if args.launcher == "slurm":  # the job script puts python / torchrun / srun in front
        return []
    raise ValueError(args.launcher)


def run_command(args, run: dict, run_dir: Path) -> list[str]:
    cmd = launcher_prefix(args) + [
        str(RECIPE),
        "--model_size", run["size"],
        "--variant", run["variant"],
        "--optim", run["optim"],
        "--seed", str(run["seed"]),
        "--output_dir", str(run_dir),
        "--disable_tqdm", "true",
    ]
    if args.dataset:
        cmd += ["--dataset", args.dataset]
    # a grid point may carry its own rate and optimizer arguments (experiments/llama_study.py)
    learning_rate = run.get("learning_rate", args.learning_rate)
    if learning_rate is not None:
        cmd += ["--learning_rate", str(learning_rate)]
    if args.max_steps is not None:
        cmd += ["--max_steps", str(args.max_steps)]
    optim_args = run.get("optim_args", args.am_optim_args if run["optim"].startswith("am_") else None)
    if optim_args:
        cmd += ["--optim_args", optim_args]
    cmd += shlex.split(args.extra_args or "")
    return cmd


def optim_available(name: str) -> str | None:
    """None if ``--optim name`` is accepted by TrainingArguments after ``import hf_am``, else why not."""
    code = (
        "import sys, tempfile; sys.path.append(%r)\n"
        "try:\n    import hf_am\nexcept Exception as e:\n    print('import hf_am failed:', e)\n"
        "from transformers import TrainingArguments\n"
        "TrainingArguments(output_dir=tempfile.mkdtemp(), optim=%r, report_to='none')\n"
    ) % (str(RECIPES_DIR.parent), name)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ["unknown error"])[-1]


def _read_progress(path: Path) -> tuple[int, int, float | None]:
    step, total, loss = 0, 0, None
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                step, total = row.get("step", step), row.get("max_steps", total)
                if "loss" in row:
                    loss = row["loss"]
    except FileNotFoundError:
        pass
    return step, total, loss


def execute(args, run: dict, run_dir: Path, position: int = 1) -> bool:
    from tqdm.auto import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    (run_dir / PROGRESS_FILE).unlink(missing_ok=True)
    cmd = run_command(args, run, run_dir)
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    start = time.time()
    with open(run_dir / "train.log", "w") as log, tqdm(
        total=None, desc=f"  {run['name']}", unit="step", position=position, leave=False,
        disable=args.no_progress, dynamic_ncols=True,
    ) as bar:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(RECIPES_DIR.parent))
        while proc.poll() is None:
            time.sleep(1.0)
            step, total, loss = _read_progress(run_dir / PROGRESS_FILE)
            if total and bar.total != total:
                bar.total = total
            bar.n = step
            if loss is not None:
                bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
            bar.refresh()
    ok = proc.returncode == 0 and (run_dir / SUMMARY_FILE).exists()
    if not ok:
        tail = (run_dir / "train.log").read_text(errors="replace").splitlines()[-30:]
        (run_dir / FAILED_FILE).write_text(json.dumps(
            {"returncode": proc.returncode, "command": cmd, "wall_seconds": time.time() - start, "log_tail": tail},
            indent=1))
    return ok


# --------------------------------------------------------------------------------------
# collection
# --------------------------------------------------------------------------------------


def _fmt_tokens(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.3g}{unit}"
    return str(int(n))


def eval_curve(summary: dict) -> list[tuple[int, float]]:
    tps = summary["tokens_per_step"]
    seen, curve = set(), []
    for row in summary["log_history"]:
        if "eval_loss" in row and row.get("step") not in seen:
            seen.add(row.get("step"))
            curve.append((row["step"] * tps, float(row["eval_loss"])))
    return curve


def train_curve(summary: dict) -> list[tuple[int, float]]:
    tps = summary["tokens_per_step"]
    return [(row["step"] * tps, float(row["loss"])) for row in summary["log_history"] if "loss" in row]


def am_series(summary: dict) -> dict[str, list[tuple[int, float]]]:
    """Every logged key starting with ``am_`` (beta_t statistics of the AM optimizers)."""
    tps = summary["tokens_per_step"]
    series: dict[str, list] = defaultdict(list)
    for row in summary["log_history"]:
        for key, value in row.items():
            if key.startswith("am_") and isinstance(value, (int, float)):
                series[key].append((row["step"] * tps, float(value)))
    return dict(series)


def interp(curve: list[tuple[int, float]], x: float) -> float:
    if not curve or x < curve[0][0] or x > curve[-1][0]:
        return float("nan")
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


def checkpoints_for(summaries: list[dict], explicit: list[float] | None) -> list[int]:
    if explicit:
        return sorted(int(x) for x in explicit)
    points = set()
    for s in summaries:
        budget = s["tokens_per_step"] * s["max_steps"]
        points.update(int(budget * f) for f in (0.1, 0.25, 0.5))
    return sorted(points)


def _ppl(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf")


def collect(out_dir: Path, runs: list[dict], loss_at_tokens: list[float] | None) -> tuple[list[dict], dict]:
    summaries = {}
    for run in runs:
        path = out_dir / "runs" / run["name"] / SUMMARY_FILE
        if path.exists():
            summaries[run["name"]] = json.loads(path.read_text())
    points = checkpoints_for(list(summaries.values()), loss_at_tokens)
    rows = []
    for run in runs:
        s = summaries.get(run["name"])
        row = {"run": run["name"], "size": run["size"], "optim": run["optim"], "variant": run["variant"],
               "seed": run["seed"]}
        if s is None:
            failed = out_dir / "runs" / run["name"] / FAILED_FILE
            submitted = out_dir / "runs" / run["name"] / _slurm.JOB_FILE
            row["status"] = "failed" if failed.exists() else "submitted" if submitted.exists() else "missing"
            rows.append(row)
            continue
        curve = eval_curve(s)
        events = s.get("divergence_events", [])
        vocab = s["model_config"]["vocab_size"]
        non_finite = sum(e["kind"] == "non_finite" for e in events)
        row.update(
            status="done",
            n_params=s["n_params"],
            learning_rate=s["learning_rate"],
            warmup=s["warmup_steps"],
            steps=s["max_steps"],
            tokens=s["max_steps"] * s["tokens_per_step"],
            final_eval_loss=s["final_eval_loss"],
            final_ppl=_ppl(s["final_eval_loss"]),
            best_eval_loss=s["best_eval_loss"],
            best_ppl=_ppl(s["best_eval_loss"]),
            next_token_acc=s.get("final_next_token_accuracy"),
            loss_spikes=sum(e["kind"] == "spike" for e in events),
            non_finite=non_finite,
            diverged=int(non_finite > 0 or not math.isfinite(s["final_eval_loss"])
                         or s["final_eval_loss"] >= math.log(vocab)),
            wall_s=round(s["wall_seconds"], 1),
        )
        for p in points:
            row[f"eval_loss@{_fmt_tokens(p)}"] = interp(curve, p)
        for key, series in sorted(am_series(s).items()):
            vals = [v for _, v in series if math.isfinite(v)]
            if vals:
                row[f"{key}:avg"] = statistics.fmean(vals)
                row[f"{key}:last"] = vals[-1]
        rows.append(row)
    return rows, summaries


def write_csv(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not values:
        return "–"
    if any(math.isinf(v) for v in values):
        return "inf"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _sort_key(key):
    size, optim, variant = key
    return (SIZE_ORDER.index(size) if size in SIZE_ORDER else 99, size, variant != "warmup", optim)


def markdown(rows: list[dict]) -> str:
    done = [r for r in rows if r.get("status") == "done"]
    loss_cols = sorted({k for r in done for k in r if k.startswith("eval_loss@")},
                       key=lambda k: float(r_tokens(k)))
    am_cols = sorted({k for r in done for k in r if k.startswith("am_") and k.endswith(":avg")})
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in done:
        groups[(r["size"], r["optim"], r["variant"])].append(r)
    head = (["size", "params", "optimizer", "variant", "seeds", "final eval loss", "final ppl", "best eval loss"]
            + [c.replace("eval_loss@", "loss @ ") for c in loss_cols] + ["spikes", "diverged"] + am_cols)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(groups, key=_sort_key):
        g = groups[key]
        cells = [key[0], f"{g[0]['n_params'] / 1e6:.1f}M", OPTIM_LABELS.get(key[1], key[1]), key[2], str(len(g)),
                 _mean_std([r["final_eval_loss"] for r in g]), _mean_std([r["final_ppl"] for r in g]),
                 _mean_std([r["best_eval_loss"] for r in g])]
        cells += [_mean_std([r.get(c, float("nan")) for r in g]) for c in loss_cols]
        cells += [str(sum(r["loss_spikes"] for r in g)), f"{sum(r['diverged'] for r in g)}/{len(g)}"]
        cells += [_mean_std([r.get(c, float("nan")) for r in g]) for c in am_cols]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    missing = [r for r in rows if r.get("status") != "done"]
    if missing:
        text += "\n\nNot finished: " + ", ".join(f"{r['run']} ({r['status']})" for r in missing)
    return text


def r_tokens(col: str) -> float:
    text = col.split("@", 1)[1]
    scale = {"k": 1e3, "M": 1e6, "B": 1e9}.get(text[-1], 1)
    return float(text[:-1] if text[-1] in "kMB" else text) * scale


def per_run_markdown(rows: list[dict]) -> str:
    head = ["run", "final eval loss", "final ppl", "best eval loss", "spikes", "diverged", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") != "done":
            lines.append(f"| {r['run']} | {r['status']} | | | | | |")
            continue
        lines.append(f"| {r['run']} | {r['final_eval_loss']:.4f} | {r['final_ppl']:.2f} | {r['best_eval_loss']:.4f} "
                     f"| {r['loss_spikes']} | {r['diverged']} | {r['wall_s']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------

_COLORS = {"adamw_torch": "tab:blue", "am_adamw": "tab:red", "am_sgd": "tab:green", "sgd": "tab:gray"}
_STYLES = {"warmup": "-", "no_warmup": "--"}


def _label(optim: str, variant: str) -> str:
    return f"{OPTIM_LABELS.get(optim, optim)}, {variant.replace('_', '-')}"


def plot(rows: list[dict], summaries: dict, plot_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    done = [r for r in rows if r.get("status") == "done"]
    by_size: dict[str, list[dict]] = defaultdict(list)
    for r in done:
        by_size[r["size"]].append(r)

    for kind, getter in (("eval", eval_curve), ("train", train_curve)):
        for size, group in by_size.items():
            fig, ax = plt.subplots(figsize=(7, 4.5))
            labelled = set()
            for r in sorted(group, key=lambda r: (r["optim"], r["variant"], r["seed"])):
                xs, ys = zip(*getter(summaries[r["run"]])) if getter(summaries[r["run"]]) else ((), ())
                label = _label(r["optim"], r["variant"])
                ax.plot(xs, ys, _STYLES.get(r["variant"], ":"), color=_COLORS.get(r["optim"]),
                        alpha=0.85, lw=1.2, label=None if label in labelled else label)
                labelled.add(label)
            ax.set_xlabel("training tokens")
            ax.set_ylabel(f"{kind} loss")
            ax.set_title(f"{kind} loss vs tokens, size {size} (one line per seed)")
            finite = [y for r in group for _, y in getter(summaries[r["run"]]) if math.isfinite(y)]
            if finite:
                lo = min(finite)
                ax.set_ylim(lo - 0.1, min(max(finite), lo + 4.0) + 0.1)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = plot_dir / f"{kind}_loss_vs_tokens_{size}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    combos: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in done:
        combos[(r["optim"], r["variant"])][r["n_params"]].append(r["final_eval_loss"])
    for (optim, variant), points in sorted(combos.items()):
        xs = sorted(points)
        means = [statistics.fmean(points[x]) for x in xs]
        errs = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, means, yerr=errs, fmt="o" + _STYLES.get(variant, ":"), color=_COLORS.get(optim),
                    capsize=3, label=_label(optim, variant))
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("final eval loss (mean ± std over seeds)")
    ax.set_title("final eval loss vs model size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = plot_dir / "final_loss_vs_size.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    am_runs = [(r, am_series(summaries[r["run"]])) for r in done]
    am_runs = [(r, s) for r, s in am_runs if s]
    if am_runs:
        # beta_t: the mean over scopes as a line, the [min, max] over scopes as a band; then
        # any other am_* key that is not constant (e.g. restarts) in its own panel
        others = sorted({k for _, s in am_runs for k in s if k not in {"am_beta", "am_beta_min", "am_beta_max"}
                         and len({v for _, v in s[k]}) > 1})
        fig, axes = plt.subplots(1 + len(others), 1, figsize=(7.5, 4.2 + 2.4 * len(others)), squeeze=False)
        ax = axes[0, 0]
        color_cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (r, s) in enumerate(am_runs):
            color = color_cycle[i % len(color_cycle)]
            label = f"{r['size']}, {_label(r['optim'], r['variant'])}, seed {r['seed']}"
            if "am_beta" in s:
                xs, ys = zip(*s["am_beta"])
                ax.plot(xs, ys, _STYLES.get(r["variant"], ":"), color=color, lw=1.2, label=label)
            if "am_beta_min" in s and "am_beta_max" in s and len(s["am_beta_min"]) == len(s["am_beta_max"]):
                xs, lo = zip(*s["am_beta_min"])
                _, hi = zip(*s["am_beta_max"])
                ax.fill_between(xs, lo, hi, color=color, alpha=0.08)
        ax.set_ylabel("beta_t (mean over scopes; band: min-max)")
        ax.set_title("AM optimizers: beta_t over training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        for ax, key in zip(axes[1:, 0], others):
            for r, s in am_runs:
                if key in s:
                    xs, ys = zip(*s[key])
                    ax.plot(xs, ys, _STYLES.get(r["variant"], ":"), lw=1.1)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("training tokens")
        fig.tight_layout()
        path = plot_dir / "beta_t.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def report(out_dir: Path, runs: list[dict], loss_at_tokens, make_plots: bool = True) -> str:
    rows, summaries = collect(out_dir, runs, loss_at_tokens)
    write_csv(rows, out_dir / "results.csv")
    table = markdown(rows)
    md = ["# Scale study results", "", f"Runs in `{out_dir}`; mean ± std over seeds.", "", table, "",
          "## Per run", "", per_run_markdown(rows), ""]
    if make_plots and summaries:
        paths = plot(rows, summaries, out_dir / "plots")
        md += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in paths] + [""]
    (out_dir / "results.md").write_text("\n".join(md))
    return table


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a predefined grid (flags override)")
    p.add_argument("--sizes", type=_csv_list, default=None, help="comma list: tiny,small,60m,130m,350m,1b")
    p.add_argument("--optims", type=_csv_list, default=None, help="comma list of --optim names")
    p.add_argument("--variants", type=_csv_list, default=None, help="comma list: warmup,no_warmup")
    p.add_argument("--seeds", type=lambda t: _csv_list(t, int), default=None, help="comma list of seeds")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--dataset", default=None, help="auto / c4 / local (passed to every run)")
    p.add_argument("--learning_rate", type=float, default=None, help="peak LR for every run (default: size preset)")
    p.add_argument("--max_steps", type=int, default=None, help="steps for every run (default: size preset)")
    p.add_argument("--am_optim_args", default=None, help='--optim_args for the am_* runs, e.g. "lam=0.1"')
    p.add_argument("--extra_args", default=None, help="more recipe flags for every run, one quoted string")
    p.add_argument("--loss_at_tokens", type=lambda t: _csv_list(t, float), default=None,
                   help="token counts for the eval-loss-at-tokens columns (default 10/25/50%% of each budget)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at the same time (python launcher; CPU threads are split between them)")
    p.add_argument("--launcher", choices=["python", "accelerate", "torchrun", "slurm"], default="python",
                   help="slurm: one sbatch job per grid point, see the --slurm-* options")
    p.add_argument("--accelerate_config", default=None)
    p.add_argument("--nproc_per_node", type=int, default=None)
    p.add_argument("--report_only", action="store_true", help="only collect finished runs into table and plots")
    p.add_argument("--rerun_failed", action="store_true", default=True, help=argparse.SUPPRESS)
    p.add_argument("--no_plots", action="store_true")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    _slurm.add_arguments(p)
    args = p.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    for key in ("sizes", "optims", "variants", "seeds", "output_dir", "jobs", "am_optim_args"):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key))
    args.jobs = max(1, args.jobs or 1)
    missing = [k for k in ("sizes", "optims", "variants", "seeds") if not getattr(args, k)]
    if missing:
        p.error(f"give --preset or all of --sizes/--optims/--variants/--seeds (missing {missing})")
    args.output_dir = args.output_dir or "study_runs/custom"
    return args


def run_locally(args, todo: list[dict], out_dir: Path) -> list[str]:
    """Run the grid points ``todo`` on this machine, ``args.jobs`` at a time, with progress bars.

    Returns the names of the runs that failed (each has a ``failed.json`` in its folder).
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    failures: list[str] = []
    with tqdm(total=len(todo), desc="scale study", unit="run", position=0, disable=args.no_progress,
              dynamic_ncols=True) as bar:

        def one(r, slot):
            ok = execute(args, r, out_dir / "runs" / r["name"], position=1 + slot)
            if not ok:
                failures.append(r["name"])
                tqdm.write(f"[scale_study] run {r['name']} FAILED, see {out_dir / 'runs' / r['name'] / 'train.log'}")
            else:
                tqdm.write(f"[scale_study] finished {r['name']} ({time.time() - t0:.0f}s since start)")
            bar.update(1)

        if args.jobs == 1:
            for r in todo:
                bar.set_postfix_str(r["name"])
                one(r, 0)
        else:
            import queue
            import threading

            pending: queue.Queue = queue.Queue()
            for r in todo:
                pending.put(r)

            def worker(slot):
                while True:
                    try:
                        r = pending.get_nowait()
                    except queue.Empty:
                        return
                    one(r, slot)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.jobs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    return failures


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.output_dir).resolve()
    runs = grid(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study.json").write_text(json.dumps(
        {k: v for k, v in vars(args).items()} | {"runs": [r["name"] for r in runs]}, indent=1))

    if args.launcher == "slurm" and not args.report_only:
        status = slurm_study(args, runs, out_dir)
        if status is not None:
            return status
    elif not args.report_only:
        todo = [r for r in runs if not (out_dir / "runs" / r["name"] / SUMMARY_FILE).exists()]
        print(f"[scale_study] {len(runs)} runs in the grid, {len(runs) - len(todo)} already finished, "
              f"{len(todo)} to run -> {out_dir}", flush=True)
        if args.dry_run:
            for r in todo:
                print(shlex.join(run_command(args, r, out_dir / "runs" / r["name"])))
            return 0
        for optim in sorted({r["optim"] for r in todo}):
            why = optim_available(optim)
            if why:
                print(f"[scale_study] WARNING: --optim {optim} is not available ({why}); its runs will fail",
                      flush=True)
        if args.jobs > 1 and args.launcher != "python":
            print("[scale_study] --jobs > 1 only with --launcher python; running one at a time", flush=True)
            args.jobs = 1
        t0 = time.time()
        failures = run_locally(args, todo, out_dir)
        print(f"[scale_study] ran {len(todo)} runs in {time.time() - t0:.0f}s ({len(failures)} failed)", flush=True)

    table = report(out_dir, runs, args.loss_at_tokens, make_plots=not args.no_plots)
    print(table)
    print(f"\n[scale_study] wrote {out_dir / 'results.csv'}, {out_dir / 'results.md'}"
          + ("" if args.no_plots else f" and plots in {out_dir / 'plots'}"))
    rows = list(csv.DictReader(open(out_dir / "results.csv")))
    if args.launcher == "slurm" and args.slurm_no_wait and not args.report_only:
        return 0 if all(r["status"] in {"done", "submitted"} for r in rows) else 1
    return 0 if all(r["status"] == "done" for r in rows) else 1


def slurm_study(args, runs: list[dict], out_dir: Path) -> int | None:
    """The grid as SLURM jobs; None to go on to the report, else the exit status."""
    def recipe_command(run, run_dir):
        return run_command(args, run, run_dir)

    try:
        if args.dry_run:
            _slurm.dry_run(args, runs, out_dir, recipe_command, RECIPES_DIR.parent)
            return 0
        _slurm.run_study(args, runs, out_dir, recipe_command, RECIPES_DIR.parent,
                         check_optims=lambda optims: _slurm.check_optims(optims, RECIPES_DIR.parent))
    except _slurm.SlurmError as e:
        print(f"[scale_study] error: {e}", file=sys.stderr, flush=True)
        return 2
    return None


if __name__ == "__main__":
    sys.exit(main())
