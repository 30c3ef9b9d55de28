"""``datasets`` pipelines for the recipes, in the style of Transformers' ``run_clm.py`` / ``run_mlm.py``.

Text comes from ``--dataset_name/--dataset_config`` (a local folder, a ``save_to_disk`` directory, or
a hub dataset already in the local cache), ``--train_file`` (txt/json/jsonl/csv/parquet) or, by
default, the offline corpus of :mod:`rannc_hf.data.corpus`. It is tokenized with a cached ``map``
and cut into blocks of exactly ``seq_len`` tokens: a partitioned model is planned for one shape, so
every example has that shape and the data loaders drop the last partial batch.

    from rannc_hf.data import get_tokenizer, build_clm_dataset, build_mlm_dataset, make_collator, make_dataloader
    tok = get_tokenizer(None, kind="gpt", vocab_size=4096)
    ds = build_clm_dataset(tok, seq_len=128)                     # {"train", "validation"}
    dl = make_dataloader(ds["train"], make_collator(tok, "clm", seq_len=128), batch_size=8)
    batch = next(iter(dl))                                        # input_ids, attention_mask, labels: [8, 128]

    btok = get_tokenizer(None, kind="bert")
    bds = build_mlm_dataset(btok, seq_len=128, nsp=True)          # sentence pairs + next_sentence_label
    collate = make_collator(btok, "mlm", seq_len=128)             # masks 15% of the tokens

``streaming=True`` returns ``IterableDataset`` splits for corpora larger than memory (the
validation split is every ``round(100 / validation_split_percentage)``-th document).

Without the ``datasets`` package (e.g. a GPU machine with only torch and transformers) the same
functions still work for the default corpus and txt/json/jsonl/csv files: they return plain dicts of
:class:`ListDataset` (in memory, no caching, no streaming).
"""

from __future__ import annotations

import functools
import os
import random
import re
import socket
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Sequence, Union
from urllib.parse import urlparse

from .errors import DataError, DataFileNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase

    AnyDatasetDict = Union[datasets.DatasetDict, datasets.IterableDatasetDict]

__all__ = ["load_text_dataset", "build_clm_dataset", "build_mlm_dataset", "make_collator", "make_dataloader",
           "FixedShapeCollator", "ListDataset", "datasets_available", "FILE_BUILDERS"]

FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                 ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def datasets_available() -> bool:
    """Whether ``datasets`` is installed (without it, a small in-memory fallback is used)."""
    import importlib.util

    return importlib.util.find_spec("datasets") is not None


class ListDataset:
    """A minimal in-memory, map-style stand-in for ``datasets.Dataset``, used when ``datasets`` is not
    installed (e.g. a GPU machine with only torch + transformers). Works with ``torch`` DataLoaders."""

    def __init__(self, columns: dict[str, list]):
        lens = {len(v) for v in columns.values()}
        if len(lens) > 1:
            raise DataError(f"columns have different lengths: { {k: len(v) for k, v in columns.items()} }")
        self._cols = columns
        self._len = lens.pop() if lens else 0

    @property
    def column_names(self) -> list[str]:
        return list(self._cols)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._cols[key]
        return {k: v[key] for k, v in self._cols.items()}

    def map_batched(self, fn: Callable, batch_size: int = 1000, with_indices: bool = False) -> "ListDataset":
        out: dict[str, list] = {}
        for start in range(0, self._len, batch_size):
            batch = {k: v[start:start + batch_size] for k, v in self._cols.items()}
            idx = list(range(start, min(start + batch_size, self._len)))
            res = fn(batch, idx) if with_indices else fn(batch)
            for k, v in res.items():
                out.setdefault(k, []).extend(v)
        return ListDataset(out)

    def __repr__(self) -> str:
        return f"ListDataset(columns={self.column_names}, num_rows={self._len})"


