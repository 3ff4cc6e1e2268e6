#!/usr/bin/env python3
"""Paper Figure 3: AM-SGD against fixed momentum on L2-regularised logistic regression.

f(w) = mean_i log(1 + exp(-y_i <x_i, w>)) + reg/2 ||w||^2, full batch, float64, labels +-1, an
intercept column of ones (regularised like the other weights), w0 = 0.  Data sets, all bundled
with scikit-learn or generated here (no download):
  breast_cancer     569 x 30, malignant vs benign
  digits_even_odd   1797 x 64, even vs odd digit
  wine_0_vs_rest    178 x 13, cultivar 0 vs the other two
  synthetic_illcond 1000 x 50 Gaussian features scaled by log-spaced factors in [1e-2, 1]
                    (feature covariance condition 1e4), labels from a random linear model with
                    10% flipped
The scikit-learn sets are standardised (constant columns left at 0).

The learning rate is a factor times 1/L with L = lambda_max(X^T X)/(4 n) + reg (the global
smoothness bound).  f* comes from scipy L-BFGS-B at tight tolerances followed by Newton steps
(gradient norm ~1e-15 or below, reported per data set); gap = f(w_T) - f*.

Baselines: torch.optim.SGD(momentum=b, dampening=b) (damped heavy ball: d <- b d + (1-b) g,
w <- w - lr d).  AM-SGD: scope "model", loss_estimate "linear" and "exact", beta_max from a list.
A pinned AM-SGD (lam=0, beta_min=beta_max=b) is checked against SGD(b) on each data set at the
first lr factor (``pinned_check`` in the JSON: largest iterate distance, ~1e-15).

    python experiments/logistic_regression.py --quick --out /tmp/logreg   # ~10 s
    python experiments/logistic_regression.py                              # full, ~2-3 min

Writes results.json, results.md (final-gap table) and gap.png / beta.png into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "logistic_regression"
DATASETS = ["breast_cancer", "digits_even_odd", "wine_0_vs_rest", "synthetic_illcond"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Writes JSON, Markdown and PNG into --out.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small settings for tests (200 iterations, smaller grids)")
    p.add_argument("--out", default=None, help=f"output folder (default experiments/results/{NAME}/)")
    p.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS, help="data sets (default all four)")
    p.add_argument("--reg", type=float, default=1e-4, help="L2 coefficient (default 1e-4)")
    p.add_argument("--iters", type=int, default=None, help="iterations (default 2000; quick 200)")
    p.add_argument("--lr-factors", type=float, nargs="+", default=[1.0, 10.0],
                   help="learning rates as multiples of 1/L (default 1 10)")
    p.add_argument("--momenta", type=float, nargs="+", default=None,
                   help="fixed-momentum grid (default 0 0.5 0.9 0.99 0.999; quick 0 0.9 0.99)")
    p.add_argument("--beta-max", type=float, nargs="+", default=None,
                   help="AM-SGD beta_max values (default 0.9 0.99 0.999; quick 0.9 0.99)")
    p.add_argument("--lam", type=float, default=0.1, help="AM lambda (default 0.1, the library default)")
    p.add_argument("--pinned-momentum", type=float, default=0.9, help="coefficient of the pinned-AM check (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNGs from --out/results.json without running")
    args = p.parse_args(argv)
    args.iters = args.iters or (200 if args.quick else 2000)
    args.momenta = args.momenta if args.momenta is not None else ([0.0, 0.9, 0.99] if args.quick else [0.0, 0.5, 0.9, 0.99, 0.999])
    args.beta_max = args.beta_max or ([0.9, 0.99] if args.quick else [0.9, 0.99, 0.999])
    return args


def _standardise(X):
    std = X.std(axis=0)
    std[std == 0] = 1.0
    return (X - X.mean(axis=0)) / std


def load(name: str, seed: int):
    from sklearn import datasets

    if name == "breast_cancer":
        d = datasets.load_breast_cancer()
        X, y = _standardise(d.data), np.where(d.target == 1, 1.0, -1.0)
    elif name == "digits_even_odd":
        d = datasets.load_digits()
        X, y = _standardise(d.data), np.where(d.target % 2 == 0, 1.0, -1.0)
    elif name == "wine_0_vs_rest":
        d = datasets.load_wine()
        X, y = _standardise(d.data), np.where(d.target == 0, 1.0, -1.0)
    elif name == "synthetic_illcond":
        rng = np.random.default_rng(seed)
        n, dim = 1000, 50
        X = rng.standard_normal((n, dim)) * np.logspace(-2, 0, dim)
        w_true = rng.standard_normal(dim) / np.logspace(-2, 0, dim) * 0.1
        y = np.sign(X @ w_true + 1e-12)
        flip = rng.random(n) < 0.1
        y[flip] = -y[flip]
    else:
        raise ValueError(name)
    X = np.hstack([X, np.ones((X.shape[0], 1))])
    return X.astype(np.float64), y.astype(np.float64)


def solve(X, y, reg):
    """High-accuracy optimum: L-BFGS-B at tight tolerances, then Newton steps (strongly convex)."""
    from scipy.optimize import minimize
    from scipy.special import expit

    n = X.shape[0]

    def fg(w):
        z = y * (X @ w)
        f = np.mean(np.logaddexp(0.0, -z)) + 0.5 * reg * w @ w
        g = X.T @ (-y * expit(-z)) / n + reg * w
        return f, g

    res = minimize(fg, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B",
                   options={"maxiter": 100000, "maxfun": 200000, "ftol": 1e-16, "gtol": 1e-13, "maxcor": 30})
    w = res.x
    for _ in range(30):
        f, g = fg(w)
        s = expit(y * (X @ w))
        H = (X * (s * (1 - s))[:, None]).T @ X / n + reg * np.eye(X.shape[1])
        step = np.linalg.solve(H, g)
        t = 1.0
        while fg(w - t * step)[0] > f and t > 1e-8:
            t *= 0.5
        w_new = w - t * step
        if fg(w_new)[0] > f:
            break
        w = w_new
        if np.linalg.norm(g) < 1e-15:
            break
    f, g = fg(w)
    return w, f, float(np.linalg.norm(g)), int(res.nit)


def main(argv=None):
    args = parse_args(argv)
    C.set_threads(args.threads)
    out = C.prepare_out(args.out, NAME)
    if args.plot_only:
        results = C.read_json(out / "results.json")
        plot(results, out)
        return results
    timer = C.run_timer()
    results = {"experiment": NAME, "args": vars(args), "env": C.environment(), "datasets": []}
    for name in args.datasets:
        X_np, y_np = load(name, args.seed)
        n, dim = X_np.shape
        w_np, f_star_np, gnorm, nit = solve(X_np, y_np, args.reg)
        X = torch.from_numpy(X_np)
        y = torch.from_numpy(y_np)
        reg = args.reg

        def loss_fn(w, X=X, y=y, reg=reg):
            return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * reg * (w * w).sum()

        w0 = torch.zeros(dim, dtype=torch.float64)
        f_star = float(loss_fn(torch.from_numpy(w_np)))  # the same arithmetic as the runs
        eig = np.linalg.eigvalsh(X_np.T @ X_np / n)
        L = eig[-1] / 4 + reg
        s = 1 / (1 + np.exp(-(y_np * (X_np @ w_np))))
        h_star = np.linalg.eigvalsh((X_np * (s * (1 - s))[:, None]).T @ X_np / n + reg * np.eye(dim))
        ds = {"name": name, "n": n, "dim": dim, "reg": reg, "L": float(L), "f_star": f_star,
              "f0": float(loss_fn(w0)), "solver_grad_norm": gnorm, "lbfgs_iterations": nit,
              "kappa_global": float(L / reg), "kappa_at_optimum": float(h_star[-1] / h_star[0]), "by_lr": []}
        for factor in args.lr_factors:
            lr = factor / L
            cfgs = [{"kind": "sgd", "momentum": b} for b in args.momenta]
            for est in ("linear", "exact"):
                for bmax in args.beta_max:
                    cfgs.append({"kind": "am_sgd", "momentum": bmax, "loss_estimate": est, "lam": args.lam})
            runs = []
            for cfg in cfgs:
                r = C.run_deterministic(loss_fn, w0, cfg, lr, args.iters, f_star)
                runs.append({
                    "label": r["label"], "config": r["config"], "diverged": r["diverged"],
                    "final_gap": r["final_gap"], "best_gap": r["best_gap"], "n_gap": len(r["gap"]),
                    "min_raw_gap": min(r["gap"]),
                    "beta_mean": float(np.mean(r["beta"])) if r["beta"] else None,
                    "gap": C.thin(r["gap"]), "beta": C.thin(r["beta"]) if r["beta"] else None,
                    "seconds": r["seconds"], "beta_stats": r["beta_stats"],
                })
            entry = {"lr_factor": factor, "lr": lr, "runs": runs}
            if factor == args.lr_factors[0]:
                bp = args.pinned_momentum
                ref = C.run_deterministic(loss_fn, w0, {"kind": "sgd", "momentum": bp}, lr, args.iters, f_star, keep_iterates=True)
                entry["pinned_check"] = {}
                for est in ("linear", "exact"):
                    am = C.run_deterministic(loss_fn, w0, {"kind": "am_sgd", "momentum": bp, "loss_estimate": est, "pinned": True},
                                             lr, args.iters, f_star, keep_iterates=True)
                    entry["pinned_check"][est] = {"momentum": bp,
                                                  "max_iterate_distance": C.max_iterate_distance(ref["_iterates"], am["_iterates"])}
            ds["by_lr"].append(entry)
            print(f"{name} lr={factor:g}/L: " + ", ".join(f"{r['label']}: {C.fmt(r['final_gap'])}" for r in runs), flush=True)
        results["datasets"].append(ds)
    return C.finish(out, results, markdown(results), plot, timer)


def markdown(results) -> str:
    a = results["args"]
    lines = ["# Logistic regression (paper Figure 3)\n\n",
             f"Full batch, float64, reg {a['reg']:g}, {a['iters']} iterations, lam {a['lam']}, w0 = 0. "
             "Final gap f(w_T) - f* (f* from L-BFGS-B + Newton); `diverged`: stopped when the gap grew 1e8-fold "
             "or became non-finite.\n\n"]
    lines.append(C.markdown_table(
        ["data set", "n x d", "L", "kappa = L/reg", "kappa at optimum", "f*", "solver |grad|"],
        [[d["name"], f"{d['n']} x {d['dim']}", C.fmt(d["L"]), C.fmt(d["kappa_global"]), C.fmt(d["kappa_at_optimum"]),
          f"{d['f_star']:.10g}", f"{d['solver_grad_norm']:.1e}"] for d in results["datasets"]]))
    cols = [(d, e) for d in results["datasets"] for e in d["by_lr"]]
    headers = ["config"] + [f"{d['name']} lr={e['lr_factor']:g}/L" for d, e in cols]
    labels = [r["label"] for r in cols[0][1]["runs"]]
    rows = []
    for i, label in enumerate(labels):
        rows.append([label] + [C.fmt(e["runs"][i]["final_gap"]) for _, e in cols])
    best = ["**best fixed**"]
    for _, e in cols:
        fixed = [r for r in e["runs"] if r["config"]["kind"] == "sgd"]
        bst = min(fixed, key=lambda r: r["final_gap"])
        best.append(f"{C.fmt(bst['final_gap'])} (b={bst['config']['momentum']:g})")
    rows.append(best)
    lines.append("\n## Final gap\n\n")
    lines.append(C.markdown_table(headers, rows))
    pin = [f"{d['name']}: {e['pinned_check']['linear']['max_iterate_distance']:.1e} / {e['pinned_check']['exact']['max_iterate_distance']:.1e}"
           for d in results["datasets"] for e in d["by_lr"] if "pinned_check" in e]
    lines.append("\nPinned AM-SGD vs SGD (linear / exact), max iterate distance: " + "; ".join(pin) + "\n")
    return "".join(lines)


def plot(results, out: Path):
    import matplotlib.pyplot as plt

    dss = results["datasets"]
    nl = len(results["args"]["lr_factors"])
    for kind in ("gap", "beta"):
        fig, axes = plt.subplots(nl, len(dss), figsize=(4.6 * len(dss), 3.6 * nl), squeeze=False)
        for j, d in enumerate(dss):
            for i, e in enumerate(d["by_lr"]):
                ax = axes[i, j]
                if kind == "gap":
                    C.plot_gap_and_beta(ax, None, e["runs"])
                    ax.set_ylim(max(1e-16, ax.get_ylim()[0]), max(d["f0"] - d["f_star"], 1e-12) * 1e3)
                    ax.set_ylabel("f(w_t) - f*")
                else:
                    dummy = plt.figure()
                    C.plot_gap_and_beta(dummy.gca(), ax, e["runs"])
                    plt.close(dummy)
                    ax.set_ylim(-0.02, 1.02)
                    ax.set_ylabel("AM beta_t")
                ax.set_title(f"{d['name']}, lr={e['lr_factor']:g}/L", fontsize=10)
                ax.set_xlabel("iteration")
                ax.grid(True, alpha=0.3)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
        fig.tight_layout(rect=(0, 0.12 if kind == "gap" else 0.08, 1, 1))
        fig.savefig(out / f"{kind}.png", dpi=72)
        plt.close(fig)


if __name__ == "__main__":
    main()
