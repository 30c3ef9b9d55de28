"""RanncPlugin (fields, from_yaml, from_env, validation), RanncAccelerator without a plugin,
save_full_model, and `rannc-hf launch` config validation (fails before any process starts)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from rannc_hf import ConfigError, RanncConfig
from rannc_hf.integrations.accelerate import RanncAccelerator, RanncPlugin
from rannc_hf.integrations.checkpoint import dedupe_tied, save_full_model

LAUNCH = ([shutil.which("rannc-hf"), "launch"] if shutil.which("rannc-hf")
          else [sys.executable, "-m", "rannc_hf.integrations.launch"])
VALID = ", ".join(RanncConfig.valid_keys())


def _write(tmp_path, text, name="rannc.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ---- RanncPlugin ---------------------------------------------------------------------------------
def test_plugin_fields_match_config_with_help():
    pf = {f.name: f for f in dataclasses.fields(RanncPlugin)}
    assert list(pf) == RanncConfig.valid_keys()
    for name, f in pf.items():
        assert f.default is None, name                 # unset by default
        assert f.metadata.get("help"), f"{name} has no help text"


def test_plugin_to_config_and_precision_follows_accelerate():
    p = RanncPlugin(num_stages=2, schedule="1F1B", gpu_memory="24GiB")
    cfg = p.to_config()
    assert isinstance(cfg, RanncConfig) and cfg.num_stages == 2 and cfg.schedule == "1f1b"
    assert cfg.precision == RanncConfig().precision            # unset, no accelerate setting: default
    assert p.to_config("no").precision == "fp32"
    assert p.to_config("bf16").precision == "bf16"
    assert RanncPlugin(precision="fp16").to_config("bf16").precision == "fp16"   # explicit wins
    with pytest.raises(ConfigError, match="fp8"):
        p.to_config("fp8")


@pytest.mark.parametrize("kwargs, match", [
    ({"num_stages": 0}, "num_stages"),
    ({"num_stages": "two"}, "num_stages"),
    ({"schedule": "zigzag"}, "schedule"),
    ({"mem_margin": 2.0}, "mem_margin"),
    ({"gpu_memory": "lots"}, "gpu_memory"),
])
def test_plugin_validates_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RanncPlugin(**kwargs)


def test_plugin_from_yaml(tmp_path):
    p = RanncPlugin.from_yaml(_write(tmp_path, "num_stages: 2\nnum_microbatches: 4\nschedule: gpipe\n"))
    assert p.set_fields() == {"num_stages": 2, "num_microbatches": 4, "schedule": "gpipe"}
    assert RanncPlugin.from_yaml(_write(tmp_path, "", "empty.yaml")).set_fields() == {}


def test_plugin_from_yaml_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        RanncPlugin.from_yaml(_write(tmp_path, "num_stage: 2\n"))
    assert "num_stage" in str(e.value) and "did you mean 'num_stages'" in str(e.value) and VALID in str(e.value)
    with pytest.raises(ConfigError, match="num_microbatches"):
        RanncPlugin.from_yaml(_write(tmp_path, "num_microbatches: [1, 2]\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        RanncPlugin.from_yaml(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        RanncPlugin.from_yaml(_write(tmp_path, "num_stages: [2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        RanncPlugin.from_yaml(_write(tmp_path, "- 2\n"))


def test_plugin_from_env(tmp_path):
    path = _write(tmp_path, "num_stages: 2\nschedule: gpipe\n")
    p = RanncPlugin.from_env({"RANNC_HF_CONFIG": path, "RANNC_HF_SCHEDULE": "1f1b", "RANNC_HF_GPU_MEMORY": "none",
                              "OTHER": "x"})
    assert p.set_fields() == {"num_stages": 2, "schedule": "1f1b"}
    assert RanncPlugin.from_env({}).set_fields() == {}
    with pytest.raises(ConfigError) as e:
        RanncPlugin.from_env({"RANNC_HF_NUM_STAGE": "2"})
    assert "RANNC_HF_NUM_STAGE" in str(e.value) and VALID in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        RanncPlugin.from_env({"RANNC_HF_CONFIG": str(tmp_path / "nope.yaml")})
    assert RanncPlugin.env_is_set({"RANNC_HF_CONFIG": path}) and not RanncPlugin.env_is_set({"PATH": "/"})
    # the engine's experiment switches are not config keys
    switches = {"RANNC_HF_OFFLOAD_DEVICE_GRADS": "1", "RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE": "0",
                "RANNC_HF_OFFLOAD_STREAM_STEP": "3", "RANNC_HF_COMPILE_FENCED_SEGMENTS": "1"}
    assert RanncPlugin.from_env({"RANNC_HF_CONFIG": path, **switches}).set_fields() == {"num_stages": 2,
                                                                                       "schedule": "gpipe"}


def test_plugin_merge_explicit_wins():
    merged = RanncPlugin(num_stages=4).merged_with(RanncPlugin(num_stages=2, schedule="gpipe"))
    assert merged.set_fields() == {"num_stages": 4, "schedule": "gpipe"}


# ---- RanncAccelerator without rannc: a plain Accelerator ---------------------------------------
def test_accelerator_without_plugin_is_plain(fresh_state):
    acc = RanncAccelerator(cpu=True)
    assert not acc.rannc_enabled and acc.num_processes == 1 and acc.mixed_precision == "no"
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m, o = acc.prepare(model, opt)
    assert m is model and type(o).__name__ == "AcceleratedOptimizer"
    # one process, nothing to partition: plain too, even with a plugin
    acc2 = RanncAccelerator(rannc_plugin=RanncPlugin(num_microbatches=2), cpu=True)
    assert not acc2.rannc_enabled


@pytest.fixture
def fresh_state(monkeypatch):
    from accelerate.state import AcceleratorState

    for k in list(os.environ):
        if k.startswith("RANNC_HF_"):
            monkeypatch.delenv(k)
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_accelerator_mixed_precision_maps_to_rannc_precision(fresh_state, tmp_path, monkeypatch):
    acc = RanncAccelerator(rannc_plugin=RanncPlugin(num_stages=2), mixed_precision="bf16", cpu=True)
    assert acc.rannc_enabled and acc.rannc_config.precision == "bf16" and acc.rannc_config.num_stages == 2
    assert acc.mixed_precision == "bf16"              # what the user asked for ...
    assert acc.state.mixed_precision == "no"          # ... done by the stages, not by Accelerate's autocast
    assert acc.world_size == 1
    AcceleratorState = type(acc.state)
    AcceleratorState._reset_state(True)
    # unset fields of an explicit plugin come from the environment; explicit ones win
    monkeypatch.setenv("RANNC_HF_CONFIG", _write(tmp_path, "num_stages: 4\nnum_microbatches: 8\nprecision: fp32\n"))
    acc = RanncAccelerator(rannc_plugin=RanncPlugin(num_stages=2), cpu=True)
    cfg = acc.rannc_config
    assert (cfg.num_stages, cfg.num_microbatches, cfg.precision) == (2, 8, "fp32") and acc.mixed_precision == "no"


def test_accelerator_rejects_other_parallelism_plugins(fresh_state):
    from accelerate import FullyShardedDataParallelPlugin

    with pytest.raises(ConfigError, match="fsdp_plugin"):
        RanncAccelerator(rannc_plugin=RanncPlugin(num_stages=2), fsdp_plugin=FullyShardedDataParallelPlugin(),
                         cpu=True)


def test_accelerator_bad_env_config_fails_before_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("RANNC_HF_CONFIG", _write(tmp_path, "num_stage: 2\n"))
    with pytest.raises(ConfigError, match="num_stage"):
        RanncAccelerator(cpu=True)


# ---- checkpoint helper -------------------------------------------------------------------------
def test_save_full_model_hf_layout(tmp_path):
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    from rannc_hf.zoo import make

    model, batch = make("gpt2", batch_size=2)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}   # gathered: no shared storage
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "pytorch_model.bin").write_text("stale")
    assert save_full_model(model, out, state_dict=sd) == str(out)
    files = sorted(os.listdir(out))
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]       # no temp dir left
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # tied weight stored once
    loaded = GPT2LMHeadModel.from_pretrained(str(out))
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_save_full_model_plain_module(tmp_path):
    from safetensors.torch import load_file

    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    m[1].weight = m[0].weight
    save_full_model(m, tmp_path / "plain")
    sd = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert set(sd) == {"0.weight", "0.bias", "1.bias"}
    assert dedupe_tied({"a": m[0].weight, "b": m[0].weight}) == {"a": m[0].weight}


# ---- rannc-hf launch: config errors before any process starts -----------------------------------
def _launch(args, tmp_path, timeout=60):
    script = tmp_path / "never.py"
    script.write_text("open(__file__ + '.ran', 'w').write('x')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env = {k: v for k, v in env.items() if not k.startswith("RANNC_HF_")}
    t = time.time()
    r = subprocess.run([*LAUNCH, *args, "--num_processes", "2",
                        str(script)], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    return r, time.time() - t, os.path.exists(str(script) + ".ran")


@pytest.mark.parametrize("text, key", [
    ("num_stage: 2\n", "num_stage"),
    ("num_stages: two\n", "num_stages"),
    ("schedule: zigzag\n", "schedule"),
])
def test_launch_rejects_bad_config(tmp_path, text, key):
    r, dt, ran = _launch(["--rannc_config", _write(tmp_path, text)], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "rannc-hf launch: error:" in r.stderr and f"'{key}'" in r.stderr
    if key == "num_stage":
        assert VALID in r.stderr
    assert not ran and dt < 30


def test_launch_rejects_missing_config(tmp_path):
    r, _, ran = _launch(["--rannc_config", str(tmp_path / "missing.yaml")], tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr and VALID in r.stderr and not ran
    r, _, ran = _launch([], tmp_path)
    assert r.returncode == 2 and "--rannc_config" in r.stderr and not ran


def test_launch_parser_has_every_accelerate_flag():
    from accelerate.commands.launch import launch_command_parser

    from rannc_hf.integrations.launch import add_launch_parser, launch_parser

    ours = {o for a in launch_parser()._actions for o in a.option_strings}
    theirs = {o for a in launch_command_parser()._actions for o in a.option_strings}
    assert theirs <= ours and "--rannc_config" in ours
    import argparse

    top = argparse.ArgumentParser(prog="rannc-hf")
    sub = top.add_subparsers(dest="command")
    add_launch_parser(sub)
    args = top.parse_args(["launch", "--rannc_config", "r.yaml", "--num_processes", "2", "t.py", "--lr", "1"])
    assert args.rannc_config == "r.yaml" and args.num_processes == 2 and args.training_script == "t.py"
    assert args.training_script_args == ["--lr", "1"] and args.func.__name__ == "rannc_launch_command"


def test_yaml_path_takes_env_overrides_in_trainer_and_recipes(tmp_path, monkeypatch):
    """A YAML given by path (Trainer's rannc_config, a recipe's --rannc_config) still takes RANNC_HF_<KEY>
    overrides, as under `rannc-hf launch`; an unknown variable is still an error."""
    import types

    from rannc_hf.integrations.trainer import resolve_rannc_config

    path = tmp_path / "r.yaml"
    path.write_text("offload: auto\ncompile: auto\n")
    monkeypatch.setenv("RANNC_HF_OFFLOAD", "optimizer")
    monkeypatch.setenv("RANNC_HF_COMPILE", "false")
    cfg = resolve_rannc_config(str(path), bf16=True)
    assert cfg.offload == "optimizer" and cfg.compile == "false"

    import importlib.util
    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
    monkeypatch.syspath_prepend(recipes)
    spec = importlib.util.spec_from_file_location("recipes_loop", os.path.join(recipes, "loop.py"))
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    plugin = loop._rannc_plugin(types.SimpleNamespace(rannc_config=str(path)))
    assert plugin.offload == "optimizer" and plugin.compile == "false"
    monkeypatch.setenv("RANNC_HF_OFFLOD", "all")
    with pytest.raises(ConfigError, match="offlod"):
        resolve_rannc_config(str(path), bf16=True)


def test_trainer_keeps_the_precision_a_config_states(tmp_path, monkeypatch):
    """Trainer flags decide the precision when set; with neither flag a precision the rannc config states (YAML,
    dict, RANNC_HF_PRECISION) is kept, else fp32. The BERT recipe's Trainer path once ran fp32 at 832 ms/step
    (86 ms in bf16) because its YAML's `precision: bf16` was dropped for unset Trainer flags."""
    import warnings

    from rannc_hf import RanncConfig, RanncTrainer, RanncTrainingArguments
    from rannc_hf.integrations.trainer import resolve_rannc_config

    monkeypatch.delenv("RANNC_HF_PRECISION", raising=False)
    stated, silent = tmp_path / "bf16.yaml", tmp_path / "none.yaml"
    stated.write_text("precision: bf16\nnum_stages: 1\n")
    silent.write_text("num_stages: 1\n")
    assert resolve_rannc_config(str(stated)).precision == "bf16"
    assert resolve_rannc_config(str(silent)).precision == "fp32"
    assert resolve_rannc_config({"precision": "bf16"}).precision == "bf16"
    assert resolve_rannc_config(RanncConfig()).precision == "fp32"
    assert resolve_rannc_config(RanncConfig(precision="fp16")).precision == "fp16"
    assert resolve_rannc_config(str(silent), fp16=True).precision == "fp16"
    with pytest.warns(UserWarning, match="overridden by the Trainer flags"):
        assert resolve_rannc_config({"precision": "fp32"}, bf16=True).precision == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_rannc_config(str(stated), bf16=True).precision == "bf16"
    monkeypatch.setenv("RANNC_HF_PRECISION", "bf16")
    assert resolve_rannc_config(str(silent)).precision == "bf16"
    monkeypatch.setenv("RANNC_HF_CONFIG", str(silent))
    assert resolve_rannc_config(None).precision == "bf16"
    monkeypatch.delenv("RANNC_HF_PRECISION")

    args = RanncTrainingArguments(output_dir=str(tmp_path / "out"), rannc_config=str(stated), report_to=[])
    assert args.rannc_config.precision == "bf16"
    trainer = RanncTrainer(model=torch.nn.Linear(4, 4), args=args)
    assert trainer.rannc_config.precision == "bf16"
