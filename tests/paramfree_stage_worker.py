"""Worker for tests/test_paramfree_stage_dist.py: pipelines where a stage holds no trainable parameters.

    torchrun --standalone --nproc_per_node 2 tests/paramfree_stage_worker.py OUTDIR ws2

Plans are built by hand (``rannc_hf.plan`` then op ranges rewritten) so that one stage is a loss alone, a run of
parameter-free ops in the middle, or parameter-free preprocessing in front. Such a rank has nothing to step but
must run the same training schedule as the others (it passes gradients back). Writes ``OUTDIR/<case>.json``
(losses, grad norms, per-rank facts) and ``OUTDIR/<case>.safetensors`` (the gathered state, rank 0); a failing
case writes ``<case>_r<rank>.json`` with the error and the loop goes on.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class PreNormMLP(nn.Module):
    """Parameter-free input normalisation (several ops) in front of a small MLP: a first stage with no params."""

    def __init__(self, dim: int = 16, classes: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = x - x.mean(dim=-1, keepdim=True)
        h = h / (h.pow(2).mean(dim=-1, keepdim=True) + 1e-5).sqrt()
        h = torch.tanh(h * 1.5)
        h = torch.tanh(self.fc1(h))
        return F.cross_entropy(self.fc2(h), labels)


def make_prenorm(seed: int = 0):
    torch.manual_seed(seed)
    model = PreNormMLP()

    def batch_fn(b: int, s: int) -> dict:
        g = torch.Generator().manual_seed(s)
        return {"x": torch.randn(b, 16, generator=g), "labels": torch.randint(0, 5, (b,), generator=g)}

    return model, batch_fn


def make_model(fam: str, seed: int = 0):
    if fam == "prenorm":
        return make_prenorm(seed)
    from rannc_hf.zoo import make_with_batches

    return make_with_batches(fam, seed)


BATCH, STEPS, LR = 8, 3, 1e-3


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    import rannc_hf
    from rannc_hf.capture import capture
    from rannc_hf.runtime.mesh import init_distributed

    from dist_helpers import record_case, run_steps

    out_dir, suite = sys.argv[1], sys.argv[2]
    init_distributed(120)
    rank, world = dist.get_rank(), dist.get_world_size()

    def param_free(g, lo: int, hi: int) -> bool:
        model_params = {n for n, _ in g.module.named_parameters()}
        return not any(p in model_params for o in g.ops[lo:hi + 1] for p in o.params)

    def case(name: str, fam: str, *, stages: int, dp: int, schedule: str, ranges) -> dict:
        """``ranges(n_ops)``: the inclusive op range of every stage."""
        m = 4 // dp
        model, bf = make_model(fam)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        cfg = rannc_hf.RanncConfig(num_stages=stages, dp_size=dp, num_microbatches=m, schedule=schedule,
                                   precision="fp32", collective_timeout_s=60)
        g = capture(model, bf(BATCH // (dp * m), 0))
        p = rannc_hf.plan(g, cluster=rannc_hf.Cluster(num_gpus=world, gpu_memory="8GiB", device="h100"),
                          config=cfg, progress=False, global_batch=BATCH)
        assert len(p.stages) == stages and p.dp_size == dp, (len(p.stages), p.dp_size)
        rs = ranges(len(g.ops))
        for st, r in zip(p.stages, rs):
            st.op_range = r
        free = [i for i, (lo, hi) in enumerate(rs) if param_free(g, lo, hi)]
        assert free, f"no parameter-free stage in {rs}"
        rm = rannc_hf.RanncModule(model, opt, config=cfg, graph=g, plan=p)
        losses, norms = run_steps(rm, opt, bf, STEPS, BATCH)
        sd = rm.state_dict()
        osd = rm.optimizer_state_dict()          # gathered from every rank, the parameter-free ones included
        if rank == 0:
            save_file({k: v.detach().clone().contiguous() for k, v in sd.items()},
                      os.path.join(out_dir, name + ".safetensors"))
        n_local = [0] * world
        dist.all_gather_object(n_local, len(rm.local_parameters()))
        return {"losses": losses, "norms": norms, "cuts": rm.plan.cuts, "free_stages": free,
                "local_params": n_local, "opt_state_keys": sorted(osd["state"])}

    def run(name: str, **kw) -> None:
        record_case(out_dir, name, lambda: case(name, **kw))

    # TinyResNet (cnn): op 33 is the cross-entropy alone; ops 29..31 (add, relu, mean) read no parameters
    if suite == "ws2":
        for sched in ("1f1b", "gpipe"):
            run(f"cnn_pp2_losslast_{sched}", fam="cnn", stages=2, dp=1, schedule=sched,
                ranges=lambda n: [(0, n - 2), (n - 1, n - 1)])
        run("forkjoin_pp2_losslast_1f1b", fam="forkjoin", stages=2, dp=1, schedule="1f1b",
            ranges=lambda n: [(0, n - 2), (n - 1, n - 1)])
        run("prenorm_pp2_freefirst_1f1b", fam="prenorm", stages=2, dp=1, schedule="1f1b",
            ranges=lambda n: [(0, _first_param_op(n) - 1), (_first_param_op(n), n - 1)])
    else:
        run("cnn_pp4_losslast_1f1b", fam="cnn", stages=4, dp=1, schedule="1f1b",
            ranges=lambda n: [(0, 12), (13, 22), (23, n - 2), (n - 1, n - 1)])
        run("cnn_pp4_freemiddle_gpipe", fam="cnn", stages=4, dp=1, schedule="gpipe",
            ranges=lambda n: [(0, 16), (17, 28), (29, 31), (32, n - 1)])
        run("cnn_pp2_dp2_losslast_1f1b", fam="cnn", stages=2, dp=2, schedule="1f1b",
            ranges=lambda n: [(0, n - 2), (n - 1, n - 1)])
    dist.barrier()
    dist.destroy_process_group()


def _first_param_op(n: int) -> int:
    """Index of the first op of PreNormMLP's graph that reads a parameter (the first linear)."""
    from rannc_hf.capture import capture

    model, bf = make_prenorm(0)
    g = capture(model, bf(2, 0))
    assert len(g.ops) == n
    return next(o.index for o in g.ops if o.params)


if __name__ == "__main__":
    main()
