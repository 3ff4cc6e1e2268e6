"""``recipes/scale_study.py --launcher slurm`` against a real single-node SLURM on localhost
(the ``slurm_cluster`` fixture in conftest.py): a 2x2 tiny grid as four batch jobs, a point
that fails on purpose, resumption without and with ``--retry-failed``, the same CSV/Markdown/
plots as the local launcher, the job scripts of ``--dry_run``, and the error without sbatch."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "recipes" / "scale_study.py"
# the tiny size, a few steps (as FAST in tests/recipes/test_recipes.py)
FAST = ["--max_steps", "4", "--eval_steps", "2", "--logging_steps", "1", "--eval_tokens", "1024",
        "--per_device_train_batch_size", "4", "--global_batch_size", "8", "--per_device_eval_batch_size", "4"]
GRID = ["--sizes", "tiny", "--optims", "adamw_torch,sgd", "--variants", "warmup,no_warmup", "--seeds", "0",
        "--learning_rate", "1e-3", "--extra_args", " ".join(FAST)]
FAILING = "tiny-sgd-warmup-s0"

# Loaded by every Python of a job when the test puts its folder on PYTHONPATH (sbatch exports the
# submitting environment): the recipe process of the run named in HFAM_TEST_FAIL_RUN exits with 3.
SITECUSTOMIZE = '''\
import os, sys
_name = os.environ.get("HFAM_TEST_FAIL_RUN")
if _name and sys.argv and sys.argv[0].endswith("pretrain_llama_c4.py") and any(_name in a for a in sys.argv):
    sys.stderr.write("deliberate failure of " + _name + " (test)\\n")
    sys.stderr.flush()
    os._exit(3)
'''


def _study(args, env, expect_rc=0, timeout=300):
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(STUDY), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, f"rc {proc.returncode}\n{out[-6000:]}"
    print(f"[test] scale_study {' '.join(a for a in args if a.startswith('--l') or a.startswith('--retry'))}: "
          f"{time.time() - t0:.1f}s")
    return out


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _md_shape(md: str) -> str:
    """results.md with every number and the output path blanked: the structure only."""
    md = re.sub(r"Runs in `[^`]*`", "Runs in `DIR`", md)
    return re.sub(r"-?\d+(\.\d+)?(e[+-]?\d+)?", "#", md)


def test_cluster_runs_a_job(slurm_cluster):
    out = subprocess.run(["srun", "-N1", "-p", slurm_cluster.partition, "hostname"], capture_output=True, text=True,
                         env=slurm_cluster.env(), timeout=60)
    assert out.returncode == 0, out.stderr + slurm_cluster.logs()
    assert out.stdout.strip()


def test_grid_on_slurm_resume_retry_and_same_report_as_local(slurm_cluster, tmp_path):
    cluster = slurm_cluster
    t0 = time.time()
    out = tmp_path / "slurm_study"
    fail_dir = tmp_path / "fail_hook"
    fail_dir.mkdir()
    (fail_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = cluster.env(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("HFAM_TEST_FAIL_RUN", None)
    pythonpath = [str(fail_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    failing_env = dict(env, HFAM_TEST_FAIL_RUN=FAILING, PYTHONPATH=os.pathsep.join(pythonpath))
    slurm = [*GRID, "--output_dir", str(out), "--launcher", "slurm", "--slurm-partition", cluster.partition,
             "--slurm-cpus-per-task", "1", "--slurm-time", "00:10:00", "--slurm-poll-interval", "0.5",
             "--no_progress"]
    before = cluster.job_ids()
    # the local launcher on the same grid, for step 5, runs meanwhile (the runs are single-threaded
    # both ways, so the two studies only share the two cores)
    local = tmp_path / "local_study"
    local_proc = subprocess.Popen([sys.executable, str(STUDY), *GRID, "--output_dir", str(local), "--jobs", "2",
                                   "--no_progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=env, cwd=ROOT)

    # 1. four jobs, one of which fails (its recipe process exits 3): submitted without waiting ...
    log = _study(slurm + ["--no_plots", "--slurm-no-wait"], failing_env)
    assert "4 to submit" in log and "submitted 4 jobs" in log and "not waiting" in log
    submitted = cluster.job_ids() - before
    assert len(submitted) == 4
    assert {r["status"] for r in _rows(out / "results.csv")} <= {"submitted", "done"}
    # ... then the same command (the failure travelled with the jobs' environment at submission)
    # waits for the jobs already in SLURM instead of submitting them again
    log = _study(slurm + ["--no_plots"], env, expect_rc=1)
    assert re.search(r"[1-4] still queued or running", log) and "0 to submit" in log, log
    assert f"run {FAILING} FAILED" in log
    states = cluster.job_states()
    assert set(states) - before == submitted
    ours = {j: s for j, s in states.items() if j not in before}
    assert len(ours) == 4, states
    assert sorted(s for _, s in ours.values()) == ["COMPLETED", "COMPLETED", "COMPLETED", "FAILED"], ours
    assert {n for n, s in ours.values() if s == "FAILED"} == {f"scale-{FAILING}"}
    rows = {r["run"]: r for r in _rows(out / "results.csv")}
    assert rows[FAILING]["status"] == "failed"
    assert all(r["status"] == "done" for n, r in rows.items() if n != FAILING)
    failed = (out / "runs" / FAILING / "failed.json").read_text()
    assert '"returncode": 3' in failed and "deliberate failure" in failed
    script = (out / "runs" / FAILING / "slurm.sbatch").read_text()
    assert f"#SBATCH --partition={cluster.partition}" in script and "#SBATCH --cpus-per-task=1" in script
    assert "#SBATCH --time=00:10:00" in script

    # 2. again, without the failure and without --retry-failed: nothing is submitted
    ids = cluster.job_ids()
    log = _study(slurm + ["--no_plots"], env, expect_rc=1)
    assert "3 finished" in log and "1 failed earlier" in log and "0 to submit" in log
    assert "--retry-failed" in log and not re.search(r"submitted \d+ jobs", log)
    assert cluster.job_ids() == ids
    assert {r["run"]: r["status"] for r in _rows(out / "results.csv")}[FAILING] == "failed"

    # 3. --retry-failed: exactly the failed point is resubmitted, and now finishes. It is retried
    # with the multi-node launch line (--slurm-srun: srun starts torchrun, which meets at a c10d
    # rendezvous on the job's first node), here on one node with two CPU processes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # (sbatch refusing the job, here for a partition that does not exist, stops the study with
    # sbatch's message and leaves the point failed)
    bad = [a if a != cluster.partition else "nosuchpartition" for a in slurm]
    log = _study(bad + ["--retry-failed", "--no_plots"], env, expect_rc=2)
    assert "sbatch refused" in log and "invalid partition" in log.lower() and "Traceback" not in log, log
    assert cluster.job_ids() == ids
    assert (out / "runs" / FAILING / "failed.json").exists()
    retry = [a for a in slurm if a != "--no_progress"]  # this time with the progress bar (on stderr)
    log = _study(retry + ["--retry-failed", "--no_plots", "--slurm-srun", "--nproc_per_node", "2",
                          "--slurm-cpus-per-task", "2", "--slurm-rdzv-port", str(port)], env)
    assert "slurm jobs" in log  # the bar
    new = cluster.job_states()
    added = {j: s for j, s in new.items() if j not in ids}
    assert list(added.values()) == [(f"scale-{FAILING}", "COMPLETED")], added
    assert "1 to submit" in log and "submitted 1 jobs" in log
    assert not (out / "runs" / FAILING / "failed.json").exists()
    script = (out / "runs" / FAILING / "slurm.sbatch").read_text()
    assert "\nsrun --nodes=" in script and "--rdzv_backend=c10d" in script and f"$head_node:{port}" in script
    summary = json.loads((out / "runs" / FAILING / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sequences_per_step"] == 8
    slurm_rows = _rows(out / "results.csv")
    assert len(slurm_rows) == 4 and all(r["status"] == "done" for r in slurm_rows)

    # 4. a finished study: no job submitted, the report rebuilt
    ids = cluster.job_ids()
    (out / "results.csv").unlink()
    log = _study(slurm, env)
    assert "4 finished" in log and "0 to submit" in log
    assert cluster.job_ids() == ids
    assert len(_rows(out / "results.csv")) == 4

    # 5. the local launcher on the same grid writes the same CSV columns, rows, table and plots
    local_log, _ = local_proc.communicate(timeout=300)
    assert local_proc.returncode == 0, local_log[-5000:]
    assert "4 to run" in local_log
    local_rows = _rows(local / "results.csv")
    slurm_rows = _rows(out / "results.csv")
    assert list(local_rows[0]) == list(slurm_rows[0])
    assert [(r["run"], r["status"], r["steps"], r["tokens"]) for r in local_rows] == \
           [(r["run"], r["status"], r["steps"], r["tokens"]) for r in slurm_rows]
    for lr, sr in zip(local_rows, slurm_rows):
        assert math.isfinite(float(sr["final_eval_loss"]))
        if sr["run"] != FAILING:  # (that one ran as two processes, each reading its own shards)
            # one thread per run both ways (OMP_NUM_THREADS from --jobs 2 here, --cpus-per-task 1 there)
            assert float(sr["final_eval_loss"]) == pytest.approx(float(lr["final_eval_loss"]), rel=1e-4), lr["run"]
    assert _md_shape((out / "results.md").read_text()) == _md_shape((local / "results.md").read_text())
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(p.name for p in (local / "plots").iterdir())
    print(f"[test] whole SLURM study test: {time.time() - t0:.1f}s")


def test_job_that_dies_before_the_recipe_is_marked_failed_by_the_study(slurm_cluster, tmp_path):
    """A job that ends without the job script's own failed.json (here: its --slurm-setup line exits
    7; in real life TIMEOUT, OUT_OF_MEMORY, scancel ...): the study writes it, with the SLURM state."""
    out = tmp_path / "dies"
    env = slurm_cluster.env(HF_HUB_OFFLINE="1")
    point = ["--sizes", "tiny", "--optims", "adamw_torch", "--variants", "warmup", "--seeds", "0",
             "--output_dir", str(out), "--launcher", "slurm", "--slurm-poll-interval", "0.3", "--no_progress",
             "--no_plots"]
    log = _study(point + ["--slurm-partition", slurm_cluster.partition, "--slurm-setup", "exit 7"], env, expect_rc=1)
    assert "1 to submit" in log
    assert "FAILED (job" in log and ": FAILED)" in log
    record = json.loads((out / "runs" / "tiny-adamw_torch-warmup-s0" / "failed.json").read_text())
    assert record["slurm_state"] == "FAILED" and record["slurm_job_id"]
    assert _rows(out / "results.csv")[0]["status"] == "failed"


def test_dry_run_writes_job_scripts_with_per_size_resources(tmp_path):
    out = tmp_path / "dry"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH="/nonexistent")  # no sbatch needed
    log = _study(["--sizes", "tiny,1b", "--optims", "am_adamw", "--variants", "warmup", "--seeds", "0",
                  "--output_dir", str(out), "--launcher", "slurm", "--dry_run", "--slurm-partition", "gpu",
                  "--slurm-gpus-per-job", "0,1b=8", "--slurm-nodes", "1,1b=2", "--slurm-time", "00:20:00,1b=2-00:00:00",
                  "--slurm-cpus-per-task", "2,1b=32", "--slurm-mem", "1b=400G", "--slurm-extra=--constraint=h100",
                  "--slurm-setup", "module load cuda", "--slurm-python", "python3"], env)
    tiny = (out / "runs" / "tiny-am_adamw-warmup-s0" / "slurm.sbatch").read_text()
    big = (out / "runs" / "1b-am_adamw-warmup-s0" / "slurm.sbatch").read_text()
    assert f"sbatch {out / 'runs' / 'tiny-am_adamw-warmup-s0' / 'slurm.sbatch'}" in log
    for text in (tiny, big):
        assert "#SBATCH --partition=gpu" in text and "#SBATCH --constraint=h100" in text
        assert "module load cuda" in text and "--model_size" in text and "mark-failed" in text
    assert "#SBATCH --nodes=1" in tiny and "--gres" not in tiny and "#SBATCH --time=00:20:00" in tiny
    assert "#SBATCH --cpus-per-task=2" in tiny and "--mem" not in tiny and "srun" not in tiny
    assert "\npython3 " in tiny
    assert "#SBATCH --nodes=2" in big and "#SBATCH --gres=gpu:8" in big and "#SBATCH --time=2-00:00:00" in big
    assert "#SBATCH --cpus-per-task=32" in big and "#SBATCH --mem=400G" in big
    assert re.search(r"srun .*python3 -m torch.distributed.run --nnodes=\"\$SLURM_NNODES\" --nproc_per_node=8 .*"
                     r"--rdzv_endpoint=\"\$head_node:29500\"", big)
    assert not (out / "runs" / "tiny-am_adamw-warmup-s0" / "slurm_job.json").exists()


def test_clear_error_without_sbatch(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH="/nonexistent")
    log = _study([*GRID, "--output_dir", str(tmp_path / "x"), "--launcher", "slurm", "--no_progress"], env,
                 expect_rc=2)
    assert "--launcher slurm needs the SLURM client commands" in log and "sbatch" in log and "not on PATH" in log
    assert "Traceback" not in log
