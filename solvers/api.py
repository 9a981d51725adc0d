"""Entry points: ``solve(graph, cluster, ...) -> Plan``, ``plan(model, inputs, ...)``, ``compare``.

``constraints`` pins any part of the plan; everything left free is solved:

    {"tp": 8, "pp": 4, "dp": 2, "microbatch_size": 2, "num_microbatches": 16,
     "schedule": "1f1b", "recompute": "full" | "none", "zero": 0..3,
     "offload": ["optimizer_state", "grads", "params", "activations"]}   (or "a+b" / "none")

With the mesh, microbatches, schedule, recomputation, ZeRO stage and offload all pinned the
result is a prediction of that configuration (status "pinned"); per-node shardings are still
chosen optimally for it (they are what a hand-written Megatron/FSDP setup fixes implicitly).
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Union

from autopar.cost_model.cluster import Cluster
from autopar.graph import Graph, OpKind, capture
from autopar.placements import rank_of
from autopar.plan import (BlockPolicy, ModelInfo, NodeStrategy, ParamPlan, Pipeline, Plan, Predicted,
                          SolverReport, Stage, Training)

from .costed import GraphStructure, analyze
from .options import InfeasibleError, SolverOptions
from .search import SearchOutcome, search
from .strategies import StrategyRegistry, default_registry
from .traffic import communication_bytes, network_total

CONSTRAINT_KEYS = ("tp", "pp", "dp", "microbatch_size", "num_microbatches", "schedule", "recompute", "zero",
                   "offload")
_PIN_ALL = ("tp", "pp", "dp", "schedule", "recompute", "zero", "offload")

__all__ = ["solve", "plan", "compare", "check_constraints", "SolverOptions", "InfeasibleError"]


def check_constraints(constraints: Optional[Mapping[str, Any]]) -> dict:
    """Validate a constraints dict; unknown keys or bad values raise ValueError naming them."""
    c = dict(constraints or {})
    unknown = sorted(set(c) - set(CONSTRAINT_KEYS))
    if unknown:
        raise ValueError(f"unknown constraint key(s) {unknown}; known keys: {list(CONSTRAINT_KEYS)}")
    for k in ("tp", "pp", "dp", "microbatch_size", "num_microbatches"):
        if k in c and (not isinstance(c[k], int) or isinstance(c[k], bool) or c[k] < 1):
            raise ValueError(f"constraint {k!r} must be a positive integer, got {c[k]!r}")
    if "schedule" in c and c["schedule"] not in ("none", "gpipe", "1f1b", "interleaved_1f1b"):
        raise ValueError(f"constraint 'schedule' must be one of none/gpipe/1f1b/interleaved_1f1b, got {c['schedule']!r}")
    if "recompute" in c and c["recompute"] not in ("none", "full"):
        raise ValueError(f"constraint 'recompute' must be 'none' or 'full', got {c['recompute']!r}")
    if "zero" in c and c["zero"] not in (0, 1, 2, 3):
        raise ValueError(f"constraint 'zero' must be 0..3, got {c['zero']!r}")
    if "offload" in c:
        off = c["offload"]
        if isinstance(off, str):  # "optimizer_state+grads" (CLI --fix), "none" or ""
            off = [] if off.strip().lower() in ("", "none") else [x.strip() for x in off.split("+")]
        bad = sorted(set(off) - {"params", "grads", "optimizer_state", "activations"})
        if bad:
            raise ValueError(f"constraint 'offload' has unknown class(es) {bad}; allowed: params, grads, "
                             f"optimizer_state, activations")
        c["offload"] = tuple(sorted(set(off)))
    return c


def _as_cluster(cluster: Union[Cluster, str]) -> Cluster:
    return Cluster.parse(cluster) if isinstance(cluster, str) else cluster


def solve(graph: Graph, cluster: Union[Cluster, str], *, precision: str = "fp32", optimizer: str = "adam",
          constraints: Optional[Mapping[str, Any]] = None, options: Optional[SolverOptions] = None,
          model_name: str = "", registry: Optional[StrategyRegistry] = None) -> Plan:
    """The fastest plan for ``graph`` on ``cluster`` under the cost model (see module docstring)."""
    from autopar.cost_model import memory as mem

    mem._check(precision, optimizer)
    cons = check_constraints(constraints)
    cl = _as_cluster(cluster)
    opts = options or SolverOptions()
    reg = registry or default_registry()
    t0 = time.perf_counter()
    struct = analyze(graph, reg)
    t1 = time.perf_counter()
    pinned = all(k in cons for k in _PIN_ALL) and ("num_microbatches" in cons or "microbatch_size" in cons)
    if cl.is_homogeneous:
        out = search(struct, reg, cl, precision=precision, optimizer=optimizer, options=opts, constraints=cons)
        out.timings["analyze_s"] = t1 - t0
        return decode(struct, out, cl, precision=precision, optimizer=optimizer, model_name=model_name,
                      pinned=pinned, wall_s=time.perf_counter() - t0)
    return _solve_mixed(struct, reg, cl, precision=precision, optimizer=optimizer, options=opts, constraints=cons,
                        model_name=model_name, pinned=pinned, t0=t0)


def _solve_mixed(struct: GraphStructure, reg: StrategyRegistry, cl: Cluster, *, precision: str, optimizer: str,
                 options: SolverOptions, constraints: dict, model_name: str, pinned: bool, t0: float) -> Plan:
    """Mixed clusters: block pipelines (each stage on one group, priced on its device) compete
    with split pipelines (:mod:`.hetero`: embedding tables on one group, the rest on the other)."""
    from . import hetero
    from .search import _host_bw

    out, block_error = None, None
    try:
        out = search(struct, reg, cl, precision=precision, optimizer=optimizer, options=options,
                     constraints=constraints)
    except InfeasibleError as e:
        block_error = str(e)
    why_not = hetero.applicable(struct, cl, options)
    wins: list = []
    skipped: dict[str, str] = {}
    if why_not is None:
        wins = hetero.search_splits(struct, reg, cl, precision=precision, optimizer=optimizer, options=options,
                                    constraints=constraints, deadline=time.perf_counter() + options.time_limit_s,
                                    host_bandwidth=_host_bw(), skipped=skipped)
    block_T = out.breakdown.step_time_s if out is not None else None
    # every alternative with its step time (seconds) or why it has none
    alts: dict[str, Any] = {f"tables on {hetero.device_kind(w.cluster, 0)}": w.step_time_s for w in wins}
    alts.update(skipped)
    if why_not is None:
        alts["block pipeline"] = block_T if block_T is not None else (
            "not possible: no repeated blocks" if not struct.blocks else "no block pipeline fits")
    best = min(wins, key=lambda w: w.step_time_s, default=None)
    if best is not None and (block_T is None or best.step_time_s < block_T):
        label = f"tables on {hetero.device_kind(best.cluster, 0)}"
        others = {k: v for k, v in alts.items() if k != label}
        shortcuts = (["split pipeline on a mixed cluster: stage 0 = the embedding tables and their lookups on one "
                      "device group, the rest cut into stages on the other (one (dp, tp) for every stage; "
                      "activations cross groups over the inter-group link)"] + best.notes
                     + [hetero.placement_line(struct, cl, best, others, optimizer=optimizer, precision=precision,
                                              reserve=options.memory_reserve_fraction)])
        if best.cluster.groups[0] is not cl.groups[0]:
            shortcuts.append(f"ranks renumbered: stage 0 runs on the {best.cluster.groups[0].device.name} group, so "
                             f"the plan's cluster lists it first ({best.cluster.name!r}); launch and validate "
                             f"with that cluster")
        status = "pinned" if pinned else ("optimal" if not best.notes and best.result.status == "optimal"
                                          else "feasible")
        return hetero.decode_split(struct, best, precision=precision, optimizer=optimizer, model_name=model_name,
                                   status=status, wall_s=time.perf_counter() - t0, shortcuts=shortcuts)
    if out is None:
        note = why_not or "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise InfeasibleError(hetero.infeasible_message(struct, cl, optimizer=optimizer, precision=precision,
                                                        reserve=options.memory_reserve_fraction,
                                                        block_error=block_error, split_note=note,
                                                        constraints=constraints))
    if wins:
        out.shortcuts.append("placement: a block pipeline beats every split of the embedding tables onto one "
                             "device group (" + "; ".join(f"{k}: {v * 1e3:.2f} ms" if isinstance(v, float) else
                                                          f"{k}: {v}" for k, v in alts.items()) + ")")
    elif why_not is not None:
        out.shortcuts.append(f"mixed cluster: split pipelines not tried ({why_not}); pipeline stages are "
                             f"priced on their own group's device")
    return decode(struct, out, cl, precision=precision, optimizer=optimizer, model_name=model_name, pinned=pinned,
                  wall_s=time.perf_counter() - t0)


def plan(model, example_inputs, *, cluster: Union[Cluster, str], precision: str = "fp32", optimizer: str = "adam",
         constraints: Optional[Mapping[str, Any]] = None, options: Optional[SolverOptions] = None,
         ir: str = "auto") -> Plan:
    """Capture ``model`` on ``example_inputs`` (one global batch) and solve."""
    g = capture(model, example_inputs, ir=ir)
    return solve(g, cluster, precision=precision, optimizer=optimizer, constraints=constraints, options=options,
                 model_name=type(model).__name__)


def compare(graph: Graph, cluster: Union[Cluster, str], pinned: Mapping[str, Any], *, precision: str = "fp32",
            optimizer: str = "adam", options: Optional[SolverOptions] = None, model_name: str = "") -> dict:
    """autopar's plan next to a pinned configuration (e.g. Megatron's tp=8, pp=8, mbs=1, full
    recompute): ``{"autopar": Plan, "pinned": Plan, "speedup": pinned_time / autopar_time}``."""
    a = solve(graph, cluster, precision=precision, optimizer=optimizer, options=options, model_name=model_name)
    b = solve(graph, cluster, precision=precision, optimizer=optimizer, constraints=pinned, options=options,
              model_name=model_name)
    return {"autopar": a, "pinned": b, "speedup": b.predicted.step_time_s / a.predicted.step_time_s}


def summary(p: Plan) -> str:
    """A few readable lines about a plan."""
    q = p.predicted
    pl = p.pipeline
    rec = sorted({b.recompute for b in p.blocks if b.block != "*"})
    zs = sorted({x.zero_stage for x in p.params})
    offs = sorted({o for x in p.params for o in x.offload})
    lines = [
        f"mesh pp={p.mesh['pp']} dp={p.mesh['dp']} tp={p.mesh['tp']}; microbatches {pl.num_microbatches} x "
        f"{pl.microbatch_size}/dp-rank; schedule {pl.schedule}" + (f" v={pl.virtual_stages}" if pl.virtual_stages > 1 else ""),
        f"stages: {[len(s.blocks) for s in pl.stages]} blocks; recompute {rec}; zero {zs}; offload {offs or '-'}"
        f"; activations offloaded in {sum(b.offload_activations for b in p.blocks)} blocks",
        f"step {q.step_time_s * 1e3:.2f} ms (compute {q.compute_s * 1e3:.2f}, comm {q.communication_s * 1e3:.2f}, "
        f"bubble {q.bubble_s * 1e3:.2f}, offload {q.offload_s * 1e3:.2f}); peak memory "
        f"{max(q.memory_per_device_bytes) / 2**30:.2f} of {q.memory_capacity_bytes / 2**30:.2f} GiB",
        f"solver {p.solver.status} gap {p.solver.gap:.2g} in {p.solver.wall_s:.2f} s; {p.solver.num_variables} vars, "
        f"{p.solver.num_constraints} constraints, {p.solver.candidates} ILPs",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# decoding


def decode(struct: GraphStructure, out: SearchOutcome, cluster: Cluster, *, precision: str, optimizer: str,
           model_name: str, pinned: bool, wall_s: float) -> Plan:
    g = struct.graph
    cg, dec, br = out.costed, out.decision, out.breakdown
    cand = cg.candidate
    mesh = cand.mesh
    m, v, pp = cand.num_microbatches, cand.virtual_stages, cand.pp
    B = g.batch_size
    by_unit = {n.name: n for n in cg.nodes}
    # fx node -> unit, and block -> pipeline chunk
    unit_of: dict[str, str] = {}
    for u in struct.units:
        for n in struct.nodes_of_unit(u):
            unit_of[n] = u
    chunk_sizes = _chunk_sizes(cand)
    block_chunk: dict[str, int] = {}
    j = 0
    for c, size in enumerate(chunk_sizes):
        for _ in range(size):
            if j < len(struct.blocks):
                block_chunk[struct.blocks[j]] = c
            j += 1
    n_chunks = len(chunk_sizes)

    def chunk_of(name: str) -> int:
        info = g.nodes[name]
        if info.block in block_chunk:
            return block_chunk[info.block]
        u = unit_of.get(name)
        place = struct.place.get(u, "prefix") if u else "prefix"
        if struct.blocks and (place == "suffix" or info.kind is OpKind.OUTPUT):
            return n_chunks - 1
        return 0

    # per-unit reshard time (incoming edges, per microbatch) for reporting
    reshard: dict[str, float] = {}
    for e in cg.edges:
        reshard[e.dst] = reshard.get(e.dst, 0.0) + e.cost_s[dec.strategy[e.src]][dec.strategy[e.dst]]

    def dev_of_chunk(c: int) -> str:
        return cg.stages[c % pp].device

    def _chosen_output(src: str):
        su = unit_of.get(src)
        if su is None or not g.nodes[src].outputs:
            return None
        return by_unit[su].strategies[dec.strategy[su]].outputs[0]

    nodes = []
    for name, info in g.nodes.items():
        if info.kind in (OpKind.INPUT, OpKind.PARAM, OpKind.OUTPUT):
            continue
        u = unit_of.get(name)
        if u is None:
            continue
        nc = by_unit[u]
        s = nc.strategies[dec.strategy[u]]
        dev = dev_of_chunk(chunk_of(name))
        inputs = s.inputs
        if not info.outputs:  # metadata reads take their input as it is (no collective)
            inputs = tuple(_chosen_output(src) or pl for src, pl in zip(info.inputs, s.inputs))
        nodes.append(NodeStrategy(name, s.name, inputs, s.outputs, m * nc.compute_s[dev][dec.strategy[u]],
                                  m * reshard.get(u, 0.0)))

    params = []
    param_place: dict[str, tuple] = {}
    param_stage: dict[str, int] = {}
    param_unit: dict[str, str] = {}  # param -> the unit standing for its first reader
    for name, info in g.nodes.items():
        u = unit_of.get(name)
        if u is None:
            continue
        s = by_unit[u].strategies[dec.strategy[u]]
        for p, pl in zip(info.params, s.params):
            if p in g.params and p not in param_place:
                param_place[p] = pl
                param_stage[p] = chunk_of(name)
                param_unit[p] = u
    for p, spec in g.params.items():
        # struct.owner names only the units' own params (one block stands for all): a param of
        # another block takes its group from the unit that stands for its reader
        u = struct.owner.get(p) or param_unit.get(p)
        group = "block" if (u and struct.place[u] == "block") else "outside"
        cfg = cg.configs[dec.config.get(group, 0)] if cg.configs else None
        from autopar.placements import Replicate
        pl = param_place.get(p, (Replicate(), Replicate()))
        params.append(ParamPlan(p, tuple(spec.shape), pl, cfg.zero_stage if cfg else 0,
                                tuple(cfg.offload) if cfg else (), param_stage.get(p, 0)))

    # stages
    stages = []
    if struct.blocks or pp == 1:
        names_by_chunk: dict[int, list[str]] = {c: [] for c in range(n_chunks)}
        for name, info in g.nodes.items():
            names_by_chunk[chunk_of(name)].append(name)
        for c in range(n_chunks):
            rank_pp = c % pp
            ranks = tuple(rank_of(mesh, rank_pp, d, t) for d in range(mesh["dp"]) for t in range(mesh["tp"]))
            blocks = tuple(b for b in struct.blocks if block_chunk.get(b) == c)
            st = cg.stages[rank_pp]
            dev_name = cluster.device_of(ranks[0]).name
            stages.append(Stage(c, tuple(names_by_chunk[c]), blocks, ranks, dev_name,
                                br.stage_time_s[rank_pp] / v, int(br.memory_bytes[rank_pp])))
    schedule = cand.schedule if pp > 1 else "none"
    pipeline = Pipeline(schedule, m, max(1, B // (mesh["dp"] * m)), v, tuple(stages))

    # block policies: the first r_i blocks of rank i recompute, the next o_i offload activations
    policies = []
    for i in range(pp):
        blocks_i = [b for b in struct.blocks if block_chunk.get(b, -1) % pp == i]
        r, o = dec.recompute[i], dec.offload_act[i]
        for k, b in enumerate(blocks_i):
            policies.append(BlockPolicy(b, "full" if k < r else "none", r <= k < r + o))
    policies.sort(key=lambda bp: struct.blocks.index(bp.block))
    policies.append(BlockPolicy("*", "none", False))

    world = cluster.world_size
    mem_per_rank = []
    for rank in range(world):
        i = rank // (mesh["dp"] * mesh["tp"])
        mem_per_rank.append(int(br.memory_bytes[i]))
    full = max(range(pp), key=lambda i: br.memory_bytes[i])
    traffic = communication_bytes(struct, cg, dec, precision=precision, optimizer=optimizer)
    fwd_flops = g.total_flops()
    rec_flops = sum(g.nodes[n].flops for n in g.nodes if g.nodes[n].block and
                    any(bp.block == g.nodes[n].block and bp.recompute == "full" for bp in policies))
    predicted = Predicted(
        step_time_s=br.step_time_s, compute_s=br.compute_s, communication_s=br.communication_s,
        bubble_s=br.bubble_s, offload_s=br.offload_s, memory_per_device_bytes=tuple(mem_per_rank),
        memory_breakdown={k: int(val) for k, val in br.memory_breakdown[full].items()},
        memory_peak_at=br.memory_moment[full] if br.memory_moment else "",
        communication_bytes=int(network_total(traffic)), flops_per_step=3 * fwd_flops + rec_flops,
        memory_capacity_bytes=int(cg.stages[full].capacity_bytes))
    res = out.result
    report = SolverReport(status="pinned" if pinned else res.status, objective=res.objective, gap=res.gap,
                          wall_s=wall_s, num_variables=res.num_variables, num_constraints=res.num_constraints,
                          candidates=out.candidates, shortcuts=tuple(out.shortcuts))
    return Plan(cluster=cluster.to_json(), model=ModelInfo(model_name or type(g.module).__name__, g.fingerprint(),
                                                           g.num_params, g.ir),
                training=Training(precision, optimizer, B), mesh=mesh, nodes=tuple(nodes), params=tuple(params),
                pipeline=pipeline, blocks=tuple(policies), predicted=predicted, solver=report)


def _chunk_sizes(cand) -> list[int]:
    """Blocks per pipeline chunk in model order (chunk c runs on pipeline rank c % pp)."""
    if cand.virtual_stages == 1:
        return list(cand.partition) if cand.partition else [0]
    per = cand.partition[0] // cand.virtual_stages
    return [per] * (cand.pp * cand.virtual_stages)
