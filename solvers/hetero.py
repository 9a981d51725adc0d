"""Split pipelines on mixed clusters: the embedding tables on one device group, the rest on another.

Block pipelines (:mod:`.pipeline`) need repeated blocks; a recommendation model such as DLRM
has none, yet its two halves want different hardware: embedding tables are memory-heavy and
compute-light (a gather per lookup), the MLPs are compute-heavy and small. This module adds
one candidate family for clusters of two device groups, a *split*:

    stage 0       = the embedding part E: every unit that owns an embedding table, its
                    ancestors (index slicing of the sparse input) and the units fed only by
                    them (the pooling sums), on all ranks of group A;
    stages 1..k   = the remaining units in topological order, cut into k contiguous chunks
                    (cuts after parameter-owning units, each chunk owning parameters), on
                    group B (k = |B| / |A|).

Every stage has the same (dp, tp) (the Plan has one mesh), so |A| divides |B|; tensor
parallelism may span nodes here: a table row-sharded (Shard(0) on tp) over the CPU nodes is
the parameter-server layout. Each stage is costed as its own single-stage graph on its own
device (:func:`.costed.annotate` on a sub-structure and a one-group sub-cluster) and all stages
are solved in one MIP (:func:`.formulation.build_split`) under 1F1B with m >= p microbatches
(torch.distributed.pipelining, the runtime's, needs one per stage):

    T = m max(t_k, c_b) + (sum_k t_k + sum_b c_b - max) + max_k q_k

where c_b = 2 (latency + X_b / (n bw_b)) is boundary b's activation-forward plus
gradient-backward transfer of X_b bytes per microbatch by the n = dp tp ranks in parallel, over
the link between the two stages (the cluster's inter-group link between groups; a link is a
pipeline stage of its own: it bounds the steady state and adds to fill/drain). Tensors that
cross a boundary must not be left Partial on either side (their producers and the consumers'
gradients are restricted to non-Partial strategies), so the reduction they need is priced.

The split competes with every block-pipeline candidate of :mod:`.search`; the plan reports why
the winner pays (a ``placement:`` line in ``SolverReport.shortcuts``).

Scope (stated in the plan's shortcuts): two device groups, graphs without deduplicated repeated
blocks, microbatch counts up to :data:`MAX_MICROBATCHES`, at most ``max_partitions`` cut
placements per (mesh, microbatches).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from itertools import combinations
from typing import Optional

from autopar.cost_model import memory as mem
from autopar.cost_model.cluster import Cluster, LinkSpec, NodeGroup
from autopar.cost_model.pipeline import inflight_microbatches
from autopar.graph import OpKind

from . import backend, formulation
from .costed import Candidate, CostedGraph, GraphStructure, _elem_bytes, annotate
from .evaluate import Breakdown, Decision, evaluate
from .options import SolveResult, SolverOptions
from .strategies import StrategyRegistry

#: Microbatch counts tried per mesh (every divisor of the per-rank batch up to this).
MAX_MICROBATCHES = 64
GIB = 2**30


@dataclass(frozen=True)
class Split:
    """Which units run on which pipeline stage, and which cluster group each stage uses."""

    stages: tuple[tuple[str, ...], ...]  # units per stage (the inputs they read included)
    groups: tuple[int, ...]  # cluster group index per stage
    boundaries: tuple[tuple[tuple[str, int], ...], ...]  # per boundary b (stage b -> b+1): tensors


@dataclass
class SplitOutcome:
    split: Split
    cluster: Cluster  # the plan's cluster: the split's groups in stage order
    candidate: Candidate  # pp, dp, tp, m, "1f1b"
    costed: list[CostedGraph]
    decisions: list[Decision]
    breakdowns: list[Breakdown]
    link_s: tuple[float, ...]  # c_b per boundary
    boundary_bytes: tuple[float, ...]  # X_b per microbatch
    step_time_s: float
    result: SolveResult
    solved: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def stage_time_s(self) -> tuple[float, ...]:
        return tuple(b.stage_time_s[0] for b in self.breakdowns)

    def per_step_s(self) -> tuple[float, ...]:
        m = self.candidate.num_microbatches
        return tuple(b.step_time_s - m * b.stage_time_s[0] for b in self.breakdowns)


# ---------------------------------------------------------------------------------------
# which units go where


def embedding_part(struct: GraphStructure) -> Optional[set[str]]:
    """The units of stage 0 (see the module docstring), or None when the graph has no
    embedding table or nothing is left for the other stages."""
    g = struct.graph
    units = set(struct.units)
    is_input = {u: g.nodes[u].kind is OpKind.INPUT for u in struct.units}
    emb = [u for u in struct.units if g.nodes[u].kind is OpKind.EMBEDDING
           and any(p in g.params for p in g.nodes[u].params)]
    if not emb:
        return None
    part: set[str] = set()
    stack = list(emb)
    while stack:  # ancestors
        u = stack.pop()
        if u in part:
            continue
        part.add(u)
        stack.extend(s for s in g.nodes[u].inputs if s in units and not is_input[s])
    for u in struct.units:  # units fed only by the part (topological order: one pass)
        if u in part or is_input[u]:
            continue
        ins = [s for s in g.nodes[u].inputs if s in units]
        if ins and any(s in part for s in ins) and all(s in part or is_input[s] for s in ins):
            part.add(u)
    rest = [u for u in struct.units if u not in part and not is_input[u]]
    if not rest:
        return None
    return part


def _with_inputs(struct: GraphStructure, members: set[str]) -> tuple[str, ...]:
    g = struct.graph
    need = set(members)
    for u in members:
        need.update(s for s in g.nodes[u].inputs if s in struct.place and g.nodes[s].kind is OpKind.INPUT)
    return tuple(u for u in struct.units if u in need)


def splits(struct: GraphStructure, part: set[str], emb_group: int, rest_group: int, k: int, limit: int
           ) -> tuple[list[Split], bool]:
    """Every way to cut the rest into k chunks after parameter-owning units (or ``limit`` of
    them, evenly spread), and whether the list is complete."""
    g = struct.graph
    rest = [u for u in struct.units if u not in part and g.nodes[u].kind is not OpKind.INPUT]
    owners = set(struct.owner.values())
    cut_after = [i for i, u in enumerate(rest[:-1]) if u in owners]
    combos = list(combinations(cut_after, k - 1))
    complete = len(combos) <= limit
    if not complete:
        step = len(combos) / limit
        combos = [combos[int(j * step)] for j in range(limit)]
    out = []
    for cuts in combos:
        bounds = (-1, *cuts, len(rest) - 1)
        chunks = [set(rest[bounds[j] + 1:bounds[j + 1] + 1]) for j in range(k)]
        members = [part] + chunks
        stage_of = {u: j for j, s in enumerate(members) for u in s}
        ok = True
        crossing: list[set] = [set() for _ in range(k)]
        for e in struct.edges:
            a, b = stage_of.get(e.src), stage_of.get(e.dst)
            if a is None or b is None or a == b:
                continue
            if e.kind == "param" or b < a:  # tied weights across stages / a backward edge
                ok = False
                break
            for bnd in range(a, b):
                crossing[bnd].add((e.src, e.out_index))
        if ok and all(c & owners for c in chunks):  # every stage does real work
            out.append(Split(tuple(_with_inputs(struct, s) for s in members), (emb_group,) + (rest_group,) * k,
                             tuple(tuple(sorted(c)) for c in crossing)))
    return out, complete


def sub_structure(struct: GraphStructure, units: tuple[str, ...]) -> GraphStructure:
    """The part of ``struct`` on one stage: its units (all outside blocks) and inner edges."""
    keep = set(units)
    owner = {p: u for p, u in struct.owner.items() if u in keep}
    return dataclasses.replace(
        struct, units=list(units), place={u: "prefix" for u in units},
        edges=[e for e in struct.edges if e.src in keep and e.dst in keep], blocks=(), rep_block=None,
        block_members={}, owner=owner,
        param_readers={p: [r for r in rs if r in keep] for p, rs in struct.param_readers.items() if p in owner},
        chain_outputs=(), dedupe_note="")


def sub_cluster(cluster: Cluster, group: int, ranks: int) -> Optional[Cluster]:
    """``ranks`` devices of one group as a cluster of their own (None if not whole nodes)."""
    g = cluster.groups[group]
    inter = g.inter_node_link or cluster.inter_node_link
    if ranks <= g.devices_per_node:
        ng = NodeGroup(g.device, ranks, 1, g.intra_node_link, g.inter_node_link)
    elif ranks % g.devices_per_node == 0:
        ng = NodeGroup(g.device, g.devices_per_node, ranks // g.devices_per_node, g.intra_node_link,
                       g.inter_node_link)
    else:
        return None
    return Cluster(f"{cluster.name}[{g.device.name}x{ranks}]", (ng,), inter)


def _boundary_link(cluster: Cluster, split: Split, b: int, per: int) -> LinkSpec:
    ga, gb = split.groups[b], split.groups[b + 1]
    if ga != gb:
        return cluster.inter_node_link
    g = cluster.groups[ga]
    if per < g.devices_per_node and g.devices_per_node % per == 0:
        return g.intra_node_link  # both stages inside one node
    return g.inter_node_link or cluster.inter_node_link


# ---------------------------------------------------------------------------------------
# search


def applicable(struct: GraphStructure, cluster: Cluster, options: SolverOptions) -> Optional[str]:
    """Why split candidates are not tried here (None: they are)."""
    if len(cluster.groups) != 2 or cluster.groups[0].device.name == cluster.groups[1].device.name:
        return "split candidates need exactly two device groups of different kinds"
    if "pp" not in options.allowed:
        return "pp not allowed"
    if struct.blocks:
        return "the graph has repeated blocks: block pipelines are used"
    if embedding_part(struct) is None:
        return "no embedding table to place apart"
    return None


def search_splits(struct: GraphStructure, registry: StrategyRegistry, cluster: Cluster, *, precision: str,
                  optimizer: str, options: SolverOptions, constraints: dict, deadline: float,
                  host_bandwidth: float, cutoff_s: Optional[float] = None,
                  skipped: Optional[dict] = None) -> list[SplitOutcome]:
    """The best split plan per orientation (embedding part on group 0 or on group 1), each
    optimal over its meshes, microbatch counts and cuts (or the best found by ``deadline``).
    The plan's cluster lists the embedding group first (ranks renumbered, name reordered).
    ``skipped`` (filled in) says why an orientation has no plan."""
    skipped = skipped if skipped is not None else {}
    from .search import _divisors, _pinned_configs

    part = embedding_part(struct)
    assert part is not None
    B = struct.graph.batch_size
    out = []
    for emb_g, rest_g in ((0, 1), (1, 0)):
        ga, gb = cluster.groups[emb_g], cluster.groups[rest_g]
        na, nb = ga.world_size, gb.world_size
        label = f"tables on {device_kind(cluster, emb_g)}"
        if nb % na:
            skipped[label] = (f"not possible: every stage has the same dp x tp, and {nb} {gb.device.name} "
                              f"ranks do not form stages of the {na} {ga.device.name} ranks")
            continue
        per, k = na, nb // na
        p = 1 + k
        if constraints.get("pp", p) != p or constraints.get("schedule", "1f1b") != "1f1b":
            skipped[label] = f"excluded by the constraints (it needs pp={p}, schedule 1f1b)"
            continue
        terms = cluster.name.split("+")
        name = "+".join(terms[::-1]) if (emb_g == 1 and len(terms) == 2) else cluster.name
        plan_cluster = Cluster(name, (ga, gb), cluster.inter_node_link)
        # in the plan's cluster the embedding group is group 0, the rest group 1
        cands, complete = splits(struct, part, 0, 1, k, options.max_partitions)
        best: Optional[SplitOutcome] = None
        solved = 0
        subs = {}
        tables: dict = {}
        strat_cache: dict = {}
        for tp in _divisors(per):
            dp = per // tp
            if constraints.get("tp", tp) != tp or constraints.get("dp", dp) != dp or B % dp:
                continue
            if (tp > 1 and "tp" not in options.allowed) or (dp > 1 and "dp" not in options.allowed):
                continue
            clusters = [sub_cluster(plan_cluster, gi, per) for gi in (0, 1)]
            if any(c is None for c in clusters):
                continue
            # m >= p: torch.distributed.pipelining's 1F1B (what the runtime runs) needs one
            # microbatch per stage at least
            ms = [m for m in _divisors(B // dp) if p <= m <= MAX_MICROBATCHES]
            if "num_microbatches" in constraints:
                ms = [m for m in _divisors(B // dp) if m == constraints["num_microbatches"] and m >= p]
            if "microbatch_size" in constraints:
                ms = [m for m in ms if B // (dp * m) == constraints["microbatch_size"]]
            for m in ms:
                for sp in cands:
                    if time.perf_counter() > deadline and best is not None:
                        complete = False
                        break
                    cgs = []
                    for j, units in enumerate(sp.stages):
                        key = units
                        if key not in subs:
                            subs[key] = sub_structure(struct, units)
                        cand = Candidate(1, dp, tp, m, "none", 1, (0,))
                        gi = sp.groups[j]
                        cg = annotate(subs[key], registry, clusters[gi], cand, precision=precision,
                                      optimizer=optimizer, reserve_fraction=options.memory_reserve_fraction,
                                      allowed=options.allowed, stage_devices=[plan_cluster.groups[gi].device],
                                      host_bandwidth=host_bandwidth, strategy_cache=strat_cache,
                                      table_cache=tables.setdefault(key, {}))
                        infl = float(inflight_microbatches("1f1b", j, p, m))
                        cgs.append(dataclasses.replace(cg, stages=(dataclasses.replace(cg.stages[0],
                                                                                         inflight=infl),)))
                    xb = [_boundary_bytes(struct, bnd, m, precision) for bnd in sp.boundaries]
                    links = [_boundary_link(plan_cluster, sp, b, per) for b in range(len(sp.boundaries))]
                    link_s = tuple(2 * (lk.latency + x / (per * lk.bandwidth)) for x, lk in zip(xb, links))
                    forbid = _forbid_partial(struct, sp, cgs)
                    fixed = None
                    if "zero" in constraints or "offload" in constraints:
                        fixed = [{"config_allowed": _pinned_configs(cg, constraints)} for cg in cgs]
                    inc = min(x for x in (cutoff_s, best.step_time_s if best else None) if x is not None) \
                        if (cutoff_s is not None or best is not None) else None
                    models = formulation.build_split(cgs, link_s, options.backend, cutoff_s=inc, forbid=forbid,
                                                     fixed=fixed)
                    res, decs = backend.run_split(models, cgs, options, max(0.05, deadline - time.perf_counter()))
                    solved += 1
                    if decs is None:
                        continue
                    brs = [evaluate(cg, d) for cg, d in zip(cgs, decs)]
                    if not all(b.feasible for b in brs):
                        continue
                    T = combine(brs, link_s, m)
                    if best is None or T < best.step_time_s - 1e-12:
                        best = SplitOutcome(sp, plan_cluster, Candidate(p, dp, tp, m, "1f1b", 1, ()), cgs, decs,
                                            brs, link_s, tuple(xb), T, res)
        if best is None:
            skipped[label] = ("no split of this orientation fits in memory"
                              + (f" under the constraints {constraints}" if constraints else ""))
        if best is not None:
            best.solved = solved
            if not complete:
                best.notes.append(f"split cuts / search not exhaustive (limit {options.max_partitions} cut "
                                  f"placements, or the time limit)")
            out.append(best)
    return out


def combine(brs: list[Breakdown], link_s: tuple[float, ...], m: int) -> float:
    """Step time of a split pipeline from its stages' single-stage breakdowns."""
    t = [b.stage_time_s[0] for b in brs]
    q = [b.step_time_s - m * b.stage_time_s[0] for b in brs]
    worst = max(t + list(link_s))
    return m * worst + (sum(t) + sum(link_s) - worst) + max(q)


