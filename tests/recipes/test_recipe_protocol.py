"""``--protocol galore`` (the GaLore reference pipeline) next to the default ``hf_am``: the
truncate+pad batches with -100 labels on the padding, the vocabulary rule, the weight dtype,
and what ``run_summary.json`` records after a few real steps offline at the tiny size."""

import json
import math
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import c4_data  # noqa: E402
import pretrain_llama_c4 as recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "pretrain_llama_c4.py"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
# the FAST arguments of tests/recipes/test_recipes.py: a few steps of the tiny size
FAST = ["--max_steps", "4", "--eval_steps", "2", "--logging_steps", "1", "--eval_tokens", "1024",
        "--per_device_train_batch_size", "4", "--global_batch_size", "8", "--per_device_eval_batch_size", "4"]
L = 256


@pytest.fixture(scope="module")
def bpe():
    c4_data.build_local_corpus()
    return c4_data.load_tokenizer("local-bpe")


@pytest.fixture(scope="module")
def llama():
    return c4_data.load_tokenizer("local-llama")


def _galore_examples(tok, n=48, seq_len=L, **kw):
    spec = c4_data.StreamSpec("local", seq_len=seq_len, seed=0, shuffle_buffer=1, layout="truncate_pad", **kw)
    return list(islice(iter(c4_data.train_stream(spec, tok)), n))


def test_galore_batches_are_truncated_documents_padded_with_masked_labels(bpe):
    examples = _galore_examples(bpe)
    batch = c4_data.collate_padded(examples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (len(examples), L)
    pad = c4_data.pad_token_id_for(bpe)
    lengths = mask.sum(1)
    assert (lengths == L).any() and (lengths < L).any()  # both truncated and padded documents here
    for row_ids, row_mask, row_labels, n in zip(ids, mask, labels, lengths.tolist()):
        assert row_mask[:n].all() and not row_mask[n:].any()  # right padding
        assert (row_labels[n:] == -100).all() and (row_labels[:n] == row_ids[:n]).all()
        assert (row_ids[n:] == pad).all()
        assert row_ids[n - 1] == bpe.eos_token_id  # </s> ends every sequence, cut or not
        assert bpe.bos_token_id not in row_ids[:n].tolist()  # no <s>, as with T5 in the reference
    # one document per sequence: a padded sequence is a whole document, a full one a document's start
    docs = list(c4_data._iter_local_texts("train"))
    whole = set(docs)
    for e in examples[:12]:
        n = int(e["attention_mask"].sum())
        text = bpe.decode(e["input_ids"][: n - 1].tolist())
        if n < L:
            assert text in whole
        else:
            doc = next(d for d in docs if d.startswith(text[:200]))
            assert c4_data.encode_truncated(bpe, doc, L) == e["input_ids"].tolist()


def test_hf_am_batches_stay_packed(bpe):
    spec = c4_data.StreamSpec("local", seq_len=L, seed=0, shuffle_buffer=1)
    batch = c4_data.collator_for("packed")(list(islice(iter(c4_data.train_stream(spec, bpe)), 4)))
    assert set(batch) == {"input_ids", "labels"} and (batch["labels"] == batch["input_ids"]).all()
    assert (batch["input_ids"] == bpe.eos_token_id).any()  # documents run on across boundaries


def test_padding_does_not_change_the_loss(bpe):
    # the padded batch's loss is the loss over the real tokens only
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_json_file(str(recipe.CONFIG_DIR / "llama_tiny.json"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    examples = _galore_examples(bpe, n=48)
    short = [e for e in examples if int(e["attention_mask"].sum()) < L][:2]
    assert len(short) == 2
    batch = c4_data.collate_padded(short)
    with torch.no_grad():
        padded = model(**batch).loss
        total, count = 0.0, 0
        for e in short:
            n = int(e["attention_mask"].sum())
            ids = e["input_ids"][:n][None]
            total += model(input_ids=ids, labels=ids).loss.item() * (n - 1)
            count += n - 1
    assert padded.item() == pytest.approx(total / count, rel=1e-4)


def test_eval_set_counts_real_tokens_and_is_fixed(bpe):
    spec = c4_data.StreamSpec("local", seq_len=L, layout="truncate_pad")
    ds = c4_data.eval_dataset(spec, bpe, 5000)
    real = int(ds[:]["attention_mask"].sum())
    assert real >= 5000 and real - 5000 < L  # stops at the first document past the target
    other = c4_data.eval_dataset(c4_data.StreamSpec("local", seq_len=L, seed=3, rank=1, world_size=2,
                                                    layout="truncate_pad"), bpe, 5000)
    assert torch.equal(ds[:]["input_ids"], other[:]["input_ids"])


def test_vocab_rule(llama, bpe):
    # today (hf_am): the vocabulary grows to the tokenizer, rounded up to 64; t5-base's 32100 -> 32128
    t5_like = c4_data.load_tokenizer("local-llama")
    t5_like.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]})
    assert len(t5_like) == 32100
    assert recipe.resolve_vocab_size(32000, t5_like, "hf_am", "c4", "t5-base") == (32128, None)
    # galore keeps the config's 32000; ids past it (added specials only) are mapped to <unk>
    assert recipe.resolve_vocab_size(32000, t5_like, "galore", "c4", "t5-base") == (32000, 32000)
    ids = c4_data.encode_truncated(t5_like, "a <extra_id_0> b", 16, vocab_limit=32000)
    assert max(ids) < 32000 and t5_like.unk_token_id in ids
    assert recipe.resolve_vocab_size(32000, llama, "galore", "local", "local-llama") == (32000, None)
    assert recipe.resolve_vocab_size(8192, bpe, "galore", "local", "local-bpe") == (8192, None)
    assert recipe.resolve_vocab_size(8192, bpe, "hf_am", "local", "local-bpe") == (8192, None)
    with pytest.raises(SystemExit, match="regular tokens"):  # a real mismatch is refused, not clipped
        recipe.resolve_vocab_size(8192, llama, "galore", "local", "local-llama")


