"""The recipes' data layer: offline corpus, tokenizers, CLM / MLM / NSP pipelines, collators, plots."""

from __future__ import annotations

import collections
import json
import os
import re
import time

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from rannc_hf.data import corpus as corpus_mod  # noqa: E402
from rannc_hf.data.errors import DataError, DataFileNotFoundError  # noqa: E402
from rannc_hf.data.pipeline import (build_clm_dataset, build_mlm_dataset, load_text_dataset,  # noqa: E402
                                    make_collator, make_dataloader)
from rannc_hf.data.tokenizer import get_tokenizer, load_tokenizer, train_tokenizer  # noqa: E402

CHARS = 300_000      # the interpreter's own docs: builds in about a second
SEQ = 64
VOCAB = 1024


@pytest.fixture(scope="module", autouse=True)
def cache_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("rannc_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANNC_HF_CACHE", str(cache))
        mp.setenv("HF_DATASETS_CACHE", str(cache / "hf_datasets"))
        yield cache


@pytest.fixture(scope="module")
def texts(cache_env):
    return corpus_mod.default_corpus_texts(max_chars=CHARS)


@pytest.fixture(scope="module")
def gpt_tok(texts):
    return get_tokenizer(None, kind="gpt", vocab_size=VOCAB, corpus_max_chars=CHARS)


@pytest.fixture(scope="module")
def bert_tok(texts):
    return get_tokenizer(None, kind="bert", vocab_size=VOCAB, corpus_max_chars=CHARS)


# ------------------------------------------------------------------------------------------ corpus

def test_corpus_is_english_prose(texts, cache_env):
    total = sum(len(t) for t in texts)
    assert CHARS * 0.95 <= total <= CHARS
    assert len(texts) > 50
    joined = "\n".join(texts)
    words = re.findall(r"[a-z]+", joined.lower())
    freq = collections.Counter(words)
    for w in ("the", "of", "and", "is", "to", "a"):
        assert freq[w] / len(words) > 0.005, w
    assert freq["the"] / len(words) > 0.03          # English prose: "the" is ~5% of words
    letters = sum(c.isalpha() for c in joined)
    assert letters / len(joined.replace(" ", "")) > 0.8
    assert ">>>" not in joined
    assert str(cache_env) in str(corpus_mod.corpus_cache_dir(corpus_mod.CorpusOptions(max_chars=CHARS)))


def test_corpus_cache_is_fast_and_identical(texts):
    t0 = time.perf_counter()
    again = corpus_mod.default_corpus_texts(max_chars=CHARS)
    assert time.perf_counter() - t0 < 1.0
    assert again == texts
    ds = corpus_mod.load_default_corpus(max_chars=CHARS)
    assert isinstance(ds, datasets.Dataset) and ds.column_names == ["text", "source"]
    assert ds["text"] == texts
    t0 = time.perf_counter()
    ds2 = corpus_mod.load_default_corpus(max_chars=CHARS)
    assert time.perf_counter() - t0 < 2.0 and ds2["text"] == texts
    # deterministic: gathering again from scratch gives the cached content
    fresh = [r["text"] for r in corpus_mod.gather_corpus(corpus_mod.CorpusOptions(max_chars=CHARS))]
    assert fresh == texts


def test_corpus_reaches_installed_packages(cache_env):
    opts = corpus_mod.CorpusOptions()
    seen: set = set()
    kinds = collections.Counter()
    for _, (pkg, src, raw) in zip(range(3000), corpus_mod._package_sources(opts)):
        if corpus_mod._prose_document(raw, opts, seen, markdown=not src.endswith(".rst")):
            kinds[src.split(":")[0]] += 1
    assert kinds["site"] + kinds["doc"] + kinds["metadata"] > 20, kinds


def test_is_prose_filter():
    assert corpus_mod.is_prose("This function returns the number of elements that are stored in the queue.")
    assert not corpus_mod.is_prose("x = [f(i) for i in range(10)]; y = {k: v for k, v in d.items()}")
    assert not corpus_mod.is_prose("Parameters ---------- a : int b : float")


