"""``rannc-hf launch``: ``accelerate launch`` plus a rannc config for every rank.

    rannc-hf launch --rannc_config rannc.yaml --num_processes 4 train.py --lr 3e-4
    rannc-hf launch --rannc_config rannc.yaml --config_file accel.yaml train.py
    python -m rannc_hf.integrations.launch --rannc_config rannc.yaml --num_processes 2 train.py

Every ``accelerate launch`` flag works (the parser *is* Accelerate's ``launch_command_parser()``,
with ``--rannc_config`` added), and the launch itself is Accelerate's ``launch_command()``; the
user's accelerate YAML is read by Accelerate as usual and never modified. On top of that:

1. The rannc YAML is validated before any process starts: a missing file, an unknown key (the
   message lists the valid ones) or a bad value prints ``rannc-hf launch: error: ...`` and exits
   with status 2. ``RANNC_HF_<FIELD>`` variables in the environment are validated too.
2. ``RANNC_HF_CONFIG`` is exported, as an absolute path, to every rank (environment variables of
   the launching shell reach every rank, on every node started through Accelerate's flags).
3. On a host without an accelerator, ``accelerate launch --cpu --num_processes N`` would start a
   single process; ``rannc-hf launch`` starts N (``ACCELERATE_USE_CPU=1`` with the multi-process
   launcher, i.e. torchrun with gloo).

``rannc-hf launch`` is registered in ``rannc_hf.cli.SUBCOMMANDS`` when this module is imported
(the CLI imports it). Wire it into another ``argparse`` CLI with :func:`add_launch_parser`::

    subparsers = parser.add_subparsers(dest="command")
    add_launch_parser(subparsers)          # args.func(args) runs the launch
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import subprocess
import sys
from typing import Optional, Sequence

from ..config import CONFIG_ENV, RanncConfig
from ..errors import ConfigError

__all__ = ["add_launch_parser", "launch_parser", "rannc_launch_command", "main"]

_DESCRIPTION = ("Launch a training script with Accelerate and rannc_hf partitioning. Takes every "
                "`accelerate launch` flag plus --rannc_config (a rannc_hf YAML file).")


def _add_rannc_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--rannc_config", "--rannc-config", dest="rannc_config", default=None, metavar="YAML",
                        help="rannc_hf config (RanncConfig keys); exported to every rank as RANNC_HF_CONFIG. "
                             "Default: $RANNC_HF_CONFIG.")
    return parser


def add_launch_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``launch`` on an argparse ``subparsers`` object; sets ``func=rannc_launch_command``."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser(subparsers)
    parser.description = _DESCRIPTION
    _add_rannc_args(parser)
    parser.set_defaults(func=rannc_launch_command)
    # accelerate registers "launch" without help text, so `rannc-hf --help` would not list it
    try:
        subparsers._choices_actions.append(argparse._SubParsersAction._ChoicesPseudoAction(
            "launch", (), "start a training script on every rank (accelerate launch + --rannc_config)"))
    except AttributeError:  # argparse internals changed: the command still works, it is just not listed
        pass
    return parser


def launch_parser() -> argparse.ArgumentParser:
    """A standalone parser (``rannc-hf launch`` without the ``rannc-hf`` prefix)."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    parser.prog = "rannc-hf launch"
    parser.description = _DESCRIPTION
    _add_rannc_args(parser)
    parser.set_defaults(func=rannc_launch_command)
    return parser


def _fail(msg: str) -> None:
    print(f"rannc-hf launch: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def validate_rannc_config(path: Optional[str], environ: Optional[dict] = None) -> tuple[str, RanncConfig]:
    """Check the rannc config (file + ``RANNC_HF_*`` variables); returns ``(abs_path, config)``."""
    env = dict(os.environ if environ is None else environ)
    if path is None:
        path = env.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"no rannc config: pass --rannc_config rannc.yaml (or set {CONFIG_ENV}); "
                              f"valid keys: {', '.join(RanncConfig.valid_keys())}")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass the path of a YAML file with keys "
                          f"{', '.join(RanncConfig.valid_keys())}")
    env[CONFIG_ENV] = path
    cfg = RanncConfig.from_env(env)
    from .accelerate import RanncPlugin

    RanncPlugin.from_env(env)      # same keys, checked the way every rank will read them
    return path, cfg


