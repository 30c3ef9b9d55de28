"""Worker for tests/test_runtime_dist.py: started once per world size by torchrun, loops over all cases.

    torchrun --standalone --nproc_per_node 2 tests/runtime_dist_worker.py OUTDIR ws2

Writes ``OUTDIR/<case>.safetensors`` (full gathered state, rank 0), ``OUTDIR/<case>.json`` (losses, grad
norms, per-rank facts) and ``OUTDIR/<case>_shared_r<rank>.safetensors`` (local copies of parameters held
on several pipeline ranks) so the test compares against single-process training without any process
group of its own. One failing case records its error and the loop goes on.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(1)

import rannc_hf  # noqa: E402
from rannc_hf.capture import capture  # noqa: E402
from rannc_hf.errors import PlanMismatchError, ShapeMismatchError  # noqa: E402
from rannc_hf.zoo import FAMILIES, loss_of, make_with_batches  # noqa: E402

from dist_helpers import record_case, run_steps as _run_steps  # noqa: E402

BATCH, STEPS, LR = 8, 3, 1e-3

OUT = sys.argv[1]
SUITE = sys.argv[2]
FAMS = sys.argv[3].split(",") if len(sys.argv) > 3 and sys.argv[3] else list(FAMILIES)
_graphs: dict = {}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def graph_for(fam: str, mb: int):
    """One capture per family and microbatch size, reused for every config (a structurally identical model)."""
    if (fam, mb) not in _graphs:
        model, bf = make_with_batches(fam, 0)
        _graphs[(fam, mb)] = capture(model, bf(mb, 0))
    return _graphs[(fam, mb)]


def dump_state(name: str, sd: dict) -> None:
    if rank() == 0:
        save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, os.path.join(OUT, name + ".safetensors"))


def dump_shared(name: str, m) -> None:
    var = m._primary
    shared = {n: p.detach().clone().contiguous() for n, p in zip(var.names, var.params) if len(var.holders[n]) > 1}
    if shared:
        save_file(shared, os.path.join(OUT, f"{name}_shared_r{rank()}.safetensors"))


def record(name: str, info: dict) -> None:
    if rank() == 0:
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(info, f)


def train_case(name: str, fam: str, *, stages: int, dp: int, m: int, schedule: str, precision: str = "fp32",
               steps: int = STEPS, recompute: str = "none", use_graph: bool = True):
    model, bf = make_with_batches(fam, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    cfg = rannc_hf.RanncConfig(num_stages=stages, dp_size=dp, num_microbatches=m, schedule=schedule,
                               precision=precision, recompute=recompute, collective_timeout_s=120)
    mb = BATCH // (dp * m)
    g = graph_for(fam, mb) if use_graph else None
    rm = rannc_hf.RanncModule(model, opt, config=cfg, graph=g)
    losses, norms = run_steps(rm, opt, bf, steps)
    return rm, opt, {"losses": losses, "norms": norms, "cuts": rm.plan.cuts, "schedule": rm.layout.schedule}


def run_steps(rm, opt, bf, steps: int = STEPS) -> tuple[list[float], list[float]]:
    return _run_steps(rm, opt, bf, steps, BATCH)


def run_case(name: str, fn) -> None:
    record_case(OUT, name, fn)


def equivalence(fam: str, stages: int, dp: int, m: int, schedule: str) -> None:
    name = f"{fam}_pp{stages}_dp{dp}_{schedule}"

    def fn():
        rm, opt, info = train_case(name, fam, stages=stages, dp=dp, m=m, schedule=schedule)
        dump_state(name, rm.state_dict())
        dump_shared(name, rm)
        return info

    run_case(name, fn)


def ws2() -> None:
    for fam in FAMS:
        equivalence(fam, 2, 1, 4, "gpipe")
        equivalence(fam, 2, 1, 4, "1f1b")

    # checkpoint written under 2 stages (model + optimizer), loaded under 4 in the ws4 run
    def ckpt():
        rm, opt, info = train_case("ckpt2", "gpt2", stages=2, dp=1, m=4, schedule="1f1b")
        sd, osd = rm.state_dict(), rm.optimizer_state_dict()
        if rank() == 0:
            save_file({k: v.clone().contiguous() for k, v in sd.items()}, os.path.join(OUT, "ckpt_model.safetensors"))
            flat = {f"{fqn}::{k}": v for fqn, st in osd["state"].items() for k, v in st.items()}
            save_file(flat, os.path.join(OUT, "ckpt_optim.safetensors"))
            with open(os.path.join(OUT, "ckpt_groups.json"), "w") as f:
                json.dump(osd["param_groups"], f)
        return info

    run_case("ckpt2", ckpt)

    def plan_file():
        path = os.path.join(OUT, "plan_ws2.json")
        model, bf = make_with_batches("forkjoin", 0)
        rm = rannc_hf.RanncModule(model, None, config=rannc_hf.RanncConfig(num_stages=2, num_microbatches=2,
                                                                          precision="fp32", plan_file=path))
        l1 = float(loss_of(rm(**bf(BATCH, 0))))
        dist.barrier()
        # a second wrapper loads the saved plan and gets the same cuts
        model2, _ = make_with_batches("forkjoin", 0)
        rm2 = rannc_hf.RanncModule(model2, None, config=rannc_hf.RanncConfig(precision="fp32", plan_file=path))
        l2 = float(loss_of(rm2(**bf(BATCH, 0))))
        return {"saved": os.path.exists(path), "cuts": rm.plan.cuts, "cuts2": rm2.plan.cuts, "l1": l1, "l2": l2}

    run_case("plan_file", plan_file)

    def fp16():
        model, bf = make_with_batches("forkjoin", 0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=2, num_microbatches=2,
                                                                          precision="fp16"))
        out = {"scale": [], "changed": [], "overflow": [], "finite": []}
        for step in range(3):
            if step == 1 and rank() == 1:
                rm._debug_inject_inf = True           # only one rank sees the overflow
            before = [p.detach().clone() for p in rm.local_parameters()]
            loss = loss_of(rm(**bf(BATCH, step)))
            loss.backward()
            out["overflow"].append(rm.overflow)
            opt.step()
            opt.zero_grad()
            changed = any(not torch.equal(a, p) for a, p in zip(before, rm.local_parameters()))
            out["scale"].append(rm.scaler.scale)
            out["changed"].append(changed)
            out["finite"].append(bool(torch.isfinite(loss)))
        gathered = [None] * dist.get_world_size()
        t = torch.tensor([float(x) for x in out["changed"] + out["overflow"]] + out["scale"])
        all_t = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(all_t, t)
        out["per_rank"] = [a.tolist() for a in all_t]
        del gathered
        return out

    run_case("fp16", fp16)

    def shapes():
        model, bf = make_with_batches("gpt2", 0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=2, num_microbatches=2,
                                                                          precision="fp32"))
        b = bf(BATCH, 0)
        l1 = float(loss_of(rm(**b)))
        short = {k: v[:, :8] for k, v in b.items()}              # another sequence length: re-captured
        l2 = float(loss_of(rm(**short)))
        err = ""
        try:
            rm(**{k: v[:7] for k, v in b.items()})               # 7 rows do not split into 2 microbatches
        except ShapeMismatchError as e:
            err = str(e)
        # eval mode and no_grad: forward only
        rm.eval()
        with torch.no_grad():
            l3 = float(loss_of(rm(**b)))
        rm.train()
        ref_model, _ = make_with_batches("gpt2", 0)
        with torch.no_grad():
            r1 = sum(float(loss_of(ref_model(**{k: v[i:i + 4] for k, v in b.items()}))) for i in (0, 4)) / 2
            r2 = sum(float(loss_of(ref_model(**{k: v[i:i + 4] for k, v in short.items()}))) for i in (0, 4)) / 2
        return {"l1": l1, "l2": l2, "r1": r1, "r2": r2, "l3": l3, "err": err, "variants": len(rm._variants)}

    run_case("shapes", shapes)

    def released():
        # GPU runs empty the parameters other stages own; a later re-capture (new shape, eval) must still work
        model, bf = make_with_batches("gpt2", 0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=2, num_microbatches=2,
                                                                          schedule="gpipe", precision="fp32"))
        b = bf(BATCH, 0)
        l1 = float(loss_of(rm(**b)))
        rm._release_nonlocal()
        n_released = sum(1 for p in model.parameters() if p.numel() == 0)
        short = {k: v[:, :8] for k, v in b.items()}
        l2 = float(loss_of(rm(**short)))
        rm.eval()
        with torch.no_grad():
            l3 = float(loss_of(rm(**b)))
        rm.train()
        still = sum(1 for p in model.parameters() if p.numel() == 0)
        ref_model, _ = make_with_batches("gpt2", 0)
        sd = rm.state_dict()
        same_sd = all(torch.equal(sd[k], v) for k, v in ref_model.state_dict().items())
        with torch.no_grad():
            r1 = sum(float(loss_of(ref_model(**{k: v[i:i + 4] for k, v in b.items()}))) for i in (0, 4)) / 2
            r2 = sum(float(loss_of(ref_model(**{k: v[i:i + 4] for k, v in short.items()}))) for i in (0, 4)) / 2
        return {"l1": l1, "l2": l2, "l3": l3, "r1": r1, "r2": r2, "released": n_released, "still": still,
                "same_sd": same_sd, "plan_time": rm.plan.predicted_step_time,
                "plan_mem": rm.plan.stages[0].peak_bytes}

    run_case("released", released)

    def eval_logits():
        # forward only: logits from the last stage on every rank; eval_forward (Trainer) on an uneven batch
        model, bf = make_with_batches("gpt2", 0)
        rm = rannc_hf.RanncModule(model, None, config=rannc_hf.RanncConfig(num_stages=2, num_microbatches=2,
                                                                          schedule="gpipe", precision="fp32"))
        b = bf(BATCH, 0)
        rm(**b)
        rm.eval()
        with torch.no_grad():
            out = rm(**b)
        ev = rm.eval_forward(**{k: v[:5] for k, v in b.items()})
        ref_model, _ = make_with_batches("gpt2", 0)
        ref_model.eval()
        with torch.no_grad():
            ref = ref_model(**b).logits
        return {"err": float((out.logits - ref).abs().max()), "shape": list(out.logits.shape),
                "ev_err": float((ev["logits"] - ref[:5]).abs().max()), "ev_shape": list(ev["logits"].shape)}

    run_case("eval_logits", eval_logits)

    def compiled():
        os.environ["RANNC_HF_COMPILE_BACKEND"] = "aot_eager"
        try:
            model, bf = make_with_batches("forkjoin", 0)
            opt = torch.optim.AdamW(model.parameters(), lr=LR)
            rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(
                num_stages=2, num_microbatches=4, schedule="1f1b", precision="fp32", compile="true"))
            losses, _ = run_steps(rm, opt, bf, 2)
            dump_state("forkjoin_compiled", rm.state_dict())
            return {"losses": losses, "compiled": all(m.compiled is not None for m in rm._primary.pipe.modules)}
        finally:
            del os.environ["RANNC_HF_COMPILE_BACKEND"]

    run_case("forkjoin_compiled", compiled)

    def recompute():
        rm, opt, info = train_case("recompute", "gpt2", stages=2, dp=1, m=4, schedule="1f1b", recompute="full")
        dump_state("gpt2_recompute", rm.state_dict())
        return info

    run_case("gpt2_recompute", recompute)

    def interleaved():
        rm, opt, info = train_case("interleaved", "llama", stages=2, dp=1, m=4, schedule="interleaved-1f1b",
                                   use_graph=False)
        dump_state("llama_interleaved", rm.state_dict())
        return info

    run_case("llama_interleaved", interleaved)

    def split_head():
        """The LM head captured as 4 vocabulary chunks and cut between chunks 2 and 3: both ranks hold the weight."""
        model, bf = make_with_batches("llama", 0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        g = capture(model, bf(BATCH // 4, 0), split_min_out_features=128)
        chunk_ops = [o.index for o in g.ops if o.target == "aten.slice.Tensor" and o.params == ["lm_head.weight"]]
        cut = chunk_ops[2] - 1                           # stage 1 starts at the third chunk's slice
        assert g.valid_cuts[cut], "no valid cut between the head chunks"
        cfg = rannc_hf.RanncConfig(num_stages=2, num_microbatches=4, schedule="1f1b", precision="fp32",
                                   collective_timeout_s=120)
        p = rannc_hf.plan(g, cluster=rannc_hf.Cluster(num_gpus=2, gpu_memory="8GiB", device="h100"), config=cfg,
                          progress=False, global_batch=BATCH)
        p.stages[0].op_range = (0, cut)
        p.stages[1].op_range = (cut + 1, len(g.ops) - 1)
        rm = rannc_hf.RanncModule(model, opt, config=cfg, graph=g, plan=p)
        losses, _ = run_steps(rm, opt, bf)
        dump_state("llama_split_head", rm.state_dict())
        return {"losses": losses, "cuts": rm.plan.cuts, "want_cut": cut,
                "head_holders": rm._primary.holders.get("lm_head.weight")}

    run_case("llama_split_head", split_head)


def ws4() -> None:
    for fam in FAMS:
        equivalence(fam, 4, 1, 4, "gpipe")
        equivalence(fam, 4, 1, 4, "1f1b")
        equivalence(fam, 2, 2, 2, "1f1b" if FAMS.index(fam) % 2 else "gpipe")

    def ckpt():
        model, bf = make_with_batches("gpt2", 0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=4, num_microbatches=4,
                                                                          schedule="1f1b", precision="fp32"),
                                  example_batch=bf(BATCH, 0))
        sd = load_file(os.path.join(OUT, "ckpt_model.safetensors"))
        flat = load_file(os.path.join(OUT, "ckpt_optim.safetensors"))
        with open(os.path.join(OUT, "ckpt_groups.json")) as f:
            groups = json.load(f)
        state: dict = {}
        for key, v in flat.items():
            fqn, k = key.split("::")
            state.setdefault(fqn, {})[k] = v
        rm.load_state_dict(sd)
        rm.load_optimizer_state_dict({"state": state, "param_groups": groups})
        back, oback = rm.state_dict(), rm.optimizer_state_dict()
        same_model = all(torch.equal(back[k], sd[k]) for k in sd) and set(back) == set(sd)
        same_opt = all(torch.equal(oback["state"][f][k], v) for f, st in state.items() for k, v in st.items())
        loss = loss_of(rm(**bf(BATCH, STEPS)))        # the 4th step, continuing the 2-stage run
        loss.backward()
        rm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        dump_state("ckpt4", rm.state_dict())
        return {"same_model": same_model, "same_opt": same_opt, "loss": float(loss)}

    run_case("ckpt4", ckpt)

    def plan_mismatch():
        try:
            model, bf = make_with_batches("forkjoin", 0)
            rm = rannc_hf.RanncModule(model, None, config=rannc_hf.RanncConfig(
                precision="fp32", plan_file=os.path.join(OUT, "plan_ws2.json")))
            rm(**bf(BATCH, 0))
        except PlanMismatchError as e:
            return {"error_text": str(e)}
        return {"error_text": ""}

    run_case("plan_mismatch", plan_mismatch)

    def no_sync():
        model, bf = make_with_batches("forkjoin", 0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=2, dp_size=2,
                                                                          num_microbatches=2, precision="fp32"),
                                  graph=graph_for("forkjoin", 2))
        with rm.no_sync():
            loss_of(rm(**bf(BATCH, 0))).backward()
            (loss_of(rm(**bf(BATCH, 1))) * 0.5).backward()
        loss_of(rm(**bf(BATCH, 2))).backward()
        rm.clip_grad_norm_(1.0)
        opt.step()
        dump_state("no_sync", rm.state_dict())
        return {}

    run_case("no_sync", no_sync)

    def dp_inner():
        """A plan whose replicas sit on neighbouring ranks (dp_inner): rank 1 is stage 0's second replica; GPT-2's
        tied embedding still syncs across its two stages."""
        model, bf = make_with_batches("gpt2", 0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        cfg = rannc_hf.RanncConfig(num_stages=2, dp_size=2, num_microbatches=2, schedule="1f1b", precision="fp32",
                                   collective_timeout_s=120)
        g = graph_for("gpt2", BATCH // 4)
        p = rannc_hf.plan(g, cluster=rannc_hf.Cluster(num_gpus=4, gpu_memory="8GiB", device="h100"), config=cfg,
                          progress=False, global_batch=BATCH)
        p.dp_inner = True
        rm = rannc_hf.RanncModule(model, opt, config=cfg, graph=g, plan=p)
        losses, norms = run_steps(rm, opt, bf)
        dump_state("gpt2_dp_inner", rm.state_dict())
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, (rm.mesh.pp_rank, rm.mesh.dp_rank))
        return {"losses": losses, "norms": norms, "ranks": ranks}

    run_case("gpt2_dp_inner", dp_inner)


if __name__ == "__main__":
    from rannc_hf.runtime.mesh import init_distributed

    init_distributed(120)
    {"ws2": ws2, "ws4": ws4}[SUITE]()
    dist.barrier()
    dist.destroy_process_group()
