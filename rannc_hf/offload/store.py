"""Host store: flat (pinned) host buffers for one group of parameters, and the host-memory check.

A :class:`ParamGroup` owns, for the parameters of one block (or the resident "rest" group):

* ``master``  fp32 master weights, one flat host buffer (pinned when CUDA is available);
* ``shadow``  the same values in the compute dtype, the source of host->GPU copies (``master``
  itself in fp32 runs);
* ``grad``    fp32 gradients, accumulated on the host across micro-batches;
* ``staging`` compute-dtype landing area of GPU->host gradient copies (CUDA only);
* ``work``    the GPU working copy (compute dtype); every parameter's ``.data`` is a view of it, so
  freeing ``work``'s storage (``resize_(0)``) frees the whole block while the ``nn.Parameter``
  objects, and every autograd view of them, stay valid; refilling the same storage brings them back.

    >>> import torch
    >>> ps = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.zeros(4))]
    >>> g = ParamGroup(0, ps, torch.device("cpu"), torch.float32, offload=True)
    >>> g.numel, ps[0].shape, g.resident      # each parameter starts at a multiple of ALIGN elements
    (128, torch.Size([2, 3]), True)
    >>> g.release(); ps[0].untyped_storage().nbytes()
    0
    >>> g.fetch(), float(ps[0].sum())
    ((512, 0), 6.0)

``check_host_memory`` refuses a store that would not fit in host RAM before anything is allocated.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn

from ..errors import OffloadError
from ..units import format_bytes


#: Every parameter starts at a multiple of this many elements of its flat buffer (256 bytes in fp32).
ALIGN = 64


#: Elements per piece of a converting copy between host and device: the device temporary of ``x.to(dtype)``
#: stays 32 MiB instead of a whole block's (a 515 MB embedding gradient's fp32 copy, allocated at the end of
#: backward near a 24 GiB cap, made the caching allocator free its cache and synchronize the device).
CAST_CHUNK = 1 << 23


def copy_cast_(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
    """``dst.copy_(src)`` where ``src`` lives elsewhere and has another dtype: converted on the device, piece by piece
    (both flat and contiguous, the same number of elements)."""
    d, s = dst.reshape(-1), src.reshape(-1)
    dev = dst if dst.device.type != "cpu" else src
    for o in range(0, d.numel(), CAST_CHUNK):
        if dev is dst:   # host -> device: bring the piece over as it is, convert there
            d[o:o + CAST_CHUNK].copy_(s[o:o + CAST_CHUNK].to(dst.device, non_blocking=non_blocking))
        else:            # device -> host: convert on the device, then copy
            d[o:o + CAST_CHUNK].copy_(s[o:o + CAST_CHUNK].to(dst.dtype), non_blocking=non_blocking)


def available_host_memory() -> int:
    """Bytes of host RAM available now (``psutil.virtual_memory().available``). Tests monkeypatch this."""
    import psutil

    return int(psutil.virtual_memory().available)


def host_need(num_params: int, compute_dtype: torch.dtype, cuda: bool, state_bytes_per_param: float = 0.0,
              on_device: int = 0, kept: int = 0) -> dict:
    """Host bytes an engine of ``num_params`` parameters needs, by kind: ``state_bytes_per_param`` of optimizer
    state for those stepped on the CPU (all but ``on_device``), no gradient or staging buffer for the ``kept``
    ones whose gradients stay on the GPU.

        >>> host_need(1000, torch.bfloat16, True, 8.0, on_device=600, kept=600)["optimizer state"]
        3200
    """
    item = torch.empty(0, dtype=compute_dtype).element_size()
    return {"fp32 master weights": 4 * num_params, "fp32 gradients": 4 * (num_params - kept),
            "compute-dtype shadow": item * num_params if compute_dtype != torch.float32 else 0,
            "gradient staging": item * (num_params - kept) if cuda else 0,
            "optimizer state": int(state_bytes_per_param * (num_params - on_device))}


def check_host_memory(needed: int, breakdown: dict, mode: str, headroom: float = 0.9) -> None:
    """Raise :class:`OffloadError` if ``needed`` bytes exceed ``headroom`` x the available host RAM."""
    avail = available_host_memory()
    if needed <= headroom * avail:
        return
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in breakdown.items() if v)
    hint = {
        "all": "use offload='params' (optimizer state on the GPU) if the GPU can hold it",
        "optimizer": "use offload='params' (optimizer state stays on the GPU)",
        "params": "use offload='optimizer' if the GPU can hold the weights",
    }.get(mode, "use a lighter offload mode")
    raise OffloadError(
        f"offload mode '{mode}' needs {format_bytes(needed)} of host memory ({parts}) but only "
        f"{format_bytes(avail)} is available ({format_bytes(headroom * avail)} usable at {headroom:.0%}). "
        f"To fit: {hint}; split the model over more pipeline stages or GPUs so each process holds fewer "
        f"parameters; use an optimizer with less state (SGD, Adafactor); or free host memory.")


_WARNED_REGISTER = False


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def _empty_host(n: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host buffer of ``n`` elements, page-locked when ``pin``.

    Pinned buffers are ordinary allocations page-locked with ``cudaHostRegister``, not
    ``torch.empty(pin_memory=True)``: torch's caching host allocator rounds every pinned allocation up to a
    power of two and never gives it back, so a 1.26 GB block costs 2 GiB, and a 12.85B-parameter model's
    stores (108 GiB nominal) overflowed a 125 GiB host. The registration ends when the tensor is freed.
    """
    t = torch.empty(n, dtype=dtype)
    if not pin or n == 0:
        return t
    try:
        rc = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), n * t.element_size(), 0))
    except (AttributeError, RuntimeError):  # a torch without the binding
        rc = -1
    if rc != 0:  # e.g. a locked-memory limit: the caching allocator's pinned memory instead
        global _WARNED_REGISTER
        if not _WARNED_REGISTER:
            _WARNED_REGISTER = True
            warnings.warn(f"rannc_hf offload: cudaHostRegister failed (code {rc}); pinned host buffers come from "
                          "torch's caching host allocator, which rounds each up to a power of two (up to 2x the "
                          "host memory the engine's check counted). Raise the locked-memory limit (ulimit -l) "
                          "to avoid it.", RuntimeWarning, stacklevel=3)
        return torch.empty(n, dtype=dtype, pin_memory=True)
    weakref.finalize(t, _unregister, t.data_ptr())
    return t