def _boundary_bytes(struct: GraphStructure, tensors, m: int, precision: str) -> float:
    g = struct.graph
    total = 0.0
    for src, oi in tensors:
        outs = g.nodes[src].outputs
        spec = outs[min(oi, len(outs) - 1)]
        total += spec.numel * _elem_bytes(spec, precision) / (m if struct.batched[src] else 1)
    return total


def _forbid_partial(struct: GraphStructure, sp: Split, cgs: list[CostedGraph]) -> dict:
    """Strategies that would leave a crossing tensor (or its gradient) Partial: fixed to 0."""
    from autopar.placements import Partial

    crossing = {t for bnd in sp.boundaries for t in bnd}
    crossing_src = {src for src, _ in crossing}
    stage_of = {}
    for j, units in enumerate(sp.stages):
        for u in units:
            if struct.graph.nodes[u].kind is not OpKind.INPUT:
                stage_of[u] = j
    out: dict = {}
    for j, cg in enumerate(cgs):
        for n in cg.nodes:
            bad = set()
            for s_i, s in enumerate(n.strategies):
                for (src, oi) in crossing:
                    if src == n.name and stage_of.get(src) == j:
                        if any(isinstance(x, Partial) for x in s.outputs[min(oi, len(s.outputs) - 1)]):
                            bad.add(s_i)
                for k, src in enumerate(struct.graph.nodes[n.name].inputs):
                    if src in crossing_src and stage_of.get(src) != j:
                        pls = list(s.inputs[k:k + 1]) + list(s.input_grads[k:k + 1])
                        if any(isinstance(x, Partial) for pl in pls for x in pl):
                            bad.add(s_i)
            if bad and len(bad) < len(n.strategies):
                out.setdefault(j, {})[n.name] = sorted(bad)
    return out


