"""``autopar explain PLAN NODE``: why this node got this strategy.

The answer is the node's alternatives side by side with their predicted costs per step, the
chosen one marked: compute (fwd+bwd) under each strategy, the resharding its inputs need
given what the producers chose in the plan, the resharding of its output into what the
consumers chose plus any tp gradient all-reduce (the ILP's edge costs), their sum, and the
saved activations per microbatch. When an alternative is cheaper for the node alone, a note
says so and points at what the local view misses (memory, parameter state): the solver
optimised the whole step under the memory limit.

Where the figures come from. The plan stores only the chosen strategy per node, so the
alternatives are recomputed with the solver's own cost tables: the model named in the plan
(``plan.model.name``, a ``pkg.mod:fn`` / ``file.py:fn`` as ``autopar plan`` writes it) is
rebuilt and captured, its fingerprint checked against the plan's, and the solver's costing
is asked for this node's strategies on the plan's mesh and cluster
(:func:`_solver_alternatives`). When the model cannot be rebuilt (a decorated class, or
``--no-recapture``), the explanation falls back to the plan alone: the chosen strategy, its
placements and predicted times, and a note saying why no alternatives are listed.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from autopar.plan import NodeStrategy, Plan


class ExplainError(ValueError):
    """The node or the plan's model cannot be explained; the message says why."""


@dataclass(frozen=True, slots=True)
class Alternative:
    strategy: str
    inputs: tuple[tuple[str, ...], ...]  # per tensor input, placements on (dp, tp) as text
    outputs: tuple[tuple[str, ...], ...]
    compute_s: float
    reshard_s: float
    memory_bytes: int | None = None  # saved activations per microbatch per device, when known
    chosen: bool = False
    reshard_out_s: float = 0.0  # resharding into what the consumers chose + tp grad all-reduce

    @property
    def total_s(self) -> float:
        return self.compute_s + self.reshard_s + self.reshard_out_s

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "inputs": [list(p) for p in self.inputs],
                "outputs": [list(p) for p in self.outputs], "compute_s": self.compute_s,
                "reshard_s": self.reshard_s, "reshard_out_s": self.reshard_out_s, "total_s": self.total_s, "memory_bytes": self.memory_bytes,
                "chosen": self.chosen}


@dataclass(frozen=True, slots=True)
class Explanation:
    node: str
    stage: int | None
    chosen: Alternative
    alternatives: tuple[Alternative, ...]  # cheapest first, chosen included
    source: str  # "solver cost tables" or "plan only"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"node": self.node, "stage": self.stage, "chosen": self.chosen.to_dict(),
                "alternatives": [a.to_dict() for a in self.alternatives], "source": self.source,
                "notes": list(self.notes)}


