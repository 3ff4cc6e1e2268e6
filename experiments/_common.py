"""Shared helpers of the experiments/ scripts: output folder, seeding, JSON/Markdown, plots, runs.

Nothing here is specific to one experiment.  The deterministic runner
(:func:`run_deterministic`) is shared by ``quadratic.py`` and ``logistic_regression.py``;
the optimizer factory (:func:`make_optimizer`) by all three scripts.
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import hf_am  # noqa: E402

EXPERIMENTS_DIR = Path(__file__).resolve().parent
#: the run stops (and is marked diverged) once the gap exceeds this factor times the first gap
DIVERGENCE_FACTOR = 1e8


# ---------------------------------------------------------------------------- set-up
def default_out(name: str) -> Path:
    return EXPERIMENTS_DIR / "results" / name


def prepare_out(out: Optional[str], name: str) -> Path:
    path = Path(out) if out else default_out(name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def environment() -> Dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "torch_threads": str(torch.get_num_threads()),
    }


# ---------------------------------------------------------------------------- files
def _clean(obj):
    """JSON has no NaN/inf: write them as strings so the file stays strict JSON."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating,)):
        return _clean(float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


def _restore(obj):
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


def read_json(path: Path):
    """Read a file of :func:`write_json`, with the NaN/inf strings turned back into floats."""
    return _restore(json.loads(Path(path).read_text()))


def write_json(path: Path, obj) -> None:
    """Strict JSON, one line per top-level key (curves make the files long otherwise)."""
    obj = _clean(obj)
    if not isinstance(obj, dict):
        path.write_text(json.dumps(obj, allow_nan=False) + "\n")
        return
    items = [f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'), allow_nan=False)}" for k, v in obj.items()]
    path.write_text("{\n" + ",\n".join(items) + "\n}\n")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def fmt(x: float, digits: int = 3) -> str:
    if x is None:
        return "-"
    x = float(x)
    if not math.isfinite(x):
        return "diverged" if x > 0 or math.isnan(x) else str(x)
    if x == 0:
        return "0"
    if abs(x) < 1e-3 or abs(x) >= 1e4:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_gap_and_beta(ax, axb, runs: List[Dict]) -> None:
    """Gap curves (log scale) of fixed-momentum SGD and AM-SGD runs on ``ax``; AM beta_t on ``axb``.

    Fixed momentum: copper shades, HB-opt black dashed, opt@lr green dotted; AM-SGD: blues
    (linear estimate, solid) and purples (exact, dash-dot), darker for larger beta_max.
    ``runs`` hold thinned curves ``{"t": [...], "v": [...]}`` under ``gap`` and ``beta``.
    """
    fixed = [r for r in runs if r["config"]["kind"] == "sgd"]
    am = [r for r in runs if r["config"]["kind"] == "am_sgd"]
    shades = plt.cm.copper(np.linspace(0.15, 0.85, max(len(fixed), 1)))
    special = {"HB-opt": dict(color="k", ls="--", lw=2), "opt@lr": dict(color="tab:green", ls=":", lw=2)}
    for c, r in zip(shades, fixed):
        style = special.get(r["config"].get("note"), dict(color=c, lw=1))
        ax.semilogy(r["gap"]["t"], np.maximum(r["gap"]["v"], 1e-300), label=r["label"], **style)
    colors = {"linear": plt.cm.Blues(np.linspace(0.5, 0.95, 3)), "exact": plt.cm.RdPu(np.linspace(0.5, 0.95, 3))}
    counters = {"linear": 0, "exact": 0}
    for r in am:
        est = r["config"]["loss_estimate"]
        c = colors[est][min(counters[est], 2)]
        counters[est] += 1
        ls = "-" if est == "linear" else "-."
        ax.semilogy(r["gap"]["t"], np.maximum(r["gap"]["v"], 1e-300), color=c, ls=ls, lw=1.6, label=r["label"])
        if axb is not None and r.get("beta"):
            axb.plot(r["beta"]["t"], r["beta"]["v"], color=c, ls=ls, lw=1, label=r["label"])


# ---------------------------------------------------------------------------- optimizers
def config_label(cfg: Dict) -> str:
    kind = cfg["kind"]
    if kind == "sgd":
        return f"SGD b={cfg['momentum']:.4g}" + (f" ({cfg['note']})" if cfg.get("note") else "")
    if kind == "am_sgd":
        s = f"AM-SGD {cfg['loss_estimate']} bmax={cfg['momentum']:.4g}"
        if cfg.get("pinned"):
            s += " pinned"
        elif cfg.get("lam", 0.1) != 0.1:
            s += f" lam={cfg['lam']:g}"
        return s
    if kind == "adamw":
        return f"AdamW b1={cfg['momentum']:.4g}"
    if kind == "am_adamw":
        return f"AM-AdamW bmax={cfg['momentum']:.4g}" + (" pinned" if cfg.get("pinned") else "")
    raise ValueError(kind)


def make_optimizer(cfg: Dict, params, lr: float):
    """Build the optimizer a config dict describes.

    Kinds: ``sgd`` (``torch.optim.SGD(momentum=b, dampening=b)``: the damped parametrisation
    ``d <- b d + (1-b) g``, ``x <- x - lr d``), ``am_sgd``, ``adamw``, ``am_adamw``.
    ``pinned=True`` on an AM kind sets ``lam=0, beta_min=beta_max`` (a fixed coefficient).
    """
    kind = cfg["kind"]
    b = cfg["momentum"]
    wd = cfg.get("weight_decay", 0.0)
    lam = 0.0 if cfg.get("pinned") else cfg.get("lam", 0.1)
    beta_min = b if cfg.get("pinned") else cfg.get("beta_min", 0.0)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=b, dampening=b, weight_decay=wd)
    if kind == "am_sgd":
        return hf_am.AMSGD(
            params, lr=lr, momentum=b, weight_decay=wd, lam=lam, beta_min=beta_min,
            scope="model", loss_estimate=cfg.get("loss_estimate", "linear"),
        )
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(b, cfg.get("beta2", 0.999)), weight_decay=wd)
    if kind == "am_adamw":
        return hf_am.AMAdamW(
            params, lr=lr, betas=(b, cfg.get("beta2", 0.999)), weight_decay=wd, lam=lam,
            beta_min=beta_min, scope=cfg.get("scope", "tensor"),
            loss_estimate=cfg.get("loss_estimate", "linear"),
        )
    raise ValueError(f"unknown optimizer kind {kind!r}")


