"""Bucketing helpers: random lengths collapse to a few shapes; padding is ignored by the loss;
ragged batch sizes are dropped or rejected with advice. (Training over pp=2 with them:
tests/test_reliability_restart.py::test_random_lengths_pp2_match_single_process.)"""

from __future__ import annotations

import random

import pytest
import torch

from rannc_hf.errors import ShapeMismatchError
from rannc_hf.reliability import BucketCollator, bucket_length, pad_to_bucket, trim_batch


def test_random_lengths_give_few_shapes():
    rng = random.Random(0)
    collate = BucketCollator(bucket=32, max_length=128, batch_multiple=4)
    shapes = set()
    for _ in range(50):
        ex = [{"input_ids": list(range(1, rng.randint(3, 128))), } for _ in range(rng.choice([4, 6, 8]))]
        for e in ex:
            e["attention_mask"] = [1] * len(e["input_ids"])
            e["labels"] = list(e["input_ids"])
        b = collate(ex)
        assert b["input_ids"].shape[0] % 4 == 0 and b["input_ids"].shape[1] % 32 == 0
        assert (b["labels"][b["attention_mask"] == 0] == -100).all()
        shapes.add(tuple(b["input_ids"].shape))
    assert len({s[1] for s in shapes}) <= 4                      # 32, 64, 96, 128


def test_padding_does_not_change_the_loss():
    from rannc_hf.zoo import make_with_batches

    model, _ = make_with_batches("gpt2", 0)
    ids = torch.randint(1, 128, (2, 11))
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    p = pad_to_bucket(b, 16)
    assert p["input_ids"].shape == (2, 16)
    with torch.no_grad():
        assert torch.allclose(model(**b).loss, model(**p).loss, rtol=1e-5)


def test_limits_and_ragged_batches():
    assert bucket_length(1, 32) == 32 and bucket_length(33, 32) == 64 and bucket_length(100, 64, max_length=120) == 120
    with pytest.raises(ShapeMismatchError, match="longer than max_length=64; truncate in the tokenizer"):
        bucket_length(65, 32, max_length=64)
    b = {"x": torch.zeros(5, 3)}
    assert trim_batch(b, 4)["x"].shape[0] == 4
    assert trim_batch({"x": torch.zeros(3, 3)}, 4) is None
    with pytest.raises(ShapeMismatchError, match="disagree on the batch size"):
        trim_batch({"x": torch.zeros(4, 3), "y": torch.zeros(2)}, 2)
