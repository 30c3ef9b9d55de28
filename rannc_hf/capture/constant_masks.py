"""Drop attention masks that a captured graph computes from constants alone and that mask nothing.

Run eagerly, Hugging Face models skip an all-ones padding mask before calling ``scaled_dot_product_attention``
(the fused flash kernel takes no mask). Under ``torch.export`` that check is data-dependent. So the graph builds
the mask from ``arange`` and comparisons, and hands it to attention. With that mask, BERT-large's attention on an
H200 fell back to the math kernel in fp32: 512 MiB of scores a layer, optimizer offload out of memory under 24 GiB,
and 382 ms a step for the recompute plan (178 ms without the mask). A mask whose inputs are all constants is
evaluated once here. If it masks nothing (a boolean mask all True, or an additive mask all zero), the attention
call loses it, as it would eagerly. A mask that depends on an input, such as a real ``attention_mask``, is left
alone (a padded BERT batch runs cuDNN's fused attention with it).

    >>> import torch, torch.fx as fx
    >>> from rannc_hf.capture.constant_masks import drop_constant_open_masks
    >>> class Attn(torch.nn.Module):
    ...     def forward(self, q):
    ...         keep = (torch.arange(4) >= 0).view(1, 1, 1, 4).expand(2, -1, 4, 4)
    ...         return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=keep)
    >>> gm = torch.export.export(Attn(), (torch.randn(2, 1, 4, 8),)).module()
    >>> drop_constant_open_masks(gm)
    1
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from .graph import op_base_name

#: attention ops whose fourth argument is the mask (flash attention takes none; flex attention takes a block mask)
_MASKED_ATTENTION = {"scaled_dot_product_attention", "_scaled_dot_product_efficient_attention",
                     "_scaled_dot_product_cudnn_attention"}
#: how many elements a constant mask may have before it is not worth evaluating on the host
_MAX_ELEMENTS = 1 << 26


def _mask_arg(node: fx.Node) -> tuple[Optional[fx.Node], Optional[object]]:
    """(the mask node, where it sits: an args index or a kwargs key) of an attention call."""
    if "attn_mask" in node.kwargs:
        m = node.kwargs["attn_mask"]
        return (m, "attn_mask") if isinstance(m, fx.Node) else (None, None)
    if len(node.args) > 3 and isinstance(node.args[3], fx.Node):
        return node.args[3], 3
    return None, None


def _constant_subgraph(mask: fx.Node) -> Optional[list[fx.Node]]:
    """The nodes ``mask`` is computed from, in graph order, when none is an input, a parameter or a buffer."""
    seen: dict[fx.Node, None] = {}
    stack = [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n.op != "call_function":
            return None
        seen[n] = None
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _evaluate(nodes: list[fx.Node]) -> Optional[torch.Tensor]:
    env: dict[fx.Node, object] = {}
    try:
        for n in nodes:
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = dict(fx.node.map_arg(n.kwargs, env.__getitem__))
            if "device" in kwargs:   # a constant: the host computes it
                kwargs["device"] = "cpu"
            val = n.target(*args, **kwargs)
            if isinstance(val, torch.Tensor) and val.numel() > _MAX_ELEMENTS:
                return None
            env[n] = val
    except Exception:   # anything unusual: keep the mask
        return None
    out = env[nodes[-1]]
    return out if isinstance(out, torch.Tensor) else None


def _masks_nothing(mask: torch.Tensor) -> bool:
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return mask.is_floating_point() and bool((mask == 0).all())


def drop_constant_open_masks(gm: fx.GraphModule) -> int:
    """Remove from every attention call of ``gm`` a mask computed from constants that masks nothing; returns
    how many calls changed (the mask's now unused nodes are removed too)."""
    changed, dropped = 0, set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or op_base_name(str(node.target)) not in _MASKED_ATTENTION:
            continue
        mask, where = _mask_arg(node)
        if mask is None:
            continue
        nodes = _constant_subgraph(mask)
        if nodes is None:
            continue
        val = _evaluate(nodes)
        if val is None or not _masks_nothing(val):
            continue
        if where == "attn_mask":
            node.kwargs = {**node.kwargs, "attn_mask": None}
        else:
            node.args = node.args[:3] + (None,) + node.args[4:]
        changed += 1
        dropped.update(nodes)   # several attention calls may share one mask
    if changed:
        for n in reversed(list(gm.graph.nodes)):   # the masks' own nodes, once nothing reads them
            if n in dropped and not n.users:
                gm.graph.erase_node(n)
        gm.graph.lint()
        gm.recompile()
    return changed
