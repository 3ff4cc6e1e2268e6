#!/usr/bin/env python3
"""Paper Figure 1: AM-SGD against fixed momentum on ill-conditioned quadratics.

Problem: f(x) = 1/2 (x - x*)^T H (x - x*) in float64, H diagonal with eigenvalues log-spaced in
[mu, L] = [1/kappa, 1] (SGD and AM-SGD are rotation-equivariant, so a diagonal H loses nothing),
x0 - x* standard normal (fixed seed), f* = 0.  Every run is deterministic and full-batch.

Baselines: damped heavy ball, torch.optim.SGD(momentum=b, dampening=b):
    d <- b d + (1 - b) g,   x <- x - lr d,
which is classical heavy ball x+ = x - alpha g + b (x - x_prev) with alpha = lr (1 - b).
The grid contains
  * the classical optimal heavy-ball coefficient b* = ((sqrt(kappa) - 1)/(sqrt(kappa) + 1))^2
    ("HB-opt"; at lr = 1/sqrt(mu L) the pair (lr, b*) *is* Polyak's optimal
    alpha* = 4/(sqrt(L) + sqrt(mu))^2, since lr (1 - b*) = alpha*), and
  * the coefficient optimal for the given lr in the damped parametrisation
    ("opt@lr": sqrt(b) = max((1 - lr mu)/(1 + lr mu), (lr L - 1)/(lr L + 1)), rate sqrt(b)).

AM-SGD (scope="model") runs with loss_estimate "linear" and "exact" and beta_max from a list.
A pinned AM-SGD (lam=0, beta_min=beta_max=b) is run against SGD(b) for every (kappa, lr):
its largest iterate distance is reported as ``pinned_check`` (should be ~1e-15).

    python experiments/quadratic.py --quick --out /tmp/quad   # ~5 s
    python experiments/quadratic.py                            # full settings, ~1-2 min

Writes results.json, results.md and gap_kappa<k>.png (top: gap vs iteration, bottom: AM beta_t) into --out.
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

NAME = "quadratic"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Writes JSON, Markdown and PNG into --out.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small settings for tests (dim 50, 300 iterations, smaller grids)")
    p.add_argument("--out", default=None, help=f"output folder (default experiments/results/{NAME}/)")
    p.add_argument("--kappas", type=float, nargs="+", default=[1e3, 1e4], help="condition numbers (default 1e3 1e4)")
    p.add_argument("--dim", type=int, default=None, help="dimension (default 200; quick 50)")
    p.add_argument("--iters", type=int, default=None, help="iterations (default 3000; quick 300)")
    p.add_argument("--lrs", nargs="+", default=["1/L", "1/sqrt(muL)"],
                   help="learning rates: numbers or the names 1/L and 1/sqrt(muL) (default both names)")
    p.add_argument("--momenta", type=float, nargs="+", default=None,
                   help="fixed-momentum grid besides HB-opt and opt@lr (default 0 0.5 0.9 0.99 0.999; quick 0 0.9 0.99)")
    p.add_argument("--beta-max", type=float, nargs="+", default=None,
                   help="AM-SGD beta_max values (default 0.9 0.99 0.999; quick 0.9 0.99)")
    p.add_argument("--lam", type=float, default=0.1, help="AM lambda (default 0.1, the library default)")
    p.add_argument("--pinned-momentum", type=float, default=0.9, help="coefficient of the pinned-AM check (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="seed of x0 (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNGs from --out/results.json without running")
    args = p.parse_args(argv)
    args.dim = args.dim or (50 if args.quick else 200)
    args.iters = args.iters or (300 if args.quick else 3000)
    args.momenta = args.momenta if args.momenta is not None else ([0.0, 0.9, 0.99] if args.quick else [0.0, 0.5, 0.9, 0.99, 0.999])
    args.beta_max = args.beta_max or ([0.9, 0.99] if args.quick else [0.9, 0.99, 0.999])
    return args


def heavy_ball_optimal(kappa: float) -> float:
    s = math.sqrt(kappa)
    return ((s - 1) / (s + 1)) ** 2


def damped_optimal(lr: float, mu: float, L: float) -> float:
    """Best fixed b for SGD(momentum=b, dampening=b) at this lr (all eigenvalues on the circle)."""
    r = max((1 - lr * mu) / (1 + lr * mu), (lr * L - 1) / (lr * L + 1), 0.0)
    return r * r


def parse_lr(text: str, mu: float, L: float) -> float:
    names = {"1/L": 1.0 / L, "1/sqrt(muL)": 1.0 / math.sqrt(mu * L)}
    return names[text] if text in names else float(text)


def iterations_to(gap, target):
    for t, g in enumerate(gap):
        if g <= target:
            return t
    return None


def main(argv=None):
    args = parse_args(argv)
    C.set_threads(args.threads)
    out = C.prepare_out(args.out, NAME)
    if args.plot_only:
        results = C.read_json(out / "results.json")
        plot(results, out)
        return results
    L = 1.0
    results = {"experiment": NAME, "args": vars(args), "env": C.environment(), "problems": []}
    md = ["# Quadratic (paper Figure 1)\n",
          f"dim {args.dim}, {args.iters} iterations, lam {args.lam}, float64; gap f(x_t) - f*, f(x_0) - f* given per problem.\n"
          "`iters to 1e-6`: first t with gap <= 1e-6 (f(x_0) - f*); `-` never.\n"]
    timer = C.run_timer()
    for kappa in args.kappas:
        mu = L / kappa
        h = torch.logspace(math.log10(mu), math.log10(L), args.dim, dtype=torch.float64)
        gen = torch.Generator().manual_seed(args.seed)
        x_star = torch.randn(args.dim, dtype=torch.float64, generator=gen)
        x0 = x_star + torch.randn(args.dim, dtype=torch.float64, generator=gen)

        def loss_fn(x, h=h, x_star=x_star):
            r = x - x_star
            return 0.5 * (h * r * r).sum()

        f0 = float(loss_fn(x0))
        b_hb = heavy_ball_optimal(kappa)
        for lr_text in args.lrs:
            lr = parse_lr(lr_text, mu, L)
            b_lr = damped_optimal(lr, mu, L)
            cfgs = [{"kind": "sgd", "momentum": b} for b in args.momenta]
            cfgs.append({"kind": "sgd", "momentum": b_hb, "note": "HB-opt"})
            if abs(b_lr - b_hb) > 1e-12:
                cfgs.append({"kind": "sgd", "momentum": b_lr, "note": "opt@lr"})
            for est in ("linear", "exact"):
                for bmax in args.beta_max:
                    cfgs.append({"kind": "am_sgd", "momentum": bmax, "loss_estimate": est, "lam": args.lam})
            runs = [C.run_deterministic(loss_fn, x0, cfg, lr, args.iters, 0.0) for cfg in cfgs]

            # Pinned check: AM-SGD with a fixed coefficient against SGD(b, dampening=b).
            bp = args.pinned_momentum
            ref = C.run_deterministic(loss_fn, x0, {"kind": "sgd", "momentum": bp}, lr, args.iters, 0.0, keep_iterates=True)
            pinned = {}
            for est in ("linear", "exact"):
                am = C.run_deterministic(loss_fn, x0, {"kind": "am_sgd", "momentum": bp, "loss_estimate": est, "pinned": True},
                                         lr, args.iters, 0.0, keep_iterates=True)
                pinned[est] = {
                    "momentum": bp,
                    "max_iterate_distance": C.max_iterate_distance(ref["_iterates"], am["_iterates"]),
                    "max_rel_gap_diff": max(abs(a - b) / max(abs(b), 1e-300) for a, b in zip(am["gap"], ref["gap"]))
                    if len(am["gap"]) == len(ref["gap"]) else float("inf"),
                    "am_betas": sorted(set(am["beta"])),
                }
            prob = {"kappa": kappa, "mu": mu, "L": L, "lr_name": lr_text, "lr": lr, "f0": f0,
                    "heavy_ball_opt": b_hb, "damped_opt_for_lr": b_lr, "pinned_check": pinned, "runs": []}
            for r in runs:
                prob["runs"].append({
                    "label": r["label"], "config": r["config"], "diverged": r["diverged"],
                    "final_gap": r["final_gap"], "best_gap": r["best_gap"],
                    "iters_to_1e-6": iterations_to(r["gap"], 1e-6 * f0),
                    "n_gap": len(r["gap"]),
                    "beta_mean": float(np.mean(r["beta"])) if r["beta"] else None,
                    "gap": C.thin(r["gap"]), "beta": C.thin(r["beta"]) if r["beta"] else None,
                    "seconds": r["seconds"], "beta_stats": r["beta_stats"],
                })
            results["problems"].append(prob)
            print(f"kappa={kappa:g} lr={lr_text} ({lr:.4g}): " + ", ".join(
                f"{r['label']}: {C.fmt(r['final_gap'])}" for r in prob["runs"]), flush=True)

            md.append(f"\n## kappa = {kappa:g}, lr = {lr_text} = {lr:.4g}\n")
            md.append(f"f(x_0) - f* = {f0:.4g}; HB-opt b* = {b_hb:.6f}; opt@lr b = {b_lr:.6f}. "
                      f"Pinned AM-SGD (b={bp}) vs SGD: max iterate distance "
                      f"{pinned['linear']['max_iterate_distance']:.1e} (linear), {pinned['exact']['max_iterate_distance']:.1e} (exact).\n\n")
            rows = [[r["label"], C.fmt(r["final_gap"]), C.fmt(r["best_gap"]),
                     "-" if r["iters_to_1e-6"] is None else r["iters_to_1e-6"],
                     "-" if r["beta_mean"] is None else f"{r['beta_mean']:.3f}"] for r in prob["runs"]]
            md.append(C.markdown_table(["config", "final gap", "best gap", "iters to 1e-6", "mean beta"], rows))
    return C.finish(out, results, "".join(md), plot, timer)


def plot(results, out: Path):
    import matplotlib.pyplot as plt

    kappas = sorted({p["kappa"] for p in results["problems"]})
    for kappa in kappas:
        probs = [p for p in results["problems"] if p["kappa"] == kappa]
        fig, axes = plt.subplots(2, len(probs), figsize=(6.2 * len(probs), 8), squeeze=False,
                                 gridspec_kw={"height_ratios": [3, 2]})
        for j, prob in enumerate(probs):
            ax, axb = axes[0, j], axes[1, j]
            C.plot_gap_and_beta(ax, axb, prob["runs"])
            ax.set_ylim(max(1e-16, ax.get_ylim()[0]), prob["f0"] * 1e3)
            ax.set_title(f"kappa={kappa:g}, lr={prob['lr_name']} ({prob['lr']:.3g})")
            ax.set_xlabel("iteration")
            ax.set_ylabel("f(x_t) - f*")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            axb.set_xlabel("iteration")
            axb.set_ylabel("AM beta_t")
            lo = min([min(r["beta"]["v"]) for r in prob["runs"] if r.get("beta")] + [0.8])
            axb.set_ylim(max(lo, 0.0) - 0.02, 1.005)
            axb.grid(True, alpha=0.3)
            axb.set_title("beta_t of AM-SGD (before the lam mix)", fontsize=9)
        C.save_figure(fig, out / f"gap_kappa{kappa:g}.png")


if __name__ == "__main__":
    main()
