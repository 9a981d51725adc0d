"""Plan the moves, then make them: (Graph, Plan) -> a pure list of steps.

:func:`plan_steps` reads a captured :class:`~autopar.graph.Graph` and a :class:`~autopar.plan.Plan`
and returns a :class:`Program`: for every compute node, in order, which of its tensor inputs
must be redistributed (from the producer's planned output placement to the placement this node's
strategy asks for), which parameters must be gathered from their storage placement to their
compute placement, the placement its outputs must be made, whether it is recomputed or has its
saved activations offloaded, and which pipeline stage runs it. Nothing here touches a process
group or a tensor, so every decision is unit-testable; :mod:`autopar.runtime.apply` executes it.

Placements live on the stage's (dp, tp) submesh. Conventions the executor relies on:

- graph inputs (one global batch, dim 0 = batch) enter as ``(S(0), R)``: each dp rank holds its
  rows of the batch (a local slice of the global batch, no communication);
- the graph output leaves as ``(S(0), R)``: each dp rank computes the loss on its rows and the
  runtime averages over dp (the Plan contract; exact for mean-reduced losses on equal shards);
- parameter storage: ``ParamPlan.placements`` with the dp entry replaced by ``S(0)`` when
  ``zero_stage >= 1`` and dp > 1 (needs dim 0 divisible by the shard count). ZeRO-3 gathers at
  every use (the gather's backward is a reduce-scatter: FSDP); ZeRO-1/2 gather once per step
  (grads reduce-scattered, optimizer state and step on the shard; ZeRO-1 is run as ZeRO-2,
  same numbers, less memory).
- a producer with several tensor outputs (``chunk``, ``split``) has no move on its consumers'
  inputs; the consumers (``getitem``) make their own outputs as planned.
"""
from __future__ import annotations

from dataclasses import dataclass

from autopar.graph import Graph, OpKind
from autopar.placements import Partial, Placement, Replicate, Shard, rank_of
from autopar.plan import Plan

Placements = tuple[Placement, ...]

INPUT_PLACEMENT: Placements = (Shard(0), Replicate())
OUTPUT_PLACEMENT: Placements = (Shard(0), Replicate())
AXES = ("dp", "tp")


class RuntimeRefusal(ValueError):
    """A plan the runtime will not run (it could not be run exactly); says what and why."""


@dataclass(frozen=True, slots=True)
class Move:
    """Redistribute one tensor on the stage submesh from ``src`` to ``dst`` placements."""

    tensor: str  # producer node name, or the parameter's fqn
    src: Placements
    dst: Placements

    def collectives(self) -> tuple[tuple[str, str], ...]:
        """(axis, collective) per axis that changes, e.g. (("tp", "all-reduce"),)."""
        return tuple((ax, collective_kind(s, d)) for ax, s, d in zip(AXES, self.src, self.dst) if s != d)

    def __str__(self) -> str:
        src = ",".join(map(str, self.src))
        dst = ",".join(map(str, self.dst))
        what = "; ".join(f"{a}:{k}" for a, k in self.collectives())
        return f"{self.tensor}: ({src}) -> ({dst}) [{what}]"


def collective_kind(src: Placement, dst: Placement) -> str:
    """The collective (or local op) that turns ``src`` into ``dst`` on one mesh axis."""
    if src == dst:
        return "none"
    if isinstance(src, Shard) and isinstance(dst, Replicate):
        return "all-gather"
    if isinstance(src, Replicate) and isinstance(dst, Shard):
        return "slice"  # local: keep my chunk
    if isinstance(src, Partial) and isinstance(dst, Replicate):
        return "all-reduce"
    if isinstance(src, Partial) and isinstance(dst, Shard):
        return "reduce-scatter"
    if isinstance(src, Shard) and isinstance(dst, Shard):
        return "all-to-all"
    if isinstance(src, Replicate) and isinstance(dst, Partial):
        return "zero-others"  # local: one rank keeps the value, the others hold zeros
    if isinstance(src, Shard) and isinstance(dst, Partial):
        return "all-gather"  # via Replicate
    raise AssertionError(f"no collective for {src} -> {dst}")


@dataclass(frozen=True, slots=True)
class ParamLayout:
    """Where a parameter is stored and where it is computed with."""

    name: str
    shape: tuple[int, ...]
    storage: Placements  # what each rank keeps between steps (optimizer works on this)
    compute: Placements  # what the nodes that read it use
    gather: str  # "none" (storage == compute), "step" (once per step: ZeRO-1/2), "use" (ZeRO-3)
    stage: int
    zero_stage: int = 0
    offload: tuple[str, ...] = ()

    @property
    def move(self) -> Move | None:
        return None if self.storage == self.compute else Move(self.name, self.storage, self.compute)


