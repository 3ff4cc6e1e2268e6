"""``--optim am_adamw`` / ``am_sgd`` on every backend: same math as one process.

Every test launches real processes (``torchrun`` / ``accelerate launch``, gloo on CPU)
that train a tiny Llama with a real ``Trainer`` on the same global batches as a
one-process reference run, then asserts

* the backend really engaged (DDP wrapper, DeepSpeed engine at the asked ZeRO
  stage with the optimizer wired to its data-parallel group, DTensor parameters),
  so a silent fallback cannot pass;
* the final parameters agree with the reference to 1e-6 and the ``beta`` sequence
  (mean/min/max/restarts per step and every scope's beta) to 1e-5.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from trainer_harness import (  # noqa: E402
    REPO,
    SCRIPT,
    assert_same_training,
    ds_config,
    free_port,
    run_command,
    run_worker,
    subprocess_env,
)

pytestmark = pytest.mark.multiprocess

# The runs every backend repeats: the Trainer's decay/no-decay split with scope=tensor,
# one model-wide beta (weight decay 0 so DeepSpeed can merge the groups), the Restart
# variant per group, and AM-SGD with its default model scope.
RUNS = {
    "tensor": {"args": {"optim_args": "lam=0.1,scope=tensor"}},
    "model": {"args": {"optim_args": "scope=model,lam=0.2", "weight_decay": 0.0}},
    # with gradient accumulation, clipping and a warmup+cosine schedule (DeepSpeed does these itself)
    "group_restart": {
        "args": {
            "optim_args": "scope=group,restart_threshold=0.6",
            "gradient_accumulation_steps": 2,
            "max_grad_norm": 0.5,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 2,
        }
    },
    "sgd_model": {"args": {"optim": "am_sgd", "optim_args": "momentum=0.9", "weight_decay": 0.0, "learning_rate": 0.05}},
}


def runs(*names, **common):
    out = []
    for name in names:
        run = {"name": name, **{k: v for k, v in RUNS[name].items() if k != "args"}, "args": dict(RUNS[name]["args"])}
        for key, value in common.items():
            run[key] = value
        out.append(run)
    return out


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """One process, no distributed backend, global batch 4."""
    return run_worker(tmp_path_factory.mktemp("ref"), model_dir, runs(*RUNS), launcher="python")


def test_reference_runs_are_adaptive(reference):
    for name, result in reference.items():
        betas = torch.tensor(result["steps"])
        assert betas.shape == (6, 4)
        # step 1 has no momentum yet (beta = beta_max); afterwards beta moves
        assert betas[1:, 0].std() > 0 or betas[1:, 1].min() < 0.85, (name, betas)
    assert torch.tensor(reference["group_restart"]["steps"])[-1, 3] > 0, "the restart run never restarted"


def test_ddp_two_processes_equal_one(model_dir, reference, tmp_path):
    got = run_worker(tmp_path, model_dir, runs("tensor", "sgd_model", backend="ddp"), nproc=2)
    for name, result in got.items():
        ev = result["evidence"]
        assert ev["world_size"] == 2 and ev["model_wrapped"] == "DistributedDataParallel", ev
        assert not ev["process_group_set"], "DDP replicas must not all-reduce the beta sums"
        assert not ev["dtensor_params"] and not ev["is_deepspeed"]
        assert_same_training(result, reference[name])


@pytest.mark.parametrize(
    "stage,names",
    [(1, ("tensor", "model")), (2, tuple(RUNS)), (3, tuple(RUNS))],
    ids=["zero1", "zero2", "zero3"],
)
def test_deepspeed_zero_two_processes_equal_one(model_dir, reference, tmp_path, stage, names):
    got = run_worker(tmp_path, model_dir, runs(*names, backend="deepspeed", deepspeed=ds_config(stage)), nproc=2)
    for name, result in got.items():
        ev = result["evidence"]
        assert ev["is_deepspeed"] and ev["model_wrapped"] == "DeepSpeedEngine", ev
        assert ev["zero_stage"] == stage and ev["engine_world_size"] == 2, ev
        assert ev["process_group_is_dp_group"], "the AM optimizer must sum over ZeRO's data-parallel group"
        if "scope=tensor" in RUNS[name]["args"]["optim_args"]:
            # one group per tensor, each keeping the Trainer's weight decay
            assert set(ev["group_sizes"]) == {1} and ev["group_weight_decays"] == [0.0, 0.1], ev
        if "scope=model" in RUNS[name]["args"]["optim_args"] or name == "sgd_model":
            assert ev["num_param_groups"] == 1, ev  # the decay/no-decay groups agreed and were merged
        assert_same_training(result, reference[name])


def test_fsdp2_distributed_config_two_processes_equal_one(model_dir, reference, tmp_path):
    got = run_worker(tmp_path, model_dir, runs("tensor", "model", "group_restart", backend="fsdp2"), nproc=2)
    for name, result in got.items():
        ev = result["evidence"]
        assert ev["world_size"] == 2 and ev["dtensor_params"], ev
        assert not ev["is_deepspeed"]
        assert_same_training(result, reference[name])


def _accelerate_deepspeed_yaml(tmp_path, ds_json: str) -> str:
    path = os.path.join(str(tmp_path), "accelerate_ds_cpu.yaml")
    with open(path, "w") as f:
        f.write(
            "compute_environment: LOCAL_MACHINE\n"
            "distributed_type: DEEPSPEED\n"
            "deepspeed_config:\n"
            f"  deepspeed_config_file: {ds_json}\n"
            "  zero3_init_flag: false\n"
            "machine_rank: 0\n"
            "num_machines: 1\n"
            "num_processes: 2\n"
            "use_cpu: true\n"
            "rdzv_backend: static\n"
            "same_network: true\n"
        )
    return path


@pytest.mark.parametrize("ds_json", ["ds_zero2.json", "ds_zero3_offload.json"])
def test_accelerate_launch_deepspeed_with_shipped_config(model_dir, reference, tmp_path, ds_json):
    """``accelerate launch -m hf_am.run script.py --optim am_adamw`` with the DeepSpeed JSON shipped in
    accelerate_configs/ (its "auto" values), on an unmodified script (it never imports hf_am)."""
    cfg = _accelerate_deepspeed_yaml(tmp_path, os.path.join(REPO, "accelerate_configs", ds_json))
    results = os.path.join(str(tmp_path), "results.pt")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg,
        "--main_process_port", str(free_port()), "-m", "hf_am.run", SCRIPT,
        "--model_dir", model_dir, "--results", results, "--output_dir", str(tmp_path / "out"),
        "--optim", "am_adamw", "--optim_args", "lam=0.1,scope=tensor", "--weight_decay", "0.1",
        "--learning_rate", "5e-3", "--max_steps", "6", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
        "--use_cpu", "--disable_tqdm", "true",
    ]  # fmt: skip
    run_command(cmd, timeout=300)
    got = torch.load(results, weights_only=False)
    ev = got["evidence"]
    assert ev["is_deepspeed"] and ev["model_wrapped"] == "DeepSpeedEngine" and ev["engine_world_size"] == 2, ev
    assert ev["am_class"] == "AMAdamW" and ev["process_group_is_dp_group"], ev
    assert ev["zero_stage"] == (3 if "zero3" in ds_json else 2)
    if "offload" in ds_json:
        assert ev["zero_offload_optimizer"], ev
    ref = reference["tensor"]
    from trainer_harness import max_param_diff

    assert max_param_diff(got["params"], ref["params"]) <= 1e-6
    # logging_steps=1: every log entry carries that step's beta statistics
    logged = torch.tensor([[h["am_beta"], h["am_beta_min"], h["am_beta_max"]] for h in got["log_history"] if "loss" in h])
    expected = torch.tensor(ref["steps"])[:, :3]
    assert torch.allclose(logged, expected, atol=1e-5, rtol=0), (logged, expected)


def test_zero2_resume_is_bit_for_bit(model_dir, tmp_path):
    """Two processes, ZeRO-2, cosine schedule with warmup: stop after step 3, resume in a fresh Trainer."""
    run = {
        "name": "resume",
        "backend": "deepspeed",
        "deepspeed": ds_config(2),
        "resume_from": 3,
        "args": {"optim_args": "lam=0.1,restart_threshold=0.5", "lr_scheduler_type": "cosine", "warmup_steps": 2},
    }
    got = run_worker(tmp_path, model_dir, [run], nproc=2)["resume"]
    assert got["evidence"]["zero_stage"] == 2 and got["evidence"]["process_group_is_dp_group"]
    full, resumed = got["uninterrupted"], got["resumed"]
    for name in full["params"]:
        assert torch.equal(full["params"][name], resumed["params"][name]), name
    assert resumed["steps"] == full["steps"][3:]
    assert resumed["per_scope"] == full["per_scope"][3:]


def test_deepspeed_misconfigurations_are_errors(model_dir, tmp_path):
    """A config "optimizer" section next to --optim am_adamw, scope=model over groups with different
    weight decays, and ZeRO-Offload with "zero_force_ds_cpu_optimizer": true stop with a clear error
    instead of training with something else (one process is enough: these fail before any step)."""
    with_optimizer = ds_config(2)
    with_optimizer["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    runs_ = [
        {"name": "optimizer_section", "backend": "deepspeed", "deepspeed": with_optimizer, "expect_error": True, "steps": 1},
        {
            "name": "model_scope_split",
            "backend": "deepspeed",
            "deepspeed": ds_config(2),
            "expect_error": True,
            "steps": 1,
            "args": {"optim_args": "scope=model", "weight_decay": 0.1},
        },
    ]
    forced = ds_config(2, offload_optimizer={"device": "cpu"})
    forced["zero_force_ds_cpu_optimizer"] = True
    runs_.append({"name": "offload_forced", "backend": "deepspeed", "deepspeed": forced, "expect_error": True, "steps": 1})
    got = run_worker(tmp_path, model_dir, runs_, nproc=1)
    err = got["optimizer_section"].get("error", "")
    assert "ValueError" in err and '"optimizer" section' in err and "am_adamw" in err, err
    err = got["model_scope_split"].get("error", "")
    assert "ValueError" in err and "scope='model'" in err and "weight_decay=0.1" in err and "scope=tensor" in err, err
    err = got["offload_forced"].get("error", "")
    assert "ValueError" in err and '"zero_force_ds_cpu_optimizer": false' in err and "set to true" in err, err


def test_unmodified_script_under_accelerate_launch_ddp(model_dir, reference, tmp_path):
    """``accelerate launch --multi_gpu`` with a ``use_cpu`` config (2 processes, DDP on gloo) runs ``-m hf_am.run``
    (``--cpu --num_processes 2`` would start one process only)."""
    cfg = os.path.join(str(tmp_path), "ddp_cpu.yaml")
    with open(cfg, "w") as f:
        f.write(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmachine_rank: 0\nnum_machines: 1\n"
            "num_processes: 2\nuse_cpu: true\nmixed_precision: 'no'\nrdzv_backend: static\nsame_network: true\n"
        )
    results = os.path.join(str(tmp_path), "results.pt")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg, "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(free_port()), "-m", "hf_am.run", SCRIPT,
        "--model_dir", model_dir, "--results", results, "--output_dir", str(tmp_path / "out"),
        "--optim", "am_adamw", "--optim_args", "lam=0.1,scope=tensor", "--weight_decay", "0.1",
        "--learning_rate", "5e-3", "--max_steps", "6", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
        "--use_cpu", "--disable_tqdm", "true",
    ]  # fmt: skip
    run_command(cmd, timeout=300, env=subprocess_env())
    got = torch.load(results, weights_only=False)
    assert got["evidence"]["world_size"] == 2 and got["evidence"]["model_wrapped"] == "DistributedDataParallel"
    from trainer_harness import max_param_diff

    assert max_param_diff(got["params"], reference["tensor"]["params"]) <= 1e-6


def _script_command(model_dir, results, out, *extra):
    return [
        "-m", "hf_am.run", SCRIPT, "--model_dir", model_dir, "--results", results, "--output_dir", out,
        "--optim", "am_adamw", "--optim_args", "lam=0.1,scope=tensor", "--weight_decay", "0.1",
        "--learning_rate", "5e-3", "--max_steps", "6", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def test_torchrun_of_an_unmodified_script_without_use_cpu_is_distributed(model_dir, reference, tmp_path):
    """The documented ``torchrun --standalone --nproc_per_node 2 -m hf_am.run script.py`` on CPU, with no
    --use_cpu: hf_am.run makes the Trainer distributed (before, each rank trained its own copy)."""
    results = os.path.join(str(tmp_path), "results.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_script_command(model_dir, results, str(tmp_path / "out"))]  # fmt: skip
    out = run_command(cmd, timeout=300)
    assert "setting ACCELERATE_USE_CPU=true" in out
    got = torch.load(results, weights_only=False)
    assert got["evidence"]["world_size"] == 2 and got["evidence"]["model_wrapped"] == "DistributedDataParallel"
    from trainer_harness import max_param_diff

    assert max_param_diff(got["params"], reference["tensor"]["params"]) <= 1e-6


def test_a_multi_process_launch_that_is_not_distributed_is_refused(model_dir, tmp_path):
    """Two processes, Trainer not distributed (ACCELERATE_USE_CPU=false stands for a script that
    forgot --use_cpu): the AM callback stops before the first step, naming the flag."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_script_command(model_dir, os.path.join(str(tmp_path), "r.pt"), str(tmp_path / "out"))]  # fmt: skip
    with pytest.raises(AssertionError) as info:
        run_command(cmd, timeout=300, env=subprocess_env(ACCELERATE_USE_CPU="false"))
    assert "2 processes were launched (WORLD_SIZE=2), but the Trainer is not distributed" in str(info.value)
    assert "add --use_cpu" in str(info.value)
    assert not os.path.exists(os.path.join(str(tmp_path), "r.pt"))


