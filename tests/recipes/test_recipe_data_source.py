"""``--dataset auto`` and the data source: the literature sizes never fall back to the local
corpus, an explicit ``--dataset local`` is honoured, and every rank of a distributed run uses
the same source (all ranks check, then all stop when they disagree)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import c4_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "pretrain_llama_c4.py"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
LITERATURE_SIZES = ["60m", "130m", "350m", "1b"]


def test_choose_dataset_policy():
    assert c4_data.choose_dataset("auto", local_fallback_ok=True, reachable=False) == "local"
    assert c4_data.choose_dataset("auto", local_fallback_ok=False, reachable=True) == "c4"
    assert c4_data.choose_dataset("auto", local_fallback_ok=True, reachable=lambda: True) == "c4"
    with pytest.raises(c4_data.DataSourceError, match="--dataset local"):
        c4_data.choose_dataset("auto", local_fallback_ok=False, reachable=False, what="--model_size 60m")
    # explicit choices are taken as given
    assert c4_data.choose_dataset("local", local_fallback_ok=False, reachable=True) == "local"
    assert c4_data.choose_dataset("c4", local_fallback_ok=True, reachable=False) == "c4"
    with pytest.raises(ValueError):
        c4_data.choose_dataset("pile", local_fallback_ok=True)


def test_offline_probe_is_the_real_one():
    # HF_HUB_OFFLINE=1 (set for the whole test session): the real probe says "unreachable"
    assert c4_data.hub_offline() and not c4_data.hub_reachable()
    with pytest.raises(c4_data.DataSourceError, match="HF_HUB_OFFLINE"):
        c4_data.choose_dataset("auto", local_fallback_ok=False)
    assert c4_data.choose_dataset_all_ranks("auto", local_fallback_ok=True) == "local"  # no process group


@pytest.mark.parametrize("size", LITERATURE_SIZES)
def test_literature_size_refuses_the_offline_fallback(tmp_path, size):
    out = tmp_path / size
    proc = subprocess.run([sys.executable, str(RECIPE), "--model_size", size, "--optim", "adamw_torch",
                           "--output_dir", str(out)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "--dataset local" in proc.stderr and f"--model_size {size}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr  # a clear message, not a crash
    assert not (out / "run_summary.json").exists()


def test_literature_size_trains_on_local_when_asked_explicitly(tmp_path):
    # a 60M model, one step of one 32-token sequence: the explicit choice goes through
    out = tmp_path / "60m-local"
    proc = subprocess.run(
        [sys.executable, str(RECIPE), "--model_size", "60m", "--dataset", "local", "--optim", "adamw_torch",
         "--output_dir", str(out), "--disable_tqdm", "true", "--max_steps", "1", "--seq_len", "32",
         "--per_device_train_batch_size", "1", "--global_batch_size", "1", "--eval_tokens", "32",
         "--per_device_eval_batch_size", "1", "--eval_steps", "1", "--logging_steps", "1"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "not the C4 experiment" in proc.stderr  # said loudly
    s = json.loads((out / "run_summary.json").read_text())
    assert s["dataset"] == "local" and s["data"]["requested"] == "local"
    assert s["data"]["source"] == "local corpus" and s["tokenizer"] == "local-llama"
    assert s["model_config"]["hidden_size"] == 512


def test_tiny_size_still_falls_back_offline(tmp_path):
    # covered end to end by tests/recipes/test_recipes.py; here just the summary's record
    from pretrain_llama_c4 import LOCAL_CORPUS_SIZES

    assert set(LOCAL_CORPUS_SIZES) == {"tiny", "small"}
    assert not set(LOCAL_CORPUS_SIZES) & set(LITERATURE_SIZES)


WORKER = textwrap.dedent('''
    import json, os, sys
    import torch.distributed as dist
    import torch.multiprocessing as mp
    import c4_data

    def work(rank, world, port, reachable_by_rank, fallback_ok, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            got = c4_data.choose_dataset_all_ranks("auto", local_fallback_ok=fallback_ok,
                                                   reachable=reachable_by_rank[rank], what="--model_size 60m")
            result = {"ok": got}
        except c4_data.DataSourceError as exc:
            result = {"error": str(exc)}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
        dist.destroy_process_group()

    if __name__ == "__main__":
        port, reach, fallback_ok, out = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
        mp.spawn(work, args=(len(reach), port, reach, fallback_ok, out), nprocs=len(reach), join=True)
''')


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(tmp_path, reach, fallback_ok):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(ROOT / "recipes"), ENV.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), json.dumps(reach),
                           "1" if fallback_ok else "0", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(len(reach))]


@pytest.mark.multiprocess
def test_ranks_that_agree_get_the_same_source(tmp_path):
    assert _ranks(tmp_path, [False, False], True) == [{"ok": "local"}, {"ok": "local"}]


@pytest.mark.multiprocess
def test_ranks_that_disagree_all_stop(tmp_path):
    # rank 0 sees the Hub, rank 1 does not: before, rank 0 trained on C4 and rank 1 on the local corpus
    results = _ranks(tmp_path, [True, False], True)
    assert all("error" in r and "disagree" in r["error"] for r in results), results
    assert "rank 0: c4" in results[0]["error"] and "rank 1: local" in results[1]["error"]


@pytest.mark.multiprocess
def test_a_refusal_on_one_rank_stops_every_rank(tmp_path):
    results = _ranks(tmp_path, [False, False], False)
    assert all("error" in r and "--dataset local" in r["error"] for r in results), results
    mixed = _ranks(tmp_path, [True, False], False)  # rank 1 refuses, rank 0 would use C4
    assert all("error" in r for r in mixed), mixed


@pytest.mark.multiprocess
def test_torchrun_literature_size_offline_stops_every_rank(tmp_path):
    # the real launch path: torchrun, two gloo ranks, HF_HUB_OFFLINE=1; the ranks compare their
    # decisions through torch.distributed and all stop, none hangs
    out = tmp_path / "ddp-60m"
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(RECIPE), "--model_size", "60m",
                           "--optim", "adamw_torch", "--output_dir", str(out)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("pass `--dataset local`") >= 2, proc.stderr[-4000:]
    assert "the same on all 2 ranks" in proc.stderr
    assert not (out / "run_summary.json").exists()
