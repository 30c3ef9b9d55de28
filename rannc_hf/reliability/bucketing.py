"""Bucketing: pad batches to a few fixed shapes so a partitioned model sees at most a handful.

``RanncModule`` captures the model again for every new input signature (keeping the cuts), which
costs about a second per shape for small models and more for big ones; a dynamic-padding collator
would produce a new shape almost every step. Pad the sequence length up to the next multiple of
``bucket`` (and cap it at ``max_length``), and make the batch size a multiple of
``dp_size x num_microbatches`` (drop the extra rows, as ``drop_last=True`` does for a short last
batch)::

    from rannc_hf.reliability import BucketCollator
    collate = BucketCollator(tokenizer, bucket=64, max_length=512, batch_multiple=4)
    loader = DataLoader(ds, batch_size=32, collate_fn=collate, drop_last=True)

    >>> import torch
    >>> b = pad_to_bucket({"input_ids": torch.ones(2, 5, dtype=torch.long),
    ...                    "labels": torch.ones(2, 5, dtype=torch.long)}, bucket=8)
    >>> tuple(b["input_ids"].shape), int(b["labels"][0, -1])
    ((2, 8), -100)
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import torch

from ..errors import ShapeMismatchError

log = logging.getLogger(__name__)

__all__ = ["bucket_length", "pad_to_bucket", "trim_batch", "BucketCollator", "DEFAULT_PAD_VALUES"]

#: padding per key: labels are ignored by the loss (-100), masks are 0, ids use the pad token (0 here)
DEFAULT_PAD_VALUES = {"labels": -100, "attention_mask": 0, "token_type_ids": 0, "input_ids": 0,
                      "special_tokens_mask": 1, "position_ids": 0}


def bucket_length(n: int, bucket: int, max_length: Optional[int] = None) -> int:
    """``n`` rounded up to a multiple of ``bucket`` (at most ``max_length``)."""
    if bucket < 1:
        raise ValueError(f"bucket must be a positive integer, got {bucket}")
    L = max(bucket, math.ceil(n / bucket) * bucket)
    if max_length is not None:
        if n > max_length:
            raise ShapeMismatchError(f"a sequence of length {n} is longer than max_length={max_length}; "
                                     f"truncate in the tokenizer (truncation=True, max_length={max_length})")
        L = min(L, max_length)
    return L


def pad_to_bucket(batch: dict, bucket: int = 64, max_length: Optional[int] = None,
                  pad_values: Optional[dict] = None, seq_keys: Optional[Sequence[str]] = None) -> dict:
    """Right-pad every ``[B, L, ...]`` tensor of ``batch`` along dim 1 to the bucket length."""
    pv = {**DEFAULT_PAD_VALUES, **(pad_values or {})}
    keys = list(seq_keys) if seq_keys is not None else [k for k, v in batch.items()
                                                         if isinstance(v, torch.Tensor) and v.dim() >= 2]
    if not keys:
        return dict(batch)
    L = max(int(batch[k].shape[1]) for k in keys)
    target = bucket_length(L, bucket, max_length)
    out = dict(batch)
    for k in keys:
        v = batch[k]
        if v.shape[1] == target:
            continue
        pad = torch.full((v.shape[0], target - v.shape[1], *v.shape[2:]), pv.get(k, 0), dtype=v.dtype, device=v.device)
        out[k] = torch.cat([v, pad], dim=1)
    return out


def trim_batch(batch: dict, multiple: int, policy: str = "drop") -> Optional[dict]:
    """Make the batch size a multiple of ``multiple``: ``drop`` the extra rows (``None`` if none remain),
    or ``error`` with advice."""
    sizes = {int(v.shape[0]) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) > 1:
        raise ShapeMismatchError(f"batch tensors disagree on the batch size ({sorted(sizes)}); every tensor needs "
                                 f"the same first dimension")
    if not sizes or multiple <= 1:
        return batch
    B = sizes.pop()
    keep = (B // multiple) * multiple
    if keep == B:
        return batch
    if policy == "error":
        raise ShapeMismatchError(f"batch of {B} samples is not a multiple of {multiple} (dp_size x num_microbatches); "
                                 f"use drop_last=True or a batch size that is a multiple of {multiple}")
    if keep == 0:
        return None
    log.info("rannc_hf: dropping %d of %d rows so the batch splits into %d parts", B - keep, B, multiple)
    return {k: (v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}


class BucketCollator:
    """Wraps a collator (or a tokenizer's ``pad``) so every batch has a bucketed sequence length.

    Args:
        base: a collate function (list of examples -> dict of tensors); a tokenizer (its ``pad``
            is used, labels copied from ``input_ids`` when ``clm=True``); or ``None`` for examples
            that are dicts of equal-length tensors/lists.
        bucket: pad the length to a multiple of this (e.g. 32 or 64).
        max_length: longest allowed length (truncate in the tokenizer beforehand).
        batch_multiple: ``dp_size x num_microbatches``; extra rows are dropped (``ragged="drop"``)
            or rejected (``ragged="error"``).
    """

    def __init__(self, base: Any = None, bucket: int = 64, max_length: Optional[int] = None,
                 batch_multiple: int = 1, ragged: str = "drop", pad_values: Optional[dict] = None,
                 clm: bool = False):
        if ragged not in ("drop", "error"):
            raise ValueError("ragged must be 'drop' or 'error'")
        self.base, self.bucket, self.max_length = base, int(bucket), max_length
        self.batch_multiple, self.ragged, self.clm = int(batch_multiple), ragged, clm
        self.pad_values = dict(pad_values or {})
        pad_id = getattr(base, "pad_token_id", None)
        if pad_id is not None:
            self.pad_values.setdefault("input_ids", pad_id)

    def _collate(self, examples: list) -> dict:
        b = self.base
        if b is None:
            return _pad_list(examples, self.pad_values)
        if callable(getattr(b, "pad", None)):
            out = dict(b.pad(examples, return_tensors="pt"))
            if self.clm and "labels" not in out:
                labels = out["input_ids"].clone()
                if "attention_mask" in out:
                    labels[out["attention_mask"] == 0] = -100
                out["labels"] = labels
            return out
        if callable(b):
            return dict(b(examples))
        raise TypeError(f"base must be a collate function or a tokenizer, got {type(b).__name__}")

    def __call__(self, examples: list) -> Optional[dict]:
        batch = pad_to_bucket(self._collate(examples), self.bucket, self.max_length, self.pad_values)
        return trim_batch(batch, self.batch_multiple, self.ragged)


def _pad_list(examples: list, pad_values: dict) -> dict:
    pv = {**DEFAULT_PAD_VALUES, **pad_values}
    out = {}
    for k in examples[0]:
        vals = [torch.as_tensor(e[k]) for e in examples]
        if vals[0].dim() == 0:
            out[k] = torch.stack(vals)
            continue
        L = max(v.shape[0] for v in vals)
        out[k] = torch.stack([torch.cat([v, torch.full((L - v.shape[0], *v.shape[1:]), pv.get(k, 0), dtype=v.dtype)])
                              for v in vals])
    return out