class ParamGroup:
    """Host buffers and the GPU working copy of one block of parameters (see module docstring)."""

    def __init__(self, index: int, params: list[nn.Parameter], device: torch.device, compute_dtype: torch.dtype,
                 offload: bool, pin: Optional[bool] = None, host_grads: bool = True):
        self.index = index
        self.params = list(params)
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.offload = offload
        self.pin = (self.device.type == "cuda" and torch.cuda.is_available()) if pin is None else pin
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.offsets = []
        off = 0
        for n in self.numels:  # aligned offsets: kernels (BLAS, vectorized CUDA loads) see aligned tensors
            self.offsets.append(off)
            off += -(-n // ALIGN) * ALIGN
        self.numel = off
        self.has_grad = [False] * len(self.params)
        self.arrivals = [0] * len(self.params)  # gradients summed on the device this pass (engine.begin_pass)
        self.dev_acc: Optional[torch.Tensor] = None  # their fp32 device sum
        self.keep_grads = False   # a GPU-stepped block keeping its gradients on the device (engine.device_grads)
        self.dev_grad: Optional[torch.Tensor] = None  # those gradients, fp32, flat
        self.ready_event = None  # CUDA event of an in-flight fetch
        self.master = _empty_host(self.numel, torch.float32, self.pin)
        self.master.zero_()  # padding between parameters stays zero
        for p, v in zip(self.params, self.views(self.master)):
            v.copy_(p.detach().reshape(v.shape))
        self.shadow = self.master if compute_dtype == torch.float32 else _empty_host(self.numel, compute_dtype, self.pin)
        # shadow_stale: the masters changed (a CPU step) and the shadow was not recast on the host; the next
        # fill_work sends the fp32 master, casts on the device and writes the shadow back (mark_shadow_stale)
        self.shadow_stale = False
        self.shadow_event = None
        if self.shadow is not self.master:
            self.shadow.copy_(self.master)
        # host_grads=False: the block's gradients stay on the device (engine.device_grads); empty buffers
        self.grad = _empty_host(self.numel if host_grads else 0, torch.float32, self.pin)
        self.grad.zero_()
        self.staging = (_empty_host(self.numel if host_grads else 0, compute_dtype, True)
                        if self.device.type == "cuda" else None)
        if self.staging is not None:
            self.staging.zero_()  # padding stays zero: whole-block folds and norms read it
        self.work = torch.empty(self.numel, dtype=compute_dtype, device=self.device)
        self.fill_work()
        for p, v in zip(self.params, self.views(self.work)):
            p.data = v
        self.resident = True
        # fp32 host parameters the optimizer steps: views of ``master`` with ``.grad`` views of ``grad``
        self.host_params = [nn.Parameter(v, requires_grad=p.requires_grad)
                            for p, v in zip(self.params, self.views(self.master))]

    # -- views -------------------------------------------------------------------------------
    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes)]

    def view(self, flat: torch.Tensor, j: int) -> torch.Tensor:
        return flat[self.offsets[j]:self.offsets[j] + self.numels[j]].view(self.shapes[j])

    @property
    def work_bytes(self) -> int:
        return self.numel * self.work.element_size()

    def mark_shadow_stale(self) -> None:
        """The masters were stepped: on a GPU, leave the compute-dtype cast to the device (the next
        :meth:`fill_work`) instead of a host pass over the block (a CPU-bound step spent ~27% of its time there);
        elsewhere recast now."""
        if self.shadow is not self.master and self.work.device.type == "cuda":
            self.shadow_stale = True
        else:
            self.refresh_shadow()

    def fill_work(self, non_blocking: bool = False, writeback_stream=None) -> tuple[int, int]:
        """``work`` <- ``shadow`` on the current stream; returns (bytes in, bytes out). With a stale shadow the fp32
        master crosses instead and is cast on the device; ``writeback_stream`` then carries the cast back into
        the shadow (later fetches wait for it), otherwise the shadow stays stale."""
        if not self.shadow_stale:
            if self.shadow_event is not None:
                torch.cuda.current_stream(self.work.device).wait_event(self.shadow_event)
                self.shadow_event = None
            self.work.copy_(self.shadow, non_blocking=non_blocking)
            return self.numel * self.shadow.element_size(), 0
        copy_cast_(self.work, self.master, non_blocking)
        if writeback_stream is None:
            return self.master.nbytes, 0
        writeback_stream.wait_stream(torch.cuda.current_stream(self.work.device))
        with torch.cuda.stream(writeback_stream):
            self.shadow.copy_(self.work, non_blocking=True)
            self.shadow_event = torch.cuda.Event()
            self.shadow_event.record(writeback_stream)
        self.work.record_stream(writeback_stream)
        self.shadow_stale = False
        return self.master.nbytes, self.shadow.nbytes

    def host_bytes(self) -> int:
        n = self.master.nbytes + self.grad.nbytes
        if self.shadow is not self.master:
            n += self.shadow.nbytes
        if self.staging is not None:
            n += self.staging.nbytes
        return n

    # -- residency (synchronous versions; the engine adds streams and events on CUDA) ----------
    def release(self) -> None:
        """Free the GPU working copy; parameters keep their shape, their storage becomes empty."""
        if self.resident:
            self.work.untyped_storage().resize_(0)
            self.resident = False
            self.ready_event = None

    def fetch(self, non_blocking: bool = False) -> tuple[int, int]:
        """Allocate the working copy again and fill it from ``shadow``; (bytes in, bytes out) as :meth:`fill_work`."""
        if self.resident:
            return 0, 0
        self.work.untyped_storage().resize_(self.work_bytes)
        moved = self.fill_work(non_blocking)
        self.resident = True
        return moved

    def accumulate_grad(self, j: int, src: torch.Tensor) -> None:
        """Add ``src`` into parameter ``j``'s host gradient (a copy for its first gradient since zero_grad)."""
        dst = self.view(self.grad, j)
        if self.has_grad[j]:
            dst.add_(src)
        else:
            dst.copy_(src)
        self.has_grad[j] = True

    def attach_host_grads(self) -> None:
        """Point each host parameter's ``.grad`` at its gradient slice (``None`` where none arrived)."""
        for j, hp in enumerate(self.host_params):
            hp.grad = self.view(self.grad, j) if self.has_grad[j] else None

    def detach_host_grads(self) -> None:
        for hp in self.host_params:
            hp.grad = None

    def refresh_shadow(self) -> None:
        if self.shadow is not self.master:
            self.shadow.copy_(self.master)
        self.shadow_stale = False
