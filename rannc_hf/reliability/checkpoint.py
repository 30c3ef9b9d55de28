"""Verified, atomic training checkpoints: write to a temporary name, fsync, manifest, rename.

    from rannc_hf.reliability import save_checkpoint, load_checkpoint, find_latest_checkpoint

    save_checkpoint(model, "out", step=100, keep=2)        # every rank (gathering is collective)
    info = load_checkpoint(model, "out")                   # newest *verified* checkpoint under out/
    start = info["step"] if info else 0

``model`` is a :class:`rannc_hf.RanncModule` (its optimizer goes along), a ``(nn.Module,
optimizer)`` pair for single-process runs, or an ``accelerate.Accelerator`` /
:class:`rannc_hf.RanncAccelerator` after ``prepare()`` (``save_state``/``load_state`` do the writing).

Layout under the root directory::

    out/checkpoint-00000100/   model.safetensors  optimizer.safetensors  optimizer.json
                               rng.safetensors    manifest.json          (written last)
    out/.checkpoint-00000104.tmp-x1y2/            (a save in progress or one that crashed)

``manifest.json`` lists every file with its size and sha256, the step, the world size, the user's
``extra`` dict and the model fingerprint (class, every state key with shape and dtype, the HF config).
A checkpoint is *complete* only once its directory carries the final name, and the rename happens
after every file and the manifest are fsynced. Older checkpoints are deleted only after that
(``keep`` newest are kept). Loading re-hashes every file; a truncated or corrupted checkpoint is
reported (file, expected and actual checksum / size) and the next older good one is used. A
checkpoint of another model is refused with :class:`~rannc_hf.errors.CheckpointError` naming the
first differing keys/shapes. Nothing is unpickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..integrations.checkpoint import _fsync_dir, fsync_tree, original_model

log = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "find_latest_checkpoint", "verify_checkpoint",
           "list_checkpoints", "model_fingerprint", "write_manifest", "check_fingerprint", "MANIFEST"]

MANIFEST = "manifest.json"
FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 1 << 20


# ---- small distributed helpers (no-ops in one process) -------------------------------------
def _dist_on() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def _rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _comm_device() -> torch.device:
    d = torch.distributed
    if d.is_available() and d.is_initialized() and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _bcast_str(s: Optional[str], src: int = 0) -> str:
    """Broadcast a string from ``src`` to every rank (identity in one process)."""
    if not _dist_on():
        return s or ""
    dev = _comm_device()
    data = (s or "").encode() if _rank() == src else b""
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    torch.distributed.broadcast(n, src=src)
    buf = (torch.tensor(list(data), dtype=torch.uint8) if _rank() == src
           else torch.empty(int(n.item()), dtype=torch.uint8)).to(dev)
    if int(n.item()):
        torch.distributed.broadcast(buf, src=src)
    return bytes(buf.cpu().tolist()).decode()


# ---- files ---------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"checkpoint-{int(step):08d}")


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the complete-named checkpoint directories under ``root``, newest first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out, reverse=True)


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check ``path``'s manifest: every file present with its size and sha256. Returns the manifest.

    Raises :class:`CheckpointError` naming the first bad file with expected vs actual size/checksum.
    """
    path = os.fspath(path)
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"checkpoint {path!r} has no {MANIFEST} (an interrupted save, or not written by "
                              f"rannc_hf.reliability.save_checkpoint); use an older checkpoint or start fresh")
    try:
        with open(mpath) as f:
            man = json.load(f)
        files = man["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path!r}: {MANIFEST} is unreadable ({e}); the checkpoint is corrupted, "
                              f"use an older one") from None
    for rel, meta in sorted(files.items()):
        fp = os.path.join(path, rel)
        if not os.path.isfile(fp):
            raise CheckpointError(f"checkpoint {path!r} is corrupted: file {rel!r} listed in {MANIFEST} is missing")
        size = os.path.getsize(fp)
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint {path!r} is corrupted: file {rel!r} has {size} bytes, the manifest "
                                  f"says {meta['size']} (truncated or overwritten); expected sha256 "
                                  f"{meta['sha256'][:16]}..., got {sha256_file(fp)[:16]}...")
        digest = sha256_file(fp)
        if digest != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path!r} is corrupted: file {rel!r} sha256 is {digest[:16]}..., "
                                  f"the manifest expects {meta['sha256'][:16]}... (bit rot or a partial write)")
    return man


def find_latest_checkpoint(root: str | os.PathLike, verify: bool = True) -> Optional[str]:
    """The newest complete checkpoint directory under ``root`` that verifies, or ``None``.

    Corrupted ones are skipped with a warning naming the file and checksums. Local (no collective);
    :func:`load_checkpoint` calls it on rank 0 only and broadcasts the answer.
    """
    for step, path in list_checkpoints(root):
        if not verify:
            if os.path.isfile(os.path.join(path, MANIFEST)):
                return path
            continue
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            log.warning("rannc_hf: skipping checkpoint of step %d: %s", step, e)
    return None


def write_manifest(path: str, step: int, fingerprint: Optional[dict] = None, extra: Optional[dict] = None,
                   aliases: Optional[dict] = None) -> dict:
    """Hash every file under ``path`` into ``path/manifest.json`` (written and fsynced last)."""
    files = {}
    for root, _, names in os.walk(path):
        for n in names:
            fp = os.path.join(root, n)
            rel = os.path.relpath(fp, path)
            if rel == MANIFEST:
                continue
            files[rel] = {"size": os.path.getsize(fp), "sha256": sha256_file(fp)}
    man = {"format": FORMAT, "step": int(step), "time": time.time(), "world_size": _world(),
           "files": files, "fingerprint": fingerprint or {}, "extra": extra or {}, "aliases": aliases or {}}
    _write_json(os.path.join(path, MANIFEST), man)
    return man


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
        f.flush()
        os.fsync(f.fileno())


def _json_default(o):
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


# ---- fingerprints --------------------------------------------------------------------------
_CONFIG_NOISE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures",
                 "_attn_implementation_autoset", "_commit_hash", "use_cache", "return_dict"}


def _live_shapes(model: Any) -> dict[str, list]:
    """``{key: [shape, dtype]}`` of the full model (RanncModule: the original shapes, even when released)."""
    inner = original_model(model) if _is_rannc(model) else model
    meta = getattr(model, "_full_meta", {}) if _is_rannc(model) else {}
    out = {}
    for k, v in inner.state_dict(keep_vars=True).items():
        if isinstance(v, torch.Tensor):
            shape, dtype = meta.get(id(v), (tuple(v.shape), v.dtype))
            out[k] = [list(shape), str(dtype).replace("torch.", "")]
    return out


def model_fingerprint(model: Any, shapes: Optional[dict] = None) -> dict:
    """What identifies a model for resuming: class, state keys with shapes/dtypes, HF config, and a digest."""
    inner = original_model(model)
    shapes = shapes if shapes is not None else _live_shapes(model)
    cfg = getattr(inner, "config", None)
    cfg_d = {}
    if cfg is not None and hasattr(cfg, "to_dict"):
        cfg_d = {k: v for k, v in cfg.to_dict().items() if k not in _CONFIG_NOISE and not k.startswith("_")}
    digest = hashlib.sha256(json.dumps([type(inner).__name__, sorted(shapes.items())]).encode()).hexdigest()
    return {"class": type(inner).__name__, "digest": digest, "num_tensors": len(shapes), "shapes": shapes,
            "config": json.loads(json.dumps(cfg_d, default=_json_default))}


def check_fingerprint(saved: dict, model: Any, where: str) -> None:
    """Raise :class:`CheckpointError` naming what differs between ``saved`` and ``model``."""
    if not saved:
        return
    live = model_fingerprint(model)
    if saved.get("digest") == live["digest"]:
        return
    problems = []
    if saved.get("class") != live["class"]:
        problems.append(f"model class {saved.get('class')} in the checkpoint vs {live['class']} here")
    s, l_ = saved.get("shapes", {}), live["shapes"]
    missing = sorted(set(l_) - set(s))
    extra = sorted(set(s) - set(l_))
    if missing:
        problems.append(f"{len(missing)} tensor(s) of this model are not in the checkpoint (e.g. {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} tensor(s) in the checkpoint do not exist in this model (e.g. {extra[:3]})")
    diff = [k for k in sorted(set(s) & set(l_)) if s[k] != l_[k]]
    if diff:
        k = diff[0]
        problems.append(f"{len(diff)} tensor(s) differ in shape/dtype, e.g. {k!r}: {s[k][0]} {s[k][1]} in the "
                        f"checkpoint vs {l_[k][0]} {l_[k][1]} here")
    cfg_s, cfg_l = saved.get("config") or {}, live["config"]
    cdiff = [k for k in sorted(set(cfg_s) | set(cfg_l)) if cfg_s.get(k) != cfg_l.get(k)]
    # architecture sizes first (n_embd, num_layers, ...), then ids / probabilities / the rest
    cdiff.sort(key=lambda k: (not (isinstance(cfg_s.get(k), int) and isinstance(cfg_l.get(k), int)),
                              k.endswith("_id"), k))
    if cdiff:
        problems.append("config differs in " + ", ".join(f"{k}={cfg_s.get(k)!r}->{cfg_l.get(k)!r}" for k in cdiff[:4]))
    raise CheckpointError(f"checkpoint {where} belongs to a different model: " + "; ".join(problems) +
                          ". Point the run at the checkpoint directory of this model (or a new output_dir), "
                          "or build the model the checkpoint was saved from")


