"""Save a (possibly partitioned) model as one full Hugging Face checkpoint: config + safetensors.

    from rannc_hf.integrations.checkpoint import save_full_model
    save_full_model(rannc_module, "out/")          # call on EVERY rank; rank 0 writes
    model = transformers.AutoModelForCausalLM.from_pretrained("out/")

``save_full_model`` works for a :class:`rannc_hf.RanncModule` (its gathered ``state_dict()`` is the
full model under the original keys), for a plain ``nn.Module`` and for a Hugging Face
``PreTrainedModel``. The result is the ``save_pretrained`` layout: ``config.json`` (and
``generation_config.json``) when the model has a config, ``model.safetensors`` (or shards plus
``model.safetensors.index.json`` above ``max_shard_size``). Tied weights (GPT-2 ``wte`` /
``lm_head``) are stored once, under the name ``from_pretrained`` expects.

The write is atomic: files go to a temporary directory next to ``output_dir``, are fsynced, and
are then renamed into place; a crash leaves either the old checkpoint or the new one, never half.
When ``output_dir`` already exists, other files in it (a tokenizer, say) are kept; stale weight
files of the old checkpoint (shards, index, ``pytorch_model*.bin``) are removed.

Only rank 0 of ``torch.distributed`` writes (every rank when it is not initialised); gathering the
state dict of a RanncModule is a collective, so every rank must call this function.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import CheckpointError

__all__ = ["save_full_model", "original_model", "dedupe_tied", "atomic_dir", "fsync_tree", "is_rank0"]

_WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model", "tf_model", "flax_model")


def is_rank0() -> bool:
    """True on global rank 0, or when torch.distributed is not initialised."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def original_model(model: Any) -> Any:
    """The user's own model behind a RanncModule (or the argument itself for anything else)."""
    for name in ("original_model", "module", "model"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module) and inner is not model:
            if type(model).__name__ == "RanncModule" or name == "original_model":
                return inner
    return model


def _tied_names(model: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for every parameter/buffer reachable under more than one name.

    The canonical name is the one ``named_parameters()`` (deduplicating) reports first; for Hugging
    Face models the declared ``_tied_weights_keys`` targets are aliases, as ``save_pretrained`` does.
    """
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        key = id(t)
        if key in first:
            alias[name] = first[key]
        else:
            first[key] = name
    declared = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    if isinstance(declared, dict):
        for target, source in declared.items():
            if isinstance(target, str) and isinstance(source, str):
                if source in alias:          # keep the declared source as the stored name
                    canon = alias.pop(source)
                    alias[canon] = source
                alias.setdefault(target, source)
    return alias


def dedupe_tied(state_dict: dict[str, torch.Tensor], model: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with each tied tensor kept once (aliases dropped).

    Ties come from ``model`` (parameter identity and HF ``_tied_weights_keys``) when given, and from
    shared storage among the tensors themselves otherwise.
    """
    out = dict(state_dict)
    if model is not None:
        for a, canon in _tied_names(model).items():
            if a in out and canon in out:
                out.pop(a)
    seen: dict[tuple, str] = {}
    for k in list(out):
        t = out[k]
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
            continue
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if sig in seen:
            out.pop(k)
        else:
            seen[sig] = k
    return out


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for root, dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_dir(tmp: str, final: str, merge: bool = False) -> None:
    """Move the finished directory ``tmp`` to ``final`` atomically (after fsyncing it).

    ``merge=False``: ``final`` is replaced as a whole (old one renamed aside, then removed).
    ``merge=True``: each file of ``tmp`` replaces its namesake in ``final`` with ``os.replace``
    (atomic per file) and other files of ``final`` stay; stale weight files are removed first.
    """
    fsync_tree(tmp)
    parent = os.path.dirname(os.path.abspath(final)) or "."
    if not os.path.exists(final):
        os.rename(tmp, final)
    elif not merge:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new_files = set(os.listdir(tmp))
        for f in os.listdir(final):
            if f not in new_files and f.startswith(_WEIGHT_PREFIXES) and os.path.isfile(os.path.join(final, f)):
                os.remove(os.path.join(final, f))
        for f in sorted(new_files, key=lambda n: n.startswith("config")):   # config last
            src, dst = os.path.join(tmp, f), os.path.join(final, f)
            if os.path.isdir(dst) and not os.path.isdir(src):
                shutil.rmtree(dst)
            os.replace(src, dst)
        shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(final)
    _fsync_dir(parent)


def _to_cpu_contiguous(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            if v.device.type == "meta":
                raise CheckpointError(f"tensor {k!r} is on the meta device; pass the gathered state_dict "
                                      f"(RanncModule.state_dict()) instead of the original model's")
            out[k] = v.detach().to("cpu").contiguous()
    return out


def save_full_model(rannc_module_or_model: Any, output_dir: str | os.PathLike,
                    state_dict: Optional[dict] = None, safe_serialization: bool = True,
                    max_shard_size: str | int = "10GB") -> Optional[str]:
    """Write the full model to ``output_dir`` in Hugging Face layout (rank 0 only, atomically).

    Args:
        rannc_module_or_model: a RanncModule, a ``PreTrainedModel`` or any ``nn.Module``.
        output_dir: target directory (created; other files already in it are kept).
        state_dict: the full state dict to save; default ``rannc_module_or_model.state_dict()``,
            which for a RanncModule is a collective gather, so call this on every rank.
        safe_serialization: safetensors (default) or ``pytorch_model.bin``.
        max_shard_size: shard above this size (``save_pretrained`` semantics; HF models only).

    Returns the directory written on rank 0, ``None`` on the other ranks.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    if state_dict is None:
        state_dict = rannc_module_or_model.state_dict()
    if not is_rank0():
        return None
    model = original_model(rannc_module_or_model)
    sd = dedupe_tied(_to_cpu_contiguous(state_dict), model if isinstance(model, nn.Module) else None)
    parent = os.path.dirname(output_dir) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        if hasattr(model, "save_pretrained") and hasattr(model, "config"):
            model.save_pretrained(tmp, state_dict=sd, safe_serialization=safe_serialization,
                                  max_shard_size=max_shard_size, is_main_process=True)
        else:
            if safe_serialization:
                from safetensors.torch import save_file

                save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            else:
                torch.save(sd, os.path.join(tmp, "pytorch_model.bin"))
            cfg = getattr(model, "config", None)
            if cfg is not None and hasattr(cfg, "save_pretrained"):
                cfg.save_pretrained(tmp)
        atomic_dir(tmp, output_dir, merge=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir
