"""Configuration: :class:`RanncConfig` (how to partition and run) and :class:`Cluster` (what to run on).

    >>> cfg = RanncConfig(num_stages=2, schedule="1f1b", gpu_memory="24GiB")
    >>> cfg.gpu_memory_bytes
    25769803776
    >>> RanncConfig.from_dict({"num_stage": 2})
    Traceback (most recent call last):
    ...
    rannc_hf.errors.ConfigError: unknown config key 'num_stage' (did you mean 'num_stages'?); valid keys: ...

A YAML file holds the same keys (``RanncConfig.from_yaml("rannc.yaml")``). ``RanncConfig.from_env()``
reads the file named by ``RANNC_HF_CONFIG`` and then ``RANNC_HF_<FIELD>`` overrides
(``RANNC_HF_NUM_STAGES=4``); ``rannc-hf launch --rannc_config`` sets them for every rank.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from .errors import ConfigError
from .units import format_bytes, parse_bytes

CONFIG_ENV = "RANNC_HF_CONFIG"
ENV_PREFIX = "RANNC_HF_"
# RANNC_HF_* variables that are not config fields (cache and results folders)
NON_CONFIG_ENV = frozenset({CONFIG_ENV, "RANNC_HF_CACHE", "RANNC_HF_RESULTS",
                            "RANNC_HF_FAST_PATH", "RANNC_HF_COMPILE_BACKEND",   # runtime switches
                            "RANNC_HF_COMPILE_FENCED_SEGMENTS", "RANNC_HF_UNGUARDED_OPEN_BLOCKS",   # experiment switches (env_flag)
                            "RANNC_HF_OFFLOAD_STREAM_STEP", "RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE", "RANNC_HF_OFFLOAD_CPU_THREADS",
                            "RANNC_HF_OFFLOAD_DEVICE_GRADS", "RANNC_HF_OFFLOAD_FLAT_STEP", "RANNC_HF_OFFLOAD_REST_FIRST",
                            "RANNC_HF_OFFLOAD_SWITCH_US",
                            "RANNC_HF_TEST_KILL_AT_STEP", "RANNC_HF_TEST_KILL_RANK"})   # test hooks (rannc_hf.reliability.testing)

SCHEDULES = ("auto", "gpipe", "1f1b", "interleaved-1f1b")
PARTITIONERS = ("auto", "even", "params")
RECOMPUTE = ("auto", "none", "full", "selective")
OFFLOAD = ("auto", "none", "optimizer", "params", "all")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE = ("auto", "true", "false")
SPLIT_HEAD = ("auto", "true", "false")


def env_flag(name: str, environ: Optional[dict] = None) -> Optional[bool]:
    """An on/off switch from the environment (``1``/``true``/``yes`` on, anything else off; None when unset).
    Switches are listed in ``NON_CONFIG_ENV`` so that ``RanncConfig.from_env`` does not take them for keys."""
    v = (os.environ if environ is None else environ).get(name)
    return None if v is None else v.lower() in ("1", "true", "yes")


def env_int(name: str, default: Optional[int] = None, environ: Optional[dict] = None) -> Optional[int]:
    """A non-negative integer switch from the environment (``default`` when unset); a bad value is an error
    naming the variable. Listed in ``NON_CONFIG_ENV`` like :func:`env_flag`'s switches."""
    v = (os.environ if environ is None else environ).get(name)
    if v is None or v.strip() == "":
        return default
    try:
        iv = int(v)
    except ValueError:
        iv = -1
    if iv < 0:
        raise ConfigError(f"environment variable {name}={v!r}: expected a non-negative integer (or unset it)")
    return iv