def is_am(cfg: Dict) -> bool:
    return cfg["kind"].startswith("am_")


# ---------------------------------------------------------------------------- deterministic runs
def run_deterministic(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    cfg: Dict,
    lr: float,
    iters: int,
    f_star: float,
    keep_iterates: bool = False,
) -> Dict:
    """Full-batch run of one optimizer config on ``loss_fn(x)`` from ``x0``.

    Returns ``gap`` (``iters + 1`` values: ``f(x_t) - f_star`` for ``t = 0..iters``, cut short
    when the run diverges), ``beta`` (the AM coefficient ``opt.beta`` after each step; AM only),
    ``diverged`` and the wall time.  Every optimizer is stepped with a closure, so
    ``loss_estimate="exact"`` gets its loss and the baselines see the same calls.
    """
    x = x0.clone().requires_grad_(True)
    opt = make_optimizer(cfg, [x], lr)

    def closure():
        opt.zero_grad(set_to_none=False)
        f = loss_fn(x)
        f.backward()
        return f.detach()

    gaps: List[float] = []
    betas: List[float] = []
    iterates: List[torch.Tensor] = []
    diverged = False
    t0 = time.perf_counter()
    first = None
    for _ in range(iters):
        if keep_iterates:
            iterates.append(x.detach().clone())
        f = float(opt.step(closure))  # f(x_t), evaluated before the step moves x
        gap = f - f_star
        gaps.append(gap)
        first = gap if first is None else first
        if is_am(cfg):
            betas.append(float(opt.beta))
        if not math.isfinite(gap) or gap > DIVERGENCE_FACTOR * max(abs(first), 1e-300):
            diverged = True
            break
    if not diverged:
        with torch.no_grad():
            f_last = float(loss_fn(x))
        gaps.append(f_last - f_star)
        if keep_iterates:
            iterates.append(x.detach().clone())
        if not math.isfinite(gaps[-1]):
            diverged = True
    out = {
        "config": dict(cfg),
        "label": config_label(cfg),
        "lr": lr,
        "gap": gaps,
        "beta": betas,
        "diverged": diverged,
        "final_gap": gaps[-1] if not diverged else float("inf"),
        "best_gap": min(gaps) if gaps else float("inf"),
        "seconds": time.perf_counter() - t0,
        "beta_stats": opt.beta_stats() if is_am(cfg) else None,  # beta (mean over scopes), min, max, restarts
    }
    if keep_iterates:
        out["_iterates"] = iterates
    return out


def max_iterate_distance(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    """max_t ||a_t - b_t|| / max_t ||a_t||; inf when the runs have different lengths."""
    if len(a) != len(b):
        return float("inf")
    scale = max(float(u.norm()) for u in a) or 1.0
    return max(float((u - v).norm()) for u, v in zip(a, b)) / scale


def _round(v) -> float:
    """Curves are kept to 7 significant digits (small files); scalars keep full precision."""
    v = float(v)
    return float(f"{v:.7g}") if math.isfinite(v) else v


def thin(values: Sequence[float], max_points: int = 200) -> Dict[str, List]:
    """Keep about ``max_points`` points of a curve (log-spaced indices) so the JSON stays small."""
    n = len(values)
    if n <= max_points:
        return {"t": list(range(n)), "v": [_round(v) for v in values]}
    idx = np.unique(np.concatenate([np.arange(min(n, 50)), np.geomspace(1, n - 1, max_points - 50).astype(int), [n - 1]]))
    return {"t": [int(i) for i in idx], "v": [_round(values[i]) for i in idx]}


def run_timer() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def finish(out: Path, results: Dict, markdown_text: str, plot: Callable, timer: Callable[[], float]) -> Dict:
    """Record the run time and write what every experiment writes: results.json, results.md, the plots."""
    results["seconds"] = timer()
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown_text)
    plot(results, out)
    print(f"wrote {out} in {results['seconds']:.1f} s")
    return results
