"""The LLaMA-on-C4 data pipeline on the offline C4-shaped corpus: corpus layout, tokenizer
round trips, packing, determinism and the per-rank split."""

import json
import os
from itertools import islice
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import c4_data  # recipes/ is on sys.path through pytest's pythonpath setting (pyproject.toml)

SEQ = 64


@pytest.fixture(scope="module")
def corpus():
    return c4_data.build_local_corpus()


@pytest.fixture(scope="module")
def bpe(corpus):
    return c4_data.load_tokenizer("local-bpe")


@pytest.fixture(scope="module")
def llama(corpus):
    return c4_data.load_tokenizer("local-llama")


def _first_docs(split, n):
    return list(islice(c4_data._iter_local_texts(split), n))


def test_resolve_dataset_offline():
    assert c4_data.hub_offline()
    assert c4_data.resolve_dataset("auto") == "local"
    assert c4_data.resolve_dataset("c4") == "c4"
    assert c4_data.resolve_tokenizer_name("auto", "local") == "local-llama"
    assert c4_data.resolve_tokenizer_name("auto", "c4") == "t5-base"
    with pytest.raises(ValueError):
        c4_data.resolve_dataset("pile")


def test_local_corpus_is_c4_shaped(corpus):
    files = c4_data.local_corpus_files(corpus)
    assert len(files["train"]) == c4_data.NUM_TRAIN_SHARDS
    urls = {}
    for split, names in files.items():
        urls[split] = set()
        for name in names:
            with open(name) as fh:
                lines = fh.readlines()
            assert lines, name
            for line in lines[:50]:
                doc = json.loads(line)
                assert set(doc) == {"text", "timestamp", "url"}
                assert len(doc["text"]) >= 200
                assert doc["timestamp"].endswith("Z") and doc["timestamp"][4] == "-"
            urls[split].update(json.loads(line)["url"] for line in lines)
    assert urls["train"].isdisjoint(urls["validation"])
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["splits"]["train"]["characters"] > 10_000_000
    assert manifest["splits"]["validation"]["documents"] == len(urls["validation"])
    assert any(u.startswith("https://en.wikipedia.org/wiki/") for u in urls["train"])
    assert any(u.startswith("local://sotu/") for u in urls["train"])


def test_corpus_build_is_cached(corpus):
    stamp = (corpus / "manifest.json").stat().st_mtime_ns
    assert c4_data.build_local_corpus() == corpus
    assert (corpus / "manifest.json").stat().st_mtime_ns == stamp


def test_bpe_tokenizer_round_trips_exactly(bpe):
    assert len(bpe) == c4_data.LOCAL_BPE_VOCAB
    texts = _first_docs("validation", 20) + ["Tabs\tand  double  spaces,\nnewlines; ünïcødé — “quotes” 1790."]
    for text in texts:
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert bpe.decode(ids) == text


def test_llama_tokenizer_round_trips(llama):
    assert len(llama) == 32000
    assert (llama.bos_token, llama.eos_token) == ("<s>", "</s>")
    for text in _first_docs("validation", 20):
        ids = llama(text, add_special_tokens=False)["input_ids"]
        assert llama.decode(ids) == text
        framed = c4_data.encode_document(llama, text)
        assert framed[0] == llama.bos_token_id and framed[-1] == llama.eos_token_id
        assert framed[1:-1] == ids


def test_pack_sequences_exact_blocks_and_carry_over():
    docs = [[1] * 5, [2] * 7, [3] * 2, [4] * 11]
    blocks = list(c4_data.pack_sequences(docs, 4))
    flat = [t for d in docs for t in d]
    assert all(len(b) == 4 for b in blocks)
    assert len(blocks) == len(flat) // 4
    assert [t for b in blocks for t in b] == flat[: len(blocks) * 4]
    assert blocks[1] == [1, 2, 2, 2]  # a document continues across the block boundary
    assert list(c4_data.pack_sequences([[1, 2, 3]], 4)) == []  # trailing partial block dropped
    with pytest.raises(ValueError):
        list(c4_data.pack_sequences(docs, 0))