def _accelerator_available() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    try:
        from accelerate.utils import (is_hpu_available, is_mlu_available, is_musa_available, is_npu_available,
                                      is_xpu_available)

        return any(f() for f in (is_xpu_available, is_npu_available, is_mlu_available, is_musa_available,
                                 is_hpu_available))
    except Exception:
        return False


def _resolved(args: argparse.Namespace) -> Optional[argparse.Namespace]:
    """What Accelerate will make of ``args`` (num_processes from its YAML etc.), without side effects."""
    from accelerate.commands import launch as accel_launch

    log = logging.getLogger("accelerate.commands.launch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return accel_launch._validate_launch_command(copy.deepcopy(args))[0]
    except Exception:
        return None
    finally:
        log.setLevel(level)


def _apply_cpu_quirk(args: argparse.Namespace) -> bool:
    """On a CPU-only host with N > 1 processes, use the multi-process launcher with ACCELERATE_USE_CPU=1."""
    if _accelerator_available() and not args.cpu:
        return False
    r = _resolved(args)
    if r is None:
        return False
    if any(getattr(r, k, False) for k in ("use_deepspeed", "use_fsdp", "use_megatron_lm", "tpu")):
        return False
    nproc = int(getattr(r, "num_processes", 1) or 1)
    if nproc < 2:
        return False
    args.cpu = False
    args.multi_gpu = True
    args.num_processes = nproc
    if getattr(args, "gpu_ids", None) not in (None, "all"):
        args.gpu_ids = "all"
    os.environ["ACCELERATE_USE_CPU"] = "1"
    return True


def rannc_launch_command(args: argparse.Namespace) -> None:
    """Validate the rannc config, export it, then run Accelerate's ``launch_command(args)``."""
    from accelerate.commands.launch import launch_command

    if not getattr(args, "training_script", None):
        _fail("no training script given: rannc-hf launch --rannc_config rannc.yaml [accelerate flags] script.py")
    try:
        path, _ = validate_rannc_config(getattr(args, "rannc_config", None))
    except ConfigError as e:
        _fail(str(e))
    os.environ[CONFIG_ENV] = path
    # restarted workers must not reuse the previous attempt's rendezvous store (pytorch issue 135712);
    # without this a job started with --max_restarts cannot come back after a rank dies
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # with the "static" rendezvous a restarted gloo group reads the dead attempt's addresses from the
    # store that outlives it; c10d rendezvous starts every attempt in a fresh round
    if getattr(args, "max_restarts", 0) and getattr(args, "rdzv_backend", "static") == "static":
        args.rdzv_backend = "c10d"
    _apply_cpu_quirk(args)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as e:
        raise SystemExit(e.returncode or 1) from None
    except Exception as e:   # torchrun's ChildFailedError: the summary is already printed
        if type(e).__name__ == "ChildFailedError":
            print(f"rannc-hf launch: a training process failed:\n{e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        raise


def _register() -> None:
    """Add ``launch`` to the ``rannc-hf`` CLI's subcommand registry (``rannc_hf.cli.SUBCOMMANDS``)."""
    try:
        from .. import cli
    except ImportError:
        return
    registry = getattr(cli, "SUBCOMMANDS", None)
    if registry is not None and not any(getattr(f, "__name__", "") == "add_launch_parser" for f in registry):
        registry.append(add_launch_parser)


_register()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = launch_parser()
    args = parser.parse_args(argv)
    rannc_launch_command(args)


if __name__ == "__main__":
    main()
