"""The ``rannc-hf`` command: ``plan``, ``show``, ``calibrate`` (and ``launch``, registered by its module).

    $ rannc-hf plan gpt2-config.json --gpus 64 --gpus-per-node 8 --gpu-memory 80GiB --batch-size 512 \\
          --seq-len 1024 --device h100 --out plan.json --plot plan.png
    $ rannc-hf show plan.json
    $ rannc-hf calibrate --out my_gpu.json

``MODEL`` is a Hugging Face ``config.json`` (or a directory holding one; the model is built on the
meta device from its ``architectures`` entry, so any size plans on a laptop) or ``module:function``
returning a model or ``(model, example_batch)``. Errors a user can fix (a missing file, a bad size
string, an unknown config key, a model that does not fit) print one clear message and exit with
status 2, never a raw traceback.

Other subcommands register themselves through :data:`SUBCOMMANDS`: a function taking the
subparsers object, e.g. ``SUBCOMMANDS.append(add_launch_parser)`` in ``rannc_hf/integrations``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Callable, Optional

from .errors import RanncError

#: functions ``f(subparsers)`` that add more subcommands; each sets ``func`` via ``set_defaults``
SUBCOMMANDS: list[Callable[[Any], None]] = []
#: modules imported (if present) before parsing, so they can append to SUBCOMMANDS
PLUGIN_MODULES = ("rannc_hf.integrations.launch",)


class UsageError(RanncError):
    """A command-line input the user can fix."""


def _load_hf_model(path: str, seq_len: Optional[int], batch_size: int):
    import torch
    import transformers as tf

    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(cfg_path):
        raise UsageError(f"model {path!r}: no such file or directory (expected a config.json, a directory "
                         f"holding one, or module:function)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"model config {cfg_path!r} is not valid JSON: {e}") from None
    if "model_type" not in raw:
        raise UsageError(f"model config {cfg_path!r} has no 'model_type'; is it a Hugging Face config.json?")
    try:
        config = tf.AutoConfig.from_pretrained(cfg_path)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"cannot read {cfg_path!r} as a Hugging Face config: {e}") from None
    arch = (raw.get("architectures") or [None])[0]
    cls = getattr(tf, arch, None) if arch else None
    if cls is None:
        for auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForPreTraining",
                     "AutoModelForSeq2SeqLM"):
            try:
                getattr(tf, auto)._model_mapping[type(config)]
                cls = getattr(tf, auto)
                break
            except KeyError:
                continue
    if cls is None:
        raise UsageError(f"cannot tell which model class to build for {cfg_path!r} (architectures={arch!r})")
    if hasattr(config, "use_cache"):
        config.use_cache = False
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    model.train()
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
    seq = seq_len or min(int(max_pos), 2048)
    ids = torch.zeros(batch_size, seq, dtype=torch.long)
    name = type(model).__name__
    if "Seq2Seq" in name or "ConditionalGeneration" in name or getattr(config, "is_encoder_decoder", False):
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    elif "PreTraining" in name and hasattr(config, "type_vocab_size"):
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                 "next_sentence_label": torch.zeros(batch_size, dtype=torch.long)}
    else:
        batch = {"input_ids": ids, "labels": ids.clone()}
    return model, batch


def load_model(spec: str, seq_len: Optional[int] = None, batch_size: int = 8):
    """``(model, example_batch)`` from a config path or ``module:function``."""
    if ":" in spec and not os.path.exists(spec):
        mod_name, fn_name = spec.split(":", 1)
        try:
            sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise UsageError(f"model {spec!r}: cannot import module {mod_name!r} ({e})") from None
        fn = getattr(mod, fn_name, None)
        if fn is None:
            raise UsageError(f"model {spec!r}: module {mod_name!r} has no attribute {fn_name!r}")
        out = fn()
        if isinstance(out, tuple) and len(out) == 2:
            return out
        raise UsageError(f"model {spec!r}: {fn_name}() returned a model but no example batch; return "
                         f"(model, batch) so the planner knows the input shapes")
    return _load_hf_model(spec, seq_len, batch_size)


def _config_from_args(args):
    from .config import RanncConfig

    cfg = RanncConfig.from_yaml(args.rannc_config) if args.rannc_config else RanncConfig()
    d = cfg.to_dict()
    for key in ("num_stages", "schedule", "partitioner", "num_microbatches", "recompute", "offload", "precision"):
        v = getattr(args, key, None)
        if v is not None:
            d[key] = v
    if args.gpu_memory is not None:
        d["gpu_memory"] = args.gpu_memory
    return RanncConfig(**d)


def cmd_plan(args) -> int:
    import rannc_hf
    from .config import Cluster

    cfg = _config_from_args(args)
    cluster = Cluster(num_gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu_memory=args.gpu_memory,
                      host_memory=args.host_memory, device=args.device)
    model, batch = load_model(args.model, args.seq_len, args.batch_size)
    p = rannc_hf.plan(model, batch, cluster=cluster, config=cfg, progress=not args.quiet)
    print(p.summary())
    print(f"planned in {p.planning_time_s:.1f} s")
    if args.out:
        p.save(args.out)
        print(f"plan written to {args.out}")
    if args.plot:
        p.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


def cmd_show(args) -> int:
    from .planner.plan import Plan

    p = Plan.load(args.plan)
    print(p.summary())
    if args.plot:
        p.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


def cmd_calibrate(args) -> int:
    from .profile.calibrate import calibrate

    prof = calibrate(quick=args.quick)
    print(json.dumps(prof.to_dict(), indent=1))
    if args.out:
        prof.save(args.out)
        print(f"profile written to {args.out}; use it with --device {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rannc-hf", description="Automatic pipeline + data-parallel partitioning "
                                     "and offload for PyTorch / Hugging Face models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("plan", help="plan how a model splits over a cluster (no GPU needed)")
    p.add_argument("model", help="HF config.json (or its directory), or module:function returning (model, batch)")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default min(gpus, 8))")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GiB (default: the device's)")
    p.add_argument("--host-memory", default=None, help="host memory per node, e.g. 1TiB")
    p.add_argument("--device", default="h100", help="cost profile: h100, h200, a100, cpu, auto or a JSON file")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size (all replicas)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: max positions, <= 2048)")
    p.add_argument("--rannc_config", "--rannc-config", dest="rannc_config", default=None, help="YAML RanncConfig")
    p.add_argument("--num-stages", dest="num_stages", type=int, default=None)
    p.add_argument("--num-microbatches", dest="num_microbatches", type=int, default=None)
    p.add_argument("--schedule", default=None, help="auto | gpipe | 1f1b | interleaved-1f1b")
    p.add_argument("--partitioner", default=None, help="auto | even | params")
    p.add_argument("--recompute", default=None, help="auto | none | full | selective")
    p.add_argument("--offload", default=None, help="auto | none | optimizer | params | all")
    p.add_argument("--precision", default=None, help="fp32 | bf16 | fp16")
    p.add_argument("--out", default=None, help="write the plan JSON here")
    p.add_argument("--plot", default=None, help="write a PNG (memory bars + pipeline timeline) here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_plan)

    s = sub.add_parser("show", help="print a saved plan")
    s.add_argument("plan", help="plan JSON file")
    s.add_argument("--plot", default=None, help="also write a PNG here")
    s.set_defaults(func=cmd_show)

    c = sub.add_parser("calibrate", help="measure this machine's device profile")
    c.add_argument("--out", default=None, help="write the profile JSON here")
    c.add_argument("--quick", action="store_true", help="smaller, faster measurements")
    c.set_defaults(func=cmd_calibrate)

    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RanncError as e:
        print(f"rannc-hf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError) as e:
        print(f"rannc-hf {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # `python -m rannc_hf.cli`: use the package module so plugins register into it
    from rannc_hf.cli import main as _main

    sys.exit(_main())
