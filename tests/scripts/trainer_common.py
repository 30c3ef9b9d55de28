"""Shared helpers for the trainer tests (datasets of tiny zoo batches, reference Trainer runs)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from rannc_hf.zoo import make_with_batches


class ListDataset(Dataset):
    """Samples (dicts of 1-D tensors) cut from deterministic zoo batches."""

    def __init__(self, family: str, n: int, seed: int = 123):
        _, batch_fn = make_with_batches(family, 0)
        batch = batch_fn(n, seed)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def tiny_model(family: str, seed: int = 0):
    model, _ = make_with_batches(family, seed)
    return model


def tb_scalars(logdir: str) -> dict[str, list[float]]:
    """All scalar series in the TensorBoard event files under ``logdir``."""
    import os

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for root, _, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root, size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def torch_threads():
    torch.set_num_threads(1)
