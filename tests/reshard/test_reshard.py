"""A checkpoint written by 2 ranks resumes on 1, one written by 1 resumes on 2 (issue 13).

Three launches of ``tests/reshard/workers/reshard_worker.py`` (``dist_common.launch``, torchrun,
gloo, CPU) share one folder of checkpoints:

* A, 1 rank: FSDP2 saves (``dcp.save``); ZeRO-1 and ZeRO-2 save and convert
  (``hf_am.integrations.deepspeed.to_universal``); the conversions that must be refused.
* B, 2 ranks: FSDP2 and ZeRO-1/2 save; they resume A's checkpoints (1 -> 2).
* C, 1 rank: FSDP2 and ZeRO-1/2 resume B's checkpoints (2 -> 1).

Every resume trains 3 more steps on each rank's slice of the same global batches and is compared
with the uninterrupted 1-process run of all 6 steps: parameters to 1e-6, every step's betas to
1e-5, the AM state right after the load (momenta, second moments, per-scope scalars, step) with
that run's state after 3 steps.  The negative control resumes the same weights with a fresh AM
state and must land far from the run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import dist_common
import hf_am

pytestmark = [pytest.mark.reshard]

TOL = 1e-6
BETA_TOL = 1e-5  # as in tests/distributed: float32 sums reduced in another order
LR = 0.5  # AM-SGD, loss_estimate='exact', full batch: large enough for beta to adapt


WORKER = str(Path(__file__).resolve().parent / "workers" / "reshard_worker.py")
FSDP2_CASES = ["adamw:tensor:two", "sgd:group:two", "sgd:model:one:exact"]
STAGES = ["1", "2"]  # JSON keys
DIRECTIONS = {"1->2": "B", "2->1": "C"}


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    for sub in ("f1", "f2", "d1", "d2", "d3"):
        (root / sub).mkdir()
    run = lambda nproc, args: dist_common.launch(WORKER, args, root, nproc=nproc, timeout=300, torchrun=True)  # noqa: E731
    a = run(1, [f"fsdp2-save={root}/f1", f"ds-save={root}/d1:1,2", f"ds-refusals={root}/d3"])
    b = run(2, [f"fsdp2-save={root}/f2", f"fsdp2-resume={root}/f1", f"ds-save={root}/d2:1,2", f"ds-resume={root}/d1:1,2"])
    c = run(1, [f"fsdp2-resume={root}/f2", f"ds-resume={root}/d2:1,2"])
    return {"A": a, "B": b, "C": c}


def _assert_resumed_exactly(ranks, what):
    r0 = ranks[0]
    for rank, r in enumerate(ranks):
        assert r["max_param_diff"] <= TOL, f"{what} rank {rank}: max |resumed - uninterrupted| = {r['max_param_diff']}"
        assert r["max_beta_diff"] <= BETA_TOL, f"{what} rank {rank}: max beta difference {r['max_beta_diff']}"
        assert r["am_state_nontrivial"], f"{what}: the loaded AM scalars are those of a fresh optimizer"
    for other in ranks[1:]:
        assert other["betas"] == r0["betas"], f"{what}: ranks computed different betas"
    assert r0["min_ref_beta"] < 0.85, "beta never adapted: the comparison would be weak"
    # Negative control: the same weights with a fresh AM state end far from the uninterrupted run.
    assert r0["fresh_max_param_diff"] > 1000 * TOL, r0["fresh_max_param_diff"]
    assert r0["fresh_max_beta_diff"] > 100 * BETA_TOL, r0["fresh_max_beta_diff"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("case", FSDP2_CASES)
def test_fsdp2_dcp_resumes_on_another_world_size(launches, case, direction):
    """FSDP2 + ``torch.distributed.checkpoint``: every AM state key arrives, equal to the uninterrupted
    run's state, and training continues that run (``loss_estimate="exact"`` included: DCP's
    state-initialising step without a closure used to be refused)."""
    launch = launches[DIRECTIONS[direction]]
    saved_by = 2 if direction == "2->1" else 1
    assert {r["world"] for r in launch} == {3 - saved_by}
    ranks = [r["fsdp2-resume"][case] for r in launch]
    name = case.split(":")[0]
    opt_cls = hf_am.AMAdamW if name == "adamw" else hf_am.AMSGD
    expected = {*opt_cls.required_scalar_state, *opt_cls.state_tensor_names} | ({"am_prev_loss"} if case.endswith("exact") else set())
    for r in ranks:
        assert set(r["state_keys"]) == expected, r["state_keys"]
        assert {"am_state_format", "am_prev_lr"} <= set(r["group_keys"]), r["group_keys"]
        assert r["state_diff"] <= TOL, f"{case} {direction}: loaded state differs from the run's by {r['state_diff']}"
    _assert_resumed_exactly(ranks, f"FSDP2 {case} {direction}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("stage", STAGES)
def test_zero_universal_checkpoint_resumes_on_another_world_size(launches, stage, direction):
    """ZeRO-1/2: ``to_universal`` + ``"checkpoint": {"load_universal": true}`` carry the AM scalars
    (0-d again after the load, equal to the run's) and the moments; training continues the run."""
    launch = launches[DIRECTIONS[direction]]
    ranks = [r["ds-resume"][stage] for r in launch]
    expected = {*hf_am.AMAdamW.required_scalar_state, *hf_am.AMAdamW.state_tensor_names}
    for r in ranks:
        assert set(r["state_keys"]) == expected, r["state_keys"]
        assert r["scalar_state_diff"] <= TOL, f"ZeRO-{stage} {direction}: AM scalars differ by {r['scalar_state_diff']}"
    _assert_resumed_exactly(ranks, f"ZeRO-{stage} {direction}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("stage", STAGES)
def test_zero_plain_checkpoint_on_another_world_size_is_refused(launches, stage, direction):
    """A plain (non-universal) ZeRO checkpoint on another world size: DeepSpeed's error, with hf_am's
    instructions appended by the attached engine's load_checkpoint."""
    saved, now = (2, 1) if direction == "2->1" else (1, 2)
    for r in launches[DIRECTIONS[direction]]:
        err = r["ds-resume"][stage]["plain_error"]
        assert err is not None, "loading a checkpoint of another world size must fail"
        assert f"world size of {saved} but the current world size is {now}" in err, err
        assert "python -m hf_am.integrations.deepspeed" in err and '"load_universal": true' in err, err


@pytest.mark.multiprocess
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_universal_checkpoint_without_am_state_is_refused_at_load(launches, direction):
    """A universal checkpoint without AM's files (what DeepSpeed's converter alone makes where it does
    not fail on AM's 0-d scalars) is refused by load_checkpoint, instead of restarting the AM state."""
    for r in launches[DIRECTIONS[direction]]:
        for stage in STAGES:
            res = r["ds-resume"][stage]
            assert res["am_dropped_is_ours"], res["am_dropped_error"]
            assert "but not AM's ['am_prod', 'am_beta'" in res["am_dropped_error"], res["am_dropped_error"]
            assert "python -m hf_am.integrations.deepspeed" in res["am_dropped_error"]
    for stage in STAGES:
        assert launches["A"][0]["ds-save"][stage]["dropped_files"] == 25  # 5 tensors x 5 AM scalars


@pytest.mark.multiprocess
def test_what_cannot_be_carried_is_refused_with_the_reason(launches):
    """``to_universal`` refuses ZeRO-3 and AM-SGD checkpoints before writing anything; a ZeRO-3 universal
    checkpoint made by DeepSpeed's converter alone is refused at load time."""
    res = launches["A"][0]["ds-refusals"]
    assert "ZeRO-3 checkpoint" in res["zero3"] and "cannot be carried" in res["zero3"], res["zero3"]
    assert "momentum_buffer" in res["sgd"] and "FSDP2" in res["sgd"], res["sgd"]
    assert res["zero3_wrote_nothing"] and res["sgd_wrote_nothing"]
    assert res["zero3_load_error"] is not None and "but not AM's" in res["zero3_load_error"], res["zero3_load_error"]


def test_dcp_state_initialising_step_of_exact_estimate():
    """``set_optimizer_state_dict`` into a fresh ``loss_estimate="exact"`` optimizer (no process group):
    DCP's closure-less zero-gradient step is accepted, the checkpoint's am_prev_loss arrives, and the
    resumed step equals the uninterrupted one; a closure-less step of real training is still refused."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        return model, hf_am.AMSGD(model.parameters(), lr=LR, momentum=0.9, scope="model", loss_estimate="exact")

    def step(model, opt):
        def closure():
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)

    model, opt = build()
    for _ in range(3):
        step(model, opt)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))  # a checkpoint, not the live tensors
    resumed, resumed_opt = build()
    resumed.load_state_dict(model.state_dict())
    set_optimizer_state_dict(resumed, resumed_opt, saved)
    first = next(iter(resumed.parameters()))
    assert float(resumed_opt.state[first]["am_prev_loss"]) == float(opt.state[next(iter(model.parameters()))]["am_prev_loss"])
    step(model, opt)
    step(resumed, resumed_opt)
    assert resumed_opt.beta == opt.beta and resumed_opt.beta < 0.85
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    fresh_model, fresh = build()
    fresh_model(x).pow(2).mean().backward()
    with pytest.raises(ValueError, match="needs the loss"):
        fresh.step()


@pytest.mark.multiprocess
def test_trainer_resumes_zero2_checkpoint_on_one_rank(tmp_path, model_dir):
    """The Trainer: a 2-rank ZeRO-2 run saves checkpoint-3; ``python -m hf_am.integrations.deepspeed``
    converts it; a 1-rank Trainer with ``"checkpoint": {"load_universal": true}`` and
    ``--resume_from_checkpoint`` continues the 2-rank run to step 6 (parameters 1e-6, betas 1e-5).
    The same checkpoint without AM's files is refused when training starts."""
    import glob
    import os
    import shutil
    import sys

    from trainer_harness import run_command, torchrun

    worker = str(Path(__file__).resolve().parent / "workers" / "trainer_reshard.py")
    model, out = model_dir, str(tmp_path / "out")
    run_command(torchrun(2) + [worker, "save", model, out, str(tmp_path / "save.pt")])
    ckpt = os.path.join(out, "checkpoint-3")
    run_command([sys.executable, "-m", "hf_am.integrations.deepspeed", "--input_folder", f"{ckpt}/global_step3",
                 "--output_folder", f"{ckpt}/global_step3_universal"])  # fmt: skip
    assert open(os.path.join(ckpt, "latest_universal")).read() == "global_step3_universal"
    shutil.copytree(ckpt, ckpt + "-am-dropped")
    dropped = glob.glob(os.path.join(ckpt + "-am-dropped", "global_step3_universal", "zero", "*", "am_*.pt"))
    assert dropped
    for f in dropped:
        os.unlink(f)
    run_command(torchrun(1) + [worker, "resume", model, out, str(tmp_path / "resume.pt")])
    run_command(torchrun(1) + [worker, "resume", model, out, str(tmp_path / "dropped.pt"), "checkpoint-3-am-dropped"])
    full, resumed, refused = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("save", "resume", "dropped"))
    assert (full["world"], resumed["world"]) == (2, 1) and "error" not in resumed, resumed.get("error")
    assert len(resumed["per_scope"]) == 3, "the resumed Trainer must run steps 4-6 only"
    diff = max((full["params"][k].double() - resumed["params"][k].double()).abs().max().item() for k in full["params"])
    assert diff <= TOL, f"max |resumed on 1 rank - uninterrupted on 2| = {diff}"
    beta_diff = max(abs(a - b) for s, r in zip(full["per_scope"][3:], resumed["per_scope"]) for a, b in zip(s, r))
    assert beta_diff <= BETA_TOL, beta_diff
    assert min(min(s) for s in full["per_scope"]) < 0.85, "beta never adapted: the comparison would be weak"
    assert refused["error"].startswith("UniversalCheckpointError:") and "but not AM's" in refused["error"], refused["error"]