# ---------------------------------------------------------------------------------------
# explaining the choice


def state_bytes(struct: GraphStructure, units, optimizer: str, precision: str) -> float:
    """Unsharded training state (params, grads, optimizer) of the params owned by ``units``."""
    g = struct.graph
    keep = set(units)
    n = sum(g.params[p].numel for p, u in struct.owner.items() if u in keep)
    return mem.training_state_bytes(n, optimizer, precision)


def usable_bytes(cluster: Cluster, group: int, reserve: float) -> float:
    g = cluster.groups[group]
    return g.world_size * g.device.memory_bytes * (1 - reserve)


def device_kind(cluster: Cluster, group: int) -> str:
    d = cluster.groups[group].device
    return f"{d.name} ({d.kind.upper() if d.kind in ('cpu', 'gpu') else d.kind})"


def table_layout(struct: GraphStructure, win: SplitOutcome) -> str:
    """How the chosen strategies hold the tables, e.g. ``"6 row-sharded Shard(0) over tp, 2 replicated"``."""
    from autopar.placements import Shard

    cg, dec = win.costed[0], win.decisions[0]
    counts: dict[str, int] = {}
    for n in cg.nodes:
        info = struct.graph.nodes[n.name]
        if info.kind is not OpKind.EMBEDDING or not info.params:
            continue
        pl = n.strategies[dec.strategy[n.name]].params[0][1]  # the table's tp placement
        what = ("row-sharded Shard(0) over tp" if isinstance(pl, Shard) and pl.dim == 0 else
                "column-sharded Shard(1) over tp" if isinstance(pl, Shard) else "replicated over tp")
        counts[what] = counts.get(what, 0) + 1
    cfg = cg.configs[dec.config.get("outside", 0)] if cg.configs else None
    z = f", ZeRO-{cfg.zero_stage}" if cfg and cfg.zero_stage else ""
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + z


