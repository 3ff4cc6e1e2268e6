"""Pieces shared by the Trainer test workers; importing it does not import ``hf_am``.

``trainer_script.py`` stands for an unmodified user script, so it must not
import ``hf_am``; ``trainer_worker.py`` does.
"""

from __future__ import annotations

import os

import torch

VOCAB = 128
SEQ = 16


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def save_tiny_model(path: str, seed: int = 0) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_config()).save_pretrained(path)


class TokenData(torch.utils.data.Dataset):
    """Fixed random token sequences (labels = inputs): local data, same on every rank."""

    def __init__(self, n: int = 96, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def world() -> tuple:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def full_parameters(trainer) -> dict:
    """Name -> full fp32 tensor on CPU, whatever the backend."""
    from torch.distributed.tensor import DTensor

    model = trainer.model
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in zip(names, params)}
    out = {}
    for n, p in zip(names, params):
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[n] = t.detach().float().cpu().clone()
    return out


def evidence(trainer) -> dict:
    from torch.distributed.tensor import DTensor

    am = trainer.optimizer
    while am is not None and not hasattr(am, "beta_summary_tensor"):
        am = getattr(am, "optimizer", None)
    ev = {
        "model_wrapped": type(trainer.model_wrapped).__name__,
        "optimizer_chain": [],
        "am_class": type(am).__name__ if am is not None else None,
        "am_scope": getattr(am, "scope", None),
        "num_param_groups": len(am.param_groups) if am is not None else None,
        "dtensor_params": any(isinstance(p, DTensor) for p in trainer.model.parameters()),
        "is_deepspeed": bool(trainer.is_deepspeed_enabled),
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "process_group_set": am is not None and am.process_group is not None,
    }
    o = trainer.optimizer
    while o is not None and len(ev["optimizer_chain"]) < 6:
        ev["optimizer_chain"].append(type(o).__name__)
        o = getattr(o, "optimizer", None)
    if trainer.is_deepspeed_enabled:
        engine = trainer.model_wrapped
        ev["zero_stage"] = engine.zero_optimization_stage()
        ev["zero_offload_optimizer"] = bool(engine.zero_offload_optimizer()) if hasattr(engine, "zero_offload_optimizer") else None
        zero_opt = engine.optimizer
        dp_group = getattr(zero_opt, "dp_process_group", None)
        same = am is not None and dp_group is not None and am.process_group is not None
        if same and am.process_group is not dp_group:  # e.g. ZeRO-3's per-sub-group handle of the same ranks
            ranks = torch.distributed.get_process_group_ranks
            same = ranks(am.process_group) == ranks(dp_group)
        ev["process_group_is_dp_group"] = bool(same)
        ev["engine_world_size"] = engine.dp_world_size
    if am is not None:
        # lr and weight decay per group as the optimizer sees them (the Trainer's split kept?)
        ev["group_weight_decays"] = sorted({float(g["weight_decay"]) for g in am.param_groups})
        # tensors per group as built (ZeRO-3 empties the groups between its step() calls)
        ev["group_sizes"] = sorted(int(g.get("am_init_tensors", len(g["params"]))) for g in am.param_groups)
    return ev


