"""Capture of every zoo family, tied groups, cut validity, meta models and clear errors."""

import pytest
import torch
import torch.nn as nn

from rannc_hf.capture import capture
from rannc_hf.errors import CaptureError
from rannc_hf.zoo import FAMILIES, make


@pytest.fixture(scope="module")
def graphs():
    return {f: capture(*make(f, batch_size=4)) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_captures_with_loss_and_params(graphs, family):
    model, _ = make(family, batch_size=4)
    g = graphs[family]
    assert g.batch_size == 4
    assert g.loss in {op.name for op in g.ops}
    assert g.op(g.loss).outputs[0].shape == ()
    # every trainable parameter is read by some op, under exactly one name per object
    n_model = sum(p.numel() for p in model.parameters())
    assert g.num_params == n_model
    assert all(p.users for p in g.params.values() if not p.is_buffer)
    # ops are in topological order: every input is defined earlier
    inputs = {i.name for i in g.inputs}
    for op in g.ops:
        for v in op.inputs:
            assert v in inputs or g.defined_at(v) < op.index
    assert sum(g.valid_cuts) >= 5


def test_tied_groups(graphs):
    assert graphs["gpt2"].tied_groups == [["transformer.wte.weight", "lm_head.weight"]]
    t5 = graphs["t5"].tied_groups
    assert len(t5) == 1 and set(t5[0]) == {"shared.weight", "encoder.embed_tokens.weight",
                                           "decoder.embed_tokens.weight", "lm_head.weight"}
    assert t5[0][0] in graphs["t5"].params  # the first name is the one the graph reads
    assert graphs["llama"].tied_groups == []


def test_inplace_writes_block_cuts(graphs):
    g = graphs["moe"]
    writers = [op for op in g.ops if op.writes and not any(w.startswith("param:") for w in op.writes)]
    assert writers, "Mixtral's index_put_ should be recorded as an in-place write"
    for w in writers:
        for root in w.writes:
            # no cut between the definition of the written value and the write itself
            start = g.defined_at(root)
            assert not any(g.valid_cuts[start:w.index]), (w.name, root)


def test_batchnorm_buffers_stay_with_their_op(graphs):
    g = graphs["cnn"]
    bn = [op for op in g.ops if any("running_mean" in w for w in op.writes)]
    assert len(bn) == 7


def test_cut_crossing_values_are_tensors_without_shared_storage(graphs):
    g = graphs["gpt2"]
    for i, ok in enumerate(g.valid_cuts):
        if ok:
            for v in g.crossing(i):
                assert g.value_meta(v) is not None


def test_batch_dims(graphs):
    g = graphs["gpt2"]
    assert all(i.meta.batch_dim == 0 for i in g.inputs)
    assert sum(1 for op in g.ops for t in op.outputs if t.batch_dim is not None) > 50


def test_meta_model_captures_without_memory():
    import transformers as tf

    cfg = tf.GPT2Config(n_embd=1024, n_layer=4, n_head=16, vocab_size=50257, n_positions=256)
    with torch.device("meta"):
        model = tf.GPT2LMHeadModel(cfg)
    ids = torch.zeros(2, 256, dtype=torch.long)
    g = capture(model, {"input_ids": ids, "labels": ids})
    assert g.num_params == sum(p.numel() for p in model.parameters())
    assert g.ops[-1].outputs[0].shape == ()


def test_tensor_and_tuple_batches():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x, y):
            return ((self.a(x) - y) ** 2).mean()

    g = capture(Net(), (torch.randn(3, 4), torch.randn(3, 4)))
    assert [i.key for i in g.inputs] == ["arg0", "arg1"]


def test_data_dependent_control_flow_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:  # depends on the data
                h = h * 2
            return h.mean()

    with pytest.raises(CaptureError) as e:
        capture(Branchy(), torch.randn(2, 4))
    msg = str(e.value)
    assert "Branchy" in msg and "test_capture.py" in msg and "torch.where" in msg


def test_no_loss_is_a_clear_error():
    with pytest.raises(CaptureError, match="no scalar loss"):
        capture(nn.Linear(4, 2), torch.randn(3, 4))


def test_inputs_without_common_batch_dim():
    class Two(nn.Module):
        def forward(self, a, b):
            return (a.sum() + b.sum())

    with pytest.raises(CaptureError, match="disagree on the batch size"):
        capture(Two(), (torch.randn(3, 2), torch.randn(4, 2)))
    with pytest.raises(CaptureError, match="batch dimension"):
        capture(Two(), (torch.randn(3, 2), torch.tensor(1.0)))


def test_constant_all_true_attention_masks_are_dropped_input_masks_kept():
    """BERT's padding mask built from constants under export masks nothing: attention loses it (as Hugging Face
    skips it eagerly), so the fused kernels stay usable. A mask computed from an input is kept."""
    import torch.fx as fx

    from rannc_hf.capture.constant_masks import drop_constant_open_masks

    def masks(g):
        return [op for op in g.ops if op.target.startswith("aten.scaled_dot_product_attention")]

    model, batch = make("bert", batch_size=2)
    attn = masks(capture(model, batch))                          # the batch has an attention_mask: kept
    assert attn and all(len(op.inputs) == 4 for op in attn)
    no_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    g = capture(model, no_mask)
    attn = masks(g)
    assert attn and all(len(op.inputs) == 3 for op in attn)       # q, k, v: no mask value read
    assert not any(op.target.split(".")[1] == "ge" for op in g.ops)   # the mask's own ops are gone

    class Masked(torch.nn.Module):
        def forward(self, q, keep):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=keep[:, None, None, :])

    q, keep = torch.randn(2, 1, 4, 8), torch.tensor([[True, True, True, False]] * 2)
    gm = torch.export.export(Masked(), (q, keep)).module()
    assert drop_constant_open_masks(gm) == 0
    assert torch.allclose(gm(q, keep), Masked()(q, keep))

    class Closed(torch.nn.Module):   # constant, but it masks something: kept
        def forward(self, q):
            keep = torch.arange(4)[None, :] <= torch.arange(4)[:, None]
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=keep)

    gm = torch.export.export(Closed(), (q,)).module()
    assert drop_constant_open_masks(gm) == 0
    assert any(isinstance(n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask"), fx.Node)
               for n in gm.graph.nodes if "scaled_dot_product" in str(n.target))
