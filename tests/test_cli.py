"""``rannc-hf plan`` / ``show`` / ``calibrate`` through a subprocess."""

import json
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rannc_hf.cli", *args], capture_output=True, text=True,
                          timeout=240, cwd=cwd)


@pytest.fixture(scope="module")
def hf_config(tmp_path_factory):
    import transformers as tf

    d = tmp_path_factory.mktemp("cfg")
    tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0,
                  architectures=["GPT2LMHeadModel"]).to_json_file(str(d / "config.json"))
    return d


def test_plan_and_show(hf_config, tmp_path):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    r = run("plan", str(hf_config / "config.json"), "--gpus", "2", "--batch-size", "8", "--seq-len", "32",
            "--device", "h100", "--num-stages", "2", "--out", str(out), "--plot", str(png), "-q")
    assert r.returncode == 0, r.stderr
    assert "stage" in r.stdout and "predicted step time" in r.stdout
    plan = json.loads(out.read_text())
    assert plan["world_size"] == 2 and len(plan["stages"]) >= 2
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = run("show", str(out))
    assert r.returncode == 0 and "GPT2LMHeadModel" in r.stdout


def test_clear_errors(hf_config, tmp_path):
    r = run("plan", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = run("plan", str(hf_config), "--gpu-memory", "12XB")
    assert r.returncode == 2 and "cannot read '12XB'" in r.stderr and "Traceback" not in r.stderr
    r = run("plan", str(hf_config), "--gpu-memory", "256KiB", "--offload", "none", "-q", "--seq-len", "32")
    assert r.returncode == 2 and "needs at least" in r.stderr and "Traceback" not in r.stderr
    r = run("show", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    y = tmp_path / "bad.yaml"
    y.write_text("num_stage: 2\n")
    r = run("plan", str(hf_config), "--rannc_config", str(y))
    assert r.returncode == 2 and "did you mean 'num_stages'" in r.stderr


def test_module_function_model(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "from rannc_hf.zoo import make\n\ndef build():\n    return make('forkjoin', batch_size=8)\n")
    r = run("plan", "mymodel:build", "--gpus", "2", "--device", "a100", "-q", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "ForkJoin" in r.stdout


def test_calibrate(tmp_path):
    out = tmp_path / "prof.json"
    r = run("calibrate", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["flops"]["fp32"] > 0
