"""Verified atomic checkpoints (rannc_hf.reliability): in one process, fast.

* save -> load round trip restores parameters, optimizer state and RNG exactly; manifest lists
  every file with size + sha256, the step and the model fingerprint; ``keep`` prunes old ones.
* a corrupted (bit flip) or truncated newest checkpoint is detected, reported (file, expected vs
  actual checksum) and the previous good one is loaded; a crashed save (temp dir) is ignored.
* a full disk (ENOSPC while writing) fails the save with CheckpointError naming the cause, removes
  the partial save and leaves the previous checkpoint byte-identical.
* a checkpoint of another model is refused naming the mismatch; accelerate.Accelerator works too.
"""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest
import torch

from rannc_hf.errors import CheckpointError
from rannc_hf.reliability import (MANIFEST, find_latest_checkpoint, list_checkpoints, load_checkpoint,
                                  save_checkpoint, verify_checkpoint)
from rannc_hf.zoo import make_with_batches


def _train(model, opt, bf, steps, start=0):
    for s in range(start, start + steps):
        model(**bf(4, s)).loss.backward()
        opt.step()
        opt.zero_grad()


def _setup(seed=0):
    model, bf = make_with_batches("gpt2", seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, bf


def _digests(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hash(fh.read())
    return out


def test_roundtrip_exact_and_manifest_and_keep(tmp_path):
    model, opt, bf = _setup()
    for step in (1, 2, 3):
        _train(model, opt, bf, 1, start=step - 1)
        save_checkpoint((model, opt), tmp_path, step, keep=2, extra={"epoch": 0})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 2]          # keep=2 pruned step 1
    man = verify_checkpoint(find_latest_checkpoint(tmp_path))
    assert man["step"] == 3 and man["extra"] == {"epoch": 0}
    assert set(man["files"]) == {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in man["files"].values())
    assert man["fingerprint"]["class"] == "GPT2LMHeadModel"
    assert "lm_head.weight" in man["aliases"]                          # tied weight stored once
    expect_rng = torch.rand(3)                                          # continue uninterrupted
    _train(model, opt, bf, 2, start=3)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    m2, o2, _ = _setup(seed=1)                                         # different init
    torch.manual_seed(123)
    got = load_checkpoint((m2, o2), tmp_path)
    assert got["step"] == 3
    assert m2.lm_head.weight is m2.transformer.wte.weight
    assert torch.equal(torch.rand(3), expect_rng)                      # RNG restored
    _train(m2, o2, bf, 2, start=3)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_corrupted_and_truncated_fall_back(tmp_path, caplog):
    model, opt, bf = _setup()
    save_checkpoint((model, opt), tmp_path, 1, keep=0)
    _train(model, opt, bf, 1)
    save_checkpoint((model, opt), tmp_path, 2, keep=0)
    save_checkpoint((model, opt), tmp_path, 3, keep=0)
    os.makedirs(tmp_path / ".checkpoint-00000004.tmp-crashed")           # a save killed halfway
    (tmp_path / ".checkpoint-00000004.tmp-crashed" / "model.safetensors").write_bytes(b"partial")
    c3, c2 = tmp_path / "checkpoint-00000003", tmp_path / "checkpoint-00000002"
    with open(c3 / "optimizer.safetensors", "r+b") as f:               # flip one byte
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors.*sha256 is [0-9a-f]+.*expects [0-9a-f]+"):
        verify_checkpoint(c3)
    os.truncate(c2 / "model.safetensors", 100)                           # truncated
    with pytest.raises(CheckpointError, match=r"model.safetensors' has 100 bytes, the manifest says \d+"):
        verify_checkpoint(c2)
    m2, o2, _ = _setup(seed=1)
    with caplog.at_level(logging.WARNING, logger="rannc_hf.reliability.checkpoint"):
        man = load_checkpoint((m2, o2), tmp_path)
    assert man["step"] == 1                                               # newest *good* one
    text = caplog.text
    assert "step 3" in text and "optimizer.safetensors" in text and "step 2" in text and "truncated" in text


def test_disk_full_keeps_previous(tmp_path, monkeypatch):
    import safetensors.torch as st

    model, opt, bf = _setup()
    save_checkpoint((model, opt), tmp_path, 1)
    before = _digests(tmp_path)
    real = st.save_file

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)                                         # a partial write, then ENOSPC
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(st, "save_file", full_disk)
    _train(model, opt, bf, 1)
    with pytest.raises(CheckpointError, match=r"disk is full.*checkpoint-00000001' is intact.*Free space"):
        save_checkpoint((model, opt), tmp_path, 2)
    assert _digests(tmp_path) == before                                    # nothing else left behind
    monkeypatch.setattr(st, "save_file", real)
    verify_checkpoint(tmp_path / "checkpoint-00000001")


def test_other_model_refused(tmp_path):
    model, opt, _ = _setup()
    save_checkpoint((model, opt), tmp_path, 5)
    before = _digests(tmp_path)
    other, _ = make_with_batches("llama", 0)
    with pytest.raises(CheckpointError, match=r"different model: model class GPT2LMHeadModel in the checkpoint vs "
                                              r"LlamaForCausalLM here.*not in the checkpoint"):
        load_checkpoint(other, tmp_path)
    import transformers as tf

    wider = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=64, vocab_size=128))
    with pytest.raises(CheckpointError, match=r"differ in shape/dtype, e.g. .*\[128, 32\] float32 in the checkpoint "
                                              r"vs \[128, 64\] float32 here.*n_embd=32->64"):
        load_checkpoint(wider, tmp_path)
    assert _digests(tmp_path) == before


def test_accelerator_roundtrip(tmp_path):
    from accelerate import Accelerator

    model, opt, bf = _setup()
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    _train(model, opt, bf, 1)
    save_checkpoint(acc, tmp_path, 1, extra={"note": "acc"})
    man = verify_checkpoint(tmp_path / "checkpoint-00000001")
    assert man["extra"] == {"note": "acc"} and any(f.startswith("model") for f in man["files"])
    want = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, bf, 1, start=1)
    assert load_checkpoint(acc, tmp_path)["step"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    with open(tmp_path / "checkpoint-00000001" / MANIFEST) as f:
        assert json.load(f)["fingerprint"]["class"] == "GPT2LMHeadModel"