def placement_line(struct: GraphStructure, cluster: Cluster, win: SplitOutcome, others: dict,
                   *, optimizer: str, precision: str, reserve: float) -> str:
    """``placement: embedding tables on graviton4 (CPU) because ...`` for the winning split,
    naming the memory each group offers and the step time of the alternatives."""
    emb_units = win.split.stages[0]
    need = state_bytes(struct, emb_units, optimizer, precision)
    total = state_bytes(struct, struct.units, optimizer, precision)
    c = win.cluster
    n_tables = sum(1 for u in emb_units if struct.graph.nodes[u].kind is OpKind.EMBEDDING)
    gB = c.groups[1]
    capA, capB = usable_bytes(c, 0, reserve), usable_bytes(c, 1, reserve)
    cand = win.candidate
    reasons = []
    if total > capB:
        reasons.append(f"the whole model needs {total / GIB:,.1f} GiB of training state and the "
                       f"{gB.device.name} group holds {capB / GIB:,.1f} GiB")
    alt = [f"{k}: {v * 1e3:.2f} ms" if isinstance(v, float) else f"{k}: {v}" for k, v in others.items()]
    if alt:
        reasons.append(f"it takes {win.step_time_s * 1e3:.2f} ms per step against the alternatives "
                       f"({'; '.join(alt)})")
    return (f"placement: {n_tables} embedding tables ({need / GIB:,.1f} GiB of training state) on "
            f"{device_kind(c, 0)} ranks 0-{cand.dp * cand.tp - 1} (dp={cand.dp}, tp={cand.tp}: "
            f"{table_layout(struct, win)}; group holds "
            f"{capA / GIB:,.1f} GiB), the rest on {device_kind(c, 1)} in {cand.pp - 1} stage(s), "
            f"activations over {c.inter_node_link.name}; because " + " and ".join(reasons or ["it is the only plan"]))


