"""Shared pieces of the GPT and BERT pretraining recipes: arguments, model config, tokenizer, data.

Arguments follow Transformers' ``run_clm.py`` / ``run_mlm.py``. A recipe script uses it like this::

    import os, sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # recipes/
    from common import parse_args, load_model_config, load_raw_text, prepare_tokenizer, prepare_datasets

    args = parse_args("gpt")                         # or "bert"
    config = load_model_config(args)                  # AutoConfig from --model_config (name or path)
    raw = load_raw_text(args)                         # DatasetDict train/validation, column "text"
    tokenizer = prepare_tokenizer(args, config, raw)  # --tokenizer, or trained on the training text
    data = prepare_datasets(args, tokenizer, raw)     # fixed-shape blocks of --seq_len tokens
    collate = make_collator(tokenizer, "clm" if args.kind == "gpt" else "mlm", seq_len=args.seq_len)

``--model_config`` takes a path (a JSON file or a directory with ``config.json``) or the name of a
config in ``recipes/configs`` (``gpt2-tiny``, ``llama-1.3b``, ``bert-large``, ...).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = os.path.join(RECIPES_DIR, "configs")
REPO_DIR = os.path.dirname(RECIPES_DIR)
if REPO_DIR not in sys.path:            # so `python recipes/gpt/pretrain.py` finds rannc_hf in a checkout
    sys.path.insert(0, REPO_DIR)

from rannc_hf.data.errors import DataError, DataFileNotFoundError  # noqa: E402

Kind = Literal["gpt", "bert"]
DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt": {"model_config": "gpt2-tiny", "output_dir": "out/gpt-tiny"},
    "bert": {"model_config": "bert-tiny", "output_dir": "out/bert-tiny"},
}
# Peak learning rate by model width when --learning_rate is not given: GPT-3's table (Brown et al.
# 2020, table 2.1) for causal LMs, BERT's 1e-4 for masked LMs; the tiny CPU configs train at 1e-3.
# A 1.3B GPT at the tiny configs' 1e-3 diverged to NaN in 70 steps on the H200.
_GPT_LR_BY_WIDTH = ((256, 1e-3), (768, 6e-4), (1024, 3e-4), (1536, 2.5e-4), (2048, 2e-4), (2560, 1.6e-4),
                    (4096, 1.2e-4), (5120, 1e-4), (float("inf"), 6e-5))


def default_learning_rate(kind: Kind, model_config_path: str) -> float:
    """The recipe's peak learning rate for a model config (see ``_GPT_LR_BY_WIDTH``)."""
    path = model_config_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    width = cfg.get("n_embd") or cfg.get("hidden_size") or cfg.get("d_model") or 768
    if width <= 256:
        return 1e-3
    if kind == "bert":
        return 1e-4
    return next(lr for w, lr in _GPT_LR_BY_WIDTH if width <= w)


def available_model_configs() -> list[str]:
    """Names of the model configs shipped in ``recipes/configs``."""
    return sorted(f[:-5] for f in os.listdir(CONFIGS_DIR) if f.endswith(".json"))