def compiles(setting: Any, precision: str, on_gpu: bool) -> bool:
    """Whether ``compile: setting`` runs training graphs through ``torch.compile``: ``true``/``false`` as given;
    ``auto`` on GPUs with bf16/fp16 compute (GPT-2 1.3B: 1.56x eager on an H200), not on CPU (compile time
    outweighs the gain). Encoders (bidirectional attention) compile too since they run their captured graph
    compiled rather than their own forward (see ``RanncModule._compiled_encoder``): BERT-large 1.33x eager and
    1.53x plain ``torch.compile`` on an H200, where it had run 0.88x eager through the fast path. The planner prices
    stages and the runtime runs them by this one rule."""
    c = str(setting).lower()
    if c in ("true", "false"):
        return c == "true"
    return on_gpu and precision in ("bf16", "fp16")


def _auto_or_count(name: str, value: Any) -> Union[str, int]:
    if str(value).lower() == "auto":
        return "auto"
    try:
        k = int(value) if not isinstance(value, bool) else -1
    except (TypeError, ValueError):
        k = -1
    if k < 0:
        raise ConfigError(f"config key '{name}': expected 'auto' or an integer >= 0, got {value!r}")
    return k


def _choice(name: str, value: Any, choices: tuple) -> str:
    v = str(value).lower() if isinstance(value, (str, bool)) else value
    if v not in choices:
        raise ConfigError(f"config key '{name}': {value!r} is not one of {', '.join(choices)}")
    return v


def _opt_pos_int(name: str, value: Any) -> Optional[int]:
    if value is None or (isinstance(value, str) and value.lower() in ("auto", "none", "")):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"config key '{name}': expected a positive integer or null, got {value!r}")
    try:
        iv = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{name}': expected a positive integer or null, got {value!r}") from None
    if iv != float(value) or iv < 1:
        raise ConfigError(f"config key '{name}': expected a positive integer or null, got {value!r}")
    return iv


def _float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"config key '{name}': expected a number in [{lo}, {hi}), got {value!r}")
    try:
        fv = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{name}': expected a number in [{lo}, {hi}), got {value!r}") from None
    if not lo <= fv < hi:
        raise ConfigError(f"config key '{name}': expected a number in [{lo}, {hi}), got {value!r}")
    return fv


def _unknown_key_error(key: str, valid: list[str], where: str = "config") -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if where.endswith(":"):   # "config file 'x.yaml':" / "environment variable RANNC_HF_X:"
        return ConfigError(f"{where} unknown key '{key}'{hint}; valid keys: {', '.join(valid)}")
    return ConfigError(f"unknown {where} key '{key}'{hint}; valid keys: {', '.join(valid)}")


def env_overrides(valid: list[str], environ: Optional[dict] = None) -> dict:
    """The ``RANNC_HF_<FIELD>`` variables as ``{field: value}``; an unknown field is an error listing the valid ones."""
    env = os.environ if environ is None else environ
    data = {}
    for k, v in env.items():
        if k.startswith(ENV_PREFIX) and k not in NON_CONFIG_ENV:
            key = k[len(ENV_PREFIX):].lower()
            if key not in valid:
                raise _unknown_key_error(key, valid, f"environment variable {k}:")
            data[key] = None if v.lower() in ("none", "null") else v
    return data


