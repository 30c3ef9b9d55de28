"""Gradient norm and scaling (``runtime/grads.py``): one foreach call per device and dtype, the same numbers as
``torch.nn.utils.clip_grad_norm_``."""

import math

import pytest
import torch

from rannc_hf.runtime.grads import grad_norm_sq, scale_grads_


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_norm_and_scaling_match_torch_over_mixed_dtypes(norm_type):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 3, generator=g), torch.randn(5, generator=g).bfloat16(), None,
             torch.randn(2, 2, generator=g) * 4]
    params = []
    for x in grads:
        p = torch.nn.Parameter(torch.zeros(1) if x is None else torch.zeros_like(x))
        p.grad = None if x is None else x.clone()
        params.append(p)
    ref = torch.nn.utils.clip_grad_norm_([p for p in params], 0.5, norm_type)
    part = grad_norm_sq(grads, norm_type)
    total = part if math.isinf(norm_type) else part.pow(1.0 / norm_type)
    assert part.dtype == torch.float32
    torch.testing.assert_close(total, ref.float(), rtol=1e-3, atol=0)   # torch norms bf16 in bf16
    coef = torch.clamp(0.5 / (ref + 1e-6), max=1.0)
    scale_grads_(grads, coef)
    for x, p in zip(grads, params):
        if x is not None:
            torch.testing.assert_close(x, p.grad)


def test_no_gradients_give_zero():
    assert float(grad_norm_sq([None, None], 2.0)) == 0.0
