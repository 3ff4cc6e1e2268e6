#!/usr/bin/env python3
"""Paper Figure 7c: learning-rate range of AM against fixed momentum on a small MLP (digits 8x8).

Data: scikit-learn's bundled digits (1797 images 8x8, pixels / 16), a fixed stratified split
1437 train / 360 test (split seed 0).  Model: MLP 64-128-128-10, ReLU, float32, cross-entropy,
mini-batches of 64 (reshuffled each epoch).  Each seed changes the initialisation and the batch
order, not the split.

Pairs compared over a learning-rate grid, same seeds:
  SGD     torch.optim.SGD(momentum=0.9, dampening=0.9)  (damped: d <- 0.9 d + 0.1 g, x <- x - lr d)
  AM-SGD  hf_am.AMSGD(momentum=0.9)                      (beta_max 0.9, lam 0.1, linear estimate)
  AdamW   torch.optim.AdamW(betas=(0.9, 0.999), weight_decay=0.01)
  AM-AdamW hf_am.AMAdamW(betas=(0.9, 0.999), weight_decay=0.01)  (lam 0.1, scope "tensor")
Reported: final training loss (whole training set, after the last epoch) and test accuracy,
mean +- std over seeds; a run whose loss becomes non-finite counts as diverged.
Also a pinned check: AM with lam=0, beta_min=beta_max=0.9 against its baseline for one epoch
(``pinned_check`` in the JSON: largest parameter difference; run in float64, since in float32
Adam's m/sqrt(v) amplifies rounding differences on near-zero gradients to ~1e-3).

    python experiments/lr_range.py --quick --out /tmp/lr   # ~15 s
    python experiments/lr_range.py                          # full settings, ~3-5 min

Writes results.json, results.md and final_loss_vs_lr.png / test_acc_vs_lr.png into --out.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "lr_range"
FAMILIES = {
    "sgd": {"baseline": {"kind": "sgd", "momentum": 0.9}, "am": {"kind": "am_sgd", "momentum": 0.9, "loss_estimate": "linear"}},
    "adamw": {"baseline": {"kind": "adamw", "momentum": 0.9, "weight_decay": 0.01},
              "am": {"kind": "am_adamw", "momentum": 0.9, "weight_decay": 0.01}},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Writes JSON, Markdown and PNG into --out.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small settings for tests (3 epochs, 2 lrs per family, 2 seeds)")
    p.add_argument("--out", default=None, help=f"output folder (default experiments/results/{NAME}/)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 30; quick 3)")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default 64)")
    p.add_argument("--hidden", type=int, default=128, help="hidden width of both hidden layers (default 128)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; quick 0 1)")
    p.add_argument("--sgd-lrs", type=float, nargs="+", default=None,
                   help="lr grid of SGD / AM-SGD (default 0.01 0.03 0.1 0.3 1 3 10; quick 0.1 1)")
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=None,
                   help="lr grid of AdamW / AM-AdamW (default 1e-4 3e-4 1e-3 3e-3 1e-2 3e-2 1e-1; quick 1e-3 1e-2)")
    p.add_argument("--lam", type=float, default=0.1, help="AM lambda (default 0.1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNGs from --out/results.json without running")
    args = p.parse_args(argv)
    args.epochs = args.epochs or (3 if args.quick else 30)
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    args.sgd_lrs = args.sgd_lrs or ([0.1, 1.0] if args.quick else [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0])
    args.adamw_lrs = args.adamw_lrs or ([1e-3, 1e-2] if args.quick else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    return args


def load_digits():
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    d = _load()
    X = d.data.astype(np.float32) / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, d.target, test_size=360, random_state=0, stratify=d.target)
    return (torch.from_numpy(Xtr), torch.from_numpy(ytr).long(), torch.from_numpy(Xte), torch.from_numpy(yte).long())


def make_model(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )


@torch.no_grad()
def evaluate(model, X, y):
    logits = model(X)
    return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train(data, cfg, lr, seed, epochs, batch_size, hidden, max_steps=None, dtype=torch.float32):
    """One run; returns final train loss, test accuracy, per-epoch train loss, AM beta mean."""
    Xtr, ytr, Xte, yte = data
    Xtr, Xte = Xtr.to(dtype), Xte.to(dtype)
    C.seed_all(seed)
    model = make_model(hidden).to(dtype)  # initialised in float32 either way: same init
    opt = C.make_optimizer(cfg, model.parameters(), lr)
    gen = torch.Generator().manual_seed(1000 + seed)
    epoch_loss, betas, steps, diverged = [], [], 0, False
    for _ in range(epochs):
        perm = torch.randperm(len(Xtr), generator=gen)
        for i in range(0, len(Xtr), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            steps += 1
            if C.is_am(cfg):
                betas.append(float(opt.beta))
            if max_steps is not None and steps >= max_steps:
                break
        train_loss, _ = evaluate(model, Xtr, ytr)
        epoch_loss.append(train_loss)
        if not math.isfinite(train_loss):
            diverged = True
            break
        if max_steps is not None and steps >= max_steps:
            break
    train_loss, _ = evaluate(model, Xtr, ytr)
    _, test_acc = evaluate(model, Xte, yte)
    diverged = diverged or not math.isfinite(train_loss)
    return {
        "final_loss": float("inf") if diverged else train_loss,
        "test_acc": test_acc, "diverged": diverged, "epoch_loss": epoch_loss, "steps": steps,
        "beta_mean": float(np.mean(betas)) if betas else None,
        "beta_stats": opt.beta_stats() if C.is_am(cfg) else None,  # of the last step
        "params": [p.detach().clone() for p in model.parameters()],
    }


def summarise(values):
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return {"mean": float("inf"), "std": float("nan"), "n_finite": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n_finite": int(len(v))}


def main(argv=None):
    args = parse_args(argv)
    C.set_threads(args.threads)
    out = C.prepare_out(args.out, NAME)
    if args.plot_only:
        results = C.read_json(out / "results.json")
        plot(results, out)
        return results
    timer = C.run_timer()
    data = load_digits()
    results = {"experiment": NAME, "args": vars(args), "env": C.environment(),
               "n_train": len(data[0]), "n_test": len(data[2]), "families": {}}
    for fam, pair in FAMILIES.items():
        lrs = args.sgd_lrs if fam == "sgd" else args.adamw_lrs
        fam_res = {"lrs": lrs, "optimizers": {}}
        for role in ("baseline", "am"):
            cfg = dict(pair[role])
            if role == "am":
                cfg["lam"] = args.lam
            label = C.config_label(cfg).split(" ")[0]
            per_lr = []
            for lr in lrs:
                runs = [train(data, cfg, lr, s, args.epochs, args.batch_size, args.hidden) for s in args.seeds]
                for r in runs:
                    r.pop("params")
                entry = {"lr": lr, "seeds": args.seeds, "runs": runs,
                         "final_loss": summarise([r["final_loss"] for r in runs]),
                         "test_acc": summarise([r["test_acc"] if not r["diverged"] else float("nan") for r in runs]),
                         "n_diverged": sum(r["diverged"] for r in runs)}
                per_lr.append(entry)
                print(f"{label} lr={lr:g}: loss {C.fmt(entry['final_loss']['mean'])} +- {C.fmt(entry['final_loss']['std'])}, "
                      f"acc {entry['test_acc']['mean']:.4f}, diverged {entry['n_diverged']}", flush=True)
            fam_res["optimizers"][label] = {"config": cfg, "by_lr": per_lr}
        # Pinned check: the AM optimizer with a fixed coefficient against its baseline, one epoch,
        # in float64 (in float32 Adam's m/sqrt(v) amplifies rounding on near-zero gradients:
        # ~4e-3 apart after 23 steps, 3e-15 in float64).
        lr = lrs[len(lrs) // 2]
        base = train(data, pair["baseline"], lr, 0, 1, args.batch_size, args.hidden, dtype=torch.float64)
        pinned = train(data, dict(pair["am"], pinned=True), lr, 0, 1, args.batch_size, args.hidden, dtype=torch.float64)
        fam_res["pinned_check"] = {"lr": lr, "steps": base["steps"], "momentum": pair["am"]["momentum"], "dtype": "float64",
                                   "max_param_diff": max(float((a - b).abs().max()) for a, b in zip(base["params"], pinned["params"])),
                                   "final_loss_baseline": base["final_loss"], "final_loss_pinned": pinned["final_loss"]}
        results["families"][fam] = fam_res
    return C.finish(out, results, markdown(results), plot, timer)


def markdown(results) -> str:
    a = results["args"]
    lines = ["# Learning-rate range, MLP on digits (paper Figure 7c)\n\n",
             f"MLP 64-{a['hidden']}-{a['hidden']}-10, {results['n_train']} train / {results['n_test']} test, "
             f"batch {a['batch_size']}, {a['epochs']} epochs, seeds {a['seeds']}, AM lam {a['lam']}. "
             "Final training loss (whole training set) and test accuracy, mean +- std over seeds "
             "(over the non-diverged seeds; `div` counts diverged seeds).\n"]
    for fam, fr in results["families"].items():
        names = list(fr["optimizers"])
        lines.append(f"\n## {' vs '.join(names)}\n\n")
        headers = ["lr"]
        for n in names:
            headers += [f"{n} loss", f"{n} test acc", f"{n} div"]
        rows = []
        for i, lr in enumerate(fr["lrs"]):
            row = [f"{lr:g}"]
            for n in names:
                e = fr["optimizers"][n]["by_lr"][i]
                fl, ta = e["final_loss"], e["test_acc"]
                row += [f"{C.fmt(fl['mean'])} ± {C.fmt(fl['std'], 2)}" if fl["n_finite"] else "diverged",
                        f"{ta['mean']:.4f} ± {ta['std']:.4f}" if ta["n_finite"] else "-", e["n_diverged"]]
            rows.append(row)
        lines.append(C.markdown_table(headers, rows))
        pc = fr["pinned_check"]
        lines.append(f"\nPinned check ({names[1]} with lam=0, beta_min=beta_max={pc['momentum']} vs {names[0]}, lr {pc['lr']:g}, "
                     f"{pc['steps']} steps, float64): max parameter difference {pc['max_param_diff']:.1e}.\n")
    return "".join(lines)


def plot(results, out: Path):
    import matplotlib.pyplot as plt

    styles = {"SGD": dict(color="tab:gray", marker="o"), "AM-SGD": dict(color="tab:blue", marker="s"),
              "AdamW": dict(color="tab:orange", marker="o"), "AM-AdamW": dict(color="tab:red", marker="s")}
    for metric, ylabel, fname in (("final_loss", "final training loss", "final_loss_vs_lr.png"),
                                  ("test_acc", "test accuracy", "test_acc_vs_lr.png")):
        fams = list(results["families"].items())
        fig, axes = plt.subplots(1, len(fams), figsize=(5.8 * len(fams), 4.2), squeeze=False)
        for ax, (fam, fr) in zip(axes[0], fams):
            for name, o in fr["optimizers"].items():
                lrs = np.array(fr["lrs"])
                m = np.array([e[metric]["mean"] for e in o["by_lr"]], dtype=float)
                s = np.array([e[metric]["std"] for e in o["by_lr"]], dtype=float)
                ok = np.isfinite(m)
                ax.errorbar(lrs[ok], m[ok], yerr=np.nan_to_num(s[ok]), capsize=3, label=name, **styles.get(name, {}))
                bad = [lr for lr, e in zip(lrs, o["by_lr"]) if e["n_diverged"] > 0]
                if bad:
                    ax.plot(bad, [ax.get_ylim()[1]] * len(bad), "x", ms=9, color=styles.get(name, {}).get("color", "k"),
                            label=f"{name}: some seeds diverged")
            ax.set_xscale("log")
            if metric == "final_loss":
                ax.set_yscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{' vs '.join(fr['optimizers'])} (mean ± std, {len(results['args']['seeds'])} seeds)", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        C.save_figure(fig, out / fname)


if __name__ == "__main__":
    main()