# --------------------------------------------------------------------------------------- tokenizer

def test_gpt_tokenizer_round_trip_and_save(gpt_tok, tmp_path):
    assert len(gpt_tok) <= VOCAB and gpt_tok.eos_token == "<|endoftext|>" and gpt_tok.pad_token == "<|endoftext|>"
    s = "The module returns a list of strings.\n  Indented   spaces & symbols: {x} -> é"
    ids = gpt_tok(s)["input_ids"]
    assert gpt_tok.decode(ids) == s                           # byte-level BPE is lossless
    assert len(ids) < len(s.encode()) * 0.6                    # and actually merges
    gpt_tok.save_pretrained(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert back(s)["input_ids"] == ids and back.eos_token_id == gpt_tok.eos_token_id
    t0 = time.perf_counter()
    cached = get_tokenizer(None, kind="gpt", vocab_size=VOCAB, corpus_max_chars=CHARS)
    assert time.perf_counter() - t0 < 2.0 and cached(s)["input_ids"] == ids


def test_bert_tokenizer_special_tokens(bert_tok, tmp_path):
    for name in ("cls", "sep", "mask", "pad", "unk"):
        assert getattr(bert_tok, f"{name}_token_id") is not None
    assert (bert_tok.pad_token, bert_tok.mask_token, bert_tok.cls_token) == ("[PAD]", "[MASK]", "[CLS]")
    enc = bert_tok("The first sentence.", "The second one.")
    assert enc["input_ids"][0] == bert_tok.cls_token_id and enc["input_ids"][-1] == bert_tok.sep_token_id
    assert enc["input_ids"].count(bert_tok.sep_token_id) == 2
    assert set(enc["token_type_ids"]) == {0, 1}
    s = "the module returns a list of strings."
    assert bert_tok.decode(bert_tok(s, add_special_tokens=False)["input_ids"]) == s
    bert_tok.save_pretrained(tmp_path / "btok")
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(str(tmp_path / "btok"))
    assert back("a b", "c")["input_ids"] == bert_tok("a b", "c")["input_ids"]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(DataError, match="kind"):
        train_tokenizer(["some text"], kind="t5")


# ---------------------------------------------------------------------------------------- pipelines

def test_clm_blocks_exact_shape_and_labels(gpt_tok):
    ds = build_clm_dataset(gpt_tok, SEQ, corpus_max_chars=CHARS)
    assert set(ds) == {"train", "validation"} and len(ds["train"]) > 500 and len(ds["validation"]) > 10
    for split in ds.values():
        lens = {len(x) for x in split["input_ids"]}
        assert lens == {SEQ}
    ex = ds["train"][0]
    assert ex["labels"] == ex["input_ids"] and ex["attention_mask"] == [1] * SEQ
    assert gpt_tok.eos_token_id in {t for x in ds["train"]["input_ids"][:50] for t in x}   # documents are separated
    collate = make_collator(gpt_tok, "clm", seq_len=SEQ)
    dl = make_dataloader(ds["train"], collate, batch_size=8, seed=0)
    batches = list(dl)
    assert len(batches) == len(ds["train"]) // 8                  # drop_last
    assert all(b["input_ids"].shape == (8, SEQ) and b["labels"].shape == (8, SEQ) for b in batches)
    # rank shards are disjoint and equally long
    a = make_dataloader(ds["train"], collate, 4, num_replicas=2, rank=0)
    b = make_dataloader(ds["train"], collate, 4, num_replicas=2, rank=1)
    assert len(a) == len(b)
    # map results are cached: a rebuild is quick
    t0 = time.perf_counter()
    build_clm_dataset(gpt_tok, SEQ, corpus_max_chars=CHARS)
    assert time.perf_counter() - t0 < 3.0


def test_clm_batch_trains_gpt2(gpt_tok):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    ds = build_clm_dataset(gpt_tok, SEQ, corpus_max_chars=CHARS)
    batch = make_collator(gpt_tok, "clm", SEQ)([ds["train"][i] for i in range(4)])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2,
                                       use_cache=False))
    loss = model(**batch).loss
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0


