"""The outer search: mesh shapes x microbatch counts x schedules x stage sizes, pruned by a bound.

Candidates: every (pp, dp, tp) with pp*dp*tp = world size, tp dividing the node size (tensor
parallelism stays inside a node), pp <= number of blocks, every microbatch count m with
B % (dp m) == 0 (and m >= pp for pipelines: torch.distributed.pipelining's schedules, which the
runtime uses, refuse fewer microbatches than stages), the schedules of :func:`.pipeline.schedules` and the stage sizes of
:func:`.pipeline.partitions`. Constraints pin any of these.

Pruning (loss-free): every candidate gets a lower bound from the per-node compute alone,

    LB = (m - 1/v) W / p + W / v,   W = sum over all nodes of min_strategy fwd+bwd time,

which no plan of that candidate can beat (T = (m - 1/v) t_max + sum_i t_i / v and
t_max >= sum_i t_i / p >= W / p). Candidates are solved in increasing LB order and the search
stops when the next LB is not below the fastest plan found: that plan is optimal over all
candidates. If the time limit stops it first, the gap to the smallest unexplored LB is reported.

Choice among near-ties (``SolverOptions.prefer_simpler_within``, tol): the plan kept is the
simplest (fewer stages, then less tensor parallelism, then fewer microbatches) among those
predicted within tol of the fastest, so the search also solves simpler candidates whose LB is
within tol; the plan says so in its shortcuts when this changed the pick. tol = 0 (the
default) is the plain optimum.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from autopar.cost_model.cluster import Cluster
from autopar.cost_model.compute import backward_time, op_time
from autopar.cost_model.device import DeviceSpec

from . import backend, formulation
from .costed import (Candidate, CostedGraph, GraphStructure, _dtype, _elem_bytes, _op_kind,
                     annotate)
from .evaluate import Breakdown, Decision, evaluate, memory_lower_bound
from .options import InfeasibleError, SolveResult, SolverOptions
from .pipeline import partitions, schedules, stage_devices
from .strategies import StrategyRegistry


@dataclass
class SearchOutcome:
    costed: CostedGraph
    decision: Decision
    breakdown: Breakdown
    result: SolveResult
    candidates: int  # candidates whose ILP was solved
    enumerated: int  # candidates generated
    shortcuts: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def meshes(cluster: Cluster, num_blocks: int, allowed: frozenset, constraints: dict) -> list[tuple[int, int, int]]:
    W = cluster.world_size
    node = min(g.devices_per_node for g in cluster.groups)
    out = []
    for tp in _divisors(W):
        if tp > node or node % tp or (tp > 1 and "tp" not in allowed):
            continue
        for pp in _divisors(W // tp):
            dp = W // (tp * pp)
            if pp > 1 and ("pp" not in allowed or pp > num_blocks):
                continue
            if dp > 1 and "dp" not in allowed:
                continue
            pin = {"tp": tp, "pp": pp, "dp": dp}
            if any(k in constraints and constraints[k] != v for k, v in pin.items()):
                continue
            out.append((pp, dp, tp))
    return out


def _lower_bound_work(struct: GraphStructure, cand: Candidate, devices: list[DeviceSpec], precision: str
                      ) -> dict[str, float]:
    """Fastest possible fwd+bwd time of one microbatch, per place: one block, prefix, suffix."""
    dtype = _dtype(precision)
    g = struct.graph
    m = cand.num_microbatches
    best_dev = max(devices, key=lambda d: d.peak_flops[dtype] * d.matmul_eff_max[dtype])
    W = {"block": 0.0, "prefix": 0.0, "suffix": 0.0}
    for u in struct.units:
        info = g.nodes[u]
        kind = _op_kind(info)
        if kind is None:
            continue
        b = struct.batched[u]
        div = cand.dp * cand.tp
        flops = info.flops / (m if b else 1) / div
        moved = sum(o.numel * _elem_bytes(o, precision) for o in info.outputs) / (m if b else 1) / div
        t = op_time(flops, moved, dtype, best_dev, kind=kind)
        W[struct.place[u]] += t + backward_time(t, kind=kind)
    return W


def _pipeline_bound(W: dict[str, float], cand: Candidate) -> float:
    """T >= (m - 1/v) max_i t_i + sum_i t_i / v with t_i >= k_i W_block (+ prefix, suffix)."""
    p, m, v = cand.pp, cand.num_microbatches, cand.virtual_stages
    parts = cand.partition or (0,)
    t = [k * W["block"] + (W["prefix"] if i == 0 else 0.0) + (W["suffix"] if i == p - 1 else 0.0)
         for i, k in enumerate(parts)]
    if len(t) != p:  # no blocks (pp == 1)
        t = [W["block"] + W["prefix"] + W["suffix"]]
    return (m - 1.0 / v) * max(t) + sum(t) / v


def search(struct: GraphStructure, registry: StrategyRegistry, cluster: Cluster, *, precision: str, optimizer: str,
           options: SolverOptions, constraints: dict) -> SearchOutcome:
    t_start = time.perf_counter()
    deadline = t_start + options.time_limit_s
    B = struct.graph.batch_size
    L = struct.num_blocks
    allowed = options.allowed
    dtype = _dtype(precision)
    shortcuts: list[str] = []
    if struct.blocks:
        shortcuts.append(f"block deduplication: the {L} identical blocks share one sharding strategy "
                         f"(solved once on {struct.rep_block}; loss-free when memory does not bind, tested; "
                         f"under memory pressure mixing strategies across blocks is not explored); "
                         f"recompute/offload are exact per-block counts")
    elif struct.dedupe_note:
        shortcuts.append(struct.dedupe_note)
    shortcuts.append("data parallelism keeps the batch dim sharded on dp; the ILP chooses tp placements")
    shortcuts.append("outer search pruned by lower bounds (compute-only, then an LP relaxation per "
                     "mesh x microbatch count; loss-free)")
    shortcuts.append("GPipe not tried unless pinned: same time as 1F1B, more activation memory (loss-free)")

    bn = struct.batch_statistics
    if bn:
        shortcuts.append(f"one microbatch: batch norm ({bn[0]}{' and others' if len(bn) > 1 else ''}) "
                         "normalises with whole-batch statistics, so no pipeline (it needs microbatches)")
    cands: list[tuple[float, Candidate, list[DeviceSpec]]] = []
    work: dict = {}
    partial_partitions = False
    num_blocks_for_pp = L if struct.blocks else 0
    for pp, dp, tp in meshes(cluster, num_blocks_for_pp, allowed, constraints):
        if pp > 1 and tp > 1 and not options.allow_pp_with_tp:
            continue
        devs = stage_devices(cluster, pp, dp, tp)
        if devs is None:
            continue
        if B % dp:
            continue
        ms = _divisors(B // dp)
        if pp > 1:  # torch.distributed.pipelining's schedules (the runtime's) need m >= pp
            ms = [m for m in ms if m >= pp]
        if bn:  # each microbatch would normalise with its own rows: one microbatch only
            ms = [m for m in ms if m == 1]
        if "num_microbatches" in constraints:
            ms = [m for m in ms if m == constraints["num_microbatches"]]
        if "microbatch_size" in constraints:
            ms = [m for m in ms if B // (dp * m) == constraints["microbatch_size"]]
        if pp > 1:
            parts, complete = partitions(L, devs, dtype, options.max_partitions)
        else:
            parts, complete = [(L,)], True
        if not complete:
            partial_partitions = True
        for m in ms:
            for sched, v in schedules(pp, L, m, constraints.get("schedule")):
                plist = parts if v == 1 else [tuple([L // pp] * pp)]
                for part in plist:
                    cand = Candidate(pp, dp, tp, m, sched, v, part)
                    wkey = (pp, dp, tp, m)
                    if wkey not in work:
                        work[wkey] = _lower_bound_work(struct, cand, devs, precision)
                    lb = _pipeline_bound(work[wkey], cand)
                    cands.append((lb, cand, devs))
    if partial_partitions:
        shortcuts.append(f"stage sizes (not loss-free): speed-proportional sizes and one block moved off "
                         f"either end; every composition only when there are <= {options.max_partitions}")
    if not cands:
        raise InfeasibleError(f"no mesh fits the constraints {constraints} on cluster {cluster.name!r} "
                              f"({cluster.world_size} devices, global batch {B}, {L} blocks)")
    # deterministic order: bound, then fewer stages, fewer microbatches, smaller tp
    cands.sort(key=lambda c: (c[0], c[1].pp, c[1].num_microbatches, c[1].tp, c[1].schedule, c[1].partition))
    # lower bound of a candidate set: W depends only on (dp, tp, m, devices), cache it
    strat_cache: dict = {}
    table_cache: dict = {}
    fixed = _fixed(constraints)
    best = None
    solved = 0
    t_cost = t_solve = 0.0
    unexplored_lb = None
    any_timeout = False
    tried_memory: list[tuple[float, Candidate, Breakdown]] = []
    # best-first over candidates; a candidate whose (mesh, m) has no LP bound yet gets one
    # (relaxed_bound) and goes back into the queue with the stronger bound.
    import heapq

    heap = [(lb, k, 0, cand, devs) for k, (lb, cand, devs) in enumerate(cands)]
    heapq.heapify(heap)
    lp_bound: dict = {}
    n_lp = 0
    n_mem_pruned = 0
    closest = None  # (bytes, candidate, stage): the candidate nearest to fitting in memory
    tol = options.prefer_simpler_within
    fastest = None  # predicted step time of the fastest plan found so far
    found: list = []  # (T, cg, dec, br, res) of every plan within tol of the fastest

    def within_tol(t: float) -> bool:  # predicted no more than tol slower than the fastest
        return t <= fastest * (1 + tol) * (1 + 1e-9)
    while heap:
        lb, k, level, cand, devs = heapq.heappop(heap)
        if fastest is not None:
            if not within_tol(lb):
                break
            if lb > fastest * (1 + 1e-9) and not _simpler(cand, best[1].candidate):
                continue  # cannot be faster; only a simpler plan within tol could still be chosen
        now = time.perf_counter()
        if now >= deadline and best is not None:
            unexplored_lb = lb
            break
        t0 = time.perf_counter()
        if level >= 1:  # (level 0 only needs the mesh's LP, shared by all its candidates)
            cg0 = annotate(struct, registry, cluster, cand, precision=precision, optimizer=optimizer,
                           reserve_fraction=options.memory_reserve_fraction, allowed=allowed, stage_devices=devs,
                           host_bandwidth=_host_bw(), strategy_cache=strat_cache, table_cache=table_cache)
            lbms = memory_lower_bound(cg0)
            if any(lbm > st.capacity_bytes for lbm, st in zip(lbms, cg0.stages)):
                n_mem_pruned += 1
                worst = max(range(len(lbms)), key=lambda i: lbms[i] - cg0.stages[i].capacity_bytes)
                if closest is None or lbms[worst] < closest[0]:
                    closest = (lbms[worst], cand, worst)
                t_cost += time.perf_counter() - t0
                continue
        if level < 2:
            # level 0 -> 1: the mesh's LP bound at m = 1, scaled (m S(m) >= S(1): every term of
            # one microbatch's time is at least 1/m of the whole batch's); 1 -> 2: the LP at m.
            m = cand.num_microbatches if level == 1 else 1
            key = (cand.pp, cand.dp, cand.tp, m)
            if key not in lp_bound:
                c1 = Candidate(cand.pp, cand.dp, cand.tp, m, "1f1b" if cand.pp > 1 else "none", 1,
                               cand.partition if cand.virtual_stages == 1 else tuple([L // cand.pp] * cand.pp))
                cg1 = annotate(struct, registry, cluster, c1, precision=precision, optimizer=optimizer,
                               reserve_fraction=options.memory_reserve_fraction, allowed=allowed,
                               stage_devices=devs, host_bandwidth=_host_bw(), strategy_cache=strat_cache,
                               table_cache=table_cache)
                lp_bound[key] = formulation.relaxed_bound(cg1)
                n_lp += 1
            scale = m / cand.num_microbatches
            parts = lp_bound[key]
            v = cand.virtual_stages
            lb2 = max(lb, parts["total"] * scale * ((cand.num_microbatches - 1.0 / v) / cand.pp + 1.0 / v))
            if "block" in parts:
                lb2 = max(lb2, _pipeline_bound({k: val * scale for k, val in parts.items()}, cand))
            t_cost += time.perf_counter() - t0
            heapq.heappush(heap, (lb2, k, 2 if m == cand.num_microbatches else level + 1, cand, devs))
            continue
        cg = annotate(struct, registry, cluster, cand, precision=precision, optimizer=optimizer,
                      reserve_fraction=options.memory_reserve_fraction, allowed=allowed, stage_devices=devs,
                      host_bandwidth=_host_bw(), strategy_cache=strat_cache, table_cache=table_cache)
        if "config_allowed" in fixed or "zero" in constraints or "offload" in constraints:
            fixed_c = dict(fixed)
            fixed_c["config_allowed"] = _pinned_configs(cg, constraints)
        else:
            fixed_c = fixed
        cutoff = None
        if best is not None:
            cutoff = fastest * (1 + tol) * (1 + 1e-9) if _simpler(cand, best[1].candidate) else fastest
        model = formulation.build(cg, options.backend, fixed_c, cutoff_s=cutoff)
        t1 = time.perf_counter()
        res, dec = backend.run(model, cg, options, max(0.05, deadline - time.perf_counter()))
        t2 = time.perf_counter()
        t_cost += t1 - t0
        t_solve += t2 - t1
        solved += 1
        if res.status == "feasible":
            any_timeout = True
        if dec is None:
            continue
        br = evaluate(cg, dec)
        fastest = br.step_time_s if fastest is None else min(fastest, br.step_time_s)
        found = [f for f in found + [(br.step_time_s, cg, dec, br, res)] if within_tol(f[0])]
        best = min(found, key=lambda f: (_simplicity(f[1].candidate), f[0]))  # the simplest, then the fastest
    if best is None:
        raise InfeasibleError(_infeasible_message(struct, cluster, precision, optimizer, options, constraints,
                                                  closest))
    T, cg, dec, br, res = best
    if T > fastest * (1 + 1e-9):
        quick = min(found, key=lambda f: f[0])
        shortcuts.append(f"preferred the simpler {_describe(cg.candidate)} ({T * 1e3:.2f} ms a step predicted) over "
                         f"{_describe(quick[1].candidate)} ({quick[0] * 1e3:.2f} ms), within "
                         f"prefer_simpler_within={tol:g}")
    gap = res.gap
    status = "optimal" if not any_timeout and unexplored_lb is None else "feasible"
    if unexplored_lb is not None:
        gap = max(gap, (T - unexplored_lb) / T if T > 0 else 0.0)
    result = SolveResult(status, T, gap, time.perf_counter() - t_start, res.num_variables, res.num_constraints)
    return SearchOutcome(cg, dec, br, result, solved, len(cands), shortcuts,
                         {"costing_s": t_cost, "solving_s": t_solve, "lp_bounds": n_lp,
                          "memory_pruned": n_mem_pruned})


def _describe(c: Candidate) -> str:
    return f"pp{c.pp}/dp{c.dp}/tp{c.tp} mb{c.num_microbatches}"


def _simplicity(c: Candidate) -> tuple[int, int, int]:
    """Fewer pipeline stages, then less tensor parallelism, then fewer microbatches: fewer
    moving parts; the lower, the simpler."""
    return (c.pp, c.tp, c.num_microbatches)


def _simpler(a: Candidate, b: Candidate) -> bool:
    return _simplicity(a) < _simplicity(b)


def _host_bw() -> float:
    """Host DRAM bandwidth for CPU-side optimizer steps (ZeRO-Offload's CPU Adam), from the
    catalog's x86 server socket (its provenance is the datasheet it cites)."""
    from autopar.cost_model import catalog

    d = catalog.x86_server()
    return d.memory_bandwidth * d.memory_bw_efficiency


def _fixed(constraints: dict) -> dict:
    out: dict = {}
    if "recompute" in constraints:
        out["recompute"] = constraints["recompute"]
    off = constraints.get("offload")
    if off is not None:
        if "activations" not in off:
            out["no_activation_offload"] = True
        else:
            out["activation_offload"] = "full"
        out["config_allowed"] = None
    if "zero" in constraints:
        out["config_allowed"] = None
    return out


def _pinned_configs(cg: CostedGraph, constraints: dict) -> list[int]:
    z = constraints.get("zero")
    off = constraints.get("offload")
    keep = []
    for k, c in enumerate(cg.configs):
        if z is not None and c.zero_stage != (z if cg.candidate.dp > 1 else 0):
            continue
        if off is not None and set(c.offload) != set(off) - {"activations"}:
            continue
        keep.append(k)
    return keep


def _infeasible_message(struct: GraphStructure, cluster: Cluster, precision: str, optimizer: str,
                        options: SolverOptions, constraints: dict, closest=None) -> str:
    from autopar.cost_model import memory as mem

    n = struct.graph.num_params
    W = cluster.world_size
    state = mem.training_state_bytes(n, optimizer, precision)
    gib = 2**30
    cap = min(g.device.memory_bytes for g in cluster.groups)
    usable = cap * (1 - options.memory_reserve_fraction)
    host = min(g.device.host_memory_bytes for g in cluster.groups)
    lines = [
        f"no plan fits in memory: {n:,} parameters need {state / gib:.1f} GiB of params+grads+optimizer "
        f"state ({precision}, {optimizer}); sharded over all {W} devices (ZeRO-3 x tp x pp) that is "
        f"{state / W / gib:.2f} GiB per device, plus activations of one microbatch.",
        f"The cluster {cluster.name!r} has {cap / gib:.2f} GiB per device minus "
        f"{options.memory_reserve_fraction:.0%} reserve = {usable / gib:.2f} GiB"
        + (f", and {host / gib:.0f} GiB host memory for offload." if host else " and no host memory to offload to."),
    ]
    if closest is not None:
        need, cand, stage = closest
        lines.append(f"The closest candidate (pp={cand.pp} dp={cand.dp} tp={cand.tp}, {cand.num_microbatches} "
                     f"microbatches) still needs at least {need / gib:.2f} GiB on pipeline rank {stage} with "
                     f"every allowed saving (ZeRO, offload, recomputation of every block).")
    if constraints:
        lines.append(f"Constraints {constraints} restrict the search; relaxing them may find a plan.")
    if "offload" not in options.allowed or "recompute" not in options.allowed or "zero" not in options.allowed:
        lines.append(f"Allowed features were {sorted(options.allowed)}.")
    return " ".join(lines)
