"""experiments/llama_study.py: the --quick grid end to end (real recipe runs through the scale
study's runner), the consistency of its tables with its runs, that each variant's options reached
the optimizer, resuming, and the rules that call a claim held.  Nothing asserts that AM wins."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.experiments

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "llama_study.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_RATES = (0.01, 0.03)
LAM = 0.1  # the library default the study keeps


def _run(out, *extra):
    cmd = [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_study")
    _run(out)
    return out, json.loads((out / "results.json").read_text())


def test_help_names_the_grid():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--quick", "--out", "--rates", "--seeds", "--clip-beta-min", "--restart-threshold", "--protocol"):
        assert flag in proc.stdout


def test_files_and_grid(study):
    out, res = study
    for name in ("results.json", "results.csv", "results.md"):
        assert (out / name).is_file()
    for png in ("final_loss_vs_lr.png", "eval_curves.png", "beta.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, png
    # AdamW and AM-AdamW at each rate, Clip and Restart at one, x 2 warmup settings x 1 seed
    assert res["grid_size"] == (2 * len(QUICK_RATES) + 2) * 2
    assert len(res["runs"]) == res["grid_size"] and all(r["status"] == "done" for r in res["runs"])
    assert {c["family"] for c in res["cells"]} == {"AdamW", "AM-AdamW", "AM-Clip", "AM-Restart"}
    assert len(res["cells"]) == res["grid_size"]  # one seed: one run per cell
    md = (out / "results.md").read_text()
    assert f"= {res['grid_size']} runs" in md and "## The paper's claims" in md


def test_cells_are_the_runs_means(study):
    out, res = study
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == res["grid_size"]
    for cell in res["cells"]:
        mine = [float(r["final_eval_loss"]) for r in rows
                if r["family"] == cell["family"] and r["variant"] == cell["variant"]
                and math.isclose(float(r["learning_rate"]), cell["learning_rate"])]
        assert len(mine) == cell["seeds"] == 1
        assert math.isclose(float(cell["mean"]), sum(mine) / len(mine), rel_tol=1e-12)


def test_each_run_got_its_rate_and_variant_options(study):
    out, res = study
    for row in res["runs"]:
        summary = json.loads((out / "runs" / row["run"] / "run_summary.json").read_text())
        assert math.isclose(summary["learning_rate"], row["learning_rate"])
        assert summary["warmup_steps"] == (0.1 if row["variant"] == "warmup" else 0.0)
        expected = {"AM-Clip": "beta_min=0.5", "AM-Restart": "restart_threshold=0.5"}.get(row["family"])
        assert summary["optim_args"] == expected
        assert summary["optim"] == ("adamw_torch" if row["family"] == "AdamW" else "am_adamw")
    for row in res["runs"]:
        if row["family"] == "AdamW":
            assert not any(k.startswith("am_") for k in row)
            continue
        low = row["am_beta_applied_min:avg"]
        high = row["am_beta_applied_max:avg"]
        # the applied coefficient (beta + lam)/(1 + lam) lies in [lam/(1+lam), (0.9+lam)/(1+lam)]
        # (0 on a restart step: Restart keeps no memory then) ...
        floor = 0.0 if row["family"] == "AM-Restart" else LAM / (1 + LAM) - 1e-6
        assert floor <= low <= high <= (0.9 + LAM) / (1 + LAM) + 1e-6
        if row["family"] == "AM-Clip":  # ... and Clip's beta_min=0.5 really bounds it from below
            assert low >= (0.5 + LAM) / (1 + LAM) - 1e-6
        if row["family"] == "AM-AdamW":
            assert low < (0.5 + LAM) / (1 + LAM)  # unclipped runs go lower, so the check above can fail


def test_best_rate_table_and_claims_follow_from_cells(study):
    sys.path.insert(0, str(SCRIPT.parent))
    import llama_study

    _, res = study
    cells = [dict(c, mean=float(c["mean"]), std=float(c["std"])) for c in res["cells"]]
    for fam in ("AdamW", "AM-AdamW"):
        for variant in ("warmup", "no_warmup"):
            best = llama_study.best_rate(cells, fam, variant)
            assert best["mean"] == min(c["mean"] for c in cells if c["family"] == fam and c["variant"] == variant)
    assert [c["claim"] for c in llama_study.claims(cells)] == [c["claim"] for c in res["claims"]]
    assert [c["held"] for c in llama_study.claims(cells)] == [c["held"] for c in res["claims"]]


def _cell(family, rate, variant, mean, std=0.01):
    return dict(family=family, learning_rate=rate, variant=variant, seeds=3, mean=mean, std=std, diverged=0)


def test_claim_rules():
    sys.path.insert(0, str(SCRIPT.parent))
    import llama_study

    cells = [
        _cell("AdamW", 0.01, "warmup", 5.00), _cell("AdamW", 0.03, "warmup", 5.20),
        _cell("AdamW", 0.01, "no_warmup", 5.30), _cell("AdamW", 0.03, "no_warmup", math.inf, math.nan),
        _cell("AM-AdamW", 0.01, "warmup", 4.90), _cell("AM-AdamW", 0.03, "warmup", 5.30),
        _cell("AM-AdamW", 0.01, "no_warmup", 5.005), _cell("AM-AdamW", 0.03, "no_warmup", 5.40),
    ]
    found = {c["claim"]: c for c in llama_study.claims(cells)}
    approx = found["AM-AdamW without warmup ≈ AdamW with warmup (each at its best rate)"]
    assert approx["held"] and "lr 0.01" in approx["numbers"]  # 5.005 vs 5.00 within sqrt(2)*0.01
    assert found["AdamW without warmup degrades (each at its best rate)"]["held"]  # 5.30 vs 5.00
    assert found["AM-AdamW beats AdamW, warmup (each at its best rate)"]["held"]  # 4.90 vs 5.00
    same = found["AM-AdamW beats AdamW at the same rate, warmup"]
    assert not same["held"] and "+0.1000" in same["numbers"]  # worse at 0.03
    same_nw = found["AM-AdamW beats AdamW at the same rate, no warmup"]
    assert same_nw["held"] and "AdamW diverged" in same_nw["numbers"]
    # within noise is not a win
    cells[4] = _cell("AM-AdamW", 0.01, "warmup", 4.995)
    found = {c["claim"]: c for c in llama_study.claims(cells)}
    assert not found["AM-AdamW beats AdamW, warmup (each at its best rate)"]["held"]


def test_rerun_resumes_without_training(study):
    out, res = study
    proc = _run(out)
    counts = [line for line in proc.stdout.splitlines() if line.startswith("[llama_study]") and "to run" in line]
    assert len(counts) == 2 and all(line.endswith(", 0 to run") for line in counts), proc.stdout  # sweep, variants
    assert sum(int(line.split()[1]) for line in counts) == res["grid_size"]