def test_weight_dtype_rule():
    assert recipe.resolve_weight_dtype("protocol", "galore", cuda_bf16=True)[0] == torch.bfloat16
    dtype, why = recipe.resolve_weight_dtype("protocol", "galore", cuda_bf16=False)
    assert dtype == torch.float32 and "CUDA bf16 is not available" in why
    assert recipe.resolve_weight_dtype("protocol", "hf_am", cuda_bf16=True)[0] == torch.float32
    assert recipe.resolve_weight_dtype("bfloat16", "hf_am", cuda_bf16=False)[0] == torch.bfloat16
    with pytest.raises(ValueError):
        recipe.resolve_weight_dtype("fp8", "galore", cuda_bf16=True)


def test_protocol_defaults_in_the_parser():
    def parsed(*extra):
        argv = ["--model_size", "tiny", "--output_dir", "/tmp/unused", *extra]
        return recipe.build_parser(argv).parse_args_into_dataclasses(args=argv)

    _, data, targs = parsed()
    assert data.protocol == "hf_am" and targs.max_grad_norm == 1.0
    _, data, targs = parsed("--protocol", "galore")
    assert data.protocol == "galore" and targs.max_grad_norm == 0.0
    _, _, targs = parsed("--protocol", "galore", "--max_grad_norm", "0.5")  # explicit flags win
    assert targs.max_grad_norm == 0.5
    with pytest.raises(SystemExit):
        recipe.build_parser(["--protocol", "nope"])


def _run(out, *args):
    proc = subprocess.run([sys.executable, str(RECIPE), "--model_size", "tiny", "--variant", "no_warmup",
                           "--optim", "adamw_torch", "--output_dir", str(out), "--disable_tqdm", "true", *FAST, *args],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "run_summary.json").read_text())


def _common_record(s):
    assert s["status"] == "done" and math.isfinite(s["final_eval_loss"])
    assert s["global_batch_size"] == s["sequences_per_step"] == 8
    assert s["tokens_per_step"] == 8 * 256 and s["gradient_accumulation_steps"] == 2
    assert s["per_device_train_batch_size"] == 4
    assert s["world_size"] == 1 and s["n_gpu"] == 0 and s["data_parallel_size"] == 1 and s["launch"] == "single"
    assert s["dataset"] == "local" and s["data"]["source"] == "local corpus"
    assert s["data"]["path"].endswith(c4_data.local_corpus_dir().name)
    assert s["tokenizer"] == "local-bpe" and s["tokenizer_vocab_size"] == 8192
    assert s["embedding_size"] == s["lm_head_size"] == s["model_config"]["vocab_size"] == 8192
    progress = [json.loads(x) for x in (Path(s["_out"]) / "progress.jsonl").read_text().splitlines()]
    assert progress[-1]["tokens"] == progress[-1]["step"] * 8 * 256


def test_summary_records_what_ran_hf_am(tmp_path):
    s = _run(tmp_path / "hf_am")
    s["_out"] = str(tmp_path / "hf_am")
    _common_record(s)
    assert s["protocol"] == "hf_am" and s["data"]["requested"] == "auto" and s["data"]["layout"] == "packed"
    assert s["max_grad_norm"] == 1.0 and s["gradient_clipping"] is True
    assert s["precision"]["weight_dtype"] == "float32" and s["precision"]["autocast"] is None
    assert s["eval_real_tokens"] == s["eval_tokens"] == 1024


def test_galore_protocol_runs_offline_and_records_it(tmp_path):
    s = _run(tmp_path / "galore", "--protocol", "galore", "--dataset", "local")
    s["_out"] = str(tmp_path / "galore")
    _common_record(s)
    assert s["protocol"] == "galore" and s["data"]["requested"] == "local"
    assert s["data"]["layout"] == "truncate_pad" and s["data"]["padding_masked"] is True
    assert s["max_grad_norm"] == 0.0 and s["gradient_clipping"] is False
    # no CUDA here: the reference's own fallback, fp32 weights, and the record says why
    assert s["precision"]["weight_dtype"] == "float32" and "CUDA bf16 is not available" in s["precision"]["reason"]
    assert s["eval_real_tokens"] >= 1024 and s["eval_tokens"] == s["eval_sequences"] * 256
    losses = [r["loss"] for r in s["log_history"] if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_galore_protocol_with_bf16_weights_on_cpu(tmp_path):
    s = _run(tmp_path / "bf16", "--protocol", "galore", "--dataset", "local", "--weight_dtype", "bfloat16")
    assert s["precision"]["weight_dtype"] == "bfloat16" and s["precision"]["autocast"] is None
    assert s["precision"]["mode"] == "bfloat16 weights, no autocast"
    assert math.isfinite(s["final_eval_loss"]) and s["final_eval_loss"] < math.log(8192) + 1
