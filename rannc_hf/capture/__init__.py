"""Capture: any ``nn.Module`` + example batch -> :class:`Graph` (ops, tensors, params, tied groups, loss).

    >>> from rannc_hf.capture import capture
    >>> from rannc_hf.zoo import make
    >>> print(capture(*make("gpt2", batch_size=2)).summary())   # doctest: +ELLIPSIS
    GPT2LMHeadModel: ... ops, 0.06M params, 1 tied groups, ... valid cut positions, batch 2
"""

from .export import batch_size_of, capture, normalize_batch
from .graph import Graph, InputInfo, Op, ParamInfo, TensorMeta

__all__ = ["capture", "Graph", "Op", "ParamInfo", "InputInfo", "TensorMeta", "normalize_batch", "batch_size_of"]
