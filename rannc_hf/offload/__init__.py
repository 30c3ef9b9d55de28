"""Offload engine: train models larger than GPU memory by keeping weights, gradients and optimizer state on the host.

    import torch, rannc_hf
    from rannc_hf.offload import offload_module

    model, batch = rannc_hf.zoo.make("gpt2", batch_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = offload_module(model, opt, rannc_hf.RanncConfig(offload="all", precision="fp32"), device="cpu")
    model(**batch).loss.backward(); h.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()

Modules, one concern each:

* :mod:`.store`     host buffers of one block (fp32 master, grads, staging; page-locked with
                    cudaHostRegister) + host-RAM check
* :mod:`.engine`    :class:`OffloadEngine`: residency, prefetch, gradient streaming, step, state
* :mod:`.fences`    :func:`offload_enter` / :func:`offload_exit`: calls the pipeline runtime puts in fx graphs
* :mod:`.optimizer` the user's optimizer rebuilt per block over the host masters
* :mod:`.hooks`     :func:`offload_module` for a plain ``nn.Module`` (blocks found automatically)
* :mod:`.cost`      :func:`offload_cost`, :func:`offload_memory`, :func:`choose_mode` for the planner
* :mod:`.emulation` :func:`~.emulation.emulate_async_fetch`: CUDA's asynchronous fetches on CPU, to find races
"""

from .cost import OffloadCost, choose_mode, offload_cost, offload_memory
from .engine import OffloadEngine, get_engine
from .fences import offload_enter, offload_exit
from .hooks import OffloadHandle, find_blocks, offload_module
from .store import available_host_memory, check_host_memory

__all__ = ["OffloadEngine", "OffloadHandle", "OffloadCost", "offload_module", "offload_enter", "offload_exit",
           "find_blocks", "get_engine", "offload_cost", "offload_memory", "choose_mode", "available_host_memory",
           "check_host_memory"]