def test_collator_rejects_other_shapes(gpt_tok):
    collate = make_collator(gpt_tok, "clm", seq_len=SEQ)
    with pytest.raises(DataError, match="expected exactly 64"):
        collate([{"input_ids": [1] * 10, "labels": [1] * 10}])


def test_mlm_blocks_and_masking(bert_tok):
    import torch

    ds = build_mlm_dataset(bert_tok, SEQ, corpus_max_chars=CHARS)
    row = ds["train"][0]
    assert len(row["input_ids"]) == SEQ and row["input_ids"][0] == bert_tok.cls_token_id
    assert row["input_ids"][-1] == bert_tok.sep_token_id and row["special_tokens_mask"][0] == 1
    collate = make_collator(bert_tok, "mlm", seq_len=SEQ, mlm_probability=0.15, seed=0)
    batch = collate([ds["train"][i] for i in range(128)])
    assert batch["input_ids"].shape == batch["labels"].shape == (128, SEQ)
    masked = batch["labels"] != -100
    frac = masked.float().mean().item() * SEQ / (SEQ - 2)           # [CLS]/[SEP] are never masked
    assert 0.13 < frac < 0.17, frac
    assert not masked[:, 0].any() and not masked[:, -1].any()
    as_mask = (batch["input_ids"] == bert_tok.mask_token_id) & masked
    assert 0.7 < as_mask.sum().item() / masked.sum().item() < 0.9    # 80% [MASK], 10% random, 10% kept
    assert torch.equal(batch["token_type_ids"], torch.zeros_like(batch["token_type_ids"]))


def test_nsp_pairs_have_both_labels_and_train_bert(bert_tok):
    import torch
    from transformers import BertConfig, BertForPreTraining

    ds = build_mlm_dataset(bert_tok, SEQ, nsp=True, corpus_max_chars=CHARS)
    labels = collections.Counter(ds["train"]["next_sentence_label"])
    assert set(labels) == {0, 1} and min(labels.values()) / sum(labels.values()) > 0.2, labels
    for row in ds["train"].select(range(50)):
        ids, tt, am = row["input_ids"], row["token_type_ids"], row["attention_mask"]
        assert len(ids) == len(tt) == len(am) == SEQ
        n = sum(am)
        assert ids[0] == bert_tok.cls_token_id and ids[n - 1] == bert_tok.sep_token_id
        assert ids[:n].count(bert_tok.sep_token_id) == 2 and all(t == bert_tok.pad_token_id for t in ids[n:])
        first_b = tt.index(1)
        assert ids[first_b - 1] == bert_tok.sep_token_id and all(tt[first_b:n]) and not any(tt[n:])
    batch = make_collator(bert_tok, "mlm", SEQ, seed=0)([ds["train"][i] for i in range(8)])
    assert batch["next_sentence_label"].shape == (8,)
    assert not (batch["labels"][batch["attention_mask"] == 0] != -100).any()   # padding never masked
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=SEQ))
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_streaming_blocks(gpt_tok):
    ds = build_clm_dataset(gpt_tok, SEQ, corpus_max_chars=CHARS, streaming=True)
    assert isinstance(ds["train"], datasets.IterableDataset)
    first = [x for _, x in zip(range(5), ds["train"])]
    assert all(len(x["input_ids"]) == SEQ and x["labels"] == x["input_ids"] for x in first)
    assert next(iter(ds["validation"]))["input_ids"]
    dl = make_dataloader(ds["train"], make_collator(gpt_tok, "clm", SEQ), 4, num_replicas=2, rank=1)
    assert next(iter(dl))["input_ids"].shape == (4, SEQ)


def _write_docs(path, n=60):
    para = ("The library reads each file in order and returns the parsed records to the caller. "
            "It is safe to call this function from several threads at once. ")
    return [f"Document {i}. {para * (1 + i % 3)}" for i in range(n)]


