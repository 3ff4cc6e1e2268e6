"""FSDP1 (``use_orig_params=True``) + AM-AdamW wired by the Trainer callback, on CPU/gloo.

accelerate turns FSDP into DDP on CPU, so a Trainer cannot run FSDP1 here; this worker drives a real
``FullyShardedDataParallel`` tiny Llama with a plain loop and lets ``AMTrainerCallback.on_train_begin``
do what it does inside the Trainer.  Usage::

    python trainer_fsdp1.py MODEL_DIR OUT [wire|nowire]        # one process: reference
    torchrun --nproc_per_node 2 trainer_fsdp1.py MODEL_DIR OUT [wire|nowire]
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

import hf_am  # noqa: E402
from dist_common import exit_process  # noqa: E402
from trainer_common import TokenData  # noqa: E402


def main(model_dir: str, out: str, mode: str = "wire") -> int:
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from hf_am.integrations.trainer import AMTrainerCallback

    ws = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if ws > 1:
        dist.init_process_group("gloo")
    model = LlamaForCausalLM.from_pretrained(model_dir)
    if ws > 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FSDP(
            model,
            use_orig_params=True,
            device_id=torch.device("cpu"),
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        )
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = hf_am.AMAdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=5e-3, scope="tensor"
    )
    if mode == "wire":
        AMTrainerCallback().on_train_begin(SimpleNamespace(optim="adamw_torch"), None, None, model=model, optimizer=opt)
    elif mode == "attach":  # a custom loop: the public helper
        hf_am.attach(opt, model=model)
    data = TokenData()
    betas = []
    per_rank = 4 // ws
    for step in range(5):
        batch = data.x[4 * step : 4 * step + 4][rank * per_rank : (rank + 1) * per_rank]
        model(input_ids=batch, labels=batch).loss.backward()
        if mode == "none":  # the optimizer was never wired: the first step must refuse, changing nothing
            before = [p.detach().clone() for p in model.parameters()]
            try:
                opt.step()
            except RuntimeError as exc:
                unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
                if rank == 0:
                    torch.save({"error": str(exc), "unchanged": unchanged, "state": len(opt.state)}, out)
                dist.barrier()
                dist.destroy_process_group()
                return 0
        opt.step()
        opt.zero_grad()
        betas.append(sorted(opt.betas_per_scope().double().tolist()))
    if ws > 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model):
            params = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in model.named_parameters()}
    else:
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(
            {"params": params, "betas": betas, "world_size": ws, "process_group_set": opt.process_group is not None,
             "fsdp1": type(model).__name__},
            out,
        )  # fmt: skip
    if ws > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_process(main(*sys.argv[1:]))
