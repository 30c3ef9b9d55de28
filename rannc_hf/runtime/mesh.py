"""The (dp, pp) process layout: one object owns the device mesh and every process group.

    # torchrun --nproc_per_node 4 train.py
    from rannc_hf.runtime.mesh import Mesh
    mesh = Mesh(pp_size=2, dp_size=2, timeout_s=600)
    mesh.pp_rank, mesh.dp_rank          # this rank's stage and replica
    mesh.pp_group, mesh.dp_group        # process groups along each dimension
    g = mesh.holder_group([0, 1])       # the ranks of my replica that hold pipeline ranks 0 and 1

Ranks are laid out row-major over ``(dp, pp)``: ``rank = dp_rank * pp_size + pp_rank``, so the
stages of one replica are neighbours (on one node, p2p traffic stays on NVLink). With ``dp_inner=True``
(a plan's ``dp_inner``, chosen by the planner when gradient all-reduces outweigh stage boundaries, as
Megatron and DeepSpeed's pipe/data topology place them) it is ``(pp, dp)``: ``rank = pp_rank * dp_size +
dp_rank``, a stage's replicas are neighbours and their all-reduce stays on the node. The default
process group is initialised from the torchrun environment when it is not already (``nccl`` on
GPU, ``gloo`` on CPU); a lone process without torchrun gets a one-rank gloo group backed by an
in-process store (no ports are opened). Every collective times out after ``timeout_s``.

Groups are created in the same order on every rank (``dist.new_group`` is collective); call
:meth:`holder_groups` with the same list on every rank.
"""

from __future__ import annotations

import datetime
import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def default_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_device(device: "torch.device | str | None") -> torch.device:
    """``device`` with an index (``"cuda"`` means this process's GPU, as :func:`default_device`); None: the default."""
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return default_device() if torch.cuda.is_available() else device
    return device


def init_distributed(timeout_s: float = 600.0, device: Optional[torch.device] = None) -> None:
    """Initialise the default process group (from torchrun's env, or a one-rank local group)."""
    if dist.is_initialized():
        return
    device = device or default_device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timeout, **kw)
    else:  # a single process started without torchrun: a one-rank group, in-process store
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


class Mesh:
    """The ``(dp, pp)`` layout of the world and its process groups."""

    def __init__(self, pp_size: int, dp_size: int = 1, timeout_s: float = 600.0,
                 device: Optional[torch.device] = None, dp_inner: bool = False):
        self.device = device or default_device()
        init_distributed(timeout_s, self.device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        if pp_size * dp_size != self.world_size:
            from ..errors import PlanMismatchError

            raise PlanMismatchError(f"{pp_size} pipeline stages x {dp_size} replicas need {pp_size * dp_size} "
                                    f"processes, but {self.world_size} were launched")
        self.pp_size, self.dp_size = pp_size, dp_size
        self.dp_inner = bool(dp_inner)
        if self.dp_inner:
            self.pp_rank, self.dp_rank = divmod(self.rank, dp_size)
        else:
            self.dp_rank, self.pp_rank = divmod(self.rank, pp_size)
        self.device_mesh = None
        try:
            from torch.distributed.device_mesh import init_device_mesh

            shape, names = ((pp_size, dp_size), ("pp", "dp")) if self.dp_inner else ((dp_size, pp_size), ("dp", "pp"))
            self.device_mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
            self.pp_group = self.device_mesh.get_group("pp")
            self.dp_group = self.device_mesh.get_group("dp")
        except Exception:  # noqa: BLE001 - fall back to plain groups (same layout)
            self.pp_group = self._grid_groups(rows=True)
            self.dp_group = self._grid_groups(rows=False)
        self._holders: dict[tuple[int, ...], Optional[dist.ProcessGroup]] = {}

    # ---- layout ------------------------------------------------------------------------
    def rank_of(self, dp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.dp_size + dp_rank if self.dp_inner else dp_rank * self.pp_size + pp_rank

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of my replica's pipeline, in stage order."""
        return [self.rank_of(self.dp_rank, p) for p in range(self.pp_size)]

    @property
    def dp_ranks(self) -> list[int]:
        return [self.rank_of(d, self.pp_rank) for d in range(self.dp_size)]

    def _grid_groups(self, rows: bool) -> dist.ProcessGroup:
        mine = None
        outer, inner = (self.dp_size, self.pp_size) if rows else (self.pp_size, self.dp_size)
        for o in range(outer):
            ranks = [self.rank_of(o, i) if rows else self.rank_of(i, o) for i in range(inner)]
            g = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                mine = g
        return mine

    # ---- groups of the ranks that hold a tied parameter ---------------------------------
    def holder_groups(self, pp_sets: Sequence[Sequence[int]]) -> list[Optional[dist.ProcessGroup]]:
        """For each set of pipeline ranks, the group of those ranks in my replica (None if I am not in it
        or the set has one rank). Collective: every rank calls it with the same list, in the same order."""
        out = []
        for pps in pp_sets:
            key = tuple(sorted(set(int(p) for p in pps)))
            if key not in self._holders:
                mine = None
                if len(key) > 1:
                    for d in range(self.dp_size):
                        ranks = [self.rank_of(d, p) for p in key]
                        g = dist.new_group(ranks, timeout=self.timeout)
                        if self.rank in ranks:
                            mine = g
                self._holders[key] = mine
            out.append(self._holders[key])
        return out

    def __repr__(self) -> str:
        return (f"Mesh(world={self.world_size}, dp={self.dp_size}, pp={self.pp_size}, rank={self.rank}, "
                f"dp_rank={self.dp_rank}, pp_rank={self.pp_rank}, dp_inner={self.dp_inner}, device={self.device})")