def test_packed_stream_matches_tokenized_documents(bpe):
    # no shuffling effect with a buffer of 1: the stream is the first shard in file order
    spec = c4_data.StreamSpec("local", seq_len=SEQ, seed=0, shuffle_buffer=1)
    stream = c4_data.PackedTrainStream(spec, bpe)
    blocks = [ex["input_ids"].tolist() for ex in islice(iter(stream), 40)]
    assert all(len(b) == SEQ for b in blocks)
    flat = [t for b in blocks for t in b]
    assert flat[0] == bpe.bos_token_id
    eos_positions = [i for i, t in enumerate(flat) if t == bpe.eos_token_id]
    assert eos_positions and all(flat[i + 1] == bpe.bos_token_id for i in eos_positions if i + 1 < len(flat))
    # the text between bos/eos decodes back to a document of the corpus
    first_doc = bpe.decode(flat[1 : eos_positions[0]])
    all_docs = set(c4_data._iter_local_texts("train"))
    assert first_doc in all_docs


def test_train_stream_deterministic_and_seeded(bpe):
    def first(seed, n=30):
        spec = c4_data.StreamSpec("local", seq_len=SEQ, seed=seed, shuffle_buffer=200)
        return [ex["input_ids"].tolist() for ex in islice(iter(c4_data.PackedTrainStream(spec, bpe)), n)]

    a, b, c = first(0), first(0), first(1)
    assert c4_data.fingerprint(a) == c4_data.fingerprint(b)
    assert c4_data.fingerprint(a) != c4_data.fingerprint(c)


def test_ranks_read_disjoint_documents(bpe):
    def docs(rank):
        spec = c4_data.StreamSpec("local", seq_len=SEQ, seed=0, shuffle_buffer=50, rank=rank, world_size=2)
        stream = c4_data.PackedTrainStream(spec, bpe)
        blocks = islice(iter(stream), 60)
        flat = [t for ex in blocks for t in ex["input_ids"].tolist()]
        text = bpe.decode(flat)
        return {d for d in text.split("</s>") if d.startswith("<s>") and len(d) > 50}

    r0, r1 = docs(0), docs(1)
    assert r0 and r1
    assert r0.isdisjoint(r1)


def test_eval_set_is_fixed(bpe):
    spec = c4_data.StreamSpec("local", seq_len=SEQ)
    a = c4_data.eval_blocks(spec, bpe, 50 * SEQ + 7)
    b = c4_data.eval_blocks(c4_data.StreamSpec("local", seq_len=SEQ, seed=5, rank=1, world_size=2), bpe, 50 * SEQ)
    assert len(a) == 50 and all(len(x) == SEQ for x in a)
    assert a == b  # independent of seed and rank
    ds = c4_data.eval_dataset(spec, bpe, 10 * SEQ)
    batch = c4_data.collate_blocks([ds[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, SEQ)
    assert (batch["labels"] == batch["input_ids"]).all()
    assert batch["input_ids"].tolist() == a[:4]


def test_corpus_and_bpe_rebuild_bit_identical(bpe, tmp_path, monkeypatch):
    first = c4_data.cache_root()
    monkeypatch.setenv("HF_AM_CACHE", str(tmp_path))
    assert c4_data.cache_root() == tmp_path
    rebuilt = c4_data.build_local_corpus()
    c4_data.load_tokenizer("local-bpe")
    for a, b in zip(c4_data.local_corpus_files(first / rebuilt.name)["train"], c4_data.local_corpus_files(rebuilt)["train"]):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    name = f"tokenizer_local-bpe_{c4_data.CORPUS_VERSION}/tokenizer.json"
    assert (first / name).read_bytes() == (tmp_path / name).read_bytes()