# ---- what we save --------------------------------------------------------------------------
def _is_rannc(obj: Any) -> bool:
    return type(obj).__name__ == "RanncModule" and hasattr(obj, "optimizer_state_dict")


def _is_accelerator(obj: Any) -> bool:
    try:
        from accelerate import Accelerator
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Accelerator)


def _unpack(target: Any) -> tuple[Any, Any]:
    """(model, optimizer) from a RanncModule, a (model, optimizer) pair or a bare model."""
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise TypeError("pass a RanncModule, an Accelerator, a model, or a (model, optimizer) pair")
        return target[0], target[1]
    if _is_rannc(target):
        return target, target.optimizer
    if isinstance(target, nn.Module):
        return target, None
    raise TypeError(f"cannot checkpoint a {type(target).__name__}: pass a RanncModule, an Accelerator, an "
                    f"nn.Module or a (model, optimizer) pair")


def _dedupe(sd: dict) -> tuple[dict, dict]:
    """(tensors stored once, {alias: stored key}) for tensors sharing storage (tied weights)."""
    seen: dict[tuple, str] = {}
    keep, aliases = {}, {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        v = v.detach()
        sig = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if sig is not None and sig in seen:
            aliases[k] = seen[sig]
            continue
        if sig is not None:
            seen[sig] = k
        keep[k] = v.to("cpu").contiguous()
    return keep, aliases


def _plain_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """A plain optimizer's state keyed by parameter FQN (RanncModule.optimizer_state_dict's format)."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: dict(st) for p, st in opt.state.items() if id(p) in names}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names.get(id(p), "") for p in g["params"]]}
              for g in opt.param_groups]
    return {"state": state, "param_groups": groups}


def _load_plain_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    by_name = dict(model.named_parameters())
    if len(sd["param_groups"]) != len(opt.param_groups):
        raise CheckpointError(f"the checkpoint's optimizer has {len(sd['param_groups'])} param groups, this one "
                              f"{len(opt.param_groups)}; build the optimizer with the same groups as the saved run")
    for g, saved in zip(opt.param_groups, sd["param_groups"]):
        for k, v in saved.items():
            if k != "params":
                g[k] = tuple(v) if isinstance(g.get(k), tuple) and isinstance(v, list) else v
    opt.state.clear()
    for fqn, st in sd["state"].items():
        p = by_name.get(fqn)
        if p is not None:
            opt.state[p] = {k: (v.to(p.device) if isinstance(v, torch.Tensor) and v.dim() else v)
                            for k, v in st.items()}


def _opt_to_files(osd: dict) -> tuple[dict, dict]:
    tensors, index = {}, {"state": {}, "param_groups": osd["param_groups"]}
    for i, (fqn, st) in enumerate(sorted(osd["state"].items())):
        ent = {}
        for k, v in sorted(st.items()):
            if isinstance(v, torch.Tensor):
                key = f"{i}.{k}"
                tensors[key] = v.detach().to("cpu").contiguous()
                ent[k] = {"tensor": key}
            else:
                ent[k] = {"value": v}
        index["state"][fqn] = ent
    return tensors, index


def _opt_from_files(tensors: dict, index: dict) -> dict:
    state = {}
    for fqn, ent in index["state"].items():
        state[fqn] = {k: (tensors[v["tensor"]].clone() if "tensor" in v else v["value"]) for k, v in ent.items()}
    return {"state": state, "param_groups": index["param_groups"]}


def _gather_rng() -> dict:
    """This and every other rank's torch RNG states (CPU, and CUDA when present), gathered on every rank."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    if not _dist_on():
        return {f"{k}.rank0": v for k, v in states.items()}
    dev = _comm_device()
    out = {}
    for k, v in sorted(states.items()):
        bufs = [torch.empty_like(v).to(dev) for _ in range(_world())]
        torch.distributed.all_gather(bufs, v.to(dev))
        for r, b in enumerate(bufs):
            out[f"{k}.rank{r}"] = b.cpu()
    return out


def _restore_rng(tensors: dict) -> None:
    r = _rank()
    if f"cpu.rank{r}" in tensors:
        torch.set_rng_state(tensors[f"cpu.rank{r}"])
    if f"cuda.rank{r}" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"cuda.rank{r}"])


