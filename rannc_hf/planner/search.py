"""The search: stages x replicas x microbatches x schedule x recompute x offload, scored by the simulator.

    >>> from rannc_hf.capture import capture
    >>> from rannc_hf.zoo import make
    >>> from rannc_hf.config import Cluster, RanncConfig
    >>> from rannc_hf.planner.costs import CostModel
    >>> from rannc_hf.planner.search import Searcher
    >>> g = capture(*make("gpt2", batch_size=8))
    >>> s = Searcher(CostModel.build(g, "h200"), Cluster(num_gpus=4, gpu_memory="80GiB"), RanncConfig())
    >>> best = s.run()["auto"]
    >>> best.S * best.dp
    4

For every pipeline depth ``S`` (a divisor of the GPU count; ``dp = GPUs / S``), microbatch count
``M`` (dividing the per-replica batch) and schedule, the block chain is split into ``S * v``
contiguous chunks minimising the slowest chunk's time subject to every chunk's memory fitting the
cap: a binary search on the bottleneck time ``T`` with a greedy feasibility test (fill each chunk
with as many blocks as fit under ``T`` and the memory cap, trying recompute and offload when
allowed; greedy filling is optimal for contiguous partitions with monotone constraints). Candidates
are ranked by a closed-form estimate; configurations whose lower bound cannot beat the best found
are skipped. The best few of every partitioner are then scored by the event simulator
(:mod:`.simulate`), and ``auto`` picks the fastest of all of them, so it is never worse than the
``even`` and ``params`` baselines by the same simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..config import Cluster, RanncConfig, compiles
from ..profile.devices import DeviceProfile
from .costs import BlockArrays, CostModel
from .coarsen import layer_key
from .memory import DDP_BUCKET_BYTES, compute_itemsize, in_flight, state_bytes, stage_memory
from .recompute import choose_boundaries
from .simulate import SimResult, estimate, ring_allreduce_time, simulate

OFFLOAD_ORDER = ("none", "optimizer", "params", "all")


@dataclass
class Candidate:
    """One scored plan candidate (block ranges per chunk plus every choice)."""

    partitioner: str
    S: int                      #: pipeline ranks
    v: int                      #: chunks per rank (interleaved)
    dp: int
    M: int
    mb: float                   #: microbatch size (samples)
    schedule: str
    chunks: list[tuple[int, int]]             #: block ranges, inclusive
    recompute: list[bool] = field(default_factory=list)
    segments: list[list[int]] = field(default_factory=list)  # per chunk: recompute boundaries (block j ends one)
    offload: list[str] = field(default_factory=list)
    rest_on_gpu: list[bool] = field(default_factory=list)   #: per chunk: the engine steps its rest group on the GPU
    fwd: list[float] = field(default_factory=list)
    bwd: list[float] = field(default_factory=list)
    p2p: list[float] = field(default_factory=list)
    tail: list[float] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)   #: per chunk
    rank_memory: list[int] = field(default_factory=list)
    est: float = math.inf
    sim: Optional[SimResult] = None
    dp_inner: bool = False      #: rank layout: a stage's replicas are neighbours (see runtime.mesh)

    @property
    def score(self) -> float:
        return self.sim.step_time if self.sim is not None else self.est

    def key(self) -> tuple:
        return (self.S, self.v, self.dp, self.M, self.schedule, tuple(self.chunks), tuple(self.recompute),
                tuple(self.offload))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Searcher:
    """Runs the search for one cost model, cluster and config."""

    def __init__(self, cm: CostModel, cluster: Cluster, config: RanncConfig, gpu_memory: Optional[int] = None,
                 top_k: int = 4, progress: bool = False, offload_modes: Optional[tuple[str, ...]] = None,
                 global_batch: Optional[int] = None, virtual: Optional[int] = None):
        self.cm = cm
        self.cluster = cluster
        self.config = config
        self.profile: DeviceProfile = cm.profile
        self.cap = float(gpu_memory if gpu_memory is not None else
                         (cluster.gpu_memory_bytes or self.profile.memory) * (1.0 - config.mem_margin))
        self.G = cluster.num_gpus
        self.gpn = cluster.gpus_per_node
        self.B = int(global_batch or cm.graph.batch_size)   #: global batch (all replicas, all microbatches)
        self.virtual = virtual
        self.top_k = top_k
        self.progress = progress
        self.precision = config.precision
        self.rc_opts = {"auto": (False, True), "none": (False,), "full": (True,), "selective": (True,)}[config.recompute]
        if offload_modes is not None:
            self.off_opts = offload_modes
        else:
            self.off_opts = ("none",) if config.offload in ("auto", "none") else (config.offload,)
        self.N = cm.num_blocks
        self.layer_of_block = self._layer_index()
        from ..offload.engine import device_grads_default

        self.device_grads = device_grads_default()   # GPU-stepped blocks keep their gradients there (priced)
        # ranks of one node step their CPU-side optimizer state at the same time, sharing the host's memory bus:
        # each gets this share of the profile's host rates (a node's rate, measured with one process per node)
        self.host_share = 1.0 / max(1, min(self.gpn, self.G))
        self.notes: list[str] = []

    # ---- configuration space ------------------------------------------------------------
    def configs(self) -> list[tuple[int, int, int, str, int]]:
        """(S, v, dp, schedule, M) tuples allowed by the cluster, batch and config."""
        cfg = self.config
        out = []
        stages = divisors(self.G)
        if cfg.num_stages is not None:
            stages = [cfg.num_stages]
        if cfg.dp_size is not None:
            stages = [s for s in stages if s * cfg.dp_size == self.G]
        for S in stages:
            if self.G % S:
                continue
            dp = self.G // S
            if self.B % dp or S > self.N:
                continue
            per_replica = self.B // dp
            Ms = divisors(per_replica)
            if cfg.num_microbatches is not None:
                Ms = [cfg.num_microbatches] if per_replica % cfg.num_microbatches == 0 else []
            scheds = ("gpipe", "1f1b", "interleaved-1f1b") if cfg.schedule == "auto" else (cfg.schedule,)
            for sch in scheds:
                for M in Ms:
                    if S == 1:
                        if sch == "interleaved-1f1b" or (sch == "gpipe" and cfg.schedule == "auto"):
                            continue
                        out.append((S, 1, dp, sch, M))
                        continue
                    if sch == "1f1b" and M < S:
                        continue
                    if sch == "interleaved-1f1b":
                        if M % S:
                            continue
                        for v in ((self.virtual,) if self.virtual else (2, 4)):
                            if S * v <= self.N and v > 1:
                                out.append((S, v, dp, sch, M))
                        continue
                    out.append((S, 1, dp, sch, M))
        return out

    # ---- helpers ------------------------------------------------------------------------------
    def _layer_index(self) -> list[int]:
        keys = [layer_key(self.cm.graph.ops[a].module) for a, _ in self.cm.blocks]
        idx, seen, cur = [], set(), -1
        for k in keys:
            if k and any(ch.isdigit() for ch in k.split(".")[-1]) and k not in seen:
                seen.add(k)
                cur += 1
            idx.append(max(cur, 0))
        return idx

    def _inflight(self, c: int, S: int, v: int, M: int, sch: str) -> float:
        return in_flight(sch, c % S, S, M, v)

    # Two rank layouts (runtime.mesh): pp-inner (a replica's stages are neighbours: p2p on NVLink, the
    # data-parallel all-reduce crosses nodes) and dp-inner (a stage's replicas are neighbours, as in Megatron
    # and DeepSpeed's pipe/data topology: all-reduce on NVLink, stage boundaries cross nodes).
    def _dp_bw(self, S: int, dp: int, dp_inner: bool = False) -> float:
        if S * dp <= self.gpn or (dp_inner and dp <= self.gpn and self.gpn % dp == 0):
            return self.profile.intra_node_bw
        if dp_inner:   # one replica group spans whole nodes: a ring crosses each node boundary once
            return self.profile.inter_node_bw
        return min(self.profile.intra_node_bw, self.profile.inter_node_bw / max(1, min(S, self.gpn)))

    def _p2p_bw(self, c: int, S: int, dp: int = 1, dp_inner: bool = False) -> float:
        r0, r1 = c % S, (c + 1) % S
        if dp_inner:   # ranks r*dp .. r*dp+dp-1; all of a node's GPUs send across at once when dp >= gpn
            if S * dp <= self.gpn:
                return self.profile.intra_node_bw
            if (r0 * dp) // self.gpn == (r1 * dp) // self.gpn:
                return self.profile.intra_node_bw
            return self.profile.inter_node_bw / max(1, min(dp, self.gpn))
        same = (r0 // self.gpn) == (r1 // self.gpn) if S > self.gpn else True
        return self.profile.intra_node_bw if same else self.profile.inter_node_bw

    def _layouts(self, S: int, dp: int) -> tuple[bool, ...]:
        """The rank layouts worth pricing (``dp_inner`` values): both once a plan spans several nodes."""
        return (False, True) if S > 1 and dp > 1 and S * dp > self.gpn else (False,)

    # ---- partitioners ---------------------------------------------------------------------
    def _greedy(self, a: BlockArrays, T: float, C: int, S: int, v: int, M: int, sch: str,
                cap: float, cut_ok: Optional[list[bool]] = None) -> Optional[list[tuple[int, int]]]:
        f, b, sv, po, cr = self._lists(a)
        N = self.N
        pf = self.cm.params_first
        buf = self.cm.buffer_first
        rc_opts = self.rc_opts
        state_rate = {off: state_bytes(1.0, self.precision, off, 8, self.config.prefetch_blocks)["total"]
                      for off in self.off_opts}
        min_rate = min(state_rate.values())
        dp_buf = 2 * DDP_BUCKET_BYTES if self.G // S > 1 else 0
        chunks = []
        start = 0
        for c in range(C):
            if start >= N:
                break
            k = self._inflight(c, S, v, M, sch)
            ccap = cap / v
            F = Bw = A = Cin = P = BUF = 0.0
            maxA = maxO = 0.0
            cin = cr[start - 1] if start > 0 else 0.0
            last_ok = -1
            for j in range(start, N):
                F += f[j]; Bw += b[j]; A += sv[j]; P += pf[j]; BUF += buf[j]
                Cin += cr[j - 1] if j > 0 else 0.0
                if sv[j] > maxA:
                    maxA = sv[j]
                if po[j] > maxO:
                    maxO = po[j]
                fixed = BUF + 2.0 * (cin + cr[j]) + 2.0 * maxO + dp_buf + P * min_rate
                ok = False
                for rc in rc_opts:
                    t = F * (2.0 if rc else 1.0) + Bw
                    if t > T:
                        continue
                    acts = k * Cin + maxA if rc else k * A
                    if fixed + acts <= ccap:
                        ok = True
                        break
                if not ok:
                    break
                if cut_ok is None or cut_ok[j] or j == N - 1:
                    last_ok = j
            if last_ok < start:
                return None
            chunks.append((start, last_ok))
            start = last_ok + 1
        if start < N:
            return None
        return self._split_to(chunks, C, f, b, cr, self._has_params())

    def _has_params(self) -> list[bool]:
        """Per block: does it use a trainable parameter."""
        if getattr(self, "_hp", None) is None:
            ps = self.cm.graph.params
            self._hp = [any(p in ps and ps[p].requires_grad and not ps[p].is_buffer for p in names)
                        for names in self.cm.block_params]
        return self._hp

    def _split_to(self, chunks: list[tuple[int, int]], C: int, f, b,
                  cross=None, has_params=None) -> Optional[list[tuple[int, int]]]:
        """Split the heaviest multi-block chunks until there are exactly ``C``.

        With ``cross`` (bytes crossing the cut after each block) a split goes only where few bytes cross (at
        most twice the cheapest place left): splitting never raises the slowest chunk, but a cut through a
        wide tensor (a large-vocabulary head's logits) costs a large send every microbatch. With
        ``has_params`` (per block) a split that leaves either half without trainable parameters (a loss-only
        last stage) is taken only when there is no other."""
        chunks = list(chunks)
        if cross is not None:
            return self._split_cheap(chunks, C, f, b, cross, has_params)
        while len(chunks) < C:
            best, bi = -1.0, -1
            for i, (lo, hi) in enumerate(chunks):
                if hi > lo:
                    t = sum(f[lo:hi + 1]) + sum(b[lo:hi + 1])
                    if t > best:
                        best, bi = t, i
            if bi < 0:
                return None
            lo, hi = chunks[bi]
            acc, cut = 0.0, lo
            for j in range(lo, hi):
                acc += f[j] + b[j]
                cut = j
                if acc >= best / 2:
                    break
            chunks[bi:bi + 1] = [(lo, cut), (cut + 1, hi)]
        return chunks

    @staticmethod
    def _split_cheap(chunks: list[tuple[int, int]], C: int, f, b, cross,
                     has_params=None) -> Optional[list[tuple[int, int]]]:
        pre = [0.0]
        for x, y in zip(f, b):
            pre.append(pre[-1] + x + y)
        npar = [0]
        for h in (has_params if has_params is not None else [True] * len(f)):
            npar.append(npar[-1] + (1 if h else 0))
        while len(chunks) < C:
            places = [(cross[j], i, j) for i, (lo, hi) in enumerate(chunks) for j in range(lo, hi)]
            both = [p for p in places if npar[p[2] + 1] > npar[chunks[p[1]][0]]
                    and npar[chunks[p[1]][1] + 1] > npar[p[2] + 1]]
            places = both or places
            if not places:
                return None
            limit = 2.0 * min(p[0] for p in places)
            best, pick = -1.0, None
            for x, i, j in places:   # among the cheap cuts, the one leaving the most even halves
                if x > limit:
                    continue
                lo, hi = chunks[i]
                even = min(pre[j + 1] - pre[lo], pre[hi + 1] - pre[j + 1])
                if even > best:
                    best, pick = even, (i, j)
            i, j = pick
            lo, hi = chunks[i]
            chunks[i:i + 1] = [(lo, j), (j + 1, hi)]
        return chunks

    def cheap_cuts(self, a: BlockArrays) -> list[bool]:
        """Where a cut is cheap: at most 1.5x the bytes of the thinnest tenth of all cuts (for a transformer,
        the residual stream between layers); never through a wide tensor such as a large head's logits."""
        hit = getattr(a, "_cheap", None)
        if hit is None:
            cr = self._lists(a)[4]
            inner = sorted(cr[:-1]) or [0.0]
            limit = 1.5 * inner[len(inner) // 10]
            hit = [x <= limit for x in cr[:-1]] + [True]
            a._cheap = hit  # type: ignore[attr-defined]
        return hit

    def _lists(self, a: BlockArrays):
        cache = getattr(a, "_lists", None)
        if cache is None:
            cache = (a.fwd.tolist(), a.bwd.tolist(), a.saved.tolist(), a.peak_out.tolist(), a.cross.tolist())
            a._lists = cache  # type: ignore[attr-defined]
        return cache

    def partition_auto(self, a: BlockArrays, S: int, v: int, M: int, sch: str,
                       cut_ok: Optional[list[bool]] = None) -> Optional[list[tuple[int, int]]]:
        C = S * v
        f, b, *_ = self._lists(a)
        per = [x + y for x, y in zip(f, b)]
        total = sum(per) * 2.0 + 1e-12
        lo = max(per)
        hi = total
        best = self._greedy(a, hi, C, S, v, M, sch, self.cap, cut_ok)
        if best is None:
            return None
        for _ in range(40):
            if hi - lo <= 1e-3 * hi:
                break
            mid = 0.5 * (lo + hi)
            r = self._greedy(a, mid, C, S, v, M, sch, self.cap, cut_ok)
            if r is None:
                lo = mid
            else:
                hi, best = mid, r
        return best

    def partition_even(self, C: int) -> Optional[list[tuple[int, int]]]:
        """Equal numbers of layers per chunk (blocks outside layers go with their neighbours)."""
        N = self.N
        if C > N:
            return None
        L = max(self.layer_of_block) + 1
        if L < C:  # fewer layers than chunks: equal numbers of blocks
            return [(round(i * N / C), round((i + 1) * N / C) - 1) for i in range(C)]
        bounds = []
        for i in range(1, C):
            target = round(i * L / C)
            j = next((k for k in range(N) if self.layer_of_block[k] >= target), N - 1)
            bounds.append(j)
        out, start = [], 0
        for j in bounds:
            j = max(j, start + 1)
            out.append((start, j - 1))
            start = j
        out.append((start, N - 1))
        if any(hi < lo for lo, hi in out) or out[-1][0] > N - 1:
            return None
        return out

    def partition_params(self, C: int) -> Optional[list[tuple[int, int]]]:
        """Equal parameter bytes per chunk (DeepSpeed's ``parameters`` method): minimise the largest."""
        w = [float(x) for x in self.cm.params_first]
        N = self.N
        if C > N:
            return None
        lo, hi = max(w), sum(w) + 1.0
        best = [(0, N - 1)] if C >= 1 else None  # feasible at hi = everything in one chunk
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            chunks, start, acc = [], 0, 0.0
            for j in range(N):
                if acc + w[j] > mid and j > start:
                    chunks.append((start, j - 1))
                    start, acc = j, 0.0
                acc += w[j]
            chunks.append((start, N - 1))
            if len(chunks) <= C:
                best, hi = chunks, mid
            else:
                lo = mid
            if hi - lo < 1e-6 * hi:
                break
        if best is None:
            return None
        f = [1.0] * N
        return self._split_to(best, C, f, [0.0] * N)

    # ---- evaluation -----------------------------------------------------------------------
    def evaluate(self, part: str, chunks: list[tuple[int, int]], S: int, v: int, dp: int, M: int,
                 sch: str) -> Optional[Candidate]:
        """Choose recompute/offload per chunk (fastest that fits), compute memory, times and the estimate."""
        cm = self.cm
        mb = self.B / (dp * M)
        a = cm.at(mb)
        cand = Candidate(part, S, v, dp, M, mb, sch, chunks)
        prof = self.profile
        ci = compute_itemsize(self.precision)
        chunk_params = []
        couts: list[float] = []
        arrays: dict[tuple[bool, bool], BlockArrays] = {}   # per way a stage may run (see _variant_key)
        cr = self._lists(a)[4]
        # the runtime steps blocks inside backward only on ranks without replicas or weights tied to other ranks
        # (their gradients are all-reduced after the pass): StageOffload.before_run
        tied = self._tied_holders(chunks, S)
        tied_ranks = set().union(*tied.values())
        for c, (lo, hi) in enumerate(chunks):
            early = self.config.step_in_backward and dp == 1 and c % S not in tied_ranks
            n_par, buf, names = cm.stage_params(lo, hi)
            rest = cm.outside_layers(lo, hi, names)
            chunk_params.append(n_par)
            k = self._inflight(c, S, v, M, sch)
            cin = cr[lo - 1] if lo > 0 else 0.0
            cout = cr[hi]
            layers = self._layers_in(lo, hi)
            best = None
            for off in self.off_opts:
                for rc in self.rc_opts:
                    key = self._variant_key(off, rc)
                    av = arrays.get(key)
                    if av is None:
                        av = arrays[key] = cm.variant(*key).at(mb)
                    f, b, sv, po, _ = self._lists(av)
                    F = sum(f[lo:hi + 1]); Bw = sum(b[lo:hi + 1]); A = sum(sv[lo:hi + 1])
                    if av.host_fwd is not None:   # eager: the host launches kernels no faster than this
                        F = max(F, float(av.host_fwd[lo:hi + 1].sum()))
                        Bw = max(Bw, float(av.host_bwd[lo:hi + 1].sum()))
                    seg = choose_boundaries(av.cross[lo:hi], av.saved[lo:hi + 1], k) if rc else None
                    Cin = (seg.kept_bytes if seg else 0.0) + cin  # + the stage's own input
                    maxA = seg.max_segment_bytes if seg else 0.0
                    maxO = max(po[lo:hi + 1])
                    mem = stage_memory(n_par, buf, A, Cin, maxA, maxO, cin, cout, k, self.precision, rc, off,
                                       layers or hi - lo + 1, self.config.prefetch_blocks, dp,
                                       resident_params=rest if off != "none" else 0.0)
                    if mem["total"] > self.cap / v:
                        continue
                    t_f, t_b = F, Bw + (F if rc else 0.0)
                    opt_t, exp_mb, rest_gpu, dev_acc = self._optimizer_time(
                        n_par, off, F, Bw, M, hi - lo + 1, rc, ci, headroom=self.cap / v - mem["total"], rest=rest,
                        layers=layers, early=early)
                    if dev_acc:   # the fp32 gradient sums are part of the stage's peak
                        mem["grad_sum"] = int(4 * n_par)
                        mem["total"] += mem["grad_sum"]
                    score = M * (t_f + t_b + exp_mb) + opt_t
                    if best is None or score < best[0]:
                        best = (score, rc, off, mem, t_f + exp_mb / 2, t_b + exp_mb / 2, opt_t, rest_gpu, seg)
            if best is None:
                return None
            _, rc, off, mem, t_f, t_b, opt_t, rest_gpu, seg = best
            cand.rest_on_gpu.append(rest_gpu)
            cand.recompute.append(rc)
            cand.segments.append([lo + j for j in seg.boundaries] if rc and seg else [])
            cand.offload.append(off)
            cand.memory.append(mem)
            cand.fwd.append(t_f)
            cand.bwd.append(t_b)
            couts.append(cout)
            cand.tail.append(opt_t)
        # per rank: memory and tails (dp all-reduce, tied all-reduce, optimizer)
        R = S
        rank_mem = [0] * R
        tails = [0.0] * R
        rank_b = [0.0] * R
        rank_params = [0] * R
        for c in range(len(chunks)):
            r = c % R
            rank_mem[r] += cand.memory[c]["total"]
            tails[r] += cand.tail[c]
            rank_b[r] += cand.bwd[c]
            rank_params[r] += chunk_params[c]
        if max(rank_mem) > self.cap:
            return None
        cand.rank_memory = rank_mem
        base = tails
        for dp_inner in self._layouts(S, dp):
            p2p = [cout / self._p2p_bw(c, S, dp, dp_inner) + prof.p2p_latency if c < len(chunks) - 1 else 0.0
                   for c, cout in enumerate(couts)]
            tails = list(base)
            bw = self._dp_bw(S, dp, dp_inner)
            for r in range(R):
                ar = ring_allreduce_time(rank_params[r] * 4.0, dp, bw, prof.collective_latency)
                tails[r] += max(0.0, ar - rank_b[r] / max(1, v))
            for r, t in self._tied_times(tied, S, dp, dp_inner).items():
                tails[r] += t
            est = estimate(cand.fwd, cand.bwd, M, sch, p2p, v, tails)
            if est < cand.est:
                cand.p2p, cand.tail, cand.est, cand.dp_inner = p2p, tails, est, dp_inner
        return cand

    def _variant_key(self, off: str, rc: bool) -> tuple[bool, bool]:
        """Which :meth:`~rannc_hf.planner.costs.CostModel.variant` prices a stage run with offload ``off`` and
        recompute ``rc``: the offload engine computes with bf16 working copies on GPUs (precision bf16), and a
        stage without recompute runs compiled when ``config.compile`` says so (:func:`~rannc_hf.config.compiles`),
        as the runtime does (checkpointed segments stay eager)."""
        gpu = self.profile.name != "cpu"
        weights = off != "none" and self.precision == "bf16" and gpu
        compiled = not rc and compiles(self.config.compile, self.precision, gpu)
        return weights, compiled

    def _layers_in(self, lo: int, hi: int) -> int:
        """Repeated layers among blocks ``lo..hi``: the engine's offload blocks (each layer is one)."""
        return len(set(self.layer_of_block[lo:hi + 1]))

    def _gpu_step_fraction(self, off: str, n_par: float, layers: int, headroom: float) -> float:
        """The share of a stage's parameters the engine will step on the GPU: ``gpu_step_blocks: auto``'s rule
        over the stage's ``layers`` (the memory headroom, as the runtime resolves it, whole layers at a time:
        GPT-2 1.3B's 24 layers with 5.8 GB left get 9, not the 48% a continuous share would); 0 on a CPU
        profile. An explicit block count is priced by the same rule."""
        if off not in ("optimizer", "all") or self.profile.name == "cpu" or layers < 1:
            return 0.0
        from ..offload.cost import choose_gpu_step_blocks

        state = 8.0 + (4.0 if self.device_grads else 0.0)
        return choose_gpu_step_blocks([n_par / layers] * layers, headroom, state) / layers

    def _rest_options(self, off: str, rest: float, headroom: float) -> tuple[bool, ...]:
        """Where a stage's rest group (embeddings, heads) may step: ``(False,)`` (the host), or also ``True`` (the
        GPU) with ``gpu_step_blocks: auto`` and room for its master, gradients and AdamW state, which takes room
        from GPU-stepped blocks; the cheaper one is planned and the runtime follows the plan.
        ``RANNC_HF_OFFLOAD_GPU_STEP_REST=0/1`` forces one. Host only on a CPU profile."""
        from ..config import env_flag
        from ..offload.cost import choose_gpu_step_rest

        if off not in ("optimizer", "all") or self.profile.name == "cpu" or rest <= 0:
            return (False,)
        forced = env_flag("RANNC_HF_OFFLOAD_GPU_STEP_REST")
        if forced is not None:
            return (bool(forced),)
        fits = self.config.gpu_step_blocks == "auto" and choose_gpu_step_rest(rest, headroom)
        return (False, True) if fits else (False,)

    def _stream_step_fraction(self, off: str, n_par: float, layers: int, gpu_share: float, ci: int) -> float:
        """The share of a stage's CPU-side layers the engine will step on the GPU with their state streamed
        (``stream_step_blocks``: auto's rule, :func:`~rannc_hf.offload.cost.choose_stream_step_blocks`, or the
        configured count); 0 on a CPU profile."""
        from ..config import env_int

        forced = env_int("RANNC_HF_OFFLOAD_STREAM_STEP")
        want = forced if forced is not None else self.config.stream_step_blocks
        if off not in ("optimizer", "all") or self.profile.name == "cpu" or layers < 1:
            return 0.0
        k = int(round(gpu_share * layers))
        if k >= layers:
            return 0.0
        if want != "auto":
            return min(int(want), layers - k) / (layers - k)
        from ..offload.cost import choose_stream_step_blocks

        prof = self.profile
        per = n_par / layers
        n = choose_stream_step_blocks([per] * (layers - k), per * k, device_grads=self.device_grads,
                                      compute_itemsize=ci, state_bytes_per_param=8.0, link_bps=prof.h2d_bw,
                                      duplex_bps=prof.duplex_bw,
                                      cpu_adam_params_per_s=prof.cpu_adam_params_per_s * self.host_share)
        return n / (layers - k)

    def _optimizer_time(self, n_par: float, off: str, F: float, Bw: float, M: int, nblocks: int, rc: bool,
                        ci: int, headroom: float = 0.0, rest: float = 0.0,
                        layers: Optional[int] = None, early: Optional[bool] = None) -> tuple[float, float, bool, bool]:
        """(optimizer step seconds, exposed offload copy seconds per microbatch, rest group stepped on the GPU,
        micro-batch gradients summed on the GPU); ``layers``: the engine's blocks in the stage (default
        ``nblocks``); ``early``: blocks step inside backward (default: the config's ``step_in_backward``)."""
        early = self.config.step_in_backward if early is None else early
        prof = self.profile
        gpu_opt = n_par * 28.0 / (prof.mem_bw * prof.bw_efficiency)  # fused AdamW: read p,g,m,v; write p,m,v
        if off == "none":
            return gpu_opt, 0.0, False, False
        try:
            from ..offload.cost import gpu_step_rest_bytes, use_device_accumulation

            dev_acc = prof.name != "cpu" and use_device_accumulation(M, n_par, headroom)  # as the runtime decides
            if dev_acc:
                headroom -= 4.0 * n_par
            best = None
            for rest_gpu in self._rest_options(off, rest, headroom):
                room = headroom - (gpu_step_rest_bytes(rest) if rest_gpu else 0.0)
                oc = self._offload_cost(n_par, off, F, Bw, M, nblocks, rc, ci, room, rest, layers, dev_acc, rest_gpu,
                                        early)
                if best is None or oc.step_time < best[0].step_time:
                    best = (oc, rest_gpu)
            oc, rest_gpu = best
            return oc.optimizer_time, oc.exposed_copy_time / max(1, M), rest_gpu, dev_acc
        except ImportError:  # pragma: no cover
            copy = n_par * ci / prof.h2d_bw
            exposed = max(0.0, copy - (F + Bw)) if off in ("params", "all") else 0.0
            opt = n_par / prof.cpu_adam_params_per_s if off in ("optimizer", "all") else gpu_opt + 12 * n_par / prof.h2d_bw
            return opt, exposed, False, False

    def _offload_cost(self, n_par: float, off: str, F: float, Bw: float, M: int, nblocks: int, rc: bool, ci: int,
                      headroom: float, rest: float, layers: Optional[int], dev_acc: bool, rest_gpu: bool,
                      early: bool):
        """The engine's cost model for one stage as the runtime will run it (GPU-stepped and streamed shares
        resolved from ``headroom`` by the runtime's rules)."""
        from ..offload.cost import offload_cost

        prof = self.profile
        host = self.host_share
        share = self._gpu_step_fraction(off, n_par - rest, layers or nblocks, headroom)
        idle = prof.cpu_adam_idle_params_per_s
        return offload_cost(param_bytes=n_par * 4.0, grad_bytes=n_par * ci, optim_bytes=n_par * 8.0,
                            fwd_time=F, bwd_time=Bw, link_gbps=prof.h2d_bw / 1e9,
                            cpu_adam_params_per_s=prof.cpu_adam_params_per_s * host, mode=off, num_blocks=nblocks,
                            prefetch_blocks=self.config.prefetch_blocks, microbatches=M, compute_itemsize=ci,
                            duplex_gbps=prof.duplex_bw / 1e9, recompute=rc, gpu_step_fraction=share,
                            stream_step_fraction=self._stream_step_fraction(off, n_par - rest, layers or nblocks,
                                                                            share, ci),
                            rest_params=rest, device_accumulate=dev_acc,
                            host_fold_params_per_s=prof.host_fold_params_per_s * host, device_grads=self.device_grads,
                            block_host_time=prof.offload_block_host_s, engine_blocks=layers or nblocks,
                            step_in_backward=early, gpu_step_rest=rest_gpu,
                            param_overhead_s=prof.offload_param_overhead_s,
                            cpu_adam_idle_params_per_s=None if idle is None else idle * host)

    def _tied_holders(self, chunks: list[tuple[int, int]], S: int) -> dict[str, set[int]]:
        """Trainable parameters used by several pipeline ranks (tied embeddings) -> those ranks."""
        cm = self.cm
        holders: dict[str, set[int]] = {}
        for c, (lo, hi) in enumerate(chunks):
            for j in range(lo, hi + 1):
                for p in cm.block_params[j]:
                    holders.setdefault(p, set()).add(c % S)
        out = {}
        for p, ranks in holders.items():
            info = cm.graph.params.get(p)
            if len(ranks) >= 2 and info is not None and not info.is_buffer and info.requires_grad:
                out[p] = ranks
        return out

    def _tied_times(self, tied: dict[str, set[int]], S: int, dp: int = 1,
                    dp_inner: bool = False) -> dict[int, float]:
        """Gradient all-reduce time of the parameters in ``tied`` (:meth:`_tied_holders`: used by several pipeline
        ranks, tied embeddings) on each rank."""
        out: dict[int, float] = {}
        for p, ranks in tied.items():
            info = self.cm.graph.params[p]
            spans = S * (dp if dp_inner else 1) > self.gpn   # a replica's pipeline ranks are dp apart when dp-inner
            bw = self.profile.inter_node_bw if spans else self.profile.intra_node_bw
            t = ring_allreduce_time(info.numel * 4.0, len(ranks), bw, self.profile.collective_latency)
            for r in ranks:
                out[r] = out.get(r, 0.0) + t
        return out

    # ---- driver -----------------------------------------------------------------------------
    def lower_bound(self, S: int, v: int, dp: int, M: int) -> float:
        a = self.cm.at(self.B / (dp * M))
        W = float(a.fwd.sum() + a.bwd.sum())
        return (M - 1) * W / S + W / (S * v) if S > 1 else M * W

    def run(self, partitioners: tuple[str, ...] = ("auto", "even", "params"),
            callback: Optional[Callable[[], None]] = None) -> dict[str, Candidate]:
        """Best candidate per partitioner (``auto`` = best of everything); missing key: nothing fits."""
        configs = self.configs()
        order = sorted(configs, key=lambda c: self.lower_bound(c[0], c[1], c[2], c[4]))
        pools: dict[str, list[Candidate]] = {p: [] for p in partitioners}
        best_est = {p: math.inf for p in partitioners}
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(order), desc="planning", unit="cfg", leave=False)
        for (S, v, dp, sch, M) in order:
            if bar is not None:
                bar.update(1)
            lb = self.lower_bound(S, v, dp, M)
            if all(lb >= best_est[p] for p in partitioners):
                continue
            a = self.cm.at(self.B / (dp * M))
            for p in partitioners:
                if lb >= best_est[p]:
                    continue
                if p == "auto":   # cuts anywhere, and cuts only where few bytes cross (see cheap_cuts)
                    parts = [self.partition_auto(a, S, v, M, sch)]
                    cheap = self.partition_auto(a, S, v, M, sch, self.cheap_cuts(a))
                    hp = self._has_params()
                    if cheap and cheap != parts[0] and all(any(hp[lo:hi + 1]) for lo, hi in cheap):
                        parts.append(cheap)   # not with a parameter-free stage: a loss alone idles its GPU
                elif p == "even":
                    parts = [self.partition_even(S * v)]
                else:
                    parts = [self.partition_params(S * v)]
                for chunks in parts:
                    if not chunks or len(chunks) != S * v:
                        continue
                    cand = self.evaluate(p, chunks, S, v, dp, M, sch)
                    if cand is None:
                        continue
                    pools[p].append(cand)
                    best_est[p] = min(best_est[p], cand.est)
        if bar is not None:
            bar.close()
        out: dict[str, Candidate] = {}
        for p in partitioners:
            pool = sorted(pools[p], key=lambda c: c.est)[: self.top_k]
            for c in pool:
                self._simulate(c)
            pools[p] = pool
        for p in partitioners:
            pool = list(pools[p])
            if p == "auto":  # auto is the best plan of every partitioner
                for q in partitioners:
                    pool += pools[q]
            if pool:
                out[p] = min(pool, key=lambda c: c.score)
        return out

    def _simulate(self, c: Candidate, keep_timeline: bool = False) -> SimResult:
        c.sim = simulate(c.fwd, c.bwd, c.M, c.schedule, c.p2p, c.v, c.tail, keep_timeline=keep_timeline)
        return c.sim

    # ---- when nothing fits -------------------------------------------------------------------
    def feasible_with(self, cap: float) -> bool:
        """Does any configuration fit a per-GPU cap of ``cap`` bytes (most memory-saving options)?"""
        saved = self.cap
        self.cap = cap
        try:
            for (S, v, dp, sch, M) in self.configs():
                if sch == "gpipe" and S > 1:
                    continue
                a = self.cm.at(self.B / (dp * M))
                chunks = self._greedy(a, math.inf, S * v, S, v, M, sch, cap)
                if chunks and self.evaluate("auto", chunks, S, v, dp, M, sch) is not None:
                    return True
            return False
        finally:
            self.cap = saved
