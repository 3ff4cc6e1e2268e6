"""End-to-end, offline: the LLaMA-on-C4 recipe (a few steps through the real Trainer) and
the scale-study runner on a 2x2 grid (table, CSV and plot files, resumption)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "pretrain_llama_c4.py"
STUDY = ROOT / "recipes" / "scale_study.py"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
# a few steps of the tiny size, small evaluation
FAST = ["--max_steps", "4", "--eval_steps", "2", "--logging_steps", "1", "--eval_tokens", "1024",
        "--per_device_train_batch_size", "4", "--global_batch_size", "8", "--per_device_eval_batch_size", "4"]


def _am_adamw_registered() -> bool:
    code = ("import sys, tempfile; sys.path.insert(0, %r); import hf_am\n"
            "from transformers import TrainingArguments\n"
            "TrainingArguments(output_dir=tempfile.mkdtemp(), optim='am_adamw')") % str(ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=ENV).returncode == 0


AM_ADAMW = _am_adamw_registered()


def _run(cmd, timeout=300):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _lrs(summary):
    return [r["learning_rate"] for r in summary["log_history"] if "learning_rate" in r]


@pytest.mark.parametrize("variant", ["no_warmup", "warmup"])
def test_recipe_runs_offline_and_reports(tmp_path, variant):
    out = tmp_path / variant
    _run([sys.executable, str(RECIPE), "--model_size", "tiny", "--variant", variant, "--learning_rate", "1e-3",
          "--optim", "adamw_torch", "--output_dir", str(out), "--disable_tqdm", "true", *FAST])
    s = json.loads((out / "run_summary.json").read_text())
    assert s["status"] == "done" and s["dataset"] == "local" and s["tokenizer"] == "local-bpe"
    assert s["optim"] == "adamw_torch"
    assert s["sequences_per_step"] == 8 and s["tokens_per_step"] == 8 * 256
    assert s["model_config"]["hidden_size"] == 64 and s["model_config"]["vocab_size"] == 8192
    assert s["eval_tokens"] == 1024
    assert math.isfinite(s["final_eval_loss"]) and s["final_eval_loss"] < math.log(8192) + 1
    assert abs(s["final_eval_perplexity"] - math.exp(s["final_eval_loss"])) < 1e-6 * s["final_eval_perplexity"]
    evals = [r for r in s["log_history"] if "eval_loss" in r]
    assert len(evals) >= 2
    for r in evals:
        assert abs(r["eval_perplexity"] - math.exp(r["eval_loss"])) < 1e-3 * r["eval_perplexity"]
        assert 0.0 <= r["eval_next_token_accuracy"] <= 1.0
    lrs = _lrs(s)
    assert len(lrs) == 4
    if variant == "no_warmup":
        assert lrs[0] > 0.9e-3  # starts at (nearly) the peak
    else:
        assert lrs[0] < 0.9e-3 and max(lrs) > lrs[0]  # ramps up first
    decay = lrs[lrs.index(max(lrs)):]
    assert min(decay) >= 1e-4 * 0.999 and decay == sorted(decay, reverse=True)  # cosine down to 10% of peak
    progress = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    assert progress[-1]["tokens"] == progress[-1]["step"] * 8 * 256


@pytest.mark.skipif(not AM_ADAMW, reason="hf_am does not register --optim am_adamw yet")
def test_recipe_with_am_adamw_logs_beta(tmp_path):
    out = tmp_path / "am"
    _run([sys.executable, str(RECIPE), "--model_size", "tiny", "--variant", "no_warmup", "--optim", "am_adamw",
          "--output_dir", str(out), "--disable_tqdm", "true", *FAST])
    s = json.loads((out / "run_summary.json").read_text())
    assert s["optim"] == "am_adamw" and math.isfinite(s["final_eval_loss"])
    am_keys = {k for r in s["log_history"] for k in r if k.startswith("am_")}
    assert am_keys, "no am_* beta_t statistics in the log history"


def test_scale_study_2x2_grid_writes_table_and_plots(tmp_path):
    optims = "adamw_torch,am_adamw" if AM_ADAMW else "adamw_torch,sgd"
    out = tmp_path / "study"
    cmd = [sys.executable, str(STUDY), "--sizes", "tiny", "--optims", optims, "--variants", "warmup,no_warmup",
           "--seeds", "0", "--output_dir", str(out), "--no_progress", "--learning_rate", "1e-3", "--jobs", "2",
           "--extra_args", " ".join(FAST)]
    proc = _run(cmd, timeout=900)
    assert "4 to run" in proc.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert {(r["optim"], r["variant"]) for r in rows} == {
        (o, v) for o in optims.split(",") for v in ("warmup", "no_warmup")}
    for r in rows:
        assert math.isfinite(float(r["final_eval_loss"]))
        assert float(r["final_ppl"]) == pytest.approx(math.exp(float(r["final_eval_loss"])), rel=1e-6)
        assert float(r["best_eval_loss"]) <= float(r["final_eval_loss"]) + 1e-9
        assert r["loss_spikes"] != "" and r["diverged"] in {"0", "1"}
    assert any(k.startswith("eval_loss@") for k in rows[0])
    md = (out / "results.md").read_text()
    assert md.count("| tiny |") == 4
    assert "AdamW" in md and "no_warmup" in md
    plots = out / "plots"
    expected = ["eval_loss_vs_tokens_tiny.png", "train_loss_vs_tokens_tiny.png", "final_loss_vs_size.png"]
    if AM_ADAMW:
        expected.append("beta_t.png")
        for r in rows:
            if r["optim"] == "am_adamw":
                assert any(k.startswith("am_") and r[k] != "" for k in r), "no beta_t statistics in results.csv"
    for name in expected:
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name

    # resumable: a second invocation finds every run finished and only rebuilds the report
    (out / "results.csv").unlink()
    proc = _run(cmd)
    assert "0 to run" in proc.stdout
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 4


LAUNCHERS = {
    "torchrun": ["torchrun", "--standalone", "--nproc_per_node", "2"],
    "accelerate": ["accelerate", "launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml")],
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_recipe_two_cpu_processes(tmp_path, launcher):
    out = tmp_path / "ddp"
    _run([*LAUNCHERS[launcher], str(RECIPE), "--model_size", "tiny",
          "--variant", "no_warmup", "--optim", "adamw_torch", "--output_dir", str(out), "--disable_tqdm", "true",
          *FAST], timeout=600)
    s = json.loads((out / "run_summary.json").read_text())
    assert s["world_size"] == 2
    assert s["sequences_per_step"] == 8  # 4 per rank x 2 ranks, no accumulation
    assert math.isfinite(s["final_eval_loss"])
