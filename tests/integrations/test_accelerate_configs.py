"""Every file in accelerate_configs/ loads with accelerate's own config loader, and what it refers to exists.

The DeepSpeed JSONs are also run through transformers' "auto" filling, so none is left unresolved,
and must not carry an "optimizer" section (it would replace --optim am_adamw).
"""

from __future__ import annotations

import glob
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO, "accelerate_configs")
YAMLS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
JSONS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.json")))

EXPECTED = {
    "single_gpu.yaml": ("NO", 1),
    "cpu_2proc.yaml": ("MULTI_GPU", 1),  # two CPU processes (gloo), what the tests and CPU recipes use
    "multi_gpu_ddp.yaml": ("MULTI_GPU", 1),
    "fsdp2.yaml": ("FSDP", 1),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 1),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 1),
    "deepspeed_zero3_offload.yaml": ("DEEPSPEED", 1),
    "multi_node_ddp.yaml": ("MULTI_GPU", 2),
    "multi_node_fsdp2.yaml": ("FSDP", 2),
    "multi_node_deepspeed_zero2.yaml": ("DEEPSPEED", 2),
    "multi_node_deepspeed_zero3.yaml": ("DEEPSPEED", 2),
}


def _load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(path)


def test_every_expected_config_is_there():
    assert set(EXPECTED) <= {os.path.basename(p) for p in YAMLS}


@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_config_loads_and_references_exist(path):
    cfg = _load(path)
    name = os.path.basename(path)
    kind, machines = EXPECTED.get(name, (None, None))
    if kind is not None:
        assert cfg.distributed_type.value == kind and cfg.num_machines == machines, (name, cfg)
    assert cfg.use_cpu is (name.startswith("cpu_"))
    if cfg.distributed_type.value == "DEEPSPEED":
        ds_file = cfg.deepspeed_config["deepspeed_config_file"]
        assert os.path.isfile(os.path.join(REPO, ds_file)), f"{name}: {ds_file} does not exist (relative to the repo root)"
        assert cfg.mixed_precision in (None, "no"), "accelerate refuses mixed_precision next to a deepspeed_config_file"
        stage = json.load(open(os.path.join(REPO, ds_file)))["zero_optimization"]["stage"]
        assert f"zero{stage}" in name
        assert cfg.deepspeed_config.get("zero3_init_flag") is (stage == 3)
    if cfg.distributed_type.value == "FSDP":
        assert int(cfg.fsdp_config["fsdp_version"]) == 2
    if machines == 2:
        assert cfg.main_process_ip == "MAIN_NODE_IP" and cfg.main_process_port and cfg.num_processes == 16
        if cfg.distributed_type.value == "DEEPSPEED":
            assert cfg.deepspeed_config.get("deepspeed_multinode_launcher") == "standard"


@pytest.mark.parametrize("path", JSONS, ids=os.path.basename)
def test_deepspeed_json_has_auto_values_and_no_optimizer(path, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    raw = json.load(open(path))
    assert "optimizer" not in raw, "an optimizer section would make DeepSpeed ignore --optim am_adamw"
    assert raw["train_micro_batch_size_per_gpu"] == "auto" and raw["gradient_clipping"] == "auto"
    assert raw["bf16"]["enabled"] == "auto"
    if "offload" in os.path.basename(path):
        assert raw["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # transformers resolves every "auto" from the Trainer's arguments and the model
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, use_cpu=True)
    cfg = HfTrainerDeepSpeedConfig(path)
    cfg.trainer_config_process(args)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    cfg.trainer_config_finalize(args, model, num_training_steps=10)
    unresolved = [k for k, v in _walk(cfg.config) if v == "auto"]
    assert not unresolved, unresolved
    assert cfg.config["train_micro_batch_size_per_gpu"] == 2 and cfg.config["gradient_accumulation_steps"] == 2
    del torch


def _walk(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
