#!/usr/bin/env python
"""Pretrain a LLaMA-style model on C4 with the Hugging Face Trainer (AdamW or AM-AdamW).

Written in the style of transformers' ``run_clm.py``: three dataclasses (model / data /
``TrainingArguments``) parsed by ``HfArgumentParser``, so every Trainer flag works and the
optimizer is just ``--optim adamw_torch`` or ``--optim am_adamw`` (registered by
``import hf_am``).

One device::

    python recipes/pretrain_llama_c4.py --model_size 60m --variant no_warmup \
        --optim am_adamw --output_dir runs/60m-am_adamw-no_warmup

Many devices::

    accelerate launch --config_file accelerate_configs/multi_gpu_ddp.yaml \
        recipes/pretrain_llama_c4.py --model_size 350m --variant warmup --optim adamw_torch ...

Sizes (``--model_size``) pick a config in ``recipes/configs`` and the training defaults in
``SIZE_PRESETS`` (steps, peak learning rate, batch); any explicit flag overrides them.
``--variant warmup`` sets ``--warmup_steps 0.1`` (10% of steps), ``--variant no_warmup``
sets it to 0. With the Hub offline (``HF_HUB_OFFLINE=1``) or ``--dataset local`` the same
code trains on the local C4-shaped corpus (see ``c4_data.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent
if str(RECIPES_DIR) not in sys.path:
    sys.path.insert(0, str(RECIPES_DIR))
if str(RECIPES_DIR.parent) not in sys.path:  # the repository root, for `import hf_am`
    sys.path.append(str(RECIPES_DIR.parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import c4_data  # noqa: E402

try:  # registers --optim am_adamw / am_sgd with TrainingArguments
    import hf_am  # noqa: F401,E402

    HF_AM_IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - only while the package is missing
    HF_AM_IMPORT_ERROR = exc

logger = logging.getLogger("pretrain_llama_c4")

CONFIG_DIR = RECIPES_DIR / "configs"
METRIC_DIR = RECIPES_DIR / "metrics" / "next_token_accuracy"
SUMMARY_FILE = "run_summary.json"
PROGRESS_FILE = "progress.jsonl"

# Training defaults per size. The four literature sizes follow the LLaMA-on-C4 setups of
# the low-memory/optimizer pretraining literature (e.g. GaLore, Zhao et al. 2024):
# 512 x 256-token sequences per step, peak LR 1e-3, cosine decay to 10% of the peak,
# evaluation on 10M validation tokens. The tiny sizes are for CPUs (see docs/recipes.md).
SIZE_PRESETS: dict[str, dict] = {
    "tiny": dict(
        config="llama_tiny.json", max_steps=200, learning_rate=3e-2, global_batch_size=16,
        per_device_train_batch_size=16, eval_tokens=32_768, tokenizer_name="local-bpe",
        eval_steps=20, logging_steps=5,
    ),
    "small": dict(
        config="llama_small.json", max_steps=600, learning_rate=5e-3, global_batch_size=32,
        per_device_train_batch_size=16, eval_tokens=65_536, tokenizer_name="local-bpe",
        eval_steps=60, logging_steps=10,
    ),
    "60m": dict(config="llama_60m.json", max_steps=10_000, learning_rate=1e-3, global_batch_size=512,
                per_device_train_batch_size=64, eval_tokens=10_000_000, eval_steps=1000, logging_steps=10),
    "130m": dict(config="llama_130m.json", max_steps=20_000, learning_rate=1e-3, global_batch_size=512,
                 per_device_train_batch_size=64, eval_tokens=10_000_000, eval_steps=1000, logging_steps=10),
    "350m": dict(config="llama_350m.json", max_steps=60_000, learning_rate=1e-3, global_batch_size=512,
                 per_device_train_batch_size=32, eval_tokens=10_000_000, eval_steps=2000, logging_steps=10),
    "1b": dict(config="llama_1b.json", max_steps=100_000, learning_rate=1e-3, global_batch_size=512,
               per_device_train_batch_size=16, eval_tokens=10_000_000, eval_steps=2000, logging_steps=10),
}
VARIANT_WARMUP = {"warmup": 0.1, "no_warmup": 0.0}


@dataclass
class ModelArguments:
    model_size: str | None = field(
        default=None, metadata={"help": f"One of {sorted(SIZE_PRESETS)}: config + training defaults."}
    )
    config_file: str | None = field(
        default=None, metadata={"help": "A LlamaConfig JSON file (overrides the size's config)."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2, ..."})


@dataclass
class DataArguments:
    dataset: str = field(
        default="auto",
        metadata={"help": "auto (C4 when the Hub answers, else local), c4 (allenai/c4 en, streaming), local."},
    )
    tokenizer_name: str = field(
        default="auto",
        metadata={"help": "auto (t5-base for c4, local-llama offline), local-llama, local-bpe, or a Hub id/path."},
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per packed training sequence."})
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "Sequences per optimizer step over all ranks; sets gradient_accumulation_steps."},
    )
    eval_tokens: int = field(default=10_000_000, metadata={"help": "Validation tokens per evaluation (fixed set)."})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "Documents in the streaming shuffle buffer."})
    variant: str | None = field(
        default=None, metadata={"help": "warmup (10% of steps linear warmup) or no_warmup."}
    )
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Cosine schedule floor as a fraction of the peak LR."})
    divergence_threshold: float = field(
        default=1.0, metadata={"help": "A logged train loss this far above its running minimum counts as a spike."}
    )


def _pre_parse(argv: list[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model_size", default=None)
    pre.add_argument("--variant", default=None)
    known, _ = pre.parse_known_args(argv)
    return known


def build_parser(argv: list[str]) -> HfArgumentParser:
    """The full parser, with recipe defaults (and the chosen size/variant presets) applied."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    defaults = dict(
        optim="adamw_torch",
        lr_scheduler_type="cosine_with_min_lr",
        weight_decay=0.0,
        max_grad_norm=1.0,
        eval_strategy="steps",
        logging_strategy="steps",
        save_strategy="no",
        report_to="none",
        seed=0,
        per_device_eval_batch_size=32,
        eval_on_start=False,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,  # divergence must show in the logs, not be averaged away
        dataloader_pin_memory=torch.cuda.is_available(),
        # without an accelerator, torchrun / accelerate multi-process runs need use_cpu for gloo DDP
        use_cpu=not torch.cuda.is_available(),
    )
    pre = _pre_parse(argv)
    if pre.model_size is not None:
        if pre.model_size not in SIZE_PRESETS:
            raise SystemExit(f"--model_size must be one of {sorted(SIZE_PRESETS)}")
        preset = dict(SIZE_PRESETS[pre.model_size])
        preset.pop("config")
        defaults.update(preset)
    if pre.variant is not None:
        if pre.variant not in VARIANT_WARMUP:
            raise SystemExit(f"--variant must be one of {sorted(VARIANT_WARMUP)}")
        defaults["warmup_steps"] = VARIANT_WARMUP[pre.variant]
    parser.set_defaults(**defaults)
    return parser


