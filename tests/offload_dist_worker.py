"""Worker for tests/test_offload_pipeline.py: torchrun starts it once (2 ranks, gloo), it loops over all cases.

    torchrun --standalone --nproc_per_node 2 tests/offload_dist_worker.py OUTDIR

Each case trains a zoo model as a 2-stage pipeline with offload on one or both stages (per-stage modes
come from a hand-made Plan, or from ``config.offload`` for all stages) and writes ``OUTDIR/<case>.json``
(losses, norms, engine facts) and ``OUTDIR/<case>.safetensors`` (the gathered state dict, rank 0).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(1)

import rannc_hf  # noqa: E402
from rannc_hf.capture import capture  # noqa: E402
from rannc_hf.planner.plan import Plan  # noqa: E402
from rannc_hf.runtime.planning import fallback_cuts  # noqa: E402
from rannc_hf.zoo import loss_of, make_with_batches  # noqa: E402

from dist_helpers import run_steps  # noqa: E402

BATCH, STEPS, LR, M = 8, 3, 1e-3, 4
OUT = sys.argv[1]
_graphs: dict = {}

# (case suffix, per-stage modes or None, config.offload, schedule)
CONFIGS = [
    ("opt_both", None, "optimizer", "gpipe"),
    ("params_s0", ["params", "none"], "auto", "1f1b"),
    ("all_s1", ["none", "all"], "auto", "gpipe"),
    ("all_both", ["all", "all"], "auto", "1f1b"),
]


def graph_for(fam: str):
    if fam not in _graphs:
        model, bf = make_with_batches(fam, 0)
        _graphs[fam] = capture(model, bf(BATCH // M, 0))
    return _graphs[fam]


def train(fam: str, modes, offload: str, schedule: str, dp: int = 1, precision: str = "fp32",
          step_in_backward: bool = False):
    model, bf = make_with_batches(fam, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    g = graph_for(fam)
    # a hand-made plan (no planner run); with config.offload != "auto" its per-stage choice is overridden.
    # dp=2: one stage replicated on both ranks, M / 2 microbatches each (the same chunks of the batch);
    # interleaved-1f1b: 4 stages, 2 on each rank
    pp, m = (2, M) if dp == 1 else (1, M // dp)
    v = 2 if schedule == "interleaved-1f1b" else 1
    plan = Plan.from_cuts(g, fallback_cuts(g, pp * v), num_microbatches=m, schedule=schedule, dp_size=dp,
                          virtual_stages=v)
    for s, mode in zip(plan.stages, modes or ["none"] * pp * v):
        s.offload = mode
    cfg = rannc_hf.RanncConfig(num_stages=pp, dp_size=dp, num_microbatches=m, schedule=schedule,
                               precision=precision, offload=offload, collective_timeout_s=120,
                               step_in_backward=step_in_backward)
    rm = rannc_hf.RanncModule(model, opt, config=cfg, graph=g, plan=plan)
    if step_in_backward:   # no clipping: the blocks step inside backward (where the runtime allows it)
        losses, norms = [], []
        for step in range(STEPS):
            loss = loss_of(rm(**bf(BATCH, step)))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    else:
        losses, norms = run_steps(rm, opt, bf, STEPS, BATCH)
    st = rm._offload.stats() if rm._offload is not None else {}
    info = {"losses": losses, "norms": norms, "mode": rm._offload.mode if rm._offload else "none",
            "blocks": st.get("num_blocks", 0), "fetches": st.get("fetches", 0),
            "resident_peak_blocks": st.get("resident_peak_blocks", 0),
            "stage_offload": [s.offload for s in rm.plan.stages],
            "early_block_steps": st.get("early_block_steps", 0)}
    return rm, info


def gather(name: str, fn) -> None:
    try:
        info = fn() or {}
        info.setdefault("ok", True)
    except Exception as e:  # noqa: BLE001 - recorded for the test
        info = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, info)
    if dist.get_rank() == 0:
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump({"ranks": per_rank}, f)


def case(fam: str, suffix: str, modes, offload: str, schedule: str, dump_optim: bool = False, **kw) -> None:
    name = f"{fam}_{suffix}"

    def fn():
        rm, info = train(fam, modes, offload, schedule, **kw)
        sd = rm.state_dict()
        if dump_optim:
            osd = rm.optimizer_state_dict()
            for fqn, st in osd["state"].items():
                for k, v in st.items():
                    sd[f"optim::{fqn}::{k}"] = v.reshape(-1).float() if torch.is_tensor(v) else torch.tensor([float(v)])
        if dist.get_rank() == 0:
            save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, os.path.join(OUT, name + ".safetensors"))
        return info

    gather(name, fn)


def main() -> None:
    for fam in ("gpt2", "bert", "cnn"):
        for suffix, modes, offload, schedule in CONFIGS:
            case(fam, suffix, modes, offload, schedule, dump_optim=(fam == "gpt2" and suffix == "all_both"))
    case("gpt2", "none", None, "none", "1f1b", dump_optim=True)
    # data-parallel replicas of an offloaded stage, and bf16 compute with offload (against bf16 without)
    for mode in ("optimizer", "all"):
        case("gpt2", f"dp2_{mode}", None, mode, "gpipe", dp=2)
    case("gpt2", "bf16_opt_both", None, "optimizer", "1f1b", precision="bf16")
    case("gpt2", "bf16_none", None, "none", "1f1b", precision="bf16")
    case("gpt2", "interleaved_all", ["all", "none", "optimizer", "all"], "auto", "interleaved-1f1b")
    # step_in_backward, the CPU standing in for CUDA's async pipeline, micro-batches summed in the device buffer:
    # each stage's blocks step inside its backward; replicas (dp=2) must average first, so they step after it
    import functools

    from rannc_hf.offload.engine import OffloadEngine
    from rannc_hf.runtime import offload_stage

    offload_stage.OffloadEngine = functools.partial(OffloadEngine, async_step=True)
    os.environ["RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE"] = "1"
    case("cnn", "sib_pp2", ["all", "optimizer"], "auto", "1f1b", step_in_backward=True)   # no weights tied across stages
    case("gpt2", "sib_dp2", None, "all", "gpipe", dp=2, step_in_backward=True)
    case("gpt2", "sib_pp2", ["all", "optimizer"], "auto", "1f1b", step_in_backward=True)   # wte tied across stages
    offload_stage.OffloadEngine = OffloadEngine
    del os.environ["RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE"]


if __name__ == "__main__":
    from rannc_hf.runtime.mesh import init_distributed

    init_distributed(120)
    main()
    dist.barrier()
    dist.destroy_process_group()