def read_yaml(path: str, valid_keys: list[str]) -> Any:
    """``yaml.safe_load`` of a config file, with clear errors for a missing file or invalid YAML."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass the path of a YAML file with keys "
                          f"{', '.join(valid_keys)}")
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None


def env_config_values(valid: list[str], read_file, environ: Optional[dict] = None) -> dict:
    """Values of ``read_file($RANNC_HF_CONFIG)`` (if set) with the ``RANNC_HF_<FIELD>`` overrides on top."""
    env = os.environ if environ is None else environ
    path = env.get(CONFIG_ENV)
    data = dict(read_file(path)) if path else {}
    data.update(env_overrides(valid, env))
    return data


class _DictLoadable:
    """Mixin: strict construction from dicts / YAML with helpful unknown-key errors."""

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: Optional[dict], where: str = "config"):
        """Strict: an unknown key raises :class:`ConfigError` naming the valid keys (``None``: no keys)."""
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
        valid = cls.valid_keys()
        for k in data:
            if k not in valid:
                raise _unknown_key_error(str(k), valid, where)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike):
        path = os.fspath(path)
        return cls.from_dict(read_yaml(path, cls.valid_keys()), where=f"config file {path!r}:")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RanncConfig(_DictLoadable):
    """How rannc_hf partitions and runs a model. ``None`` / ``"auto"`` lets the planner decide."""

    num_stages: Optional[int] = field(default=None, metadata={"help": "pipeline stages (ranks along the pipeline; interleaved schedules run several chunks "
                                          "per rank); None: planner decides"})
    num_microbatches: Optional[int] = field(default=None, metadata={"help": "microbatches per step; None: planner decides"})
    schedule: str = field(default="auto", metadata={"help": "auto | gpipe | 1f1b | interleaved-1f1b"})
    partitioner: str = field(default="auto", metadata={"help": "auto (cost search) | even (equal layers) | params (equal param bytes)"})
    recompute: str = field(default="auto", metadata={"help": "activation recompute: auto | none | full | selective"})
    offload: str = field(default="auto", metadata={"help": "auto | none | optimizer | params | all"})
    gpu_memory: Optional[Union[int, str]] = field(default=None, metadata={"help": "per-GPU memory cap, e.g. '24GiB'; None: device memory"})
    compile: Union[str, bool] = field(default="auto", metadata={"help": "torch.compile stage modules: auto (training graphs, on CUDA with bf16/fp16) | true | false"})
    mem_margin: float = field(default=0.1, metadata={"help": "fraction of GPU memory kept free"})
    precision: str = field(default="bf16", metadata={"help": "fp32 | bf16 | fp16 (compute precision; master weights stay fp32)"})
    plan_file: Optional[str] = field(default=None, metadata={"help": "load (or save) the plan from this JSON file"})
    profile_cache: Optional[str] = field(default=None, metadata={"help": "directory caching measured op costs"})
    dp_size: Optional[int] = field(default=None, metadata={"help": "data-parallel replicas; None: world size / stages"})
    prefetch_blocks: int = field(default=2, metadata={"help": "offload: blocks in flight on the GPU at once"})
    gpu_step_blocks: Union[str, int] = field(default="auto", metadata={
        "help": "offload (optimizer/all, CUDA): leading blocks whose optimizer state stays on the GPU and which "
                "step there while the CPU steps the rest; auto: as many as the plan's memory headroom allows"})
    stream_step_blocks: Union[str, int] = field(default=0, metadata={
        "help": "offload (optimizer/all, CUDA): of the blocks the CPU would step, how many step on the GPU with "
                "their optimizer state streamed over PCIe, so the link and the CPU share the step after backward; "
                "auto: the count that balances the two by the device profile's rates. Default 0: on an H200 host "
                "the copies and the CPU step share host memory bandwidth, and streaming ran slower (docs/offload.md)"})
    step_in_backward: bool = field(default=False, metadata={
        "help": "offload (optimizer/all, CUDA): step each offloaded block as soon as its last gradient of the step "
                "arrives in backward, so the CPU step overlaps the rest of backward. Then gradients cannot be "
                "clipped (or scaled, read, all-reduced) before the step: clip_grad_norm_ is refused, and every "
                "training call must be followed by optimizer.step(); stages with data-parallel replicas (or "
                "weights tied across stages) step after backward as usual"})
    split_head: Union[str, bool] = field(default="auto", metadata={
        "help": "a 128k+ vocabulary LM head on several GPUs: auto (split into vocabulary chunks across stages when "
                "the planner finds it faster) | true (split whenever possible) | false (keep whole; needed for "
                "logits from a pipelined evaluation)"})
    collective_timeout_s: float = field(default=600.0, metadata={"help": "seconds before a stuck collective fails every rank"})

    def __post_init__(self):
        self.num_stages = _opt_pos_int("num_stages", self.num_stages)
        self.num_microbatches = _opt_pos_int("num_microbatches", self.num_microbatches)
        self.dp_size = _opt_pos_int("dp_size", self.dp_size)
        self.schedule = _choice("schedule", self.schedule, SCHEDULES)
        self.partitioner = _choice("partitioner", self.partitioner, PARTITIONERS)
        self.recompute = _choice("recompute", self.recompute, RECOMPUTE)
        self.offload = _choice("offload", self.offload, OFFLOAD)
        self.precision = _choice("precision", self.precision, PRECISIONS)
        self.compile = _choice("compile", str(self.compile).lower(), COMPILE)
        self.split_head = _choice("split_head", str(self.split_head).lower(), SPLIT_HEAD)
        self.step_in_backward = _choice("step_in_backward", str(self.step_in_backward).lower(),
                                        ("true", "false")) == "true"
        self.mem_margin = _float("mem_margin", self.mem_margin, 0.0, 0.9)
        self.collective_timeout_s = _float("collective_timeout_s", self.collective_timeout_s, 1.0, 1e7)
        pb = _opt_pos_int("prefetch_blocks", self.prefetch_blocks)
        if pb is None:
            raise ConfigError("config key 'prefetch_blocks': expected a positive integer")
        self.prefetch_blocks = pb
        self.gpu_step_blocks = _auto_or_count("gpu_step_blocks", self.gpu_step_blocks)
        self.stream_step_blocks = _auto_or_count("stream_step_blocks", self.stream_step_blocks)
        parse_bytes(self.gpu_memory, "config key 'gpu_memory'")
        for k in ("plan_file", "profile_cache"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise ConfigError(f"config key '{k}': expected a path string, got {v!r}")

    @property
    def gpu_memory_bytes(self) -> Optional[int]:
        return parse_bytes(self.gpu_memory, "config key 'gpu_memory'")

    @classmethod
    def from_env(cls, environ: Optional[dict] = None) -> "RanncConfig":
        """Config from ``$RANNC_HF_CONFIG`` (a YAML path) plus ``RANNC_HF_<FIELD>`` overrides."""
        return cls(**env_config_values(cls.valid_keys(), lambda path: cls.from_yaml(path).to_dict(), environ))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class Cluster(_DictLoadable):
    """The machines a plan targets: GPU count, per-GPU memory and the device cost profile to use.

    >>> Cluster(num_gpus=64, gpus_per_node=8, gpu_memory="80GiB", device="h100").num_nodes
    8
    """

    num_gpus: int = 1
    gpus_per_node: Optional[int] = None
    gpu_memory: Optional[Union[int, str]] = None
    host_memory: Optional[Union[int, str]] = None
    device: str = "auto"

    def __post_init__(self):
        self.num_gpus = _opt_pos_int("num_gpus", self.num_gpus) or 1
        self.gpus_per_node = _opt_pos_int("gpus_per_node", self.gpus_per_node) or min(self.num_gpus, 8)
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise ConfigError(f"cluster: num_gpus={self.num_gpus} is not a multiple of gpus_per_node={self.gpus_per_node}")
        parse_bytes(self.gpu_memory, "cluster gpu_memory")
        parse_bytes(self.host_memory, "cluster host_memory")

    @property
    def num_nodes(self) -> int:
        return max(1, self.num_gpus // self.gpus_per_node)

    @property
    def gpu_memory_bytes(self) -> Optional[int]:
        return parse_bytes(self.gpu_memory, "cluster gpu_memory")

    @property
    def host_memory_bytes(self) -> Optional[int]:
        return parse_bytes(self.host_memory, "cluster host_memory")

    def describe(self) -> str:
        mem = format_bytes(self.gpu_memory_bytes) if self.gpu_memory else "device default"
        return f"{self.num_gpus} x {self.device} ({mem}), {self.gpus_per_node}/node"