def test_readme_deepspeed_launch_runs_from_any_directory(model_dir, reference, tmp_path):
    """``accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml --num_processes 2 -m hf_am.run``
    from a directory other than the repository root: the yaml finds its DeepSpeed JSON and ZeRO-2 runs,
    exact (on CPU with the script's --use_cpu, as the docs say); without --use_cpu the run stops before the
    first step naming the flag (it used to fail inside DeepSpeed with a batch-size assertion)."""
    results = os.path.join(str(tmp_path), "results.pt")
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        os.path.join(REPO, "accelerate_configs", "deepspeed_zero2.yaml"), "--num_processes", "2",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    with pytest.raises(AssertionError) as info:
        run_command(launch + _script_command(model_dir, results, str(tmp_path / "out")), timeout=300, cwd=str(tmp_path))
    assert "but the Trainer is not distributed" in str(info.value) and "add --use_cpu" in str(info.value)
    launch[-1] = str(free_port())
    run_command(launch + _script_command(model_dir, results, str(tmp_path / "out"), "--use_cpu"), timeout=300, cwd=str(tmp_path))
    got = torch.load(results, weights_only=False)
    assert got["evidence"]["is_deepspeed"] and got["evidence"]["zero_stage"] == 2, got["evidence"]
    from trainer_harness import max_param_diff

    assert max_param_diff(got["params"], reference["tensor"]["params"]) <= 1e-6