def load_model_config(model_args: ModelArguments) -> LlamaConfig:
    if model_args.config_file:
        path = Path(model_args.config_file)
    elif model_args.model_size:
        path = CONFIG_DIR / SIZE_PRESETS[model_args.model_size]["config"]
    else:
        raise SystemExit("pass --model_size or --config_file")
    return LlamaConfig.from_json_file(str(path))


class TrainStreamTrainer(Trainer):
    """Trainer whose train loader iterates a stream that is already split across ranks
    (``split_dataset_by_node``), so accelerate must not shard it a second time; and whose
    evaluation logs perplexity next to the loss."""

    def get_train_dataloader(self):
        return torch.utils.data.DataLoader(
            self.train_dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )

    def log(self, logs, *args, **kwargs):
        if "eval_loss" in logs:
            loss = logs["eval_loss"]
            logs["eval_perplexity"] = math.exp(loss) if loss < 50 else float("inf")
        return super().log(logs, *args, **kwargs)


class ProgressCallback(TrainerCallback):
    """Appends every log line (with the step and token count) to ``progress.jsonl`` so a
    supervising process (``scale_study.py``) can follow the run."""

    def __init__(self, path: Path, tokens_per_step: int):
        self.path = path
        self.tokens_per_step = tokens_per_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs is not None:
            row = {"step": state.global_step, "max_steps": state.max_steps,
                   "tokens": state.global_step * self.tokens_per_step, **logs}
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row, default=float) + "\n")


