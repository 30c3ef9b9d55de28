"""Checkpoint state of :class:`~rannc_hf.runtime.module.RanncModule`: gathered by broadcast from each owner.

    sd = model.state_dict()                     # the full model under the original keys, on every rank
    osd = model.optimizer_state_dict()          # {"state": {fqn: {...}}, "param_groups": [...]} keyed by FQN
    torch.save({"model": sd, "optim": osd}, "ckpt.pt")
    ...
    model.load_state_dict(ck["model"])          # each rank keeps what is local (any plan)
    model.load_optimizer_state_dict(ck["optim"])

The owner of a tensor is replica 0's first pipeline rank holding it; it broadcasts (``dist.broadcast``, one
flattened tensor per source and dtype, no pickling). :class:`_StateMixin` holds the RanncModule methods.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import PlanMismatchError
from ..offload.hooks import check_state_keys


class _StateMixin:
    """RanncModule's state_dict / optimizer-state methods (mixed into :class:`~rannc_hf.runtime.module.RanncModule`)."""

    def _owner_rank_of(self) -> dict[int, int]:
        """id(tensor) -> global rank that holds the authoritative copy (replica 0, first holding stage)."""
        var, mesh = self._primary, self.mesh
        if var is None:   # fast path / not built: everything is local to this (only) rank
            return {id(t): dist.get_rank() if dist.is_initialized() else 0
                    for t in list(self.module.parameters()) + list(self.module.buffers())}
        out = {}
        for name, pps in var.holders.items():
            try:
                obj = _fetch(self.module, name)
            except AttributeError:  # a constant lifted by export, not model state
                continue
            if isinstance(obj, torch.Tensor):
                out[id(obj)] = mesh.rank_of(0, pps[0])
        return out

    def _broadcast_tensors(self, items: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """items: (src rank, tensor to send on src / buffer of the right shape elsewhere), same order everywhere."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        out: list = [None] * len(items)
        keys = sorted({(src, str(t.dtype)) for src, t in items})
        for src, dt in keys:
            ids = [i for i, (s, t) in enumerate(items) if s == src and str(t.dtype) == dt]
            ts = [items[i][1].detach().to(self.device) for i in ids]
            flat = _flatten_dense_tensors(ts) if ts else None
            if dist.get_world_size() > 1:
                dist.broadcast(flat, src=src)
            for i, t in zip(ids, _unflatten_dense_tensors(flat, ts)):
                out[i] = t.cpu().clone()
        return out

    def state_dict(self, *args, **kwargs) -> dict:  # noqa: D401 - nn.Module override
        """The full model state under the original keys (tied aliases share one tensor), on every rank."""
        if self._primary is None:
            return self.module.state_dict(*args, **kwargs)
        owners = self._owner_rank_of()
        sd = self.module.state_dict(keep_vars=True)
        uniq: dict[int, torch.Tensor] = {}
        for v in sd.values():
            if isinstance(v, torch.Tensor):
                uniq.setdefault(id(v), v)
        order = [i for i in uniq if i in owners]
        rank = dist.get_rank()
        items = []
        for i in order:
            t = uniq[i]
            shape, dtype = self._full_meta.get(i, (tuple(t.shape), t.dtype))
            val = t.data if self._offload is None else self._offload.value_of(t)
            buf = val if owners[i] == rank else torch.empty(shape, dtype=dtype)
            items.append((owners[i], buf))
        got = dict(zip(order, self._broadcast_tensors(items)))
        out = {}
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                out[k] = v
            elif id(v) in got:
                out[k] = got[id(v)]
            else:
                out[k] = v.detach().clone()
        return out

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Load a full state dict (original keys) into the local parameters/buffers."""
        if self._primary is None:
            return self.module.load_state_dict(state_dict, strict=strict)
        own = self.module.state_dict(keep_vars=True)
        missing, unexpected = check_state_keys(self.module, own, state_dict, strict)
        with torch.no_grad():
            for k, t in own.items():
                if k in state_dict and isinstance(t, torch.Tensor) and t.numel() > 0:
                    if self._offload is not None and self._offload.load_value_(t, state_dict[k]):
                        continue
                    t.data.copy_(state_dict[k].to(t.device, t.dtype))
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def optimizer_state_dict(self) -> dict:
        """``{"state": {fqn: {key: tensor}}, "param_groups": [{hyperparameters, "params": [fqn, ...]}]}``, gathered."""
        opt = self.optimizer
        if opt is None:
            raise RuntimeError("RanncModule was built without an optimizer")
        owners = self._owner_rank_of()
        rank = dist.get_rank()
        mine: dict[str, dict] = {}
        ostate = opt.state if self._offload is None else self._offload.optimizer_state(opt)
        for p in self.local_parameters():
            if owners.get(id(p)) == rank and p in ostate:
                mine[self._name_of[id(p)]] = ostate[p]
        state: dict[str, dict] = {}
        world = dist.get_world_size()
        for src in range(world):
            if src == rank:
                desc = {fqn: {k: ([list(v.shape), str(v.dtype).replace("torch.", "")] if isinstance(v, torch.Tensor)
                                  else {"value": v}) for k, v in st.items()} for fqn, st in mine.items()}
                data = torch.tensor(list(json.dumps(desc, sort_keys=True).encode()), dtype=torch.uint8)
                n = torch.tensor([data.numel()], dtype=torch.int64)
            else:
                n = torch.zeros(1, dtype=torch.int64)
            if world > 1:
                n = n.to(self.device)
                dist.broadcast(n, src=src)
                n = n.cpu()
            if src != rank:
                data = torch.empty(int(n.item()), dtype=torch.uint8)
            if world > 1:
                d = data.to(self.device)
                dist.broadcast(d, src=src)
                data = d.cpu()
            desc = json.loads(bytes(data.tolist()).decode())
            items, where = [], []
            for fqn in sorted(desc):
                for k in sorted(desc[fqn]):
                    v = desc[fqn][k]
                    if isinstance(v, dict):
                        state.setdefault(fqn, {})[k] = v["value"]
                        continue
                    shape, dt = v
                    t = mine[fqn][k] if src == rank else torch.empty(shape, dtype=getattr(torch, dt))
                    items.append((src, t))
                    where.append((fqn, k))
            for (fqn, k), t in zip(where, self._broadcast_tensors(items)):
                state.setdefault(fqn, {})[k] = t
        groups = []
        for fqns, g in zip(self._opt_groups_fqn or [], opt.param_groups):
            hyper = {k: v for k, v in g.items() if k != "params"}
            groups.append({**hyper, "params": list(fqns)})
        return {"state": state, "param_groups": groups}

    def load_optimizer_state_dict(self, sd: dict) -> None:
        """Load a gathered optimizer state (by parameter FQN) into the local optimizer."""
        opt = self.optimizer
        if opt is None:
            raise RuntimeError("RanncModule was built without an optimizer")
        if len(sd["param_groups"]) != len(opt.param_groups):
            raise PlanMismatchError(f"optimizer state has {len(sd['param_groups'])} param groups, the optimizer "
                                    f"{len(opt.param_groups)}")
        for g, saved in zip(opt.param_groups, sd["param_groups"]):
            for k, v in saved.items():
                if k != "params":
                    g[k] = v
        if self._offload is not None:
            fq = {id(p): self._name_of.get(id(p)) for p in self._primary.params}
            self._offload.load_optimizer_state(opt, {p: sd["state"][fq[id(p)]] for p in self._primary.params
                                                     if fq[id(p)] in sd["state"]})
            return
        for p in self.local_parameters():
            fqn = self._name_of.get(id(p))
            st = sd["state"].get(fqn)
            if st is None:
                continue
            opt.state[p] = {k: (v.to(p.device) if isinstance(v, torch.Tensor) and v.dim() > 0 else
                                v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}


def _fetch(root: Any, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