# ---- save ----------------------------------------------------------------------------------
def _disk_error(e: OSError, root: str, tmp: str, prev: Optional[str]) -> CheckpointError:
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only"}.get(e.errno, str(e))
    keep = f"the previous checkpoint {prev!r} is intact" if prev else "no earlier checkpoint exists"
    return CheckpointError(f"could not write the checkpoint under {root!r}: {what} ({e.strerror or e}); the partial "
                           f"save {os.path.basename(tmp)!r} was removed and {keep}. Free space (or lower `keep`), "
                           f"or point the checkpoints at another directory")


def _prune(root: str, keep: int, newest: str) -> list[str]:
    removed = []
    for i, (_, path) in enumerate(list_checkpoints(root)):
        if i >= keep and os.path.abspath(path) != os.path.abspath(newest):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for name in os.listdir(root):     # temporaries of crashed saves (never the one we just renamed)
        if name.startswith(".checkpoint-") and ".tmp-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return removed


def _finish(root: str, tmp: str, final: str, keep: int) -> None:
    fsync_tree(tmp)
    if os.path.exists(final):          # re-saving a step: move the old one aside, then drop it
        aside = tmp + ".old"
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        _prune(root, keep, final)


def _agree(err: Optional[BaseException], what: str) -> None:
    """Every rank learns whether rank 0's write worked; all raise the same CheckpointError if not."""
    msg = _bcast_str(f"{type(err).__name__}: {err}" if err is not None else "", src=0) if _dist_on() else \
        (f"{type(err).__name__}: {err}" if err is not None else "")
    if err is not None and isinstance(err, CheckpointError):
        raise err
    if err is not None:
        raise CheckpointError(f"{what} failed on rank 0: {msg}") from err
    if msg:
        raise CheckpointError(f"{what} failed on rank 0 (this is rank {_rank()}): {msg}")


def save_checkpoint(target: Any, root: str | os.PathLike, step: int, keep: int = 2,
                    extra: Optional[dict] = None, save_rng: bool = True) -> Optional[str]:
    """Write a verified checkpoint of ``target`` as ``root/checkpoint-<step>`` (call on every rank).

    Args:
        target: a RanncModule (with its optimizer), ``(model, optimizer)``, a bare model, or an
            ``Accelerator`` after ``prepare`` (its ``save_state`` writes the files).
        root: the directory holding the checkpoints (created).
        step: the training step this state is *after* (resume starts at ``step``).
        keep: complete checkpoints kept (older ones are deleted after the new one is in place);
            0 keeps all.
        extra: JSON-serialisable dict stored in the manifest (epoch, data position, ...).

    Returns the checkpoint path (every rank). Raises :class:`CheckpointError` on every rank when the
    write fails (a full disk, say); the previous checkpoints are left untouched.
    """
    root = os.path.abspath(os.fspath(root))
    final = _step_dir(root, step)
    if _is_accelerator(target):
        return _save_accelerator(target, root, final, step, keep, extra)
    model, opt = _unpack(target)
    sd = model.state_dict()                                   # collective for a RanncModule
    osd = None
    if opt is not None:
        osd = model.optimizer_state_dict() if _is_rannc(model) else _plain_optimizer_state(model, opt)
    rng = _gather_rng() if save_rng else {}
    err = None
    if _rank() == 0:
        prev = (list_checkpoints(root) or [(None, None)])[0][1]
        tmp = None
        try:
            os.makedirs(root, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".checkpoint-{int(step):08d}.tmp-", dir=root)
            from safetensors.torch import save_file

            tensors, aliases = _dedupe(sd)
            save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            if osd is not None:
                ot, oindex = _opt_to_files(osd)
                save_file(ot, os.path.join(tmp, "optimizer.safetensors"))
                _write_json(os.path.join(tmp, "optimizer.json"), oindex)
            if rng:
                save_file(rng, os.path.join(tmp, "rng.safetensors"))
            fp = model_fingerprint(model, shapes={k: [list(v.shape), str(v.dtype).replace("torch.", "")]
                                                  for k, v in sd.items() if isinstance(v, torch.Tensor)})
            write_manifest(tmp, step, fp, extra, aliases)
            _finish(root, tmp, final, keep)
        except OSError as e:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            err = _disk_error(e, root, tmp or root, prev)
        except BaseException as e:  # noqa: BLE001 - reported on every rank below
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            err = e
    _agree(err, f"saving checkpoint step {step}")
    return final