def _read_text_file(path: str, text_column: Optional[str]) -> list[str]:
    import csv as csv_mod

    builder = _builder_for(path)
    if builder == "text":
        with open(path, encoding="utf-8") as f:
            return [p.strip() for p in re.split(r"\n\s*\n", f.read()) if p.strip()]
    if builder == "json":
        import json

        with open(path, encoding="utf-8") as f:
            head = f.read(1).strip()
            f.seek(0)
            rows = json.load(f) if head == "[" else [json.loads(line) for line in f if line.strip()]
    elif builder == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv_mod.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ","))
    else:
        raise DataError(f"{path!r}: reading {builder} files needs the `datasets` package (pip install datasets)")
    if not rows:
        return []
    col = text_column or ("text" if "text" in rows[0] else next((k for k, v in rows[0].items() if isinstance(v, str)), None))
    if col is None or col not in rows[0]:
        raise DataError(f"text column {col!r} not found in {path!r}; columns: {list(rows[0])}; pass --text_column NAME")
    return [r[col] for r in rows if r.get(col)]


def _load_without_datasets(dataset_name, train_file, validation_file, text_column, streaming,
                           validation_split_percentage, corpus_max_chars, seed) -> dict:
    if streaming or dataset_name:
        raise DataError("--streaming and --dataset_name need the `datasets` package (pip install datasets); "
                        "without it use --train_file (txt/json/jsonl/csv) or the built-in offline corpus")
    if train_file:
        for split, path in (("train", train_file), ("validation", validation_file)):
            if path and not os.path.isfile(path):
                raise DataFileNotFoundError(f"--{split}_file {path!r} does not exist (working directory "
                                            f"{os.getcwd()!r}); pass an existing txt/json/jsonl/csv file, or omit "
                                            f"the data arguments to use the built-in offline corpus")
        train = _read_text_file(train_file, text_column)
        if validation_file:
            return {"train": ListDataset({"text": train}),
                    "validation": ListDataset({"text": _read_text_file(validation_file, text_column)})}
    else:
        from .corpus import default_corpus_texts

        train = default_corpus_texts(max_chars=corpus_max_chars)
    if len(train) < 2:
        raise DataError(f"the training data has {len(train)} document(s); need at least 2 to split off a validation set")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(train) * validation_split_percentage / 100))
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return {"train": ListDataset({"text": [train[i] for i in keep]}),
            "validation": ListDataset({"text": [train[i] for i in val]})}


# --------------------------------------------------------------------------------------------
# loading raw text
# --------------------------------------------------------------------------------------------