def resolve_node(plan: Plan, name: str) -> NodeStrategy:
    """The node's strategy by fx name or module path (``h.3.attn.c_proj`` -> ``h_3_attn_c_proj``)."""
    for cand in (name, name.replace(".", "_")):
        ns = plan.strategy_of(cand)
        if ns is not None:
            return ns
    names = [ns.node for ns in plan.nodes]
    close = difflib.get_close_matches(name.replace(".", "_"), names, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; the plan has {len(names)} nodes, e.g. " \
        f"{', '.join(names[:5])}"
    raise ExplainError(f"node {name!r} is not in the plan for {plan.model.name}{hint} "
                       f"(`autopar show PLAN --json` lists them)")


def _text(pls: Sequence[Sequence[Any]]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(str(p) for p in pl) for pl in pls)


def _stage_of(plan: Plan, node: str) -> int | None:
    for s in plan.pipeline.stages:
        if node in s.nodes:
            return s.index
    return None if plan.pipeline.stages else 0


def explain(plan: Plan, node: str, *, top: int = 5, graph: Any = None, recapture: bool = True,
            progress: Callable[[str], None] | None = None) -> Explanation:
    """Explain ``node``'s strategy in ``plan`` (see module docstring)."""
    ns = resolve_node(plan, node)
    chosen = Alternative(ns.strategy, _text(ns.inputs), _text(ns.outputs), ns.compute_s, ns.reshard_s,
                         chosen=True)
    stage = _stage_of(plan, ns.node)
    notes: list[str] = []
    if graph is None and recapture:
        graph, why = _recapture(plan, progress)
        if why:
            notes.append(why)
    elif graph is None:
        notes.append("--no-recapture: alternatives need the model, so only the chosen strategy is shown")
    if graph is not None:
        try:
            alts = _solver_alternatives(plan, graph, ns.node)
        except _NoSolverCosts as e:
            notes.append(str(e))
            alts = None
        except Exception as e:  # the solver's internals moved: explain what we can, say why
            notes.append(f"costing the alternatives failed ({type(e).__name__}: {e}); only the chosen "
                         f"strategy is shown")
            alts = None
        if alts:
            mine = next((a for a in alts if a.chosen), None) or \
                next((a for a in alts if a.strategy == ns.strategy), None)
            rest = sorted((a for a in alts if a is not mine), key=lambda a: a.total_s)[: max(0, top - 1)]
            if mine is None:
                notes.append("the plan's strategy is not among the solver's current options for this node")
                chosen_row = chosen
            else:
                chosen_row = Alternative(ns.strategy, chosen.inputs, chosen.outputs, mine.compute_s,
                                         mine.reshard_s, mine.memory_bytes, True, mine.reshard_out_s)
            rows = sorted(rest + [chosen_row], key=lambda a: a.total_s)
            best = rows[0]
            if best is not chosen_row:
                more_mem = (best.memory_bytes or 0) - (chosen_row.memory_bytes or 0)
                mem = (f", but it keeps {_fmt_b(best.memory_bytes)} of activations per microbatch where "
                       f"{ns.strategy} keeps {_fmt_b(chosen_row.memory_bytes)}" if more_mem > 0 else "")
                notes.append(f"{best.strategy} is cheaper for this node alone by "
                             f"{_fmt_s(chosen_row.total_s - best.total_s)}{mem}; the solver minimises the whole "
                             f"step under the memory limit, so {ns.strategy} must save more elsewhere (memory, "
                             f"parameter state, or its neighbours' choices)")
            elif len(rows) > 1:
                notes.append(f"{ns.strategy} is the cheapest option for this node given its neighbours, "
                             f"{_fmt_s(rows[1].total_s - chosen_row.total_s)} ahead of {rows[1].strategy}")
            return Explanation(ns.node, stage, chosen_row, tuple(rows), "solver cost tables", tuple(notes))
    return Explanation(ns.node, stage, chosen, (chosen,), "plan only", tuple(notes))


class _NoSolverCosts(Exception):
    pass


def _recapture(plan: Plan, progress: Callable[[str], None] | None) -> tuple[Any, str]:
    """(graph, "") or (None, why not)."""
    spec = plan.model.name
    if ":" not in spec:
        return None, (f"the plan's model {spec!r} is not a 'pkg.module:function' path (e.g. a decorated "
                      f"class), so it cannot be rebuilt to cost the alternatives")
    from autopar.cli import CliError, load_model
    from autopar.graph import capture

    try:
        if progress:
            progress(f"rebuilding {spec} to cost the alternatives")
        model, inputs = load_model(spec)
        graph = capture(model, inputs)
    except CliError as e:
        return None, f"cannot rebuild the plan's model: {e}"
    if graph.fingerprint() != plan.model.fingerprint:
        return None, (f"{spec} now captures as graph {graph.fingerprint()}, not the plan's "
                      f"{plan.model.fingerprint} (the model changed since the plan was made); alternatives "
                      f"would not be comparable")
    return graph, ""


def _solver_alternatives(plan: Plan, graph: Any, node: str) -> list[Alternative]:
    """The node's strategies costed by the solver, its neighbours fixed as in the plan.

    Uses the solver's own costing (``autopar.solvers.costed.analyze`` / ``annotate``) for the
    plan's candidate (mesh, microbatches, schedule, blocks per stage), so the figures are
    the ones the ILP compared. Per strategy: compute (fwd+bwd, all microbatches of a step),
    resharding of the inputs from what the producers chose, resharding of the output into
    what the consumers chose plus the tp gradient all-reduce it leaves. Memory shown is the
    node's saved activations per microbatch per device.
    """
    try:
        api = importlib.import_module("autopar.solvers.api")
    except ImportError as e:
        raise _NoSolverCosts(f"the solver's cost tables (autopar.solvers.api) cannot be imported: {e}") from None
    hook = getattr(api, "node_alternatives", None)
    if hook is not None:  # the solver's own explanation, if it grows one
        return [Alternative(a["strategy"], _text(a["inputs"]), _text(a["outputs"]), float(a["compute_s"]),
                            float(a["reshard_s"]), a.get("memory_bytes"), False, float(a.get("reshard_out_s", 0.0)))
                for a in hook(graph, plan, node)]
    try:
        from autopar.cost_model.cluster import Cluster
        from autopar.solvers.costed import Candidate, analyze, annotate
        from autopar.solvers.options import SolverOptions
        from autopar.solvers.pipeline import stage_devices
        from autopar.solvers.search import _host_bw
        from autopar.solvers.strategies import default_registry
    except ImportError as e:
        raise _NoSolverCosts(f"the solver's costing modules cannot be imported: {e}") from None

    cluster = Cluster.from_json(dict(plan.cluster))
    reg = default_registry()
    struct = analyze(graph, reg)
    mesh, pr = plan.mesh, plan.pipeline
    pp, dp, tp = mesh["pp"], mesh["dp"], mesh["tp"]
    L = struct.num_blocks
    if pp == 1:
        partition: tuple[int, ...] = (L,)
    elif pr.virtual_stages == 1:
        partition = tuple(len(s.blocks) for s in pr.stages)
    else:
        partition = tuple([L // pp] * pp)
    cand = Candidate(pp, dp, tp, pr.num_microbatches, pr.schedule, pr.virtual_stages, partition)
    devs = stage_devices(cluster, pp, dp, tp)
    if devs is None:
        raise _NoSolverCosts(f"mesh {dict(mesh)} does not map onto cluster {cluster.name!r} stage by stage")
    opts = SolverOptions()
    cg = annotate(struct, reg, cluster, cand, precision=plan.training.precision, optimizer=plan.training.optimizer,
                  reserve_fraction=opts.memory_reserve_fraction, allowed=opts.allowed, stage_devices=devs,
                  host_bandwidth=_host_bw())
    unit_of = {n: u for u in struct.units for n in struct.nodes_of_unit(u)}
    unit = unit_of.get(node)
    if unit is None:
        raise _NoSolverCosts(f"node {node!r} is not one the solver decides (it has no strategy choice)")
    by_unit = {n.name: n for n in cg.nodes}

    def chosen_index(u: str) -> int | None:
        nc = by_unit[u]
        ns = plan.strategy_of(u)
        if ns is None:
            return None
        for k, st in enumerate(nc.strategies):
            if st.name == ns.strategy and tuple(map(tuple, st.inputs)) == tuple(map(tuple, ns.inputs)) \
                    and tuple(map(tuple, st.outputs)) == tuple(map(tuple, ns.outputs)):
                return k
        return next((k for k, st in enumerate(nc.strategies) if st.name == ns.strategy), None)

    nc = by_unit[unit]
    stage = _stage_of(plan, node) or 0
    dev = cg.stages[stage % pp].device if cg.stages else next(iter(nc.compute_s))
    m = pr.num_microbatches
    ins = [(e, chosen_index(e.src)) for e in cg.edges if e.dst == unit]
    outs = [(e, chosen_index(e.dst)) for e in cg.edges if e.src == unit]
    mine = chosen_index(unit)
    out = []
    for k, st in enumerate(nc.strategies):
        r_in = m * sum(e.cost_s[j][k] for e, j in ins if j is not None)
        r_out = m * sum(e.cost_s[k][j] for e, j in outs if j is not None) + nc.tp_sync_s[k]
        out.append(Alternative(st.name, _text(st.inputs), _text(st.outputs), m * nc.compute_s[dev][k], r_in,
                               int(nc.act_bytes[k]), k == mine, r_out))
    return out


def _fmt_s(s: float) -> str:
    from autopar.show import fmt_seconds

    return fmt_seconds(s)


def _fmt_b(n: int | None) -> str:
    from autopar.show import fmt_bytes

    return "-" if n is None else fmt_bytes(n)


def format_explanation(ex: Explanation) -> str:
    L = [f"{ex.node}" + (f" (stage {ex.stage})" if ex.stage is not None else "")
         + f": {ex.chosen.strategy}  [{ex.source}]"]
    L.append(f"  {'':2}{'strategy':<22} {'inputs (dp,tp)':<28} {'outputs':<16} {'compute':>10} "
             f"{'reshard in':>10} {'out+sync':>10} {'total':>10}  {'act/mb':>9}")
    for a in ex.alternatives:
        ins = " ".join("(" + ",".join(p) + ")" for p in a.inputs) or "-"
        outs = " ".join("(" + ",".join(p) + ")" for p in a.outputs) or "-"
        L.append(f"  {'*' if a.chosen else ' ':2}{a.strategy:<22} {ins:<28} {outs:<16} {_fmt_s(a.compute_s):>10} "
                 f"{_fmt_s(a.reshard_s):>10} {_fmt_s(a.reshard_out_s):>10} {_fmt_s(a.total_s):>10}  "
                 f"{_fmt_b(a.memory_bytes):>9}")
    for n in ex.notes:
        L.append(f"  note: {n}")
    return "\n".join(L)