def make_compute_metrics():
    import evaluate
    import numpy as np

    metric = evaluate.load(str(METRIC_DIR))

    def preprocess_logits_for_metrics(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def compute_metrics(eval_pred):
        preds, labels = eval_pred
        return metric.compute(predictions=np.asarray(preds), references=np.asarray(labels))

    return compute_metrics, preprocess_logits_for_metrics


def divergence_events(log_history: list[dict], threshold: float) -> list[dict]:
    """Log rows with a non-finite loss / grad norm / eval loss, and logged train losses that
    exceed their running minimum by more than ``threshold`` (spikes)."""
    events, best = [], math.inf
    for row in log_history:
        bad = [k for k in ("loss", "grad_norm", "eval_loss") if k in row and not math.isfinite(float(row[k]))]
        if bad:
            events.append({"step": row.get("step"), "loss": row.get("loss", row.get("eval_loss")),
                           "kind": "non_finite", "keys": bad})
            continue
        if "loss" not in row:
            continue
        loss = float(row["loss"])
        if loss > best + threshold:
            events.append({"step": row.get("step"), "loss": loss, "kind": "spike"})
        best = min(best, loss)
    return events


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity_warning()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Dataset.*shards.*")
    if HF_AM_IMPORT_ERROR is not None and str(training_args.optim).startswith("am_"):
        raise SystemExit(f"--optim {training_args.optim} needs the hf_am package: {HF_AM_IMPORT_ERROR}")

    # cosine to min_lr_ratio of the peak unless the user chose another schedule/kwargs
    if str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)) in {
        "cosine_with_min_lr", "cosine_warmup_with_min_lr"
    } and not training_args.lr_scheduler_kwargs:
        training_args.lr_scheduler_kwargs = {"min_lr_rate": data_args.min_lr_ratio}

    world = training_args.world_size
    if data_args.global_batch_size:
        per_step = training_args.per_device_train_batch_size * world
        if data_args.global_batch_size % per_step:
            raise SystemExit(
                f"global_batch_size {data_args.global_batch_size} is not a multiple of "
                f"per_device_train_batch_size x world_size = {per_step}"
            )
        accum = data_args.global_batch_size // per_step
        if "--gradient_accumulation_steps" in argv and training_args.gradient_accumulation_steps != accum:
            raise SystemExit("--gradient_accumulation_steps contradicts --global_batch_size")
        training_args.gradient_accumulation_steps = accum
    if training_args.max_steps <= 0:
        raise SystemExit("the training stream is endless: set --max_steps (or use --model_size presets)")
    sequences_per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    tokens_per_step = sequences_per_step * data_args.seq_len

    dataset = c4_data.resolve_dataset(data_args.dataset)
    tok_name = c4_data.resolve_tokenizer_name(data_args.tokenizer_name, dataset)
    if training_args.process_index == 0:
        logger.info("data: %s | tokenizer: %s | optim: %s | world %d | %d seq x %d tok per step",
                    dataset, tok_name, getattr(training_args.optim, "value", training_args.optim), world, sequences_per_step, data_args.seq_len)
    with training_args.main_process_first(desc="corpus/tokenizer build"):
        tokenizer = c4_data.load_tokenizer(tok_name)
        if dataset == "local":
            c4_data.build_local_corpus()

    set_seed(training_args.seed)
    config = load_model_config(model_args)
    if len(tokenizer) > config.vocab_size:
        config.vocab_size = int(math.ceil(len(tokenizer) / 64) * 64)
    if dataset == "local" and tok_name == "local-bpe":
        config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.max_position_embeddings = max(config.max_position_embeddings, data_args.seq_len)
    model = LlamaForCausalLM._from_config(config, attn_implementation=model_args.attn_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    n_non_embed = n_params - model.get_input_embeddings().weight.numel()

    spec = c4_data.StreamSpec(
        dataset=dataset,
        seq_len=data_args.seq_len,
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        shuffle_buffer=data_args.shuffle_buffer,
        rank=training_args.process_index,
        world_size=world,
    )
    train_stream = c4_data.PackedTrainStream(spec, tokenizer)
    eval_ds = c4_data.eval_dataset(spec, tokenizer, data_args.eval_tokens)
    compute_metrics, preprocess = make_compute_metrics()

    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = out / PROGRESS_FILE
    if training_args.process_index == 0 and progress.exists() and not training_args.resume_from_checkpoint:
        progress.unlink()
    trainer = TrainStreamTrainer(
        model=model,
        args=training_args,
        train_dataset=train_stream,
        eval_dataset=eval_ds,
        data_collator=c4_data.collate_blocks,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
        callbacks=[ProgressCallback(progress, tokens_per_step)],
    )
    if training_args.process_index == 0:
        logger.info("model: %.2fM parameters (%.2fM non-embedding), vocab %d; eval set %d x %d tokens",
                    n_params / 1e6, n_non_embed / 1e6, config.vocab_size, len(eval_ds), data_args.seq_len)

    start = time.time()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    final_eval = trainer.evaluate()
    wall = time.time() - start

    summary = None
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        evals = [r for r in history if "eval_loss" in r] or [{"eval_loss": final_eval["eval_loss"]}]
        best = min(evals, key=lambda r: r["eval_loss"] if math.isfinite(r["eval_loss"]) else math.inf)
        summary = {
            "status": "done",
            "model_size": model_args.model_size,
            "optim": str(getattr(training_args.optim, "value", training_args.optim)),
            "optim_args": training_args.optim_args,
            "variant": data_args.variant,
            "warmup_steps": training_args.warmup_steps,
            "learning_rate": training_args.learning_rate,
            "seed": training_args.seed,
            "dataset": dataset,
            "tokenizer": tok_name,
            "seq_len": data_args.seq_len,
            "sequences_per_step": sequences_per_step,
            "tokens_per_step": tokens_per_step,
            "max_steps": training_args.max_steps,
            "world_size": world,
            "n_params": n_params,
            "n_non_embedding_params": n_non_embed,
            "model_config": {k: getattr(config, k) for k in (
                "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")},
            "eval_tokens": len(eval_ds) * data_args.seq_len,
            "final_eval_loss": final_eval["eval_loss"],
            "final_eval_perplexity": math.exp(final_eval["eval_loss"]) if final_eval["eval_loss"] < 50 else float("inf"),
            "final_next_token_accuracy": final_eval.get("eval_next_token_accuracy"),
            "best_eval_loss": best["eval_loss"],
            "best_eval_step": best.get("step"),
            "train_loss": train_result.training_loss,
            "divergence_events": divergence_events(history, data_args.divergence_threshold),
            "wall_seconds": wall,
            "log_history": history,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=float))
        logger.info("final eval loss %.4f (ppl %.2f), best %.4f, %.0fs",
                    summary["final_eval_loss"], summary["final_eval_perplexity"], summary["best_eval_loss"], wall)

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