def _save_accelerator(acc, root: str, final: str, step: int, keep: int, extra: Optional[dict]) -> str:
    main = acc.is_main_process
    tmp = os.path.join(root, f".checkpoint-{int(step):08d}.tmp-acc")
    err: Optional[BaseException] = None
    if main:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            err = _disk_error(e, root, tmp, None)
    _agree(err, f"saving checkpoint step {step}")
    prev = (list_checkpoints(root) or [(None, None)])[0][1]
    try:
        acc.save_state(tmp)
    except OSError as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(e, root, tmp, prev) from e
    acc.wait_for_everyone()
    err = None
    if main:
        try:
            model = acc._models[0] if getattr(acc, "_models", None) else None
            fp = model_fingerprint(_acc_model(acc, model)) if model is not None else {}
            write_manifest(tmp, step, fp, extra)
            _finish(root, tmp, final, keep)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            err = _disk_error(e, root, tmp, prev)
        except BaseException as e:  # noqa: BLE001
            shutil.rmtree(tmp, ignore_errors=True)
            err = e
    _agree(err, f"saving checkpoint step {step}")
    acc.wait_for_everyone()
    return final


def _acc_model(acc, model):
    """The model to fingerprint for an accelerator's prepared model (the RanncModule or the unwrapped one)."""
    if _is_rannc(model):
        return model
    try:
        return acc.unwrap_model(model)
    except Exception:  # noqa: BLE001
        return model


# ---- load ----------------------------------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> Optional[str]:
    """A checkpoint directory to load: ``path`` itself when it is one, else the newest good one under it.

    Rank 0 verifies (and reports corrupted ones) and broadcasts the choice to every rank.
    """
    path = os.path.abspath(os.fspath(path))
    chosen, err = "", None
    if _rank() == 0:
        if os.path.isfile(os.path.join(path, MANIFEST)) or _NAME.match(os.path.basename(path)):
            try:
                verify_checkpoint(path)
                chosen = path
            except CheckpointError as e:
                err = e
        else:
            chosen = find_latest_checkpoint(path) or ""
            found = list_checkpoints(path)
            if not chosen and found:   # checkpoints exist but none verifies: never silently start over
                err = CheckpointError(
                    f"none of the {len(found)} checkpoint(s) under {path!r} verifies "
                    f"({', '.join(os.path.basename(p) for _, p in found)}; the warnings above name the bad files). "
                    f"Restore one from a backup, or move them away / pass another directory to start from scratch")
    msg = _bcast_str(f"!{err}" if err else chosen) if _dist_on() else (f"!{err}" if err else chosen)
    if msg.startswith("!"):
        raise err if err is not None else CheckpointError(msg[1:])
    return msg or None


def load_checkpoint(target: Any, path: str | os.PathLike, load_rng: bool = True,
                    strict: bool = True) -> Optional[dict]:
    """Load the newest verified checkpoint under ``path`` (or ``path`` itself) into ``target``.

    Returns the manifest (``step``, ``extra``, ...) or ``None`` when there is no checkpoint at all.
    Corrupted checkpoints are skipped (warning naming file and checksums); one of another model
    raises :class:`CheckpointError`. Call on every rank.
    """
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        return None
    with open(os.path.join(ckpt, MANIFEST)) as f:
        man = json.load(f)
    if _is_accelerator(target):
        model = target._models[0] if getattr(target, "_models", None) else None
        if model is not None and not _is_rannc(model):
            model = original_model(target.unwrap_model(model)) if hasattr(target, "unwrap_model") else model
        if model is not None:
            check_fingerprint(man.get("fingerprint"), model, repr(ckpt))
        target.load_state(ckpt)
        return man
    from safetensors.torch import load_file

    model, opt = _unpack(target)
    check_fingerprint(man.get("fingerprint"), model, repr(ckpt))
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    for alias, key in (man.get("aliases") or {}).items():
        sd[alias] = sd[key]
    if _is_rannc(model):
        model.load_state_dict(sd, strict=strict)
    else:
        model.load_state_dict(sd, strict=strict)
    if opt is not None and os.path.isfile(os.path.join(ckpt, "optimizer.json")):
        with open(os.path.join(ckpt, "optimizer.json")) as f:
            index = json.load(f)
        osd = _opt_from_files(load_file(os.path.join(ckpt, "optimizer.safetensors")), index)
        if _is_rannc(model) and getattr(model, "_primary", None) is not None:
            model.load_optimizer_state_dict(osd)
        else:   # not built yet (or plain): the full optimizer; a RanncModule drops what is not local when built
            _load_plain_optimizer_state(original_model(model), opt, osd)
    if load_rng and os.path.isfile(os.path.join(ckpt, "rng.safetensors")):
        _restore_rng(load_file(os.path.join(ckpt, "rng.safetensors")))
    return man
