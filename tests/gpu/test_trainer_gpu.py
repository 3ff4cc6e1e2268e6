"""GPU checks of the Trainer integration (skipped without CUDA).

* FSDP2 through accelerate's FSDP plugin (``accelerate launch`` with an FSDP config,
  ``fsdp_version: 2``) on ``min(2, #GPUs)`` processes equals a one-process GPU run
  without FSDP, on an unmodified script run through ``-m hf_am.run``; the parameters
  must really be DTensors.
* The callback's per-step accumulation of the beta statistics makes no host sync
  (``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from trainer_harness import SCRIPT, free_port, max_param_diff, run_command  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _script_args(model_dir, out, results, per_device):
    return [
        SCRIPT, "--model_dir", model_dir, "--results", results, "--output_dir", out,
        "--optim", "am_adamw", "--optim_args", "lam=0.1,scope=tensor", "--weight_decay", "0.1",
        "--learning_rate", "5e-3", "--max_steps", "6", "--per_device_train_batch_size", str(per_device),
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def test_fsdp2_accelerate_plugin_equals_single_gpu(model_dir, tmp_path):
    n = min(2, torch.cuda.device_count())
    ref_results = str(tmp_path / "ref.pt")
    run_command([sys.executable, "-m", "hf_am.run", *_script_args(model_dir, str(tmp_path / "ref"), ref_results, 4)], timeout=300)

    cfg = tmp_path / "fsdp2_gpu.yaml"
    cfg.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\ndowncast_bf16: 'no'\n"
        "fsdp_config:\n  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
        "  fsdp_cpu_ram_efficient_loading: false\n  fsdp_offload_params: false\n"
        "  fsdp_reshard_after_forward: true\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n"
        "  fsdp_activation_checkpointing: false\n"
        f"machine_rank: 0\nmain_training_function: main\nmixed_precision: 'no'\nnum_machines: 1\nnum_processes: {n}\n"
        "rdzv_backend: static\nsame_network: true\nuse_cpu: false\n"
    )
    results = str(tmp_path / "fsdp.pt")
    run_command(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--num_processes", str(n),
         "--main_process_port", str(free_port()), "-m", "hf_am.run",
         *_script_args(model_dir, str(tmp_path / "fsdp"), results, 4 // n)],
        timeout=400,
    )  # fmt: skip
    got, ref = torch.load(results, weights_only=False), torch.load(ref_results, weights_only=False)
    ev = got["evidence"]
    assert ev["dtensor_params"] and ev["am_class"] == "AMAdamW" and ev["world_size"] == n, ev
    assert ref["evidence"]["am_class"] == "AMAdamW" and not ref["evidence"]["dtensor_params"]
    assert max_param_diff(got["params"], ref["params"]) <= 1e-5
    betas = lambda r: torch.tensor([[h["am_beta"], h["am_beta_min"], h["am_beta_max"]] for h in r["log_history"] if "loss" in h])  # noqa: E731
    assert torch.allclose(betas(got), betas(ref), atol=1e-4, rtol=0), (betas(got), betas(ref))


def test_beta_accumulation_makes_no_host_sync():
    import hf_am
    from hf_am.integrations.trainer import AMTrainerCallback

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).cuda()
    opt = hf_am.AMAdamW(model.parameters(), lr=1e-2)
    callback = AMTrainerCallback()
    callback._am = opt
    for _ in range(4):
        model(torch.randn(8, 16, device="cuda")).square().mean().backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            callback.on_optimizer_step(None, None, None, optimizer=opt)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    logs = {"loss": 1.0}
    callback.on_log(None, SimpleNamespace(log_history=[], global_step=4), None, logs=logs)
    assert 0.0 <= logs["am_beta_min"] <= logs["am_beta"] <= logs["am_beta_max"] <= 0.9 + 1e-6
