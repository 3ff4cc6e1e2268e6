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
sets it to 0. ``--dataset local`` trains on the local C4-shaped corpus (see ``c4_data.py``);
``--dataset auto`` (the default) uses C4 when the Hub answers and falls back to the local
corpus only for the ``tiny``/``small`` sizes: a literature size with no Hub stops with an error.

``--protocol hf_am`` (default) packs documents into full 256-token blocks, clips gradients at
1.0 and keeps fp32 weights; ``--protocol galore`` follows the GaLore reference pipeline
(``torchrun_main.py``) that the AM paper's LLaMA-on-C4 setup uses: one document per sequence,
truncated to 256 tokens and padded (padding labelled -100), no clipping, bf16 weights, the
config's 32000-entry vocabulary. See "Protocols" in ``docs/recipes.md``.
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
# sizes for which `--dataset auto` may fall back to the local corpus when the Hub is away
LOCAL_CORPUS_SIZES = ("tiny", "small")
# What each protocol changes (see docs/recipes.md, "Protocols"); explicit flags override.
PROTOCOLS: dict[str, dict] = {
    # packed blocks, clip 1.0, fp32 weights (autocast only with --bf16/--fp16), vocab rounded up
    "hf_am": dict(layout="packed", max_grad_norm=1.0, weight_dtype="float32", vocab="grow"),
    # the GaLore reference: truncate+pad per document, no clipping, bf16 weights where CUDA
    # supports bf16 (the reference's own default: float32 otherwise), the config's vocab
    "galore": dict(layout="truncate_pad", max_grad_norm=0.0, weight_dtype="auto", vocab="keep"),
}


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
        metadata={"help": "auto (C4 when the Hub answers; without it the local corpus for the tiny/small "
                          "sizes only, an error otherwise), c4 (allenai/c4 en, streaming), local."},
    )
    protocol: str = field(
        default="hf_am",
        metadata={"help": "hf_am (packed blocks, clip 1.0, fp32 weights, vocab rounded up to the tokenizer) or "
                          "galore (the GaLore reference: truncate+pad each document with -100 labels on the "
                          "padding, no clipping, bf16 weights, the config's vocab). See docs/recipes.md."},
    )
    weight_dtype: str = field(
        default="protocol",
        metadata={"help": "protocol (hf_am: float32; galore: bfloat16 when CUDA supports it, else float32, "
                          "as the reference), float32 or bfloat16: the dtype the model weights are cast to."},
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
        default=None, metadata={"help": "warmup (10%% of steps linear warmup) or no_warmup."}
    )
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Cosine schedule floor as a fraction of the peak LR."})
    divergence_threshold: float = field(
        default=1.0, metadata={"help": "A logged train loss this far above its running minimum counts as a spike."}
    )