def test_fsdp1_use_orig_params_is_wired_by_the_callback(model_dir, tmp_path):
    """FSDP1 cannot run under the Trainer on CPU (accelerate falls back to DDP there), so a real
    ``FullyShardedDataParallel`` (use_orig_params=True, one unit per decoder layer) is driven by a plain
    loop and wired by ``AMTrainerCallback.on_train_begin``, as inside the Trainer. Without the wiring the
    parameters differ from the one-process run by ~5e-3 (measured)."""
    from trainer_harness import WORKERS_DIR, max_param_diff, torchrun

    worker = os.path.join(WORKERS_DIR, "trainer_fsdp1.py")
    ref_out, got_out = str(tmp_path / "ref.pt"), str(tmp_path / "fsdp1.pt")
    run_command([sys.executable, worker, model_dir, ref_out], timeout=120)
    run_command(torchrun(2) + [worker, model_dir, got_out, "wire"], timeout=180)
    ref, got = torch.load(ref_out), torch.load(got_out)
    assert got["fsdp1"] == "FullyShardedDataParallel" and got["world_size"] == 2 and got["process_group_set"]
    assert max_param_diff(got["params"], ref["params"]) <= 1e-6
    for b_got, b_ref in zip(got["betas"], ref["betas"]):
        assert torch.allclose(torch.tensor(b_got), torch.tensor(b_ref), atol=1e-5, rtol=0)


