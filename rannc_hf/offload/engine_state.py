"""Offload engine, state: fp32 masters, optimizer state dicts and loading, statistics.

:class:`_StateMixin` is mixed into :class:`~rannc_hf.offload.engine.OffloadEngine` and works on the engine's state
(``self.groups``, ``self.blocks``, streams, ...); see the engine module for the whole picture::

    from rannc_hf.offload import OffloadEngine
    eng = OffloadEngine(blocks, device="cuda", mode="all", optimizer=opt)   # has every mixin's methods
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import OffloadError
from .optimizer import sync_hyperparams


def state_to_device_(inner: torch.optim.Optimizer, move, steps_only: bool = False) -> None:
    """Move ``inner``'s loaded state with ``move`` (a tensor to the device), where its device steps will read it;
    ``steps_only``: the step counts alone (a streamed block's other state stays in its host buffers).

    A step count stays on the host for torch's default kernels, which read it there; the fused and capturable
    ones (a Trainer's default AdamW is fused) take it on the parameters' device, as torch's own
    ``load_state_dict`` places it. Left on the host, the first device step after a resume handed the fused
    CUDA kernel host step counts beside device tensors."""
    for group in inner.param_groups:
        steps_move = bool(group.get("fused") or group.get("capturable"))
        for hp in group["params"]:
            st = inner.state.get(hp)
            for key, v in (st or {}).items():
                if torch.is_tensor(v) and (steps_move if key == "step" else not steps_only):
                    st[key] = move(v)


class _StateMixin:
    """State access of :class:`~rannc_hf.offload.engine.OffloadEngine`."""

    def master_of(self, p: nn.Parameter) -> torch.Tensor:
        """The fp32 host master of device parameter ``p`` (a view: do not keep it across steps)."""
        self.synchronize()
        g, j = self._where[id(p)]
        return g.view(g.master, j)

    def owns(self, p: torch.Tensor) -> bool:
        return id(p) in self._where

    def load_param_(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Set parameter ``p`` (master, shadow and, if resident, working copy) to ``value``."""
        self.synchronize()
        g, j = self._where[id(p)]
        if g.shadow_event is not None:   # a cast still on its way back into the shadow
            g.shadow_event.synchronize()
        g.view(g.master, j).copy_(value.detach().reshape(g.shapes[j]))
        g.dev_master = None   # a device master (gpu_step_rest) is made again from this one at the next step
        if g.shadow is not g.master:
            g.view(g.shadow, j).copy_(g.view(g.master, j))
        if g.resident:
            if g.ready_event is not None and self.cuda:
                g.ready_event.synchronize()
            g.view(g.work, j).copy_(g.view(g.shadow, j))

    def _user_index(self):
        out = []
        for ug in self.optimizer.param_groups:
            for p in ug["params"]:
                out.append(p)
        return out

    def optimizer_state_dict(self) -> dict:
        """The state dict the user's optimizer would have (its parameter indices, its groups)."""
        self.synchronize()
        if self.optimizer is None:
            raise OffloadError("the offload engine has no optimizer")
        state = {}
        for k, p in enumerate(self._user_index()):
            g, j = self._where[id(p)]
            inner = self._inner[self.groups.index(g)]
            st = inner.state.get(g.host_params[j]) if inner is not None else None
            if st:
                state[k] = dict(st)
        groups, k = [], 0
        for ug in self.optimizer.param_groups:
            d = {key: v for key, v in ug.items() if key != "params"}
            d["params"] = list(range(k, k + len(ug["params"])))
            k += len(ug["params"])
            groups.append(d)
        return {"state": state, "param_groups": groups}

    def load_optimizer_state_dict(self, sd: dict) -> None:
        """Load a state dict in the user's optimizer's format (from :meth:`optimizer_state_dict` or torch)."""
        self.synchronize()
        if self.optimizer is None:
            raise OffloadError("the offload engine has no optimizer")
        ugroups = sd["param_groups"]
        if len(ugroups) != len(self.optimizer.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(ugroups, self.optimizer.param_groups)):
            raise OffloadError("optimizer state dict does not match the optimizer's param groups (group count or sizes)")
        for ug, sg in zip(self.optimizer.param_groups, ugroups):
            for key, v in sg.items():
                if key != "params":
                    ug[key] = v
        by_saved_index = {}
        for ug, sg in zip(self.optimizer.param_groups, ugroups):
            for p, k in zip(ug["params"], sg["params"]):
                by_saved_index[k] = p
        per_inner: dict[int, dict] = {}
        for k, st in sd["state"].items():
            p = by_saved_index[int(k)]
            g, j = self._where[id(p)]
            per_inner.setdefault(self.groups.index(g), {})[g.host_params[j]] = st
        for gi, inner in enumerate(self._inner):
            if inner is None:
                continue
            sync_hyperparams(self.optimizer, inner, self._inner_groups[gi])
            local = {}
            idx = 0
            groups = []
            states = per_inner.get(gi, {})
            for ig in inner.param_groups:
                ids = []
                for hp in ig["params"]:
                    if hp in states:
                        local[idx] = states[hp]
                    ids.append(idx)
                    idx += 1
                groups.append({**{k: v for k, v in ig.items() if k != "params"}, "params": ids})
            inner.load_state_dict({"state": local, "param_groups": groups})
            g = self.groups[gi]
            if (not self.step_on_cpu or g.device_step) and self.cuda:  # state lives on the device
                state_to_device_(inner, self._to_device)
            elif g.stream_step and self.cuda:   # state streamed in each step, step counts kept on the device
                state_to_device_(inner, self._to_device, steps_only=True)

    def _to_device(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(self.device)

    def stats(self) -> dict:
        """Counters: bytes copied each way, copy and stall time, resident peak, step time."""
        self.synchronize()
        st = dict(self._stats)
        if self.cuda and self.timing:
            torch.cuda.synchronize(self.device)
            st["copy_time_s"] += sum(a.elapsed_time(b) for a, b in self._copy_events) / 1e3
            st["stall_time_s"] += sum(a.elapsed_time(b) for a, b in self._stall_events) / 1e3
            self._stats["copy_time_s"], self._stats["stall_time_s"] = st["copy_time_s"], st["stall_time_s"]
            self._copy_events.clear()
            self._stall_events.clear()
        st["hidden_fraction"] = (max(0.0, 1.0 - st["stall_time_s"] / st["copy_time_s"])
                                 if st["copy_time_s"] > 0 else 1.0)
        st["host_bytes"] = sum(g.host_bytes() for g in self.groups)
        st["host_step_threads"] = self.cpu_threads
        st["worker_threads"] = len(self._worker_idents)
        st["mode"] = self.mode
        st["num_blocks"] = self.num_blocks
        return st

    def reset_stats(self) -> None:
        """Count afresh from here: waits for the background work, zeroes the counters, empties the worker log."""
        self.synchronize()
        for k, v in self._stats.items():
            self._stats[k] = type(v)(0)
        self._worker_idents.clear()
        self.wlog.clear()

