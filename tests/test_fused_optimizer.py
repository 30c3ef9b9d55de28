"""RanncModule runs an Adam/AdamW whose implementation the user left to torch as the fused kernel on GPUs."""

import torch

from rannc_hf.runtime.fused_optimizer import prefer_fused


def _params(n=2):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(n)]


def test_only_groups_left_to_torch_are_switched():
    a, b, c, d = _params(4)
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "foreach": True}, {"params": [c], "fused": False},
                             {"params": [d]}], lr=1e-2)
    d.grad = torch.ones_like(d)
    opt.step()                                   # d's group has state now (its step counter on the host)
    assert prefer_fused(opt, "cpu") == 1
    assert [g["fused"] for g in opt.param_groups] == [True, None, False, None]
    assert prefer_fused(opt, "cuda") == 0        # the parameters are not on that device
    sgd = torch.optim.SGD(_params(1), lr=0.1)
    assert prefer_fused(sgd, "cpu") == 0 and sgd.param_groups[0].get("fused") is None


def test_fused_computes_the_same_update():
    ref, fused = _params(), _params()
    o_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    o_fused = torch.optim.AdamW(fused, lr=1e-2, weight_decay=0.1)
    assert prefer_fused(o_fused, "cpu") == 1
    for step in range(3):
        for p, q in zip(ref, fused):
            p.grad = torch.full_like(p, 0.1 * (step + 1))
            q.grad = p.grad.clone()
        o_ref.step()
        o_fused.step()
    for p, q in zip(ref, fused):
        assert torch.allclose(p, q, atol=1e-6)


def test_ranncmodule_asks_for_the_fused_kernel_on_a_gpu_without_offload(monkeypatch):
    """The wiring: on a CUDA device (faked: only the decision is under test), without offload on the rank and
    outside fp16, RanncModule hands its optimizer to ``prefer_fused`` for "cuda"; on the CPU it never does."""
    import rannc_hf.runtime.fused_optimizer as fo
    from rannc_hf import RanncConfig, RanncModule
    from rannc_hf.zoo import make

    calls = []
    monkeypatch.setattr(fo, "prefer_fused", lambda opt, dev: calls.append((opt, dev)) or 0)
    model, batch = make("gpt2", batch_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    m = RanncModule(model, opt, config=RanncConfig(num_stages=1, precision="fp32"), example_batch=batch)
    assert m.built and calls == []                                   # CPU
    m.device = torch.device("cuda")
    m._prefer_fused_optimizer()
    assert calls == [(opt, "cuda")]
    m._offload = object()                                            # a stage of this rank offloads
    m._prefer_fused_optimizer()
    m._offload, m.config.precision = None, "fp16"                     # the fp16 loss scaler steps it
    m._prefer_fused_optimizer()
    assert len(calls) == 1