def resolve_model_config(name_or_path: str) -> str:
    """A path to a config: ``name_or_path`` itself if it exists, else ``recipes/configs/<name>.json``."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "config.json")):
            return name_or_path
        raise DataFileNotFoundError(f"--model_config {name_or_path!r} is a directory without config.json")
    name = name_or_path[:-5] if name_or_path.endswith(".json") else name_or_path
    cand = os.path.join(CONFIGS_DIR, f"{os.path.basename(name)}.json")
    if os.path.isfile(cand):
        return cand
    raise DataFileNotFoundError(f"--model_config {name_or_path!r} is neither a file nor a directory nor one of the "
                                f"shipped configs: {', '.join(available_model_configs())}")


def build_parser(kind: Kind, description: Optional[str] = None) -> argparse.ArgumentParser:
    """The recipe's argument parser (``kind`` picks the defaults and the BERT-only options)."""
    if kind not in DEFAULTS:
        raise ValueError(f"kind {kind!r} is not 'gpt' or 'bert'")
    d = DEFAULTS[kind]
    p = argparse.ArgumentParser(description=description or f"{kind.upper()} pretraining with rannc_hf",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model_config", default=d["model_config"],
                   help=f"config JSON / directory, or a shipped name: {', '.join(available_model_configs())}")
    m.add_argument("--tokenizer", default=None,
                   help="local tokenizer directory (save_pretrained); default: train one on the training text")
    m.add_argument("--vocab_size", type=int, default=None,
                   help="size of a trained tokenizer; default: the model config's vocab_size")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="datasets name or local folder (hub names work offline only when cached)")
    g.add_argument("--dataset_config", default=None, help="the dataset's configuration name")
    g.add_argument("--train_file", default=None, help="a txt/json/jsonl/csv/parquet file of training text")
    g.add_argument("--validation_file", default=None, help="validation text in the same format as --train_file")
    g.add_argument("--text_column", default=None, help="column holding the text (default: 'text' or the first string column)")
    g.add_argument("--validation_split_percentage", type=float, default=5.0,
                   help="percent of the documents held out when the data has no validation split")
    g.add_argument("--streaming", action="store_true", help="stream the data (corpora larger than memory)")
    g.add_argument("--corpus_max_chars", type=int, default=None,
                   help="characters of the built-in offline corpus (default: rannc_hf.data.corpus.DEFAULT_MAX_CHARS)")
    g.add_argument("--seq_len", type=int, default=128, help="tokens per example (the model is planned for this shape)")
    g.add_argument("--num_proc", type=int, default=None, help="processes for datasets.map")
    if kind == "bert":
        g.add_argument("--mlm_probability", type=float, default=0.15, help="fraction of tokens masked")
        g.add_argument("--nsp", action=argparse.BooleanOptionalAction, default=True,
                       help="next-sentence prediction pairs (BertForPreTraining); --no-nsp: MLM only")
        g.add_argument("--short_seq_prob", type=float, default=0.1,
                       help="NSP: probability of a shorter target length (as in BERT)")

    t = p.add_argument_group("training")
    t.add_argument("--per_device_batch_size", type=int, default=8, help="examples per data-parallel replica per step")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--max_steps", type=int, default=300, help="optimizer steps")
    t.add_argument("--learning_rate", type=float, default=None,
                   help="peak learning rate (default: by model width, GPT-3's table; 1e-4 for BERT; 1e-3 tiny)")
    t.add_argument("--weight_decay", type=float, default=0.1)
    t.add_argument("--adam_beta1", type=float, default=0.9)
    t.add_argument("--adam_beta2", type=float, default=0.95 if kind == "gpt" else 0.999)
    t.add_argument("--warmup_steps", type=int, default=None, help="default: 5%% of --max_steps")
    t.add_argument("--lr_scheduler_type", default="cosine", choices=["cosine", "linear", "constant"])
    t.add_argument("--max_grad_norm", type=float, default=1.0, help="clip by the global gradient norm; 0: no clipping")
    t.add_argument("--seed", type=int, default=42)

    r = p.add_argument_group("run")
    r.add_argument("--output_dir", default=d["output_dir"], help="checkpoint, tokenizer, logs, loss curve")
    r.add_argument("--rannc_config", default=None,
                   help="rannc_hf YAML (default: $RANNC_HF_CONFIG, as set by `rannc-hf launch --rannc_config`)")
    r.add_argument("--trainer", action="store_true", help="run through RanncTrainer instead of the RanncAccelerator loop")
    r.add_argument("--log_every", type=int, default=10, help="steps between loss logs")
    r.add_argument("--eval_every", type=int, default=100, help="steps between validation runs (0: only at the end)")
    r.add_argument("--eval_batches", type=int, default=10,
                   help="validation batches per evaluation (the first ones; per data-parallel replica in the loop)")
    r.add_argument("--save_every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    r.add_argument("--resume", default="auto",
                   help="auto: continue from the newest verified checkpoint in output_dir/checkpoints; "
                        "none: start fresh; or a checkpoint directory")
    r.add_argument("--no_plot", action="store_true", help="do not write loss.png")
    r.add_argument("--report_to", default="none", choices=["none", "tensorboard"], help="where to log metrics")
    r.add_argument("--profile_steps", type=int, default=0,
                   help="trace this many steps with torch.profiler (0: off); writes OUTPUT_DIR/profile/")
    r.add_argument("--profile_start", type=int, default=20,
                   help="first profiled step (after the first steps' capture, planning and compilation)")
    r.add_argument("--dataloader_num_workers", type=int, default=None,
                   help="processes that collate batches (default: 2 on a GPU, where collating on the training "
                        "process costs steps their speed; 0 on a CPU; 0: the training process collates)")
    r.add_argument("--adam_fused", action=argparse.BooleanOptionalAction, default=None,
                   help="the loop's AdamW with torch's fused kernel (default: on a GPU, as RanncTrainer's default "
                        "adamw_torch_fused; --no-adam_fused: torch's own choice)")
    r.add_argument("--dataloader_pin_memory", action=argparse.BooleanOptionalAction, default=False,
                   help="collate into pinned host memory and copy batches to the GPU without stopping the host "
                        "(default off: a batch of token ids is a few hundred KB, and the pin-memory thread that "
                        "pinning adds doubles the time of the offload engine's CPU step; GPT-2 1.3B with offload "
                        "on an H200: 382-397 ms a step unpinned, 397-408 pinned)")
    return p


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fail fast, before any model or process group exists, with messages that say what to pass."""
    if args.train_file and args.dataset_name:
        raise DataError("pass either --dataset_name or --train_file, not both")
    for flag in ("train_file", "validation_file"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise DataFileNotFoundError(f"--{flag} {path!r} does not exist; pass an existing txt/json/jsonl/csv/parquet "
                                        f"file, or no data arguments to use the built-in offline corpus")
    if args.tokenizer and not os.path.isdir(args.tokenizer) and (os.sep in args.tokenizer or args.tokenizer.startswith(".")):
        raise DataFileNotFoundError(f"--tokenizer {args.tokenizer!r} does not exist; omit it to train one")
    if args.rannc_config and not os.path.isfile(args.rannc_config):
        raise DataFileNotFoundError(f"--rannc_config {args.rannc_config!r} does not exist; see recipes/configs/rannc_*.yaml")
    for name in ("seq_len", "per_device_batch_size", "max_steps", "gradient_accumulation_steps", "log_every",
                 "eval_batches"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("profile_steps", "profile_start", "dataloader_num_workers"):
        if (getattr(args, name, None) or 0) < 0:
            raise DataError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if getattr(args, "mlm_probability", 0.15) <= 0 or getattr(args, "mlm_probability", 0.15) >= 1:
        raise DataError("--mlm_probability must be in (0, 1)")
    args.model_config = resolve_model_config(args.model_config)
    if args.learning_rate is None:
        args.learning_rate = default_learning_rate(args.kind, args.model_config)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.max_steps // 20)
    return args


def parse_args(kind: Kind, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and validate the recipe's command line; ``args.kind`` is set to ``kind``."""
    args = build_parser(kind).parse_args(argv)
    args.kind = kind
    if hasattr(signal, "SIGUSR1"):   # `kill -USR1 <pid>`: every thread's stack (not on Windows)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    return validate_args(args)