@dataclass(frozen=True, slots=True)
class NodeStep:
    """Everything the executor does for one compute node, in order."""

    node: str
    stage: int
    inputs: tuple[str, ...]  # producer names, NodeInfo.inputs order
    moves: tuple[Move | None, ...]  # per input: None = already as planned (or multi-output producer)
    param_moves: tuple[Move, ...]  # per-use gathers (ZeRO-3)
    outputs: tuple[Placements, ...]  # make outputs equal to these (one per tensor output)
    recompute: bool = False
    offload_activations: bool = False
    block: str | None = None


@dataclass(frozen=True, slots=True)
class StageIO:
    """Values crossing into (``inputs``) and out of (``outputs``) one pipeline stage, in order."""

    index: int
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ranks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Program:
    """The whole per-step program: what every rank does, stage by stage."""

    steps: tuple[NodeStep, ...]
    params: dict  # fqn -> ParamLayout
    placement_of: dict  # value name -> its planned placement (producer's output[0])
    graph_inputs: tuple[str, ...]  # placeholder names
    output: str  # name of the value the model returns
    output_move: Move | None
    stages: tuple[StageIO, ...]
    num_microbatches: int
    schedule: str
    input_placement: Placements = INPUT_PLACEMENT  # of graph inputs (degree-1 axes made R)
    output_placement: Placements = OUTPUT_PLACEMENT  # the model output, before the loss

    def local_stages(self, pp_index: int, pp: int) -> tuple[int, ...]:
        """Stages pp rank ``pp_index`` runs: s with s % pp == pp_index (one unless interleaved)."""
        if len(self.stages) <= 1:
            return (0,)
        return tuple(s.index for s in self.stages if s.index % pp == pp_index)

    def steps_of_stage(self, stage: int) -> tuple[NodeStep, ...]:
        return tuple(s for s in self.steps if s.stage == stage)

    def step_gathers(self, stage: int | None = None) -> tuple[Move, ...]:
        return tuple(p.move for p in self.params.values()
                     if p.gather == "step" and (stage is None or p.stage == stage))

    def describe(self) -> str:
        """One line per step, for humans and `autopar explain`."""
        lines = []
        for g in self.step_gathers():
            lines.append(f"step-start gather {g}")
        for s in self.steps:
            for m in s.moves:
                if m is not None and m.src != m.dst:
                    lines.append(f"[stage {s.stage}] {s.node}: redistribute {m}")
            for m in s.param_moves:
                lines.append(f"[stage {s.stage}] {s.node}: gather param {m}")
            flags = (" recompute" if s.recompute else "") + (" offload-act" if s.offload_activations else "")
            outs = " ".join("(" + ",".join(map(str, o)) + ")" for o in s.outputs)
            lines.append(f"[stage {s.stage}] {s.node}: run -> {outs}{flags}")
        if self.output_move is not None and self.output_move.src != self.output_move.dst:
            lines.append(f"output: redistribute {self.output_move}")
        return "\n".join(lines)


def _norm(pl: Placements, ndim: int, what: str, degrees: tuple[int, int] = (2, 2)) -> Placements:
    """Non-negative shard dims; any placement on an axis of degree 1 is Replicate (all equal)."""
    out = []
    for p, deg in zip(pl, degrees):
        if deg == 1:
            out.append(Replicate())
            continue
        if isinstance(p, Shard):
            d = p.dim + ndim if p.dim < 0 else p.dim
            if not 0 <= d < max(ndim, 1):
                raise RuntimeRefusal(f"{what}: placement {p} names dim {p.dim} of a {ndim}-d tensor")
            p = Shard(d)
        out.append(p)
    return tuple(out)


def _storage(pp, dp: int, tp: int) -> tuple[Placements, str]:
    comp = pp.placements
    if pp.zero_stage == 0 or dp == 1 or not isinstance(comp[0], Replicate):
        return comp, "none"
    shards = dp * (tp if comp[1] == Shard(0) else 1)
    if not pp.shape or pp.shape[0] % shards:
        raise RuntimeRefusal(
            f"param {pp.name!r} shape {tuple(pp.shape)}: zero_stage={pp.zero_stage} stores dim 0 "
            f"sharded {shards} ways (dp={dp}{' x tp=' + str(tp) if shards != dp else ''}), which "
            f"does not divide {pp.shape[0] if pp.shape else 0}; use zero_stage 0 for it"
        )
    return (Shard(0), comp[1]), ("use" if pp.zero_stage == 3 else "step")


