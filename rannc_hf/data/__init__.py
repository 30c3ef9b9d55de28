"""Data for the recipes: an offline default corpus, tokenizer training, ``datasets`` pipelines.

    from rannc_hf.data import load_default_corpus, get_tokenizer, build_clm_dataset, make_collator
    tok = get_tokenizer(None, kind="gpt", vocab_size=4096)          # trained on the default corpus
    ds = build_clm_dataset(tok, seq_len=128)                         # DatasetDict train/validation
    collate = make_collator(tok, "clm", seq_len=128)
    batch = collate([ds["train"][i] for i in range(8)])              # input_ids/labels [8, 128]

Submodules are imported lazily, so ``import rannc_hf.data`` imports neither ``datasets`` nor
``transformers``.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "CorpusOptions": "corpus", "load_default_corpus": "corpus", "default_corpus_texts": "corpus",
    "gather_corpus": "corpus", "cache_root": "corpus",
    "get_tokenizer": "tokenizer", "train_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "load_text_dataset": "pipeline", "build_clm_dataset": "pipeline", "build_mlm_dataset": "pipeline",
    "make_collator": "pipeline", "make_dataloader": "pipeline",
    "plot_loss_curve": "plots",
    "DataError": "errors", "DataFileNotFoundError": "errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