def _builder_for(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_BUILDERS:
        raise DataError(f"data file {path!r}: unsupported extension {ext!r}; use one of "
                        f"{', '.join(sorted(FILE_BUILDERS))}")
    return FILE_BUILDERS[ext]


def _offline_env() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_resolvable() -> bool:
    """Whether the hub's host name resolves (a DNS lookup only; no connection is opened)."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _load_named(name: str, config: Optional[str], streaming: bool, cache_dir: Optional[str]):
    import datasets

    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "dataset_dict.json")) or \
                os.path.exists(os.path.join(name, "state.json")):
            ds = datasets.load_from_disk(name)
            if streaming:
                ds = (datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in ds.items()})
                      if isinstance(ds, datasets.DatasetDict) else ds.to_iterable_dataset())
            return ds
        return datasets.load_dataset(name, config, streaming=streaming, cache_dir=cache_dir)
    hint = ("pass --train_file PATH (txt/json/jsonl/csv/parquet), a local dataset folder as --dataset_name, "
            "or no data arguments at all to use the built-in offline corpus")
    # 1) the local HF cache only: instant, and the only option on machines without network
    import datasets.config as dconfig
    import huggingface_hub.constants as hconst

    saved = (dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE)
    dconfig.HF_HUB_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, config, streaming=streaming, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - any failure here means "not cached"
        offline_error = e
    finally:
        dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE = saved
    cfg = f" (config {config!r})" if config else ""
    if _offline_env() or not _hub_resolvable():
        raise DataError(f"dataset {name!r}{cfg} is not in the local Hugging Face cache and the hub is not "
                        f"reachable (offline). {hint}. [{type(offline_error).__name__}: "
                        f"{str(offline_error).splitlines()[0] if str(offline_error) else ''}]") from None
    # 2) the hub
    try:
        return datasets.load_dataset(name, config, streaming=streaming, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"could not load dataset {name!r}{cfg}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}. {hint}") from None


def _load_files(train_file: str, validation_file: Optional[str], streaming: bool, cache_dir: Optional[str]):
    import datasets

    files = {"train": train_file}
    if validation_file:
        files["validation"] = validation_file
    for split, path in files.items():
        if not os.path.isfile(path):
            raise DataFileNotFoundError(f"--{split}_file {path!r} does not exist (working directory "
                                        f"{os.getcwd()!r}); pass an existing txt/json/jsonl/csv/parquet file, "
                                        f"or omit the data arguments to use the built-in offline corpus")
    builders = {_builder_for(p) for p in files.values()}
    if len(builders) > 1:
        raise DataError(f"--train_file and --validation_file must have the same format, got {sorted(builders)}")
    builder = builders.pop()
    kwargs: dict[str, Any] = {}
    if builder == "text":
        kwargs["sample_by"] = "paragraph"   # a blank line separates documents; keeps sentences together
    if builder == "csv" and any(p.lower().endswith(".tsv") for p in files.values()):
        kwargs["delimiter"] = "\t"
    try:
        return datasets.load_dataset(builder, data_files=files, streaming=streaming, cache_dir=cache_dir, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"could not read {train_file!r} as {builder}: {type(e).__name__}: {e}") from None


def _column_names(ds) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names:
        return list(names)
    first = next(iter(ds), None)   # streaming datasets may not know their features
    return list(first) if first else []


def _text_column(ds, text_column: Optional[str]) -> str:
    names = _column_names(ds)
    if text_column:
        if text_column not in names:
            raise DataError(f"text column {text_column!r} not found; the dataset has columns {names}")
        return text_column
    if "text" in names:
        return "text"
    feats = getattr(ds, "features", None) or {}
    for n in names:
        f = feats.get(n)
        if f is not None and getattr(f, "dtype", None) in ("string", "large_string"):
            return n
    if feats or not names:
        raise DataError(f"no text column found among {names}; pass --text_column NAME")
    first = next(iter(ds))
    for n in names:
        if isinstance(first[n], str):
            return n
    raise DataError(f"no text column found among {names}; pass --text_column NAME")


def load_text_dataset(dataset_name: Optional[str] = None, dataset_config: Optional[str] = None,
                      train_file: Optional[str] = None, validation_file: Optional[str] = None,
                      text_column: Optional[str] = None, streaming: bool = False,
                      validation_split_percentage: float = 5.0, corpus_max_chars: Optional[int] = None,
                      cache_dir: Optional[str] = None, seed: int = 42) -> "AnyDatasetDict":
    """Raw text as a ``DatasetDict`` (or ``IterableDatasetDict``) with splits ``train`` and ``validation``
    and the single column ``text``.

    Precedence: ``train_file`` > ``dataset_name`` > the default offline corpus. A source without a
    validation split gets one of ``validation_split_percentage`` percent of its documents.
    """
    if train_file and dataset_name:
        raise DataError("pass either --dataset_name or --train_file, not both")
    if validation_file and not train_file:
        raise DataError("--validation_file needs --train_file")
    if not 0 < validation_split_percentage < 100:
        raise DataError(f"validation_split_percentage={validation_split_percentage} must be in (0, 100)")
    if not datasets_available():
        return _load_without_datasets(dataset_name, train_file, validation_file, text_column, streaming,
                                      validation_split_percentage, corpus_max_chars, seed)
    import datasets

    if train_file:
        raw = _load_files(train_file, validation_file, streaming, cache_dir)
    elif dataset_name:
        raw = _load_named(dataset_name, dataset_config, streaming, cache_dir)
    else:
        from .corpus import load_default_corpus

        corpus = load_default_corpus(max_chars=corpus_max_chars)
        raw = datasets.DatasetDict({"train": corpus})
        if streaming:
            raw = datasets.IterableDatasetDict({"train": corpus.to_iterable_dataset(num_shards=8)})
    if isinstance(raw, (datasets.Dataset, datasets.IterableDataset)):
        raw = (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)({"train": raw})
    if "train" not in raw:
        raise DataError(f"the dataset has no 'train' split (splits: {list(raw)})")
    col = _text_column(raw["train"], text_column)
    out: dict[str, Any] = {}
    for split in ("train", "validation"):
        if split in raw:
            ds = raw[split]
            drop = [c for c in _column_names(ds) if c != col]
            ds = ds.remove_columns(drop) if drop else ds
            out[split] = ds.rename_column(col, "text") if col != "text" else ds
    if "validation" not in out:
        train = out["train"]
        if streaming:
            every = max(2, round(100 / validation_split_percentage))
            out["validation"] = train.filter(lambda _, i: i % every == 0, with_indices=True)
            out["train"] = train.filter(lambda _, i: i % every != 0, with_indices=True)
        else:
            n = len(train)
            if n < 2:
                raise DataError(f"the training data has {n} document(s); need at least 2 to split off a validation "
                                f"set (or pass --validation_file)")
            n_val = max(1, round(n * validation_split_percentage / 100))
            split = train.train_test_split(test_size=n_val, seed=seed, shuffle=True)
            out["train"], out["validation"] = split["train"], split["test"]
    return (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)(out)


# --------------------------------------------------------------------------------------------
# batched transforms (plain functions of dict-of-lists, so datasets can fingerprint and cache them)
# --------------------------------------------------------------------------------------------

def _tokenize_docs(batch: dict, tokenizer: "PreTrainedTokenizerBase", append_eos: bool) -> dict:
    texts = [t for t in batch["text"] if t and t.strip()]
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if append_eos and tokenizer.eos_token_id is not None:
        ids = [x + [tokenizer.eos_token_id] for x in ids]
    return {"input_ids": ids}


def _group_clm(batch: dict, seq_len: int) -> dict:
    flat = [t for ids in batch["input_ids"] for t in ids]
    n = (len(flat) // seq_len) * seq_len
    blocks = [flat[i:i + seq_len] for i in range(0, n, seq_len)]
    return {"input_ids": blocks, "attention_mask": [[1] * seq_len for _ in blocks],
            "labels": [list(b) for b in blocks]}


def _group_mlm(batch: dict, seq_len: int, cls_id: int, sep_id: int) -> dict:
    body = seq_len - 2
    flat = [t for ids in batch["input_ids"] for t in ids]
    n = (len(flat) // body) * body
    blocks = [[cls_id] + flat[i:i + body] + [sep_id] for i in range(0, n, body)]
    special = [1] + [0] * body + [1]
    return {"input_ids": blocks, "token_type_ids": [[0] * seq_len for _ in blocks],
            "attention_mask": [[1] * seq_len for _ in blocks], "special_tokens_mask": [list(special) for _ in blocks]}


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])|\n\s*\n")


def _tokenize_sentences(batch: dict, tokenizer: "PreTrainedTokenizerBase") -> dict:
    docs = [[s.strip() for s in _SENT_SPLIT.split(t) if s and s.strip()] for t in batch["text"] if t and t.strip()]
    flat = [s for d in docs for s in d]
    ids = tokenizer(flat, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"] \
        if flat else []
    out, k = [], 0
    for d in docs:
        out.append([x for x in ids[k:k + len(d)] if x])
        k += len(d)
    return {"sentences": [d for d in out if d]}


def _truncate_pair(a: list, b: list, max_tokens: int, rng: random.Random) -> None:
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def _nsp_pairs(batch: dict, indices: list[int], seq_len: int, cls_id: int, sep_id: int, pad_id: int,
               short_seq_prob: float, seed: int) -> dict:
    """Sentence pairs as in BERT's ``create_pretraining_data.py``: B follows A (label 0) or is a random
    span from another document (label 1), each with probability 1/2; padded to ``seq_len``."""
    docs: list[list[list[int]]] = batch["sentences"]
    out: dict[str, list] = {k: [] for k in ("input_ids", "token_type_ids", "attention_mask",
                                            "special_tokens_mask", "next_sentence_label")}
    max_tokens = seq_len - 3
    for d_i, (doc, idx) in enumerate(zip(docs, indices)):
        rng = random.Random(seed * 1_000_003 + idx)
        target = max_tokens if rng.random() >= short_seq_prob else rng.randint(2, max_tokens)
        chunk: list[list[int]] = []
        length = 0
        i = 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                if chunk:
                    a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                    a = [t for s in chunk[:a_end] for t in s]
                    others = [j for j in range(len(docs)) if j != d_i]
                    if others and (len(chunk) == 1 or rng.random() < 0.5):
                        label = 1
                        other = docs[rng.choice(others)]
                        start = rng.randint(0, len(other) - 1)
                        b: list[int] = []
                        for s in other[start:]:
                            b.extend(s)
                            if len(b) >= target - len(a):
                                break
                        i -= len(chunk) - a_end          # the unused sentences go back into the pool
                    elif len(chunk) >= 2:
                        label = 0
                        b = [t for s in chunk[a_end:] for t in s]
                    else:
                        label, b = -1, []
                    if label >= 0 and a and b:
                        _truncate_pair(a, b, max_tokens, rng)
                        ids = [cls_id] + a + [sep_id] + b + [sep_id]
                        pad = seq_len - len(ids)
                        out["input_ids"].append(ids + [pad_id] * pad)
                        out["token_type_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * pad)
                        out["attention_mask"].append([1] * len(ids) + [0] * pad)
                        out["special_tokens_mask"].append([1] + [0] * len(a) + [1] + [0] * len(b) + [1] + [1] * pad)
                        out["next_sentence_label"].append(label)
                chunk, length = [], 0
                target = max_tokens if rng.random() >= short_seq_prob else rng.randint(2, max_tokens)
            i += 1
    return out


# --------------------------------------------------------------------------------------------
# public builders
# --------------------------------------------------------------------------------------------

def _check_seq_len(seq_len: int, tokenizer: "PreTrainedTokenizerBase", minimum: int) -> None:
    if not isinstance(seq_len, int) or seq_len < minimum:
        raise DataError(f"seq_len={seq_len!r} must be an integer >= {minimum}")


def _map(ds, fn: Callable, streaming: bool, desc: str, num_proc: Optional[int], with_indices: bool = False,
         batch_size: int = 1000):
    if isinstance(ds, ListDataset):
        return ds.map_batched(fn, batch_size=batch_size, with_indices=with_indices)
    kwargs: dict[str, Any] = dict(batched=True, batch_size=batch_size, with_indices=with_indices,
                                  remove_columns=_column_names(ds))
    if not streaming:
        kwargs.update(num_proc=num_proc, desc=desc, load_from_cache_file=True)
    return ds.map(fn, **kwargs)


def _splits(raw):
    return [(k, raw[k]) for k in raw]


def build_clm_dataset(tokenizer: "PreTrainedTokenizerBase", seq_len: int, *, dataset_name: Optional[str] = None,
                      dataset_config: Optional[str] = None, train_file: Optional[str] = None,
                      validation_file: Optional[str] = None, text_column: Optional[str] = None,
                      streaming: bool = False, validation_split_percentage: float = 5.0,
                      corpus_max_chars: Optional[int] = None, num_proc: Optional[int] = None,
                      cache_dir: Optional[str] = None, seed: int = 42,
                      raw: Optional["AnyDatasetDict"] = None) -> "AnyDatasetDict":
    """Causal-LM blocks: ``input_ids``, ``attention_mask``, ``labels`` (= ``input_ids``), each exactly ``seq_len``.

    Documents are joined with the tokenizer's eos token and cut into consecutive blocks (the
    remainder of each ``map`` batch of 1000 documents is dropped, as in ``run_clm.py``). Pass
    ``raw`` (a dict of text splits) to skip loading.
    """
    _check_seq_len(seq_len, tokenizer, 2)
    raw = raw if raw is not None else load_text_dataset(
        dataset_name, dataset_config, train_file, validation_file, text_column, streaming,
        validation_split_percentage, corpus_max_chars, cache_dir, seed)
    streaming = _is_streaming(raw["train"])
    out = {}
    for split, ds in _splits(raw):
        tok = _map(ds, functools.partial(_tokenize_docs, tokenizer=tokenizer, append_eos=True), streaming,
                   f"tokenizing {split}", num_proc)
        out[split] = _map(tok, functools.partial(_group_clm, seq_len=seq_len), streaming,
                          f"grouping {split} into blocks of {seq_len}", num_proc)
    result = _container(raw, out, streaming)
    _check_nonempty(result, streaming, seq_len)
    return result


def _special_ids(tokenizer: "PreTrainedTokenizerBase") -> tuple[int, int, int]:
    ids = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    if None in ids or tokenizer.mask_token_id is None:
        raise DataError("masked-LM data needs a tokenizer with [CLS], [SEP], [PAD] and [MASK] tokens "
                        "(train one with get_tokenizer(None, kind='bert'))")
    return ids  # type: ignore[return-value]


def build_mlm_dataset(tokenizer: "PreTrainedTokenizerBase", seq_len: int, *, nsp: bool = False,
                      short_seq_prob: float = 0.1, dataset_name: Optional[str] = None,
                      dataset_config: Optional[str] = None, train_file: Optional[str] = None,
                      validation_file: Optional[str] = None, text_column: Optional[str] = None,
                      streaming: bool = False, validation_split_percentage: float = 5.0,
                      corpus_max_chars: Optional[int] = None, num_proc: Optional[int] = None,
                      cache_dir: Optional[str] = None, seed: int = 42,
                      raw: Optional["AnyDatasetDict"] = None) -> "AnyDatasetDict":
    """Masked-LM examples of exactly ``seq_len`` tokens: ``input_ids``, ``token_type_ids``, ``attention_mask``,
    ``special_tokens_mask`` (masking happens in the collator, fresh every epoch).

    ``nsp=False``: ``[CLS] block [SEP]`` over the concatenated text (no padding).
    ``nsp=True``: BERT's sentence pairs ``[CLS] A [SEP] B [SEP] [PAD]...`` with ``token_type_ids`` 0/1 and
    ``next_sentence_label`` (0: B follows A, 1: B is random), for ``BertForPreTraining``.
    """
    _check_seq_len(seq_len, tokenizer, 8 if nsp else 3)
    cls_id, sep_id, pad_id = _special_ids(tokenizer)
    raw = raw if raw is not None else load_text_dataset(
        dataset_name, dataset_config, train_file, validation_file, text_column, streaming,
        validation_split_percentage, corpus_max_chars, cache_dir, seed)
    streaming = _is_streaming(raw["train"])
    out = {}
    for split, ds in _splits(raw):
        if nsp:
            sents = _map(ds, functools.partial(_tokenize_sentences, tokenizer=tokenizer), streaming,
                         f"splitting {split} into sentences", num_proc)
            out[split] = _map(sents, functools.partial(_nsp_pairs, seq_len=seq_len, cls_id=cls_id, sep_id=sep_id,
                                                       pad_id=pad_id, short_seq_prob=short_seq_prob, seed=seed),
                              streaming, f"building {split} sentence pairs", num_proc, with_indices=True)
        else:
            tok = _map(ds, functools.partial(_tokenize_docs, tokenizer=tokenizer, append_eos=False), streaming,
                       f"tokenizing {split}", num_proc)
            out[split] = _map(tok, functools.partial(_group_mlm, seq_len=seq_len, cls_id=cls_id, sep_id=sep_id),
                              streaming, f"grouping {split} into blocks of {seq_len}", num_proc)
    result = _container(raw, out, streaming)
    _check_nonempty(result, streaming, seq_len)
    return result


def _is_streaming(ds) -> bool:
    return type(ds).__name__ == "IterableDataset" and not isinstance(ds, ListDataset)


def _container(raw, out: dict, streaming: bool):
    if isinstance(raw["train"], ListDataset):
        return out
    import datasets

    return (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)(out)


def _check_nonempty(result, streaming: bool, seq_len: int) -> None:
    if streaming:
        return
    for split, ds in result.items():
        if len(ds) == 0:
            raise DataError(f"the {split} split has no complete block of seq_len={seq_len} tokens; "
                            f"use more text, a smaller --seq_len or a smaller validation percentage")


# --------------------------------------------------------------------------------------------
# collation and loading
# --------------------------------------------------------------------------------------------

class FixedShapeCollator:
    """Collates examples that all have ``seq_len`` tokens into tensors, refusing any other shape.

    ``kind="clm"``: stacks ``input_ids``/``attention_mask``/``labels`` (labels = input_ids when absent).
    ``kind="mlm"``: ``DataCollatorForLanguageModeling`` masking (``mlm_probability``, 80/10/10);
    ``special_tokens_mask`` and padding are never masked; ``next_sentence_label`` passes through.
    """

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", kind: Literal["clm", "mlm"] = "clm",
                 seq_len: Optional[int] = None, mlm_probability: float = 0.15, seed: Optional[int] = None):
        if kind not in ("clm", "mlm"):
            raise DataError(f"collator kind {kind!r} is not 'clm' or 'mlm'")
        self.tokenizer, self.kind, self.seq_len = tokenizer, kind, seq_len
        self.mlm_probability = mlm_probability
        if kind == "mlm":
            from transformers import DataCollatorForLanguageModeling

            _special_ids(tokenizer)
            kw: dict[str, Any] = {"seed": seed} if seed is not None else {}
            self._inner = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability,
                                                          return_tensors="pt", **kw)

    def __call__(self, examples: Sequence[dict]) -> dict[str, "torch.Tensor"]:
        import torch

        if not examples:
            raise DataError("cannot collate an empty batch")
        lengths = {len(e["input_ids"]) for e in examples}
        want = self.seq_len if self.seq_len is not None else next(iter(lengths))
        if lengths != {want}:
            raise DataError(f"examples have lengths {sorted(lengths)}, expected exactly {want}: the model is planned "
                            f"for one shape; build the dataset with the same seq_len")
        if self.kind == "mlm":
            return dict(self._inner([dict(e) for e in examples]))
        batch = {k: torch.tensor([e[k] for e in examples], dtype=torch.long)
                 for k in examples[0] if k in ("input_ids", "attention_mask", "labels", "token_type_ids")}
        if "labels" not in batch:
            batch["labels"] = batch["input_ids"].clone()
        return batch


def make_collator(tokenizer: "PreTrainedTokenizerBase", kind: Literal["clm", "mlm"] = "clm",
                  seq_len: Optional[int] = None, mlm_probability: float = 0.15,
                  seed: Optional[int] = None) -> FixedShapeCollator:
    """A collator for ``build_clm_dataset`` (``kind="clm"``) or ``build_mlm_dataset`` (``kind="mlm"``) examples."""
    return FixedShapeCollator(tokenizer, kind, seq_len, mlm_probability, seed)


def make_dataloader(dataset, collator: Callable, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                    num_replicas: int = 1, rank: int = 0, num_workers: int = 0,
                    pin_memory: bool = False, shuffle_buffer: int = 10_000) -> "torch.utils.data.DataLoader":
    """A ``DataLoader`` of fixed-shape batches (``drop_last=True``), sharded over ``num_replicas`` ranks.

    Map-style datasets use a (``DistributedSampler`` when sharded) seeded shuffle; streaming
    ``IterableDataset``s are split with ``split_dataset_by_node`` and shuffled with a buffer. For
    sharded map-style data call ``loader.sampler.set_epoch(epoch)`` each epoch. ``pin_memory=True``
    collates into page-locked memory, so a ``non_blocking`` copy to the GPU does not stall the host.
    """
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    if not 0 <= rank < num_replicas:
        raise DataError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
    if isinstance(dataset, torch.utils.data.IterableDataset):
        from datasets.distributed import split_dataset_by_node

        ds = dataset
        if shuffle and hasattr(ds, "shuffle"):
            ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
        if num_replicas > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=num_replicas)
        return DataLoader(ds, batch_size=batch_size, collate_fn=collator, drop_last=True, num_workers=num_workers,
                          pin_memory=pin_memory)
    if len(dataset) < batch_size * num_replicas:
        raise DataError(f"the dataset has {len(dataset)} examples, fewer than one batch of {batch_size} x "
                        f"{num_replicas} replicas; use more data or a smaller batch")
    if num_replicas > 1:
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=True)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator, drop_last=True,
                      num_workers=num_workers, pin_memory=pin_memory)