def plan_steps(graph: Graph, plan: Plan) -> Program:
    """The per-rank program that executes ``plan`` on ``graph``; raises :class:`RuntimeRefusal`.

    Checks: every compute node has a strategy with one placement pair per tensor input/output;
    every parameter has a ParamPlan; stages are contiguous and cover every compute node; a
    parameter is used on one stage only; the global batch splits evenly over dp x microbatches.
    """
    mesh = plan.mesh
    dp, tp, pp = mesh["dp"], mesh["tp"], mesh["pp"]
    deg = (dp, tp)
    nodes = graph.nodes
    compute = [n for n in nodes.values() if n.kind not in (OpKind.INPUT, OpKind.PARAM, OpKind.OUTPUT)]
    inputs = tuple(n.name for n in nodes.values() if n.kind is OpKind.INPUT)
    outs = [n for n in nodes.values() if n.kind is OpKind.OUTPUT]
    if len(outs) != 1 or len(outs[0].inputs) != 1:
        raise RuntimeRefusal("the model must return exactly one tensor (the logits / prediction); "
                             f"its output node reads {list(outs[0].inputs) if outs else []}")
    output = outs[0].inputs[0]

    # --- batch split
    B = graph.batch_size
    m = plan.pipeline.num_microbatches
    if B % (dp * m):
        raise RuntimeRefusal(f"global batch {B} does not split evenly into dp={dp} x "
                             f"num_microbatches={m}; every shard must be equal for the loss to be exact")

    if m > 1 and graph.ir == "export":
        raise RuntimeRefusal(
            f"num_microbatches={m}, but this graph was captured with torch.export, which bakes the "
            f"example batch of {B} into its reshapes; a microbatch of {B // m} rows cannot run through it. "
            f"Capture with ir='fx' if the model traces, or plan with one microbatch (no pipeline)")

    # --- stages
    if plan.pipeline.stages:
        stage_of: dict[str, int] = {}
        for st in plan.pipeline.stages:
            for nm in st.nodes:
                if nm not in nodes:
                    raise RuntimeRefusal(f"pipeline.stages[{st.index}] names node {nm!r}, not in the graph")
                if nm in stage_of:
                    raise RuntimeRefusal(f"node {nm!r} is in stages {stage_of[nm]} and {st.index}")
                stage_of[nm] = st.index
        missing = [n.name for n in compute if n.name not in stage_of]
        if missing:
            raise RuntimeRefusal(f"compute nodes {missing[:5]} are in no pipeline stage")
        for st in plan.pipeline.stages:  # stage s runs on pp index s % pp (interleaved: v per rank)
            want = tuple(rank_of(mesh, st.index % pp, d, t) for d in range(dp) for t in range(tp))
            if st.ranks and tuple(sorted(st.ranks)) != tuple(sorted(want)):
                raise RuntimeRefusal(f"pipeline.stages[{st.index}].ranks {list(st.ranks)} differ from the "
                                     f"mesh layout's ranks {list(want)} for pp index {st.index}")
        n_stages = len(plan.pipeline.stages)
    else:
        if pp != 1:
            raise RuntimeRefusal(f"mesh pp={pp} but the plan lists no pipeline stages")
        stage_of = {n.name: 0 for n in compute}
        n_stages = 1
    for n in nodes.values():
        if n.kind is OpKind.INPUT:
            stage_of[n.name] = 0
    for n in compute:
        for src in n.inputs:
            if stage_of.get(src, 0) > stage_of[n.name]:
                raise RuntimeRefusal(f"node {n.name!r} (stage {stage_of[n.name]}) reads {src!r} from a "
                                     f"later stage {stage_of[src]}: stages must follow topological order")

    # --- parameters
    params: dict[str, ParamLayout] = {}
    for name, spec in graph.params.items():
        pp_ = plan.param(name)
        if pp_ is None:
            raise RuntimeRefusal(f"param {name!r} has no ParamPlan in the plan")
        if tuple(pp_.shape) != tuple(spec.shape):
            raise RuntimeRefusal(f"param {name!r}: plan shape {tuple(pp_.shape)} != model shape {spec.shape}")
        comp = _norm(pp_.placements, len(spec.shape), f"param {name!r}", deg)
        pp_n = type(pp_)(pp_.name, pp_.shape, comp, pp_.zero_stage, pp_.offload, pp_.stage)
        storage, gather = _storage(pp_n, dp, tp)
        params[name] = ParamLayout(name, tuple(spec.shape), storage, comp, gather, pp_.stage,
                                   pp_.zero_stage, tuple(pp_.offload))
    users: dict[str, set[int]] = {}
    for n in compute:
        for p in n.params:
            if p in params:
                users.setdefault(p, set()).add(stage_of[n.name])
    for p, st in users.items():
        if len(st) > 1:
            raise RuntimeRefusal(f"param {p!r} is read by nodes on pipeline stages {sorted(st)} (tied "
                                 f"weights across stages); put its readers on one stage")
        (s,) = st
        if n_stages > 1 and params[p].stage != s:
            params[p] = ParamLayout(**{**_asdict(params[p]), "stage": s})

    # --- per-node steps
    in_pl = _norm(INPUT_PLACEMENT, 1, "graph input", deg)
    out_pl = _norm(OUTPUT_PLACEMENT, 1, "graph output", deg)
    placement_of: dict[str, Placements] = {name: in_pl for name in inputs}
    multi: set[str] = set()
    steps: list[NodeStep] = []
    for n in compute:
        ns = plan.strategy_of(n.name)
        if ns is None:
            raise RuntimeRefusal(f"node {n.name!r} ({n.kind.value}, {n.target}) has no strategy in the plan")
        if len(ns.inputs) != len(n.inputs):
            raise RuntimeRefusal(f"node {n.name!r}: strategy gives {len(ns.inputs)} input placements for "
                                 f"{len(n.inputs)} tensor inputs {list(n.inputs)}")
        if len(ns.outputs) != len(n.outputs):
            raise RuntimeRefusal(f"node {n.name!r}: strategy gives {len(ns.outputs)} output placements for "
                                 f"{len(n.outputs)} tensor outputs")
        moves: list[Move | None] = []
        for src, want in zip(n.inputs, ns.inputs):
            spec = nodes[src].outputs
            if src in multi or not spec:
                moves.append(None)
                continue
            want = _norm(want, len(spec[0].shape), f"node {n.name!r} input {src!r}", deg)
            have = placement_of[src]
            moves.append(None if have == want else Move(src, have, want))
        pmoves = tuple(params[p].move for p in n.params
                       if p in params and params[p].gather == "use" and params[p].move is not None)
        outputs = tuple(_norm(o, len(spec.shape), f"node {n.name!r} output {i}", deg)
                        for i, (o, spec) in enumerate(zip(ns.outputs, n.outputs)))
        if len(outputs) == 1:
            placement_of[n.name] = outputs[0]
        else:
            multi.add(n.name)
        pol = plan.block_policy(n.block)
        steps.append(NodeStep(n.name, stage_of[n.name], tuple(n.inputs), tuple(moves), pmoves, outputs,
                              pol.recompute == "full", bool(pol.offload_activations), n.block))

    if output in multi or output not in placement_of:
        raise RuntimeRefusal(f"model output {output!r} must be a single tensor")
    have = placement_of[output]
    out_move = None if have == out_pl else Move(output, have, out_pl)

    # --- stage boundaries (values live across each cut, in first-produced order)
    order = list(inputs) + [n.name for n in compute]
    last_use: dict[str, int] = {}
    for n in compute:
        for src in n.inputs:
            last_use[src] = max(last_use.get(src, 0), stage_of[n.name])
    last_use[output] = n_stages  # needed after the last stage (the loss)
    stages = []
    for s in range(n_stages):
        s_nodes = tuple(n.name for n in compute if stage_of[n.name] == s)
        ins = tuple(v for v in order if stage_of[v] < s and last_use.get(v, -1) >= s) if s else inputs
        outs_ = tuple(v for v in order if stage_of[v] <= s and last_use.get(v, -1) > s)
        ranks = tuple(rank_of(mesh, s % pp, d, t) for d in range(dp) for t in range(tp)) if n_stages > 1 else \
            tuple(range(plan.world_size))
        bad = [v for v in outs_ if v in multi]
        if bad:
            raise RuntimeRefusal(f"pipeline cut after stage {s} splits the tuple-valued node(s) {bad} from "
                                 f"their getitem users; move the cut so only single tensors cross it")
        stages.append(StageIO(s, s_nodes, ins, outs_, ranks))
    return Program(tuple(steps), params, placement_of, inputs, output, out_move, tuple(stages), m,
                   plan.pipeline.schedule, in_pl, out_pl)


def _asdict(x) -> dict:
    return {f: getattr(x, f) for f in x.__slots__}
