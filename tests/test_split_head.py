"""A large-vocabulary LM head captured as vocabulary chunks (rannc_hf.capture.split_head): same values and
gradients as the whole head, planned both ways, and captured by the runtime the way the plan says.
The pipeline run with the chunks on two stages is in test_runtime_dist.py (test_split_lm_head_across_stages)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf

import rannc_hf
from rannc_hf.capture import capture
from rannc_hf.capture.split_head import num_chunks
from rannc_hf.runtime.building import _BuildMixin
from rannc_hf.zoo import loss_of, make_with_batches


def _chunks(g) -> list[int]:
    return [o.index for o in g.ops if o.target == "aten.slice.Tensor" and o.params == ["lm_head.weight"]]


def test_chunked_head_gives_the_same_loss_and_gradients():
    """The head as 4 chunks whose loss comes from per-chunk statistics: no op produces the whole logits, only the
    loss is returned, and loss and gradients equal the whole model's (fp32, within rounding)."""
    model, bf = make_with_batches("llama", 0)
    batch = bf(4, 0)
    whole = capture(model, batch)
    split = capture(model, batch, split_min_out_features=128)
    assert whole.split_min_out_features is None and not _chunks(whole)
    assert split.split_min_out_features == 128 and len(_chunks(split)) == 4
    vocab = model.config.vocab_size
    assert not any(o.outputs and o.outputs[0].shape[-1:] == (vocab,) and len(o.outputs[0].shape) == 3
                   for o in split.ops)                          # no [batch, seq, vocab] tensor anywhere
    assert split.outputs == [split.loss] and "cross_entropy" not in " ".join(o.target for o in split.ops)

    grads, losses = [], []
    for g in (whole, split):
        model.zero_grad()
        out = g.module(**batch, use_cache=False)
        losses.append(out.loss.detach())
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert split.module(**batch, use_cache=False).logits is None
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_chunked_loss_honours_ignore_index():
    model, bf = make_with_batches("llama", 0)
    batch = bf(4, 0)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][:, ::3] = -100                           # padding / prompt tokens that do not count
    split = capture(model, batch, split_min_out_features=128)
    ref = loss_of(model(**batch))
    torch.testing.assert_close(split.module(**batch, use_cache=False).loss, ref.detach(), rtol=1e-6, atol=1e-6)


def test_narrow_models_are_not_split():
    model, bf = make_with_batches("gpt2", 0)
    g = capture(model, bf(2, 0), split_min_out_features=10**6)
    assert g.split_min_out_features is None
    assert num_chunks(250_000) == 8 and num_chunks(100) == 1


@pytest.mark.parametrize("hidden,vocab,chosen", [(1024, 250_000, True), (256, 131_072, False)])
def test_planner_tries_the_split_and_keeps_it_only_when_better(hidden, vocab, chosen):
    """A large-vocabulary decoder on 8 pipeline stages is also planned with its head split; the split is kept
    when it is clearly faster (a 250k head on a 1024-wide model: about 1.2x), not when the partial logits it
    carries cost more than it saves (a 256-wide model). Never slower than the whole-head plan."""
    ids = torch.zeros(64, 512, dtype=torch.long)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                                   num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                                   vocab_size=vocab, max_position_embeddings=512,
                                                   tie_word_embeddings=False))
    model.config.use_cache = False
    cluster = rannc_hf.Cluster(num_gpus=8, gpus_per_node=8, gpu_memory="80GB", device="h100")
    cfg = rannc_hf.RanncConfig(num_stages=8)
    batch = {"input_ids": ids, "labels": ids}
    p = rannc_hf.plan(model, batch, cluster=cluster, config=cfg, progress=False)
    whole = rannc_hf.plan(capture(model, {k: v[:2] for k, v in batch.items()}), cluster=cluster, config=cfg,
                          progress=False, global_batch=64)
    assert p.predicted_step_time <= whole.predicted_step_time * (1 + 1e-9)
    if chosen:
        assert p.split_min_out_features == 131_072 and p.num_ops > whole.num_ops
        assert p.predicted_step_time < 0.99 * whole.predicted_step_time
        assert any(n.startswith("the LM head is split into vocabulary chunks") for n in p.notes)
    else:
        assert p.split_min_out_features is None and p.num_ops == whole.num_ops
        assert any(n.startswith("LM head split into vocabulary chunks") and "(not better)" in n for n in p.notes)
    # baselines are the better of either capture: auto is compared with the best each hand split can do
    for name in ("even", "params"):
        assert p.baselines[name] <= whole.baselines[name] * (1 + 1e-9)
    # the config decides too: never split, or split whenever there is such a head
    kept = rannc_hf.plan(model, batch, cluster=cluster, config=rannc_hf.RanncConfig(num_stages=8, split_head=False),
                         progress=False)
    assert kept.split_min_out_features is None and not any("vocabulary chunks" in n for n in kept.notes)
    forced = rannc_hf.plan(model, batch, cluster=cluster, config=rannc_hf.RanncConfig(num_stages=8, split_head="true"),
                           progress=False)
    assert forced.split_min_out_features == 131_072


def test_one_gpu_plans_the_head_whole():
    ids = torch.zeros(8, 64, dtype=torch.long)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=131_072,
                                                   max_position_embeddings=64, tie_word_embeddings=False))
    model.config.use_cache = False
    one = rannc_hf.plan(model, {"input_ids": ids, "labels": ids},
                        cluster=rannc_hf.Cluster(num_gpus=1, gpu_memory="80GB", device="h100"), progress=False)
    assert one.split_min_out_features is None and not any("vocabulary chunks" in n for n in one.notes)


def test_runtime_captures_the_way_the_plan_says():
    model, bf = make_with_batches("llama", 0)
    for split, n in ((None, 0), (128, 4)):
        rm = SimpleNamespace(module=model, layout=SimpleNamespace(plan=SimpleNamespace(split_min_out_features=split)))
        assert len(_chunks(_BuildMixin._capture(rm, bf(2, 0)))) == n
