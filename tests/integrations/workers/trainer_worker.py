"""Runs real ``transformers.Trainer`` trainings of a tiny Llama and records what the tests compare.

Usage (one process, or under ``torchrun`` / ``accelerate launch``)::

    python tests/integrations/workers/trainer_worker.py SPEC.json

``SPEC.json`` holds ``{"model_dir": ..., "out": ..., "runs": [RUN, ...]}``; each RUN is a
dict of :func:`run_one` options.  Rank 0 saves ``{run_name: result}`` to ``out`` with
``torch.save``; a result holds the final full parameters, the per-step ``beta`` statistics
read straight from the optimizer, the Trainer's log history and evidence of which backend
really ran (engine/wrapper types, DTensor parameters, ZeRO stage, the optimizer's group).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import hf_am  # noqa: E402,F401  (registers --optim am_adamw before any parser/TrainingArguments)

from trainer_common import TokenData, evidence, full_parameters, world  # noqa: E402


def _recorder_class():
    from transformers import TrainerCallback

    from hf_am.integrations.wrappers import find_am_optimizer

    class Recorder(TrainerCallback):
        """Reads the optimizer's beta after every optimizer step (host sync: test only)."""

        def __init__(self):
            self.steps = []
            self.per_scope = []
            self.logs = []

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            am = find_am_optimizer(optimizer)
            if am is None:
                return
            s = am.beta_stats()
            self.steps.append([s["beta"], s["beta_min"], s["beta_max"], s["restarts"]])
            self.per_scope.append(sorted(am.betas_per_scope().double().tolist()))

        def on_log(self, args, state, control, logs=None, **kwargs):
            # a user callback runs after hf_am's, like the report_to integrations: what they receive
            self.logs.append(dict(logs or {}))

    return Recorder


def run_one(spec: dict, model_dir: str, tmp: str) -> dict:
    """One training run; ``spec`` keys: name, backend (plain|ddp|deepspeed|fsdp2), deepspeed (dict),
    steps, global_batch, args (TrainingArguments overrides), resume_from (step to resume from: trains
    to ``steps`` saving checkpoints, then trains again from that checkpoint in a fresh Trainer, with
    the overrides ``resume_args``)."""
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    rank, ws = world()
    backend = spec.get("backend", "plain")
    steps = spec.get("steps", 6)
    gas = spec.get("args", {}).get("gradient_accumulation_steps", 1)
    per_device = spec.get("global_batch", 4) // ws // gas
    out_dir = os.path.join(tmp, spec["name"])

    def make_args(**extra):
        kw = dict(
            output_dir=out_dir,
            per_device_train_batch_size=per_device,
            max_steps=steps,
            learning_rate=5e-3,
            weight_decay=0.1,
            logging_steps=2,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            seed=0,
            optim="am_adamw",
            dataloader_num_workers=0,
        )
        kw.update(spec.get("args", {}))
        if spec.get("deepspeed") is not None:
            kw["deepspeed"] = json.loads(json.dumps(spec["deepspeed"]))
        kw.update(extra)
        args = TrainingArguments(**kw)
        _ = args.device  # sets up torch.distributed before a ZeRO-3 model is built under zero.Init, as scripts do
        if spec.get("deepspeed") is not None and not torch.cuda.is_available():
            import deepspeed

            # on GPUs accelerate does this; on CPU zero.Init would otherwise see a world of one
            deepspeed.init_distributed(dist_backend="gloo")
        return args

    def make_model():
        kw = {}
        if spec.get("dtype"):
            kw["dtype"] = getattr(torch, spec["dtype"])
        if backend == "fsdp2" and ws > 1:
            from transformers.distributed import DistributedConfig

            kw["distributed_config"] = DistributedConfig(fsdp_size=ws)
        return LlamaForCausalLM.from_pretrained(model_dir, **kw)

    Recorder = _recorder_class()

    def train(args, resume=None):
        model = make_model()
        rec = Recorder()
        extra = {}
        if spec.get("torch_sgd") is not None:  # reference: torch.optim.SGD with the Trainer's param groups
            extra["optimizer_cls_and_kwargs"] = (torch.optim.SGD, dict(lr=args.learning_rate, **spec["torch_sgd"]))
        trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[rec], **extra)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, rec

    result: dict = {}
    if spec.get("resume_from"):
        k = spec["resume_from"]
        args = make_args(save_strategy="steps", save_steps=k, save_only_model=False)
        trainer, rec = train(args)
        result["uninterrupted"] = {"params": full_parameters(trainer), "steps": rec.steps, "per_scope": rec.per_scope}
        del trainer
        args = make_args(save_strategy="no", **spec.get("resume_args", {}))  # e.g. another --optim
        trainer, rec = train(args, resume=os.path.join(out_dir, f"checkpoint-{k}"))
        result["resumed"] = {
            "params": full_parameters(trainer), "steps": rec.steps, "per_scope": rec.per_scope, "evidence": evidence(trainer),
        }  # fmt: skip
    else:
        args = make_args()
        trainer, rec = train(args)
    result.update(
        params=full_parameters(trainer),
        steps=rec.steps,
        per_scope=rec.per_scope,
        log_history=trainer.state.log_history,
        callback_logs=rec.logs,
        callback_order=[type(cb).__name__ for cb in trainer.callback_handler.callbacks],
        evidence=evidence(trainer),
    )
    if spec.get("save_optimizer_state"):
        result["optimizer_state"] = trainer.optimizer.state_dict()
    return result


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    rank, ws = world()
    results = {}
    for run in spec["runs"]:
        try:
            results[run["name"]] = run_one(run, spec["model_dir"], spec["tmp"])
        except Exception as exc:  # recorded, so the test can assert on the error of an expected failure
            if not run.get("expect_error"):
                raise
            results[run["name"]] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if rank == 0:
        torch.save(results, spec["out"])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from dist_common import exit_process

    exit_process(main(sys.argv[1]))
