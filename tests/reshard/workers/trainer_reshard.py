"""Worker: the Trainer with DeepSpeed ZeRO-2 resumes on another world size (issue 13).

Usage (under ``torchrun``)::

    trainer_reshard.py save   MODEL_DIR OUT_DIR RESULT.pt   # trains 6 steps, saves checkpoint-3
    trainer_reshard.py resume MODEL_DIR OUT_DIR RESULT.pt [CHECKPOINT]  # --resume_from_checkpoint OUT_DIR/CHECKPOINT

``save`` trains ``--optim am_adamw`` for 6 steps with ``save_steps=3`` (the uninterrupted run); the
test then converts ``checkpoint-3/global_step3`` with ``python -m hf_am.integrations.deepspeed``
(which writes ``checkpoint-3/latest_universal``).  ``resume`` runs a fresh Trainer whose DeepSpeed
config has ``"checkpoint": {"load_universal": true}`` from ``checkpoint-3`` to step 6.  The global
batch is the same on every world size (per-device batch = 4 / world size).  Rank 0 saves the final
parameters and the per-step betas, or the error of a resume that must be refused.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import hf_am  # noqa: E402,F401  (registers --optim am_adamw)

from helpers import deepspeed_config  # noqa: E402
from trainer_common import TokenData, full_parameters, world  # noqa: E402
from trainer_worker import _recorder_class  # noqa: E402

GLOBAL_BATCH, STEPS, SAVE_AT = 4, 6, 3


def train(phase: str, model_dir: str, out_dir: str, checkpoint: str) -> dict:
    import deepspeed
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    _, ws = world()
    ds = deepspeed_config(2)
    if phase == "resume":
        ds["checkpoint"] = {"load_universal": True}
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=GLOBAL_BATCH // ws, max_steps=STEPS, learning_rate=5e-3,
        weight_decay=0.1, logging_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, optim="am_adamw",
        dataloader_num_workers=0, deepspeed=ds, save_strategy="steps" if phase == "save" else "no", save_steps=SAVE_AT,
        save_only_model=False,
    )  # fmt: skip
    _ = args.device
    deepspeed.init_distributed(dist_backend="gloo")
    rec = _recorder_class()()
    trainer = Trainer(model=LlamaForCausalLM.from_pretrained(model_dir), args=args, train_dataset=TokenData(), callbacks=[rec])
    try:
        trainer.train(resume_from_checkpoint=os.path.join(out_dir, checkpoint) if phase == "resume" else None)
    except Exception as exc:  # noqa: BLE001 - a refused resume: the test asserts type and message
        return {"error": f"{type(exc).__name__}: {exc}", "world": ws}
    result = {"params": full_parameters(trainer), "per_scope": rec.per_scope, "world": ws}
    return result


def main() -> int:
    phase, model_dir, out_dir, result_path = sys.argv[1:5]
    result = train(phase, model_dir, out_dir, sys.argv[5] if len(sys.argv) > 5 else f"checkpoint-{SAVE_AT}")
    if world()[0] == 0:
        torch.save(result, result_path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from dist_common import exit_process

    exit_process(main())
