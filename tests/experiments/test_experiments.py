"""experiments/: each script's --quick run, as a subprocess into a temporary folder, and the
internal consistency of what it writes (files, tables listing every configuration, pinned AM equal
to fixed momentum, finite non-negative gaps, seeds that differ).  Nothing here asserts that AM
is better than its baseline."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.experiments

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
SCRIPTS = ["quadratic", "logistic_regression", "lr_range"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(name, out, *extra, timeout=300):
    cmd = [sys.executable, str(EXPERIMENTS / f"{name}.py"), *extra, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _load(out):
    with open(out / "results.json") as f:
        return json.load(f)  # strict JSON: NaN/inf are written as strings


def _f(x):
    return float(x)


def _png(path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert path.stat().st_size > 5000, f"{path} looks empty"


@pytest.fixture(scope="module")
def quadratic(tmp_path_factory):
    out = tmp_path_factory.mktemp("quadratic")
    _run("quadratic", out, "--quick")
    return out, _load(out)


@pytest.fixture(scope="module")
def logistic(tmp_path_factory):
    out = tmp_path_factory.mktemp("logistic_regression")
    _run("logistic_regression", out, "--quick")
    return out, _load(out)


@pytest.fixture(scope="module")
def lr_range(tmp_path_factory):
    out = tmp_path_factory.mktemp("lr_range")
    _run("lr_range", out, "--quick")
    return out, _load(out)


# ----------------------------------------------------------------------------- all scripts
@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--quick", "--out", "--threads"):
        assert flag in proc.stdout
    assert "damp" in proc.stdout  # the help states the baselines' parametrisation


# ----------------------------------------------------------------------------- quadratic
def test_quadratic_files(quadratic):
    out, res = quadratic
    for kappa in res["args"]["kappas"]:
        _png(out / f"gap_kappa{kappa:g}.png")
    assert (out / "results.md").read_text().startswith("# Quadratic")
    assert len(res["problems"]) == len(res["args"]["kappas"]) * len(res["args"]["lrs"])


def test_quadratic_table_lists_every_configuration(quadratic):
    out, res = quadratic
    md = (out / "results.md").read_text()
    sections = md.split("\n## ")[1:]
    assert len(sections) == len(res["problems"])
    a = res["args"]
    for sec, prob in zip(sections, res["problems"]):
        rows = [line for line in sec.splitlines() if line.startswith("| ") and not line.startswith("| config")]
        labels = [r["label"] for r in prob["runs"]]
        assert [row.split(" | ")[0][2:] for row in rows] == labels
        kinds = [(r["config"]["kind"], r["config"].get("loss_estimate"), r["config"]["momentum"]) for r in prob["runs"]]
        for est in ("linear", "exact"):
            for bmax in a["beta_max"]:
                assert ("am_sgd", est, bmax) in kinds
        fixed = [r["config"]["momentum"] for r in prob["runs"] if r["config"]["kind"] == "sgd"]
        for b in a["momenta"] + [prob["heavy_ball_opt"]]:
            assert any(math.isclose(b, f) for f in fixed)


def test_quadratic_heavy_ball_coefficients(quadratic):
    _, res = quadratic
    for prob in res["problems"]:
        s = math.sqrt(prob["kappa"])
        assert math.isclose(prob["heavy_ball_opt"], ((s - 1) / (s + 1)) ** 2)
        if prob["lr_name"] == "1/sqrt(muL)":
            # damped SGD at lr = 1/sqrt(mu L) with b* is Polyak's heavy ball: lr (1 - b*) = 4/(sqrt(L)+sqrt(mu))^2
            assert math.isclose(prob["damped_opt_for_lr"], prob["heavy_ball_opt"], rel_tol=1e-12)
            alpha = 4 / (math.sqrt(prob["L"]) + math.sqrt(prob["mu"])) ** 2
            assert math.isclose(prob["lr"] * (1 - prob["heavy_ball_opt"]), alpha, rel_tol=1e-12)


def test_quadratic_pinned_am_reproduces_fixed_momentum(quadratic):
    _, res = quadratic
    for prob in res["problems"]:
        for est in ("linear", "exact"):
            pc = prob["pinned_check"][est]
            assert _f(pc["max_iterate_distance"]) < 1e-12, (prob["kappa"], prob["lr_name"], est, pc)
            assert _f(pc["max_rel_gap_diff"]) < 1e-9, (prob["kappa"], prob["lr_name"], est, pc)
            assert all(abs(b - pc["momentum"]) < 1e-6 for b in pc["am_betas"])


def test_quadratic_gaps_and_betas(quadratic):
    _, res = quadratic
    iters = res["args"]["iters"]
    for prob in res["problems"]:
        for r in prob["runs"]:
            gaps = [_f(v) for v in r["gap"]["v"]]
            if r["diverged"]:
                assert _f(r["final_gap"]) == math.inf
                assert r["n_gap"] <= iters
            else:
                assert r["n_gap"] == iters + 1
                assert r["gap"]["t"][-1] == iters
                assert all(math.isfinite(g) and g >= 0 for g in gaps), r["label"]
                assert math.isclose(_f(r["final_gap"]), gaps[-1], rel_tol=1e-6)
            assert math.isclose(gaps[0], prob["f0"], rel_tol=1e-6)  # every run starts at x0
            if r["config"]["kind"] == "am_sgd":
                betas = r["beta"]["v"]
                assert len(betas) > 0
                assert all(-1e-7 <= b <= r["config"]["momentum"] + 1e-6 for b in betas), r["label"]
                stats = r["beta_stats"]  # opt.beta_stats() after the last step
                assert stats["restarts"] == 0  # no restart_threshold
                assert -1e-7 <= stats["beta_min"] <= stats["beta"] <= stats["beta_max"] <= r["config"]["momentum"] + 1e-6
                assert math.isclose(stats["beta"], betas[-1], rel_tol=1e-6, abs_tol=1e-7)
            else:
                assert r["beta"] is None and r["beta_stats"] is None


def test_quadratic_gradient_descent_is_monotone(quadratic):
    """b = 0 at lr = 1/L is gradient descent with step 1/L: the gap cannot increase."""
    _, res = quadratic
    for prob in res["problems"]:
        if prob["lr_name"] != "1/L":
            continue
        gd = next(r for r in prob["runs"] if r["config"]["kind"] == "sgd" and r["config"]["momentum"] == 0)
        g = np.array(gd["gap"]["v"], dtype=float)
        assert np.all(np.diff(g) <= 1e-15 * g[:-1]), prob["kappa"]


def test_quadratic_baseline_is_damped_heavy_ball(quadratic):
    """The fixed-momentum curve equals damped heavy ball written out in numpy (x0 regenerated)."""
    import torch

    _, res = quadratic
    a = res["args"]
    prob = next(p for p in res["problems"] if p["lr_name"] == "1/sqrt(muL)")
    run = next(r for r in prob["runs"] if r["config"]["kind"] == "sgd" and r["config"]["momentum"] == 0.9)
    gen = torch.Generator().manual_seed(a["seed"])
    x_star = torch.randn(a["dim"], dtype=torch.float64, generator=gen).numpy()
    x = x_star + torch.randn(a["dim"], dtype=torch.float64, generator=gen).numpy()
    h = np.logspace(math.log10(prob["mu"]), math.log10(prob["L"]), a["dim"])
    b, lr = 0.9, prob["lr"]
    d = None
    gaps = []
    for _ in range(a["iters"]):
        gaps.append(0.5 * np.sum(h * (x - x_star) ** 2))
        g = h * (x - x_star)
        d = g if d is None else b * d + (1 - b) * g
        x = x - lr * d
    gaps.append(0.5 * np.sum(h * (x - x_star) ** 2))
    got = np.array(run["gap"]["v"], dtype=float)
    want = np.array(gaps)[run["gap"]["t"]]
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ----------------------------------------------------------------------------- logistic regression
def test_logistic_files_and_table(logistic):
    out, res = logistic
    _png(out / "gap.png")
    _png(out / "beta.png")
    md = (out / "results.md").read_text()
    table = md.split("## Final gap")[1]
    header = next(line for line in table.splitlines() if line.startswith("| config"))
    a = res["args"]
    for d in res["datasets"]:
        for f in a["lr_factors"]:
            assert f"{d['name']} lr={f:g}/L" in header
    rows = [line.split(" | ")[0][2:] for line in table.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    n_cfg = len(a["momenta"]) + 2 * len(a["beta_max"])
    assert len(rows) == n_cfg + 1  # + the best-fixed row
    for d in res["datasets"]:
        for e in d["by_lr"]:
            assert [r["label"] for r in e["runs"]] == rows[:-1]
    assert sorted(d["name"] for d in res["datasets"]) == sorted(a["datasets"])


def test_logistic_optimum_and_gaps(logistic):
    _, res = logistic
    iters = res["args"]["iters"]
    for d in res["datasets"]:
        assert d["solver_grad_norm"] < 1e-10, d["name"]
        assert d["f_star"] < d["f0"]
        tol = 1e-12 * max(1.0, abs(d["f_star"]))
        for e in d["by_lr"]:
            for r in e["runs"]:
                assert _f(r["min_raw_gap"]) >= -tol, (d["name"], r["label"], r["min_raw_gap"])
                if not r["diverged"]:
                    assert r["n_gap"] == iters + 1
                    assert math.isfinite(_f(r["final_gap"])) and _f(r["final_gap"]) >= -tol
                    assert _f(r["best_gap"]) <= _f(r["final_gap"])
                else:
                    assert _f(r["final_gap"]) == math.inf
                if r["config"]["kind"] == "am_sgd":
                    assert all(-1e-7 <= b <= r["config"]["momentum"] + 1e-6 for b in r["beta"]["v"])


def test_logistic_gradient_descent_is_monotone(logistic):
    """b = 0 at lr = 1/L (L the global smoothness bound) is a descent method."""
    _, res = logistic
    for d in res["datasets"]:
        e = next(e for e in d["by_lr"] if e["lr_factor"] == 1.0)
        gd = next(r for r in e["runs"] if r["config"]["kind"] == "sgd" and r["config"]["momentum"] == 0)
        g = np.array(gd["gap"]["v"], dtype=float)
        assert np.all(np.diff(g) <= 1e-12), d["name"]


def test_logistic_pinned_am_reproduces_fixed_momentum(logistic):
    _, res = logistic
    for d in res["datasets"]:
        pcs = [e["pinned_check"] for e in d["by_lr"] if "pinned_check" in e]
        assert len(pcs) == 1
        for est in ("linear", "exact"):
            assert _f(pcs[0][est]["max_iterate_distance"]) < 1e-12, (d["name"], est)


# ----------------------------------------------------------------------------- lr range
def test_lr_range_files_and_table(lr_range):
    out, res = lr_range
    _png(out / "final_loss_vs_lr.png")
    _png(out / "test_acc_vs_lr.png")
    md = (out / "results.md").read_text()
    a = res["args"]
    assert set(res["families"]) == {"sgd", "adamw"}
    for fam, names, lrs in (("sgd", ["SGD", "AM-SGD"], a["sgd_lrs"]), ("adamw", ["AdamW", "AM-AdamW"], a["adamw_lrs"])):
        fr = res["families"][fam]
        assert list(fr["optimizers"]) == names
        section = md.split(f"## {names[0]} vs {names[1]}")[1].split("\n## ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| lr")]
        assert [row.split(" | ")[0][2:] for row in rows] == [f"{lr:g}" for lr in lrs]
        for name in names:
            assert [e["lr"] for e in fr["optimizers"][name]["by_lr"]] == lrs


def test_lr_range_statistics_and_seeds(lr_range):
    _, res = lr_range
    seeds = res["args"]["seeds"]
    assert len(seeds) >= 2 and len(set(seeds)) == len(seeds)
    for fam, fr in res["families"].items():
        for name, o in fr["optimizers"].items():
            best = math.inf
            for e in o["by_lr"]:
                assert e["seeds"] == seeds and len(e["runs"]) == len(seeds)
                losses = [_f(r["final_loss"]) for r in e["runs"]]
                finite = [x for x in losses if math.isfinite(x)]
                assert e["n_diverged"] == len(losses) - len(finite)
                if len(finite) >= 2:
                    assert len(set(finite)) == len(finite), f"{name} lr={e['lr']}: seeds gave identical losses"
                    assert math.isclose(_f(e["final_loss"]["mean"]), np.mean(finite), rel_tol=1e-6)
                    assert math.isclose(_f(e["final_loss"]["std"]), np.std(finite, ddof=1), rel_tol=1e-5, abs_tol=1e-12)
                for r in e["runs"]:
                    assert 0.0 <= r["test_acc"] <= 1.0
                    if name.startswith("AM"):
                        assert r["beta_mean"] is None or 0.0 <= r["beta_mean"] <= 0.9 + 1e-6
                best = min([best] + finite)
            assert best < 1.0, f"{name} learned nothing at any lr (best final loss {best})"


def test_lr_range_pinned_am_reproduces_baseline(lr_range):
    _, res = lr_range
    for fam, fr in res["families"].items():
        pc = fr["pinned_check"]
        assert pc["steps"] > 0
        assert _f(pc["max_param_diff"]) < 1e-10, (fam, pc)
