"""GPU correctness check of the offload engine (streams, events, pinned memory): offloaded training
equals plain training on CUDA in fp32, for each mode, and bf16 runs; then the same through RanncModule
(one stage, 2 microbatches: the path the recipes and the Trainer take, with gradients left in the
engine's host buffers and `params` run as `all` with every block GPU-stepped). Prints one line per case.

    python benchmarks/offload_gpu_check.py
    python benchmarks/offload_gpu_check.py --rannc-only [--cpu]    # only the RanncModule cases
    python benchmarks/offload_gpu_check.py --recompute-only [--cpu]   # only RanncModule with recompute="full"
    python benchmarks/offload_gpu_check.py --in-backward-only       # only step_in_backward (no clipping)
    python benchmarks/offload_gpu_check.py --gpu-rest-only          # only the rest group stepped on the GPU
    python benchmarks/offload_gpu_check.py --groups-only            # only decay / no-decay groups (flat CPU step)

Every case with ``rest``/``gpu-rest=True`` steps the rest group (embeddings, head) on the GPU (``gpu_step_rest``;
RanncModule through ``RANNC_HF_OFFLOAD_GPU_STEP_REST=1``).
"""

import copy
import itertools
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rannc_hf import zoo  # noqa: E402
from rannc_hf.offload import offload_module  # noqa: E402
from common import decay_param_groups  # noqa: E402  (this directory is on sys.path when run as a script)


def differences(ref, got) -> tuple[float, float]:
    """(largest per-step loss difference, largest parameter difference) of two runs' (losses, state dict, ...)."""
    dl = max(abs(a - b) for a, b in zip(ref[0], got[0]))
    dp = max((ref[1][k] - got[1][k]).abs().max().item() for k in ref[1])
    return dl, dp


def train(family, mode, dtype=None, recompute=False, fused=False, async_step=None, dev_blocks=0, stream_blocks=0,
          device_grads=False, rest=False, groups=False, user_fused=False, reload_at=None):
    """``user_fused``: the user's AdamW is fused (RanncTrainer's default), which the engine's GPU-stepped blocks
    then use; ``reload_at``: after that step the optimizer state goes through ``state_dict`` and back, as a resume."""
    torch.manual_seed(0)
    model, bf = zoo.make_with_batches(family, 0)
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if user_fused and mode is None:
        model.cuda()   # the fused kernel's state is made where the parameters are
    opt = torch.optim.AdamW(decay_param_groups(model, 0.1) if groups else model.parameters(), lr=1e-2,
                            weight_decay=0.1, fused=True if user_fused else None)
    if mode is None:
        model.cuda()
        h = None
    else:
        h = offload_module(model, opt, mode, device="cuda", prefetch_blocks=1, compute_dtype=dtype,
                           timing=True, cpu_fused=fused, async_step=async_step,
                           device_step_blocks=dev_blocks, stream_step_blocks=stream_blocks, device_grads=device_grads,
                           gpu_step_rest=rest)
    losses = []
    for s in range(3):
        for m in range(2):
            b = {k: v.cuda() for k, v in bf(4, 100 * s + m).items()}
            loss = zoo.loss_of(model(**b)) / 2
            loss.backward()
            losses.append(loss.item())
        (h.clip_grad_norm_ if h else lambda c: torch.nn.utils.clip_grad_norm_(model.parameters(), c))(1.0)
        opt.step()
        opt.zero_grad()
        if s == reload_at:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return losses, {k: v.detach().float().cpu() for k, v in model.state_dict().items()}, h


