"""A training script as users write them: ``HfArgumentParser`` + ``Trainer``, and no ``import hf_am``.

The tests launch it through ``python -m hf_am.run`` / ``accelerate launch -m hf_am.run``,
which is what makes ``--optim am_adamw`` a valid choice here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import HfArgumentParser, LlamaForCausalLM, Trainer, TrainingArguments

from trainer_common import TokenData, evidence, full_parameters, world  # noqa: E402


@dataclass
class ScriptArguments:
    model_dir: str = field(metadata={"help": "a saved tiny model"})
    results: Optional[str] = field(default=None, metadata={"help": "where rank 0 saves params/logs (torch.save)"})


def main() -> int:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses()
    model = LlamaForCausalLM.from_pretrained(script_args.model_dir)
    trainer = Trainer(model=model, args=training_args, train_dataset=TokenData())
    trainer.train()
    rank, _ = world()
    result = {
        "params": full_parameters(trainer),
        "log_history": trainer.state.log_history,
        "evidence": evidence(trainer),
        "hf_am_imported": "hf_am" in sys.modules,
    }
    if rank == 0:
        print("TRAINED_WITH", result["evidence"]["optimizer_chain"])
        if script_args.results:
            torch.save(result, script_args.results)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
