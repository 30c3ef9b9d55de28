"""Tokenizers for the recipes: load one that exists, or train a small one on the corpus.

GPT recipes get a byte-level BPE (GPT-2 style, ``<|endoftext|>`` as bos/eos/unk/pad); BERT recipes
get a lower-cased WordPiece with ``[PAD] [UNK] [CLS] [SEP] [MASK]`` and the ``[CLS] A [SEP] B [SEP]``
template. Both are ``transformers.PreTrainedTokenizerFast`` objects, so ``save_pretrained(dir)``
writes them beside the checkpoint and ``AutoTokenizer.from_pretrained(dir)`` reads them back.

    from rannc_hf.data.tokenizer import get_tokenizer
    tok = get_tokenizer(None, kind="gpt", vocab_size=4096)      # trains on the default corpus (cached)
    tok = get_tokenizer("out/checkpoint", kind="gpt")           # a local directory: loaded, never trained
    tok.save_pretrained("out/checkpoint")

Trained tokenizers are cached under ``$RANNC_HF_CACHE/tokenizer-<kind>-<vocab>-<hash of the texts>``.
Nothing here touches the network: hub names are looked up in the local HF cache only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal, Optional, Sequence

from .errors import DataError, DataFileNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["TokenizerKind", "GPT_SPECIAL", "BERT_SPECIAL", "train_tokenizer", "load_tokenizer",
           "get_tokenizer", "DEFAULT_VOCAB_SIZE"]

TokenizerKind = Literal["gpt", "bert"]
DEFAULT_VOCAB_SIZE = 4096
GPT_SPECIAL = "<|endoftext|>"
BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _check_kind(kind: str) -> str:
    k = str(kind).lower()
    aliases = {"gpt": "gpt", "gpt2": "gpt", "clm": "gpt", "llama": "gpt", "bpe": "gpt",
               "bert": "bert", "mlm": "bert", "wordpiece": "bert"}
    if k not in aliases:
        raise DataError(f"tokenizer kind {kind!r} is not one of 'gpt' (byte-level BPE) or 'bert' (WordPiece)")
    return aliases[k]


def _wrap(tok, kind: str, model_max_length: int) -> "PreTrainedTokenizerFast":
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt":
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=GPT_SPECIAL, eos_token=GPT_SPECIAL,
                                       unk_token=GPT_SPECIAL, pad_token=GPT_SPECIAL,
                                       model_max_length=model_max_length, add_prefix_space=False,
                                       clean_up_tokenization_spaces=False)
    pad, unk, cls, sep, mask = BERT_SPECIAL
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, cls_token=cls,
                                   sep_token=sep, mask_token=mask, model_max_length=model_max_length,
                                   do_lower_case=True, clean_up_tokenization_spaces=True,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def train_tokenizer(texts: Iterable[str], kind: TokenizerKind = "gpt", vocab_size: int = DEFAULT_VOCAB_SIZE,
                    min_frequency: int = 2, model_max_length: int = 1024) -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE (``kind="gpt"``) or WordPiece (``kind="bert"``) tokenizer on ``texts``.

    ``vocab_size`` is an upper bound: a small corpus may yield fewer tokens (``len(tok)`` is exact).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    kind = _check_kind(kind)  # type: ignore[assignment]
    if vocab_size < 300:
        raise DataError(f"vocab_size={vocab_size} is too small; use at least 300 (byte-level BPE needs 257)")
    if kind == "gpt":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=[GPT_SPECIAL], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True,
                                                    handle_chinese_chars=True, strip_accents=None)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=list(BERT_SPECIAL), show_progress=False,
                                            continuing_subword_prefix="##")
    tok.train_from_iterator(texts, trainer=trainer)
    if kind == "bert":
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return _wrap(tok, kind, model_max_length)


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs) -> "PreTrainedTokenizerBase":
    """``AutoTokenizer.from_pretrained`` restricted to local files (a directory, or the local HF cache)."""
    from transformers import AutoTokenizer

    path = os.fspath(name_or_path)
    looks_local = os.path.sep in path or path.startswith(".") or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise DataFileNotFoundError(f"tokenizer directory {path!r} does not exist; pass a directory written by "
                                    f"save_pretrained, or omit --tokenizer to train one on the corpus")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise DataError(f"could not load tokenizer {path!r} from local files ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). Hub names work only when already in the "
                        f"local HF cache; otherwise omit --tokenizer to train one on the corpus") from None


def _texts_key(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.blake2b(t.encode("utf-8", "replace"), digest_size=16).digest())
    return h.hexdigest()[:16]


def get_tokenizer(name_or_path: Optional[str | os.PathLike] = None, kind: TokenizerKind = "gpt",
                  vocab_size: int = DEFAULT_VOCAB_SIZE, texts: Optional[Sequence[str]] = None,
                  cache_dir: Optional[str | os.PathLike] = None, model_max_length: int = 1024,
                  corpus_max_chars: Optional[int] = None) -> "PreTrainedTokenizerBase":
    """The recipes' tokenizer: load ``name_or_path`` if given, else train (or reuse a cached) one.

    ``texts`` defaults to the default corpus (:func:`rannc_hf.data.corpus.default_corpus_texts`,
    ``corpus_max_chars`` characters). The trained tokenizer is cached keyed by kind, vocab size and
    a hash of the texts, so every rank and every rerun gets the identical tokenizer.
    """
    if name_or_path:
        return load_tokenizer(name_or_path)
    kind = _check_kind(kind)  # type: ignore[assignment]
    if texts is None:
        from .corpus import default_corpus_texts

        texts = default_corpus_texts(max_chars=corpus_max_chars, cache_dir=cache_dir)
    if not texts:
        raise DataError("cannot train a tokenizer on an empty corpus")
    from .corpus import cache_root

    final = Path(cache_dir or cache_root()) / f"tokenizer-{kind}-{vocab_size}-{_texts_key(texts)}"
    if (final / "tokenizer.json").exists():
        tok = load_tokenizer(final)
        tok.model_max_length = model_max_length
        return tok
    tok = train_tokenizer(texts, kind=kind, vocab_size=vocab_size, model_max_length=model_max_length)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tok.save_pretrained(str(tmp))
    try:
        os.rename(tmp, final)
    except OSError:  # another rank won the race; its tokenizer is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return tok