def load_model_config(args: argparse.Namespace) -> "PretrainedConfig":
    """The model's ``AutoConfig`` with ``use_cache=False``; checks ``--seq_len`` against its positions."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_config(args.model_config), local_files_only=True)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_pos is not None and args.seq_len > max_pos:
        raise DataError(f"--seq_len {args.seq_len} exceeds the model's {max_pos} positions "
                        f"({args.model_config}); use --seq_len <= {max_pos}")
    return config


def load_raw_text(args: argparse.Namespace):
    """The raw text splits the arguments name (``DatasetDict``/``IterableDatasetDict``, column ``text``)."""
    from rannc_hf.data.pipeline import load_text_dataset

    return load_text_dataset(args.dataset_name, args.dataset_config, args.train_file, args.validation_file,
                             args.text_column, args.streaming, args.validation_split_percentage,
                             args.corpus_max_chars, seed=args.seed)


def _training_texts(raw, max_chars: int) -> list[str]:
    texts, total = [], 0
    for ex in raw["train"]:
        t = ex["text"]
        if t:
            texts.append(t)
            total += len(t)
            if total >= max_chars:
                break
    return texts


def prepare_tokenizer(args: argparse.Namespace, config: "PretrainedConfig", raw=None) -> "PreTrainedTokenizerBase":
    """``--tokenizer`` loaded locally, or a tokenizer trained (and cached) on the training text.

    The trained vocabulary has at most the model's ``vocab_size`` tokens (or ``--vocab_size``);
    the model config's special-token ids are set from the tokenizer.
    """
    from rannc_hf.data.corpus import DEFAULT_MAX_CHARS
    from rannc_hf.data.tokenizer import get_tokenizer

    vocab = args.vocab_size or config.vocab_size
    texts = None
    if not args.tokenizer and (args.train_file or args.dataset_name):
        if raw is None:
            raw = load_raw_text(args)
        texts = _training_texts(raw, args.corpus_max_chars or DEFAULT_MAX_CHARS)
    tok = get_tokenizer(args.tokenizer, kind=args.kind, vocab_size=vocab, texts=texts,
                        model_max_length=args.seq_len, corpus_max_chars=args.corpus_max_chars)
    if len(tok) > config.vocab_size:
        raise DataError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {config.vocab_size}; "
                        f"pass a model config with vocab_size >= {len(tok)} or --vocab_size <= {config.vocab_size}")
    sync_config_with_tokenizer(config, tok)
    return tok


def sync_config_with_tokenizer(config: "PretrainedConfig", tokenizer: "PreTrainedTokenizerBase") -> None:
    """Copy the tokenizer's special-token ids into the model config (pad/bos/eos)."""
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None and hasattr(config, attr):
            setattr(config, attr, value)


def prepare_datasets(args: argparse.Namespace, tokenizer: "PreTrainedTokenizerBase", raw=None):
    """Tokenized fixed-shape splits: CLM blocks (gpt) or MLM / NSP examples (bert)."""
    from rannc_hf.data.pipeline import build_clm_dataset, build_mlm_dataset

    if raw is None:
        raw = load_raw_text(args)
    if args.kind == "gpt":
        return build_clm_dataset(tokenizer, args.seq_len, raw=raw, num_proc=args.num_proc, seed=args.seed)
    return build_mlm_dataset(tokenizer, args.seq_len, nsp=args.nsp, short_seq_prob=args.short_seq_prob, raw=raw,
                             num_proc=args.num_proc, seed=args.seed)


def save_run_args(args: argparse.Namespace, output_dir: Optional[str] = None) -> str:
    """Write the arguments as ``<output_dir>/run_args.json`` (for reproducing a run); returns the path."""
    out = output_dir or args.output_dir
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "run_args.json")
    with open(path, "w") as f:
        json.dump(vars(args), f, indent=1, sort_keys=True, default=str)
    return path