def train_rannc(family, mode, device, recompute="none"):
    """RanncModule, one stage, 2 microbatches of a batch of 8 (``mode`` None: the plain model, same chunks);
    Accelerate's ``step(None)`` every other step."""
    import rannc_hf

    torch.manual_seed(0)
    model, bf = zoo.make_with_batches(family, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if mode is None:
        model.to(device)
    else:
        cfg = rannc_hf.RanncConfig(num_stages=1, num_microbatches=2, precision="fp32", offload=mode,
                                   compile="false", recompute=recompute)
        model = rannc_hf.RanncModule(model, opt, config=cfg, device=device)
    losses = []
    for s in range(4):
        b = {k: v.to(device) for k, v in bf(8, 100 * s).items()}
        if mode is None:
            total = 0.0
            for c in range(2):
                loss = zoo.loss_of(model(**{k: v.chunk(2)[c] for k, v in b.items()})) / 2
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            losses.append(total)
        else:
            loss = zoo.loss_of(model(**b))
            loss.backward()
            model.clip_grad_norm_(1.0)
            losses.append(float(loss))
        opt.step(None) if s % 2 else opt.step()
        opt.zero_grad()
    if mode not in (None, "none"):   # the engine is built at the first call
        want = os.environ.get("RANNC_HF_OFFLOAD_GPU_STEP_REST") == "1" and device == "cuda"
        if model._offload.engine.gpu_step_rest != want:
            raise AssertionError(f"the engine's gpu_step_rest is {model._offload.engine.gpu_step_rest}, expected {want}")
    return losses, {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def _checked(label: str, ref, run) -> bool:
    """Run ``run()``, compare it with ``ref`` (loss and parameters within 1e-3) and print one line; an exception
    is reported as a failure and the check goes on."""
    try:
        got = run()
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"{label}: FAIL {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}", flush=True)
        return False
    dl, dp = differences(ref, got)
    good = dl < 1e-3 and dp < 1e-3
    print(f"{label}: loss diff {dl:.2e} param diff {dp:.2e} {'OK' if good else 'FAIL'}", flush=True)
    return good


def rannc_cases(device, rest=False) -> bool:
    """Each family and mode: the two micro-batches' gradients summed on the device and on the host, and with
    GPU-stepped blocks keeping their gradients on the device."""
    good_all = True
    os.environ["RANNC_HF_OFFLOAD_GPU_STEP_REST"] = "1" if rest else "0"
    for fam in ("gpt2", "bert"):
        ref = train_rannc(fam, None, device)
        for mode, (acc, dg) in itertools.product(("optimizer", "params", "all"), (("1", "0"), ("0", "0"), ("1", "1"))):
            os.environ["RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE"] = acc
            os.environ["RANNC_HF_OFFLOAD_DEVICE_GRADS"] = dg   # GPU-stepped blocks keep their gradients
            good_all &= _checked(f"RanncModule {fam} {mode} device-accumulate={acc} device-grads={dg} gpu-rest={rest}",
                                 ref, lambda: train_rannc(fam, mode, device))
    os.environ.pop("RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE", None)
    os.environ.pop("RANNC_HF_OFFLOAD_DEVICE_GRADS", None)
    os.environ.pop("RANNC_HF_OFFLOAD_GPU_STEP_REST", None)
    return good_all


def recompute_cases(device) -> bool:
    """RanncModule with recompute="full" (segments fed by gradients checkpointed reentrant, offloaded ones not),
    without offload and with optimizer and all offload, against the plain model."""
    good_all = True
    os.environ["RANNC_HF_OFFLOAD_GPU_STEP_REST"] = "1" if device == "cuda" else "0"   # the default on each
    for fam in ("gpt2", "bert"):
        ref = train_rannc(fam, None, device)
        for mode in ("none", "optimizer", "all"):
            good_all &= _checked(f"RanncModule {fam} {mode} recompute=full", ref,
                                 lambda: train_rannc(fam, mode, device, recompute="full"))
    os.environ.pop("RANNC_HF_OFFLOAD_GPU_STEP_REST", None)
    return good_all


def train_in_backward(family, mode, dev_blocks=0, rannc=False, rest=False):
    """No clipping, one backward per step; ``mode`` None: the plain model. With ``rannc``: RanncModule, 2
    micro-batches summed on the GPU, step_in_backward=True; else offload_module(step_in_backward=True), recompute on."""
    import rannc_hf

    torch.manual_seed(0)
    model, bf = zoo.make_with_batches(family, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    h = None
    if mode is None:
        model.cuda()
    elif rannc:
        os.environ["RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE"] = "1"
        cfg = rannc_hf.RanncConfig(num_stages=1, num_microbatches=2, precision="fp32", offload=mode, compile="false",
                                   recompute="none", step_in_backward=True, gpu_step_blocks=dev_blocks)
        model = rannc_hf.RanncModule(model, opt, config=cfg, device="cuda")
        os.environ.pop("RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        h = offload_module(model, opt, mode, device="cuda", prefetch_blocks=1, device_step_blocks=dev_blocks,
                           step_in_backward=True, gpu_step_rest=rest)
    losses = []
    for s in range(4):
        b = {k: v.cuda() for k, v in bf(8, 100 * s).items()}
        if mode is None and rannc:
            total = 0.0
            for c in range(2):
                loss = zoo.loss_of(model(**{k: v.chunk(2)[c] for k, v in b.items()})) / 2
                loss.backward()
                total += loss.item()
            losses.append(total)
        else:
            loss = zoo.loss_of(model(**b))
            loss.backward()
            losses.append(float(loss))
        opt.step()
        opt.zero_grad()
    eng = h.engine if h is not None else (model._offload.engine if mode is not None else None)
    early = eng.stats()["early_block_steps"] if eng is not None else 0
    if eng is not None and eng.gpu_step_rest != rest:
        raise AssertionError(f"the engine's gpu_step_rest is {eng.gpu_step_rest}, the case asked for {rest}")
    return losses, {k: v.detach().float().cpu() for k, v in model.state_dict().items()}, early


def in_backward_cases(rests=(False,)) -> bool:
    good_all = True
    for fam, rannc in (("gpt2", False), ("bert", False), ("gpt2", True), ("bert", True)):
        ref = train_in_backward(fam, None, rannc=rannc)
        for (mode, k), rest in itertools.product((("all", 0), ("all", 2), ("optimizer", 1)), rests):
            name = f"step_in_backward {'RanncModule' if rannc else 'offload_module'} {fam} {mode} gpu-step={k} gpu-rest={rest}"
            if rannc:
                os.environ["RANNC_HF_OFFLOAD_GPU_STEP_REST"] = "1" if rest else "0"
            try:
                got = train_in_backward(fam, mode, k, rannc, rest)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{name}: FAIL {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}", flush=True)
                good_all = False
                continue
            dl, dp = differences(ref, got)
            good = dl < 1e-3 and dp < 1e-3 and got[2] > 0
            good_all &= good
            print(f"{name}: loss diff {dl:.2e} param diff {dp:.2e} early block steps {got[2]} {'OK' if good else 'FAIL'}",
                  flush=True)
    os.environ.pop("RANNC_HF_OFFLOAD_GPU_STEP_REST", None)
    return good_all


def gpu_rest_cases() -> bool:
    """The rest group stepped on the GPU: offload_module with clipping (async pipeline, with and without GPU-stepped
    blocks), RanncModule's modes, and step_in_backward."""
    good_all = True
    ref = train("gpt2", None)
    for mode, k, dg in (("optimizer", 0, False), ("all", 0, False), ("all", 2, True), ("optimizer", 1, False)):
        got = train("gpt2", mode, recompute=True, fused=True, dev_blocks=k, device_grads=dg, rest=True)
        dl, dp = differences(ref, got)
        good = dl < 1e-3 and dp < 1e-3 and got[2].engine.gpu_step_rest
        good_all &= good
        print(f"gpt2 {mode} gpu-rest={got[2].engine.gpu_step_rest} gpu-step={k} device-grads={dg}: loss diff {dl:.2e} "
              f"param diff {dp:.2e} {'OK' if good else 'FAIL'}", flush=True)
    good_all &= rannc_cases("cuda", rest=True)
    good_all &= in_backward_cases(rests=(True,))
    return good_all


if "--gpu-rest-only" in sys.argv:
    ok = gpu_rest_cases()
    print("ALL OK" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)

def group_cases() -> bool:
    """Decay / no-decay param groups with the fused CPU step: the engine lays blocks out by group and steps them
    flat (offload/flat_step.py); GPU-stepped blocks and the rest group on the GPU too."""
    ok = True
    ref = train("gpt2", None, groups=True)
    for mode, k, rest in (("optimizer", 0, False), ("all", 0, False), ("optimizer", 2, True), ("all", 1, True)):
        got = train("gpt2", mode, recompute=True, fused=True, dev_blocks=k, rest=rest, groups=True)
        flat = sum(f.steps for f in got[2].engine._flat.values() if f is not None)
        dl, dp = differences(ref, got)
        good = dl < 1e-3 and dp < 1e-3 and flat > 0
        ok &= good
        print(f"gpt2 {mode} decay groups gpu-step={k} rest-on-gpu={rest}: flat steps {flat} loss diff {dl:.2e} "
              f"param diff {dp:.2e} {'OK' if good else 'FAIL'}", flush=True)
    return ok


def user_fused_cases() -> bool:
    """The user's AdamW fused (RanncTrainer's default): the GPU-stepped, streamed and rest-on-GPU groups step with
    the fused CUDA kernel, and a reload of the optimizer state after step 1 (a resume) keeps their step counts
    on the GPU, where that kernel reads them (engine_state.state_to_device_)."""
    ok = True
    ref = train("gpt2", None, user_fused=True, reload_at=1)
    for mode, k, ns, rest in (("optimizer", 2, 0, False), ("all", 2, 0, False), ("all", 1, 2, False),
                              ("optimizer", 1, 0, True)):
        ok &= _checked(f"gpt2 {mode} user-fused gpu-step={k} streamed={ns} rest-on-gpu={rest} reloaded", ref,
                       lambda: train("gpt2", mode, recompute=True, fused=True, dev_blocks=k, stream_blocks=ns,
                                     rest=rest, user_fused=True, reload_at=1))
    return ok


if "--user-fused-only" in sys.argv:
    ok = user_fused_cases()
    print("ALL OK" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)

if "--groups-only" in sys.argv:
    ok = group_cases()
    print("ALL OK" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)

if "--in-backward-only" in sys.argv:
    ok = in_backward_cases()
    print("ALL OK" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)

if "--recompute-only" in sys.argv:
    ok = recompute_cases("cpu" if "--cpu" in sys.argv else "cuda")
    print("ALL OK" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)

if "--rannc-only" in sys.argv:
    ok = rannc_cases("cpu" if "--cpu" in sys.argv else "cuda")
    print("ALL OK" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)

ok = recompute_cases("cuda")
for fam in ("gpt2", "bert", "cnn"):
    ref = train(fam, None)
    for mode in ("optimizer", "params", "all"):
        for rec in ((False, True) if fam == "gpt2" else (False,)):
            got = train(fam, mode, recompute=rec)
            dl, dp = differences(ref, got)
            st = got[2].stats()
            good = dl < 1e-3 and dp < 1e-3
            ok &= good
            print(f"{fam} {mode} recompute={rec}: loss diff {dl:.2e} param diff {dp:.2e} "
                  f"peak blocks {st['resident_peak_blocks']} hidden {st['hidden_fraction']:.2f} {'OK' if good else 'FAIL'}",
                  flush=True)
ref = train("gpt2", None)
for mode in ("optimizer", "all"):  # async pipeline with the fused CPU kernel (clip via grad_scale), and sync path
    for fused, asy, k, ns, dg in ((True, None, 0, 0, False), (False, False, 0, 0, False),
                                  (True, None, 1, 0, False), (True, None, 2, 1, False), (True, None, 0, 3, False),
                                  (True, None, 2, 0, True), (True, None, 1, 2, True)):
        got = train("gpt2", mode, recompute=True, fused=fused, async_step=asy, dev_blocks=k, stream_blocks=ns,
                    device_grads=dg)
        dl, dp = differences(ref, got)
        good = dl < 1e-3 and dp < 1e-3
        ok &= good
        print(f"gpt2 {mode} fused={fused} async={got[2].engine.async_step} gpu-step={k} streamed="
              f"{got[2].engine.stream_step_blocks} device-grads={got[2].engine.device_grads}: loss diff {dl:.2e} param diff {dp:.2e} "
              f"{'OK' if good else 'FAIL'}", flush=True)
got = train("gpt2", "all", dtype=torch.bfloat16)
print("bf16 all losses", [round(x, 3) for x in got[0]], "ref", [round(x, 3) for x in train("gpt2", None)[0]])
ok &= rannc_cases("cuda")
ok &= in_backward_cases()
ok &= gpu_rest_cases()
ok &= group_cases()
ok &= user_fused_cases()
print("ALL OK" if ok else "SOME FAILED")