def _pre_parse(argv: list[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model_size", default=None)
    pre.add_argument("--variant", default=None)
    pre.add_argument("--protocol", default="hf_am")
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
    if pre.protocol not in PROTOCOLS:
        raise SystemExit(f"--protocol must be one of {sorted(PROTOCOLS)}")
    defaults["max_grad_norm"] = PROTOCOLS[pre.protocol]["max_grad_norm"]
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


@dataclass(frozen=True)
class BatchPlan:
    """How many sequences one optimizer step really sees.

    ``replicas_per_process`` is the Trainer's own factor ``max(1, n_gpu)``: with one process
    and several visible GPUs it wraps the model in ``nn.DataParallel`` and loads
    ``per_device x n_gpu`` sequences per micro-batch (``TrainingArguments.train_batch_size``);
    under torchrun/accelerate (DDP, FSDP, DeepSpeed) ``n_gpu`` is 1 and ``world_size`` counts
    the processes.
    """

    per_device_batch: int
    n_gpu: int
    world_size: int
    gradient_accumulation_steps: int
    seq_len: int

    @property
    def replicas_per_process(self) -> int:
        return max(1, self.n_gpu)

    @property
    def data_parallel_size(self) -> int:
        return self.world_size * self.replicas_per_process

    @property
    def micro_batch_per_process(self) -> int:
        return self.per_device_batch * self.replicas_per_process

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.data_parallel_size * self.gradient_accumulation_steps

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def launch(self) -> str:
        if self.world_size > 1:
            return "distributed"
        return "dataparallel" if self.n_gpu > 1 else "single"


def plan_batch(per_device_batch: int, world_size: int, n_gpu: int, seq_len: int,
               global_batch_size: int | None = None, gradient_accumulation_steps: int = 1,
               accumulation_given: bool = False) -> BatchPlan:
    """The batch arithmetic of one launch, as a pure function.

    With ``global_batch_size`` the accumulation is ``global / (per_device x n_gpu x world)``;
    it must divide exactly, and an explicitly given ``gradient_accumulation_steps``
    (``accumulation_given``) must agree. Without it, the given accumulation is kept.
    Raises ``ValueError`` on a mismatch.
    """
    if per_device_batch <= 0 or world_size <= 0 or seq_len <= 0:
        raise ValueError("per-device batch, world size and seq_len must be positive")
    plan = BatchPlan(per_device_batch, max(0, n_gpu), world_size, gradient_accumulation_steps, seq_len)
    if not global_batch_size:
        return plan
    per_step = per_device_batch * plan.data_parallel_size
    if global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a multiple of per_device_train_batch_size x "
            f"data-parallel size = {per_device_batch} x {plan.data_parallel_size} = {per_step} "
            f"(world_size {world_size}, {plan.replicas_per_process} GPU(s) per process)"
        )
    accum = global_batch_size // per_step
    if accumulation_given and gradient_accumulation_steps != accum:
        raise ValueError(
            f"--gradient_accumulation_steps {gradient_accumulation_steps} contradicts --global_batch_size "
            f"{global_batch_size} (which needs {accum} with {per_step} sequences per micro-step)"
        )
    return BatchPlan(per_device_batch, plan.n_gpu, world_size, accum, seq_len)


def _flag_given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def resolve_weight_dtype(choice: str, protocol: str, cuda_bf16: bool) -> tuple[torch.dtype, str]:
    """The dtype to cast the model weights to, and why."""
    if choice not in {"protocol", "float32", "bfloat16"}:
        raise ValueError(f"--weight_dtype must be protocol, float32 or bfloat16, got {choice!r}")
    if choice != "protocol":
        return getattr(torch, choice), f"--weight_dtype {choice}"
    wanted = PROTOCOLS[protocol]["weight_dtype"]
    if wanted == "float32":
        return torch.float32, f"protocol {protocol}: fp32 weights"
    if cuda_bf16:
        return torch.bfloat16, f"protocol {protocol}: bf16 weights (CUDA supports bf16)"
    return torch.float32, (f"protocol {protocol}: fp32 weights, because CUDA bf16 is not available here "
                           "(the reference's own fallback); pass --weight_dtype bfloat16 to force bf16 weights")


def resolve_vocab_size(config_vocab: int, tokenizer, protocol: str, dataset: str, tok_name: str) -> tuple[int, int | None]:
    """(the model's vocabulary size, the id limit for the data or None).

    hf_am: grow to the tokenizer, rounded up to a multiple of 64 (t5-base's 32100 -> 32128);
    exactly the tokenizer's size for the local BPE. galore: keep the config's size (32000 for
    the literature sizes, as the reference's ``LlamaForCausalLM(config)``); the tokenizer may
    be larger only by added/special tokens (t5-base's 100 ``<extra_id_*>``), which the data
    pipeline maps to ``<unk>``.
    """
    n_tok = len(tokenizer)
    if PROTOCOLS[protocol]["vocab"] == "grow":
        vocab = config_vocab
        if n_tok > vocab:
            vocab = int(math.ceil(n_tok / 64) * 64)
        if dataset == "local" and tok_name == "local-bpe":
            vocab = n_tok
        return vocab, None
    if n_tok <= config_vocab:
        return config_vocab, None
    added = set(tokenizer.get_added_vocab().values())
    beyond = [i for i in range(config_vocab, n_tok) if i not in added]
    if beyond:
        raise SystemExit(
            f"--protocol {protocol} keeps the config's vocabulary ({config_vocab}), but the tokenizer "
            f"'{tok_name}' has {n_tok} entries and ids {beyond[0]}.. are regular tokens: use a config "
            "whose vocab_size covers the tokenizer, or another tokenizer"
        )
    return config_vocab, config_vocab


def precision_record(training_args, model) -> dict:
    weight_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    autocast = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None
    weights = "/".join(weight_dtypes)
    if autocast:
        mode = f"{weights} weights under {autocast} autocast"
    else:
        mode = f"{weights} weights, no autocast"
    return {"weight_dtype": weights, "autocast": autocast, "bf16": bool(training_args.bf16),
            "fp16": bool(training_args.fp16), "mode": mode}


class TrainStreamTrainer(Trainer):
    """Trainer whose train loader iterates a stream that is already split across ranks
    (``split_dataset_by_node``), so accelerate must not shard it a second time; and whose
    evaluation logs perplexity next to the loss.

    ``reference_loss`` (protocol galore): every micro-batch's loss is the mean over its own
    unmasked tokens and is divided by the accumulation steps, as in the GaLore reference's
    loop, instead of the Trainer's token-weighted average over the accumulated batch (the
    two differ only when micro-batches hold different numbers of real tokens, i.e. padding).
    """

    reference_loss = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.reference_loss:
            num_items_in_batch = None
        return super().training_step(model, inputs, num_items_in_batch)

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
    n_gpu = training_args.n_gpu
    protocol = data_args.protocol
    layout = PROTOCOLS[protocol]["layout"]
    try:
        plan = plan_batch(
            training_args.per_device_train_batch_size, world, n_gpu, data_args.seq_len,
            global_batch_size=data_args.global_batch_size,
            gradient_accumulation_steps=training_args.gradient_accumulation_steps,
            accumulation_given=_flag_given(argv, "--gradient_accumulation_steps"),
        )
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    training_args.gradient_accumulation_steps = plan.gradient_accumulation_steps
    if training_args.max_steps <= 0:
        raise SystemExit("the training stream is endless: set --max_steps (or use --model_size presets)")
    if plan.launch == "dataparallel" and training_args.process_index == 0:
        logger.warning(
            "one process drives %d GPUs: the Trainer uses nn.DataParallel (%d x %d sequences per micro-batch); "
            "the accumulation above accounts for it. torchrun / accelerate launch (one process per GPU) is faster.",
            n_gpu, training_args.per_device_train_batch_size, n_gpu)
    sequences_per_step = plan.global_batch
    tokens_per_step = plan.tokens_per_step

    # the data source: the same on every rank, never a silent fallback for the literature sizes
    fallback_ok = model_args.model_size in LOCAL_CORPUS_SIZES
    what = (f"--model_size {model_args.model_size}" if model_args.model_size else
            f"--config_file {model_args.config_file}")
    try:
        dataset = c4_data.choose_dataset_all_ranks(data_args.dataset, local_fallback_ok=fallback_ok, what=what)
    except (c4_data.DataSourceError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    if dataset == "local" and not fallback_ok and training_args.process_index == 0:
        logger.warning("%s trains on the 3.5M-token local corpus (--dataset local): %d steps x %d tokens "
                       "repeat it many times; this is not the C4 experiment", what, training_args.max_steps,
                       tokens_per_step)
    tok_name = c4_data.resolve_tokenizer_name(data_args.tokenizer_name, dataset)
    if training_args.process_index == 0:
        logger.info("data: %s | tokenizer: %s | optim: %s | protocol %s | world %d x %d GPU(s)/process | "
                    "%d seq x %d tok per step (accumulation %d)",
                    dataset, tok_name, getattr(training_args.optim, "value", training_args.optim), protocol, world,
                    plan.replicas_per_process, sequences_per_step, data_args.seq_len, plan.gradient_accumulation_steps)
    corpus_dir = None
    with training_args.main_process_first(desc="corpus/tokenizer build"):
        tokenizer = c4_data.load_tokenizer(tok_name)
        if dataset == "local":
            corpus_dir = c4_data.build_local_corpus()

    set_seed(training_args.seed)
    config = load_model_config(model_args)
    config.vocab_size, vocab_limit = resolve_vocab_size(config.vocab_size, tokenizer, protocol, dataset, tok_name)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = c4_data.pad_token_id_for(tokenizer) if layout == "truncate_pad" else tokenizer.pad_token_id
    config.max_position_embeddings = max(config.max_position_embeddings, data_args.seq_len)
    model = LlamaForCausalLM._from_config(config, attn_implementation=model_args.attn_implementation)
    try:
        weight_dtype, weight_dtype_reason = resolve_weight_dtype(
            data_args.weight_dtype, protocol, torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if weight_dtype != torch.float32:
        if training_args.fp16:
            raise SystemExit("--fp16 (fp16 autocast with a GradScaler) cannot train bf16 weights; "
                             "use --weight_dtype float32 or drop --fp16")
        model = model.to(weight_dtype)
    if training_args.process_index == 0:
        logger.info("weights: %s", weight_dtype_reason)
    n_params = sum(p.numel() for p in model.parameters())
    n_non_embed = n_params - model.get_input_embeddings().weight.numel()

    spec = c4_data.StreamSpec(
        dataset=dataset,
        seq_len=data_args.seq_len,
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        shuffle_buffer=data_args.shuffle_buffer,
        rank=training_args.process_index,
        world_size=world,
        layout=layout,
        vocab_limit=vocab_limit,
    )
    train_stream = c4_data.train_stream(spec, tokenizer)
    eval_ds = c4_data.eval_dataset(spec, tokenizer, data_args.eval_tokens)
    eval_real_tokens = (int(sum(int(m.sum()) for m in eval_ds["attention_mask"])) if layout == "truncate_pad"
                        else len(eval_ds) * data_args.seq_len)
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
        data_collator=c4_data.collator_for(layout),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
        callbacks=[ProgressCallback(progress, tokens_per_step)],
    )
    trainer.reference_loss = protocol == "galore"
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
            "protocol": protocol,
            "dataset": dataset,
            "data": {
                "requested": data_args.dataset,
                "source": "hub C4" if dataset == "c4" else "local corpus",
                "path": f"{c4_data.C4_HUB_ID}:{c4_data.C4_CONFIG}" if dataset == "c4" else str(corpus_dir),
                "layout": layout,
                "padding_masked": layout == "truncate_pad",
            },
            "tokenizer": tok_name,
            "tokenizer_vocab_size": len(tokenizer),
            "embedding_size": int(model.get_input_embeddings().weight.shape[0]),
            "lm_head_size": int(model.get_output_embeddings().weight.shape[0]),
            "seq_len": data_args.seq_len,
            "global_batch_size": plan.global_batch,
            "sequences_per_step": sequences_per_step,
            "tokens_per_step": tokens_per_step,
            # with truncate_pad, tokens_per_step counts sequence positions, padding included
            "tokens_per_step_counts": "positions, padding included" if layout == "truncate_pad" else "tokens",
            "per_device_train_batch_size": plan.per_device_batch,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "max_steps": training_args.max_steps,
            "world_size": world,
            "n_gpu": n_gpu,
            "data_parallel_size": plan.data_parallel_size,
            "launch": plan.launch,
            "precision": {**precision_record(training_args, trainer.model), "reason": weight_dtype_reason},
            "max_grad_norm": training_args.max_grad_norm,
            "gradient_clipping": bool(training_args.max_grad_norm and training_args.max_grad_norm > 0),
            "n_params": n_params,
            "n_non_embedding_params": n_non_embed,
            "model_config": {k: getattr(config, k) for k in (
                "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")},
            "eval_tokens": len(eval_ds) * data_args.seq_len,
            "eval_real_tokens": eval_real_tokens,
            "eval_sequences": len(eval_ds),
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