# ---------------------------------------------------------------------------------------
# decoding


def decode_split(struct: GraphStructure, win: SplitOutcome, *, precision: str, optimizer: str, model_name: str,
                 status: str, wall_s: float, shortcuts: list[str]):
    """The Plan of a split pipeline: stage j runs ``win.split.stages[j]`` on the ranks
    [j n, (j + 1) n) of ``win.cluster`` (the embedding group first), n = dp tp."""
    from autopar.placements import Replicate, rank_of
    from autopar.plan import (BlockPolicy, ModelInfo, NodeStrategy, ParamPlan, Pipeline, Plan, Predicted,
                              SolverReport, Stage, Training)

    from .traffic import communication_bytes

    g = struct.graph
    cand = win.candidate
    mesh = cand.mesh
    m, p, per = cand.num_microbatches, cand.pp, cand.dp * cand.tp
    stage_of: dict[str, int] = {}
    for j, units in enumerate(win.split.stages):
        for u in units:
            stage_of.setdefault(u, j)
    nodes, params = [], []
    param_seen: set[str] = set()
    stage_nodes: list[list[str]] = [[] for _ in range(p)]
    for j, (units, cg, dec) in enumerate(zip(win.split.stages, win.costed, win.decisions)):
        by = {n.name: n for n in cg.nodes}
        reshard: dict[str, float] = {}
        for e in cg.edges:
            reshard[e.dst] = reshard.get(e.dst, 0.0) + e.cost_s[dec.strategy[e.src]][dec.strategy[e.dst]]
        dev = cg.stages[0].device
        for u in units:
            info = g.nodes[u]
            s = by[u].strategies[dec.strategy[u]]
            if info.kind is not OpKind.INPUT:
                inputs = s.inputs
                if not info.outputs:  # metadata reads take their input as it is
                    inputs = tuple((by[src].strategies[dec.strategy[src]].outputs[0]
                                    if src in by and g.nodes[src].outputs else pl)
                                   for src, pl in zip(info.inputs, s.inputs))
                nodes.append(NodeStrategy(u, s.name, inputs, s.outputs, m * by[u].compute_s[dev][dec.strategy[u]],
                                          m * reshard.get(u, 0.0)))
            for prm, pl in zip(info.params, s.params):
                if prm in g.params and prm not in param_seen and struct.owner.get(prm) == u:
                    param_seen.add(prm)
                    cfg = cg.configs[dec.config.get("outside", 0)] if cg.configs else None
                    params.append(ParamPlan(prm, tuple(g.params[prm].shape), pl, cfg.zero_stage if cfg else 0,
                                            tuple(cfg.offload) if cfg else (), j))
    for prm, spec in g.params.items():
        if prm not in param_seen:
            params.append(ParamPlan(prm, tuple(spec.shape), (Replicate(), Replicate()), 0, (), 0))
    fx_users = {n.name: list(n.users) for n in g.gm.graph.nodes}
    for name, info in g.nodes.items():
        if name in stage_of:
            stage_nodes[stage_of[name]].append(name)
        elif info.kind is OpKind.OUTPUT:
            stage_nodes[p - 1].append(name)
        else:  # get_attr params and buffers: with their first reader
            readers = [u.name for u in fx_users.get(name, ()) if u.name in stage_of]
            stage_nodes[stage_of[readers[0]] if readers else 0].append(name)
    brs = win.breakdowns
    t = win.stage_time_s
    stages = []
    for j in range(p):
        ranks = tuple(rank_of(mesh, j, d, k) for d in range(cand.dp) for k in range(cand.tp))
        stages.append(Stage(j, tuple(stage_nodes[j]), (), ranks, win.cluster.device_of(ranks[0]).name, t[j],
                            int(brs[j].memory_bytes[0])))
    pipeline = Pipeline("1f1b", m, max(1, g.batch_size // (cand.dp * m)), 1, tuple(stages))
    T = win.step_time_s
    worst = max(list(t) + list(win.link_s))
    bubble = sum(t) + sum(win.link_s) - worst
    crit = t.index(worst) if worst in t else None
    compute = brs[crit].compute_s if crit is not None else 0.0
    offload = brs[crit].offload_s if crit is not None else 0.0
    full = max(range(p), key=lambda j: brs[j].memory_bytes[0])
    sent = []
    for j, (cg, dec) in enumerate(zip(win.costed, win.decisions)):
        d = communication_bytes(_sub(struct, win.split.stages[j]), cg, dec, precision=precision,
                                optimizer=optimizer)[0]
        x = (win.boundary_bytes[j] if j < p - 1 else 0.0) + (win.boundary_bytes[j - 1] if j > 0 else 0.0)
        sent.append(sum(v for k, v in d.items() if k != "offload") + m * x / per)
    predicted = Predicted(
        step_time_s=T, compute_s=compute, communication_s=max(0.0, T - compute - bubble - offload), bubble_s=bubble,
        offload_s=offload, memory_per_device_bytes=tuple(int(brs[r // per].memory_bytes[0]) for r in range(p * per)),
        memory_breakdown={k: int(v) for k, v in brs[full].memory_breakdown[0].items()},
        memory_peak_at=brs[full].memory_moment[0] if brs[full].memory_moment else "",
        communication_bytes=int(max(sent)), flops_per_step=3 * g.total_flops(),
        memory_capacity_bytes=int(win.costed[full].stages[0].capacity_bytes))
    res = win.result
    report = SolverReport(status=status, objective=T, gap=res.gap, wall_s=wall_s, num_variables=res.num_variables,
                          num_constraints=res.num_constraints, candidates=win.solved, shortcuts=tuple(shortcuts))
    return Plan(cluster=win.cluster.to_json(), model=ModelInfo(model_name or type(g.module).__name__,
                                                               g.fingerprint(), g.num_params, g.ir),
                training=Training(precision, optimizer, g.batch_size), mesh=mesh, nodes=tuple(nodes),
                params=tuple(params), pipeline=pipeline, blocks=(BlockPolicy("*", "none", False),),
                predicted=predicted, solver=report)


def _sub(struct: GraphStructure, units) -> GraphStructure:
    return sub_structure(struct, tuple(units))


def infeasible_message(struct: GraphStructure, cluster: Cluster, *, optimizer: str, precision: str, reserve: float,
                       block_error: Optional[str], split_note: str, constraints: Optional[dict] = None) -> str:
    """Why nothing fits on a mixed cluster, with each group's memory and the model's state."""
    total = state_bytes(struct, struct.units, optimizer, precision)
    part = embedding_part(struct)
    emb = state_bytes(struct, part, optimizer, precision) if part else 0.0
    groups = "; ".join(f"group {i} {g.device.name}: {g.world_size} x {g.device.memory_bytes * (1 - reserve) / GIB:,.1f}"
                       f" GiB usable = {usable_bytes(cluster, i, reserve) / GIB:,.1f} GiB"
                       for i, g in enumerate(cluster.groups))
    pins = f" the constraints {constraints} on" if constraints else ""
    lines = [f"no plan fits{pins} the mixed cluster {cluster.name!r}: the model's training state is "
             f"{total / GIB:,.1f} GiB ({struct.graph.num_params:,} parameters, {precision}, {optimizer})"
             + (f", of which the embedding tables take {emb / GIB:,.1f} GiB" if part else "") + f"; {groups}."]
    lines.append(f"Split pipelines: {split_note}.")
    if block_error:
        lines.append(f"Block pipelines: {block_error}")
    return " ".join(lines)