def test_train_file_txt_jsonl_csv(gpt_tok, tmp_path):
    docs = _write_docs(tmp_path)
    txt = tmp_path / "train.txt"
    txt.write_text("\n\n".join(docs))
    raw = load_text_dataset(train_file=str(txt))
    assert len(raw["train"]) + len(raw["validation"]) == len(docs)
    ds = build_clm_dataset(gpt_tok, 32, train_file=str(txt))
    assert {len(x) for x in ds["train"]["input_ids"]} == {32}
    jl = tmp_path / "train.jsonl"
    jl.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)))
    raw = load_text_dataset(train_file=str(jl), text_column="body")
    assert raw["train"].column_names == ["text"]
    raw = load_text_dataset(train_file=str(jl))                     # first string column
    assert raw["train"][0]["text"].startswith("Document")
    with pytest.raises(DataError, match="nope"):
        load_text_dataset(train_file=str(jl), text_column="nope")
    csv = tmp_path / "train.csv"
    csv.write_text("text\n" + "\n".join(f'"{d}"' for d in docs))
    assert len(load_text_dataset(train_file=str(csv), validation_split_percentage=10)["validation"]) == 6


def test_missing_file_and_offline_hub_errors(tmp_path, monkeypatch):
    with pytest.raises(DataFileNotFoundError, match="missing.txt.*does not exist"):
        load_text_dataset(train_file=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unsupported extension"):
        (tmp_path / "x.docx").write_text("hi")
        load_text_dataset(train_file=str(tmp_path / "x.docx"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="--train_file"):
        load_text_dataset(dataset_name="surely-not/a-cached-dataset-xyz")
    assert time.perf_counter() - t0 < 10


def test_local_dataset_dir(tmp_path):
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": _write_docs(tmp_path)}),
                              "validation": datasets.Dataset.from_dict({"content": _write_docs(tmp_path, 5)})})
    d.save_to_disk(str(tmp_path / "saved"))
    raw = load_text_dataset(dataset_name=str(tmp_path / "saved"))
    assert len(raw["validation"]) == 5 and raw["train"].column_names == ["text"]


# -------------------------------------------------------------------------------------------- plots

def test_plot_loss_curve(tmp_path):
    from rannc_hf.data.plots import plot_loss_curve

    hist = [{"step": i, "loss": 8.0 / (1 + 0.05 * i)} for i in range(1, 60)] + [{"step": 59, "eval_loss": 5.0}]
    path = plot_loss_curve(hist, tmp_path / "sub" / "loss.png", title="t")
    assert os.path.getsize(path) > 5000 and open(path, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError):
        plot_loss_curve([], tmp_path / "empty.png")


def test_without_datasets_package(gpt_tok, bert_tok, tmp_path, monkeypatch):
    from rannc_hf.data import pipeline

    monkeypatch.setattr(pipeline, "datasets_available", lambda: False)
    ds = build_clm_dataset(gpt_tok, SEQ, corpus_max_chars=CHARS)
    assert isinstance(ds, dict) and isinstance(ds["train"], pipeline.ListDataset)
    assert len(ds["train"]) > 500 and {len(x) for x in ds["train"]["input_ids"]} == {SEQ}
    dl = make_dataloader(ds["train"], make_collator(gpt_tok, "clm", SEQ), 8, num_replicas=2, rank=0)
    assert next(iter(dl))["labels"].shape == (8, SEQ)
    nsp = build_mlm_dataset(bert_tok, SEQ, nsp=True, corpus_max_chars=CHARS)
    assert set(nsp["train"]["next_sentence_label"]) == {0, 1}
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(_write_docs(tmp_path)))
    assert {len(x) for x in build_clm_dataset(gpt_tok, 32, train_file=str(txt))["train"]["input_ids"]} == {32}
    with pytest.raises(DataFileNotFoundError):
        load_text_dataset(train_file=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="need the `datasets` package"):
        load_text_dataset(dataset_name="wikitext")
