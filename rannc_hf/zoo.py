"""Tiny models of every family rannc_hf must handle, for tests, benchmarks and examples.

    >>> from rannc_hf.zoo import make
    >>> model, batch = make("gpt2", batch_size=4)
    >>> float(model(**batch).loss) > 0
    True

Families: gpt2 (tied embeddings), bert (masked LM), llama (RoPE), t5 (encoder-decoder),
cnn (BatchNorm + residuals), forkjoin (custom branching MLP), moe (Mixtral, routed experts).
Every model is fp32, dropout off, deterministic for a given seed. ``batch(batch_size, seed)`` gives
a dict of kwargs whose call returns an object with ``.loss`` (HF) or a scalar loss tensor (plain).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILIES = ("gpt2", "bert", "llama", "t5", "cnn", "forkjoin", "moe")
VOCAB = 128
SEQ = 16


def _lm_batch(batch_size: int, seed: int, seq: int = SEQ, vocab: int = VOCAB) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _mlm_batch(batch_size: int, seed: int, seq: int = SEQ, vocab: int = VOCAB) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch_size, seq), generator=g)
    labels = torch.full_like(ids, -100)
    mask = torch.rand(ids.shape, generator=g) < 0.3
    mask[:, 0] = True
    labels[mask] = ids[mask]
    inp = ids.clone()
    inp[mask] = 4  # [MASK]
    return {"input_ids": inp, "attention_mask": torch.ones_like(ids), "labels": labels}


def _t5_batch(batch_size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch_size, SEQ), generator=g)
    labels = torch.randint(2, VOCAB, (batch_size, SEQ // 2), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class TinyResNet(nn.Module):
    """A small CNN with BatchNorm and residual connections; ``forward(x, labels)`` returns the loss."""

    def __init__(self, width: int = 8, blocks: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.stem(pixel_values)
        for b in self.blocks:
            h = F.relu(h + b(h))
        logits = self.head(h.mean(dim=(2, 3)))
        return F.cross_entropy(logits, labels)


class ForkJoin(nn.Module):
    """A custom MLP whose layers fork into two branches and join again (not a chain)."""

    def __init__(self, dim: int = 32, layers: int = 4, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.left = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.right = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                   for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for l, r in zip(self.left, self.right):
            h = self.norm(torch.tanh(l(h)) * torch.sigmoid(r(h)) + h)
        return F.cross_entropy(self.out(h), labels)


def _hf(family: str) -> nn.Module:
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common)
        return tf.GPT2LMHeadModel(cfg)
    if family == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            **common)
        return tf.BertForMaskedLM(cfg)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **common)
        return tf.LlamaForCausalLM(cfg)
    if family == "t5":
        cfg = tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                          dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, **common)
        return tf.T5ForConditionalGeneration(cfg)
    if family == "moe":
        cfg = tf.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                               max_position_embeddings=64, router_aux_loss_coef=0.0, **common)
        return tf.MixtralForCausalLM(cfg)
    raise KeyError(family)


def make(family: str, batch_size: int = 8, seed: int = 0) -> tuple[nn.Module, dict]:
    """Return ``(model, example_batch)`` for a zoo family, deterministically initialised from ``seed``."""
    model, batch_fn = make_with_batches(family, seed)
    return model, batch_fn(batch_size, 1000 + seed)


def make_with_batches(family: str, seed: int = 0) -> tuple[nn.Module, Callable[[int, int], dict]]:
    """Return ``(model, batch_fn)``; ``batch_fn(batch_size, seed)`` makes a fresh batch."""
    if family not in FAMILIES:
        raise KeyError(f"unknown zoo family {family!r}; choose from {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    if family == "cnn":
        model: nn.Module = TinyResNet()

        def batch_fn(b: int, s: int) -> dict:
            g = torch.Generator().manual_seed(s)
            return {"pixel_values": torch.randn(b, 3, 8, 8, generator=g), "labels": torch.randint(0, 10, (b,), generator=g)}
    elif family == "forkjoin":
        model = ForkJoin()

        def batch_fn(b: int, s: int) -> dict:
            g = torch.Generator().manual_seed(s)
            return {"x": torch.randn(b, 32, generator=g), "labels": torch.randint(0, 10, (b,), generator=g)}
    else:
        model = _hf(family)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        batch_fn = {"bert": _mlm_batch, "t5": _t5_batch}.get(family, _lm_batch)
    model.train()
    return model, batch_fn


def loss_of(output) -> torch.Tensor:
    """The scalar loss of a model call: ``output.loss`` for HF outputs, the tensor itself otherwise."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "loss"):
        return output.loss
    if isinstance(output, dict):
        return output["loss"]
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find a loss in {type(output).__name__}")