def test_raw_fsdp1_custom_loop_is_exact_with_attach_and_refuses_without(model_dir, tmp_path):
    """``FullyShardedDataParallel(model, use_orig_params=True)`` and an optimizer built on its parameters,
    no Trainer: with ``hf_am.attach(opt, model=model)`` it equals the one-process run; without, the first
    step refuses (it used to train with per-rank betas, 0.433 vs 0.393 at step 2) and changes nothing."""
    from trainer_harness import WORKERS_DIR, max_param_diff, torchrun

    worker = os.path.join(WORKERS_DIR, "trainer_fsdp1.py")
    ref_out, got_out, bare_out = str(tmp_path / "ref.pt"), str(tmp_path / "fsdp1.pt"), str(tmp_path / "bare.pt")
    run_command([sys.executable, worker, model_dir, ref_out], timeout=120)
    run_command(torchrun(2) + [worker, model_dir, got_out, "attach"], timeout=180)
    ref, got = torch.load(ref_out), torch.load(got_out)
    assert got["fsdp1"] == "FullyShardedDataParallel" and got["process_group_set"]
    assert max_param_diff(got["params"], ref["params"]) <= 1e-6
    for b_got, b_ref in zip(got["betas"], ref["betas"]):
        assert torch.allclose(torch.tensor(b_got), torch.tensor(b_ref), atol=1e-5, rtol=0)
    run_command(torchrun(2) + [worker, model_dir, bare_out, "none"], timeout=180)
    bare = torch.load(bare_out)
    assert "FSDP1-sharded parameters" in bare["error"] and "hf_am.attach(" in bare["error"], bare
    assert bare["unchanged"] and bare["state"] == 0
