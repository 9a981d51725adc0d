"""Annotate: a captured Graph + one candidate (mesh, microbatches, stages) -> typed cost tables.

Two steps.

:func:`analyze` (once per graph, mesh independent) builds a :class:`GraphStructure`:
the nodes the solver decides (*units*), each node's :class:`OpContext`, which tensors carry the
batch dim, and the edges, each with a *class* saying how often it occurs per microbatch:

    outside  between nodes outside the repeated blocks             once
    intra    inside the representative block                       once per block
    chain    block j's output -> block j+1's input                 L - 1 times
    prefix   outside -> first block (embedding -> h.0)             once, stage 0
    suffix   last block -> outside (h.L-1 -> ln_f)                 once, last stage
    fanin    outside -> every block (LLaMA's rope tables)          once per block
    param    owner of a tied parameter -> another reader           once

Block deduplication: when every repeated block has the same node sequence (kinds, targets,
shapes, internal edges) one representative block is costed and solved, and its strategies are
reused for all L blocks. Blocks that differ switch deduplication off (every node is a unit).

:func:`annotate` (per candidate) prices every unit x strategy on the stage device(s): forward
and backward time (cost model ``op_time``; backward = 2x forward), saved activation bytes,
the per-parameter training state under every ZeRO/offload configuration, and the resharding
cost matrix of every edge (forward collective plus the backward one on the gradient).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch.fx as fx

from autopar.cost_model import memory as mem
from autopar.cost_model.cluster import Cluster, LinkSpec, axis_link
from autopar.cost_model.collectives import collective_time
from autopar.cost_model.compute import BACKWARD_FACTOR, kernel_class, node_time, optimizer_step_time
from autopar.cost_model.device import DeviceSpec
from autopar.cost_model.pipeline import shared_host_factor
from autopar.cost_model.reshard import reshard_cost_multi
from autopar.graph import Graph, NodeInfo, OpKind, TensorSpec
from autopar.placements import Partial, Placement, Replicate, Shard

from .strategies import (AxisOption, OpContext, Strategy, StrategyRegistry, _conflict, choose_dp_option,
                         combine, replicate_option)

NO_WORK = (OpKind.INPUT, OpKind.PARAM, OpKind.OUTPUT)
R = Replicate()

#: Gradient all-reduces are bucketed as the runtime does them (``autopar.runtime.apply.
#: BUCKET_BYTES``, 4 MiB; DDP's idea, a smaller cap), so per-parameter costs are priced at
#: messages of that size.
BUCKET_BYTES = 4 * 2**20
#: Share of a training step's compute that is backward (backward = 2x forward).
BACKWARD_SHARE = 2.0 / 3.0


class SolverInputError(ValueError):
    """A graph/candidate the solver cannot price, naming the node at fault."""


# ---------------------------------------------------------------------------------------
# structure (mesh independent)


@dataclass(frozen=True)
class Edge:
    src: str  # producer unit
    dst: str  # consumer unit
    index: int  # position in dst's NodeInfo.inputs (-1: param edge)
    out_index: int  # which output of src
    kind: str  # outside | intra | chain | prefix | suffix | fanin | param
    param: str = ""  # for param edges: the parameter name


@dataclass
class GraphStructure:
    graph: Graph
    contexts: dict[str, OpContext]
    batched: dict[str, bool]  # node -> its outputs carry the batch dim
    batch_dp: dict[str, AxisOption]  # node -> the batch-sharding option (degree-free)
    units: list[str]  # nodes the solver decides, topological
    place: dict[str, str]  # unit -> "prefix" | "suffix" | "block"
    edges: list[Edge]
    blocks: tuple[str, ...]  # block names in order ([] when not deduplicated)
    rep_block: Optional[str]
    block_members: dict[str, list[str]]  # block -> its node names in order
    owner: dict[str, str]  # param -> unit that owns (holds) it
    param_readers: dict[str, list[str]]
    chain_outputs: tuple[str, ...]  # rep-block units whose output feeds the next block
    dedupe_note: str = ""
    #: node -> a gradient flows back through its output (it depends on a trained parameter);
    #: outputs computed only from inputs and buffers (RoPE tables, masks) carry none, so a
    #: reshard into them has no backward collective
    needs_grad: dict[str, bool] = field(default_factory=dict)

    @property
    def batch_statistics(self) -> tuple[str, ...]:
        """Batch-norm nodes: in training their statistics are over the whole batch, so a plan
        that splits the batch into microbatches cannot give one device's numbers."""
        return tuple(n for n, c in self.contexts.items()
                     if self.graph.nodes[n].kind is OpKind.NORM
                     and (c.batch_norm_module or "batch_norm" in self.graph.nodes[n].target))

    def has_grad(self, node: str, spec: TensorSpec) -> bool:
        return spec.dtype.startswith(("float", "bfloat")) and self.needs_grad.get(node, True)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def nodes_of_unit(self, unit: str) -> list[str]:
        """All fx nodes that take ``unit``'s strategy (the unit and its copies in other blocks)."""
        if self.place.get(unit) != "block":
            return [unit]
        pos = self.block_members[self.rep_block].index(unit)
        return [self.block_members[b][pos] for b in self.blocks]


def _fx_context(graph: Graph, info: NodeInfo, fx_node: Optional[fx.Node]) -> OpContext:
    specs: list[Optional[TensorSpec]] = []
    multi = False
    for src in info.inputs:
        outs = graph.nodes[src].outputs
        if not outs:
            specs.append(None)
        elif len(outs) > 1:
            multi = True
            idx = 0
            if fx_node is not None and len(fx_node.args) > 1 and isinstance(fx_node.args[1], int):
                idx = fx_node.args[1]
            specs.append(outs[min(idx, len(outs) - 1)])
        else:
            specs.append(outs[0])
    pspecs = tuple(graph.params.get(p) or graph.buffers.get(p) or TensorSpec((), "float32") for p in info.params)

    def strip(a):
        if isinstance(a, fx.Node):
            return a.name
        if isinstance(a, (list, tuple)):
            return type(a)(strip(x) for x in a)
        return a

    args = tuple(strip(a) for a in fx_node.args) if fx_node is not None else ()
    kwargs = {k: strip(v) for k, v in fx_node.kwargs.items()} if fx_node is not None else {}
    if multi and info.target.endswith("getitem"):
        kwargs["_multi_output"] = True
    if info.op == "call_module":  # a module's call options live on the module (nn.GELU(approximate="tanh"))
        approx = getattr(_submodule(graph, info), "approximate", None)
        if isinstance(approx, str) and "approximate" not in kwargs:
            kwargs["approximate"] = approx
    return OpContext(tuple(specs), pspecs, args, kwargs, _module_type(graph, info))


def _kernel_of(info: NodeInfo, ctx: OpContext) -> "str | None":
    """The measured kernel that prices ``info`` (:func:`kernel_class`), told by its module's
    class for a module node (ResNet's ``pool`` is a MaxPool2d, ``stem.1`` a BatchNorm2d)."""
    return kernel_class(info.kind, ctx.module_type or info.target, ctx.kwargs)


def _module_type(graph: Graph, info) -> str:
    """Class name of a call_module node's module ("" for other nodes): a module node's target
    is its path ("stem.1"), which does not say what it computes."""
    mod = _submodule(graph, info)
    return type(mod).__name__ if mod is not None else ""


def _submodule(graph: Graph, info):
    """A call_module node's module, or None."""
    if info.op != "call_module":
        return None
    try:
        return graph.gm.get_submodule(info.target)
    except AttributeError:
        return None


def _relative(name_target: str, block: str) -> str:
    return name_target.replace(block, "<b>").replace(block.replace(".", "_"), "<b>")


def _block_signature(graph: Graph, block: str, members: list[str]) -> tuple:
    pos = {n: i for i, n in enumerate(members)}
    sig = []
    for n in members:
        info = graph.nodes[n]
        ins = tuple(("in", pos[s]) if s in pos else ("ext",) for s in info.inputs)
        sig.append((info.kind.value, _relative(info.target, block), tuple(t.shape for t in info.outputs),
                    tuple(graph.params[p].shape if p in graph.params else () for p in info.params), ins))
    return tuple(sig)


def analyze(graph: Graph, registry: StrategyRegistry, *, dedupe: bool = True) -> GraphStructure:
    """Mesh-independent structure: contexts, batch tracking, units, classified edges."""
    fx_nodes = {n.name: n for n in graph.gm.graph.nodes}
    contexts: dict[str, OpContext] = {}
    batched: dict[str, bool] = {}
    batch_dp: dict[str, AxisOption] = {}
    B = graph.batch_size
    dp_out: dict[str, tuple[Placement, ...]] = {}
    for name, info in graph.nodes.items():
        ctx = _fx_context(graph, info, fx_nodes.get(name))
        contexts[name] = ctx
        if info.kind is OpKind.INPUT:
            is_b = bool(info.outputs) and len(info.outputs[0].shape) > 0 and info.outputs[0].shape[0] == B
            batched[name] = is_b
            dp_out[name] = tuple(Shard(0) if is_b else R for _ in info.outputs)
            continue
        batched[name] = any(batched.get(s, False) for s in info.inputs) and bool(info.outputs)
        if info.kind in (OpKind.PARAM, OpKind.OUTPUT):
            dp_out[name] = tuple(R for _ in info.outputs)
            continue
        opts = registry.options(info, ctx, 0)
        have = []
        for s in info.inputs:
            outs = dp_out.get(s, ())
            have.append(outs[0] if outs and graph.nodes[s].outputs else None)
        # int tensors of non-batched producers are None-equivalent R
        o = choose_dp_option(opts, have) if info.outputs else replicate_option(info, ctx)
        batch_dp[name] = o
        dp_out[name] = o.outputs

    # ---- blocks
    members: dict[str, list[str]] = {b: [] for b in graph.blocks}
    for name, info in graph.nodes.items():
        if info.block in members and info.kind not in NO_WORK:
            members[info.block].append(name)
    blocks = tuple(graph.blocks)
    note = ""
    ok = dedupe and len(blocks) >= 2
    if ok:
        sigs = {_block_signature(graph, b, members[b]) for b in blocks}
        if len(sigs) != 1:
            ok, note = False, "repeated blocks differ in structure; every node solved on its own"
    if ok:
        index = {b: i for i, b in enumerate(blocks)}
        first, last = None, None
        names = list(graph.nodes)
        for i, n in enumerate(names):
            info = graph.nodes[n]
            if info.block in index:
                first = i if first is None else first
                last = i
        # blocks must be contiguous in the topological order, outside nodes only before/after
        for n in names[first:last + 1]:
            info = graph.nodes[n]
            if info.block is None and info.kind not in NO_WORK and info.outputs:
                ok, note = False, f"node {n!r} sits between repeated blocks; blocks not deduplicated"
                break
        # edges between blocks only j -> j+1
        if ok:
            for n, info in graph.nodes.items():
                if info.block not in index:
                    continue
                for s in info.inputs:
                    sb = graph.nodes[s].block
                    if sb in index and index[sb] not in (index[info.block], index[info.block] - 1):
                        ok, note = False, f"edge {s}->{n} skips blocks; blocks not deduplicated"
            for n, info in graph.nodes.items():
                if info.block is None and info.kind not in NO_WORK:
                    for s in info.inputs:
                        sb = graph.nodes[s].block
                        if sb in index and index[sb] != len(blocks) - 1:
                            ok, note = False, f"edge {s}->{n} leaves an inner block; blocks not deduplicated"
    if not ok:
        blocks = ()
    rep = blocks[1] if blocks else None
    first_block_seen = False
    place: dict[str, str] = {}
    units: list[str] = []
    for name, info in graph.nodes.items():
        if info.kind is OpKind.OUTPUT or info.kind is OpKind.PARAM:
            continue
        if blocks and info.block in blocks:
            first_block_seen = True
            if info.block == rep:
                units.append(name)
                place[name] = "block"
            continue
        units.append(name)
        place[name] = "suffix" if first_block_seen else "prefix"

    unit_of: dict[str, str] = {}  # fx node -> unit name (block nodes map to the rep position)
    if blocks:
        for b in blocks:
            for i, n in enumerate(members[b]):
                unit_of[n] = members[rep][i]
    for u in units:
        unit_of.setdefault(u, u)

    edges: list[Edge] = []
    seen: set[tuple] = set()
    bidx = {b: i for i, b in enumerate(blocks)}
    for name, info in graph.nodes.items():
        if name not in unit_of or info.kind is OpKind.INPUT or not info.outputs:
            continue  # metadata reads (x.size(1), x.device) move no data
        cb = bidx.get(info.block) if blocks else None
        for k, s in enumerate(info.inputs):
            sinfo = graph.nodes[s]
            if not sinfo.outputs or s not in unit_of:
                continue
            out_index = 0
            ctx = contexts[name]
            if len(sinfo.outputs) > 1 and ctx.args and len(ctx.args) > 1 and isinstance(ctx.args[1], int):
                out_index = ctx.args[1]
            sb = bidx.get(sinfo.block) if blocks else None
            if cb is None and sb is None:
                kind = "outside"
            elif cb is not None and sb is not None:
                if cb != bidx[rep] and not (cb == 0 and sb == 0):
                    continue
                if cb == sb:
                    if info.block != rep:
                        continue
                    kind = "intra"
                else:
                    kind = "chain"
            elif cb is not None:  # outside -> block
                if info.block == rep:
                    kind = "fanin"
                elif cb == 0:
                    # prefix unless the same producer also feeds the rep block (then fanin)
                    rep_consumer = unit_of[name]
                    if s in graph.nodes[rep_consumer].inputs:
                        continue
                    kind = "prefix"
                else:
                    continue
            else:  # block -> outside
                if sb != len(blocks) - 1:
                    continue
                kind = "suffix"
            key = (unit_of[s], unit_of[name], k, kind)
            if key in seen:
                continue
            seen.add(key)
            edges.append(Edge(unit_of[s], unit_of[name], k, out_index, kind))

    # ---- parameter ownership (tied weights: first reader owns, others read through a param edge)
    owner: dict[str, str] = {}
    readers: dict[str, list[str]] = {}
    for u in units:
        for p in graph.nodes[u].params:
            if p not in graph.params:
                continue  # buffers: not trained
            readers.setdefault(p, []).append(u)
            owner.setdefault(p, u)
    for p, rs in readers.items():
        for r in rs[1:]:
            if r != owner[p]:
                edges.append(Edge(owner[p], r, -1, 0, "param", param=p))
    chain_outputs = tuple(sorted({e.src for e in edges if e.kind == "chain"}, key=units.index))
    needs_grad: dict[str, bool] = {}
    for name, info in graph.nodes.items():  # topological
        needs_grad[name] = (any(p in graph.params for p in info.params)
                            or any(needs_grad.get(s, False) for s in info.inputs))
    return GraphStructure(graph, contexts, batched, batch_dp, units, place, edges, blocks, rep,
                          members, owner, readers, chain_outputs, note, needs_grad)


# ---------------------------------------------------------------------------------------
# cost tables (per candidate)


@dataclass(frozen=True)
class StateConfig:
    """How a parameter group's training state is held: ZeRO stage and offloaded classes."""

    zero_stage: int
    offload: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        off = "+".join(self.offload) if self.offload else "-"
        return f"zero{self.zero_stage}/offload:{off}"


#: Configurations offered per parameter group: ZeRO 0-3, and ZeRO-Offload / ZeRO-Infinity
#: style offload on top (optimizer state; + gradients; + parameters), which only make sense
#: in that order (Ren et al. 2021, Rajbhandari et al. 2021).
STATE_CONFIGS: tuple[StateConfig, ...] = (
    StateConfig(0), StateConfig(1), StateConfig(2), StateConfig(3),
    StateConfig(0, ("optimizer_state",)), StateConfig(2, ("optimizer_state",)),
    StateConfig(3, ("optimizer_state",)),
    StateConfig(2, ("grads", "optimizer_state")), StateConfig(3, ("grads", "optimizer_state")),
    StateConfig(3, ("params", "grads", "optimizer_state")),
)


#: at dp == 1, the one ZeRO stage kept for each offloaded set that needs one
_DP1_STAGE = {("grads", "optimizer_state"): 2, ("params", "grads", "optimizer_state"): 3}


@dataclass(frozen=True)
class StateCost:
    """One parameter node x strategy x state config: per stage holding it."""

    memory_bytes: float  # resident per device (scaled by the blocks on the stage)
    working_bytes: float  # kept per device between steps (gradient bucket buffers), scaled by the blocks
    overlap_s: float  # per step, overlappable with compute (param streaming)
    sync_s: float  # per step, gradient sync after the last backward
    step_s: float  # per step, optimizer step (device or host), not overlapped
    host_bytes: float  # kept in host memory per device
    # alive only while this node runs (ZeRO-3 / host-streamed parameters gathered whole, and
    # their whole gradient before the reduce-scatter): a stage holds the largest one at a time
    gather_bytes: float = 0.0
    # the device-resident gradients inside memory_bytes: they do not exist yet at the loss's
    # backward (the step before ended with zero_grad(set_to_none=True))
    grad_bytes: float = 0.0
    # the optimizer step's temporaries on the device (cost_model.memory.optimizer_step_temp_bytes):
    # summed over the stage on a GPU (foreach), the largest one on a CPU (one tensor at a time)
    step_sum_bytes: float = 0.0
    step_max_bytes: float = 0.0


@dataclass(frozen=True)
class NodeCosts:
    name: str
    place: str  # prefix | suffix | block
    strategies: tuple[Strategy, ...]
    compute_s: Mapping[str, tuple[float, ...]]  # device -> per strategy fwd+bwd per microbatch
    forward_s: Mapping[str, tuple[float, ...]]  # device -> per strategy forward per microbatch
    act_bytes: tuple[float, ...]  # saved activations per microbatch per device
    out_bytes: tuple[float, ...]  # local output bytes per microbatch (pipeline p2p, checkpoints)
    tp_sync_s: tuple[float, ...]  # per step: all-reduce over tp of param grads left Partial
    state: Optional[Mapping[str, tuple[tuple[StateCost, ...], ...]]]  # device -> [s][c]; None: no params


@dataclass(frozen=True)
class EdgeCosts:
    src: str
    dst: str
    kind: str
    cost_s: tuple[tuple[float, ...], ...]  # [s_src][s_dst] per microbatch, fwd + bwd


@dataclass(frozen=True)
class StageSpec:
    index: int
    device: str  # device name (key into the per-device tables)
    num_blocks: int
    inflight: float  # microbatches of activations held at peak
    prefix: bool
    suffix: bool
    capacity_bytes: float
    host_link: bool  # can offload to host memory
    host_capacity_bytes: float = 0.0  # host memory this device may fill with offloaded tensors


@dataclass(frozen=True)
class Candidate:
    pp: int
    dp: int
    tp: int
    num_microbatches: int
    schedule: str  # none | gpipe | 1f1b | interleaved_1f1b
    virtual_stages: int
    partition: tuple[int, ...]  # blocks per pipeline rank

    @property
    def mesh(self) -> dict[str, int]:
        return {"pp": self.pp, "dp": self.dp, "tp": self.tp}


@dataclass(frozen=True)
class CostedGraph:
    candidate: Candidate
    nodes: tuple[NodeCosts, ...]
    edges: tuple[EdgeCosts, ...]
    stages: tuple[StageSpec, ...]
    configs: tuple[StateConfig, ...]
    num_blocks: int
    chain_outputs: tuple[str, ...]
    p2p_s_per_byte: float  # pipeline send/recv seconds per byte (0 when pp == 1)
    p2p_latency_s: float
    host_bw: Mapping[str, float]  # device -> host link bytes/s (0 = none)
    microbatch_size: int
    allowed: frozenset[str]
    #: fraction of asynchronous communication that hides behind compute (the candidate's
    #: slowest-overlapping link; LinkSpec.overlap_efficiency): 1 = all of it, 0 = none
    overlap_efficiency: float = 1.0
    #: bytes alive at the loss's backward on the last stage besides saved activations: the
    #: model output as the loss sees it, times cost_model.memory.LOSS_BACKWARD_OUTPUTS
    loss_bytes: float = 0.0

    def node(self, name: str) -> NodeCosts:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def _dtype(precision: str) -> str:
    return {"fp32": "fp32", "bf16-mixed": "bf16", "fp16-mixed": "fp16"}[precision]


def _elem_bytes(spec: TensorSpec, precision: str) -> int:
    if spec.dtype.startswith(("float", "bfloat")):
        return mem.activation_bytes_per_element(precision)
    return spec.itemsize


def _local(spec: TensorSpec, pl: tuple[Placement, Placement], mesh: Mapping[str, int], batched: bool,
           m: int, precision: str) -> float:
    """Bytes of a tensor per device per microbatch under placements (dp, tp)."""
    n = spec.numel * _elem_bytes(spec, precision)
    if batched:
        n /= m
    for axis, p in zip(("dp", "tp"), pl):
        if isinstance(p, Shard):
            n /= mesh[axis]
    return n


def strategies_for(struct: GraphStructure, registry: StrategyRegistry, name: str, dp: int, tp: int) -> list[Strategy]:
    info = struct.graph.nodes[name]
    ctx = struct.contexts[name]
    if info.kind is OpKind.INPUT:
        outs = tuple((Shard(0) if (struct.batched[name] and dp > 1) else R, R) for _ in info.outputs)
        return [Strategy("input", (), outs, (), (), ())]
    if dp > 1:
        dpo = struct.batch_dp[name]
    else:
        dpo = replicate_option(info, ctx)
    tps = registry.options(info, ctx, tp)
    out = [combine(dpo, t) for t in tps if not _conflict(dpo, t)]
    if not out:
        out = [combine(dpo, replicate_option(info, ctx))]
    return out


def _op_kind(info: NodeInfo) -> Optional[str]:
    k = info.kind
    if k in (OpKind.LINEAR, OpKind.MATMUL, OpKind.ATTENTION, OpKind.CONV):
        return "matmul"
    if k in (OpKind.NORM, OpKind.SOFTMAX, OpKind.ELEMENTWISE):
        return "elementwise"
    if k in (OpKind.REDUCTION, OpKind.POOL, OpKind.LOSS):
        return "reduction"
    if k in (OpKind.EMBEDDING, OpKind.OTHER):
        return "other"
    return None  # views, inputs: no work


def _work_factor(s: Strategy, mesh: Mapping[str, int]) -> int:
    f = 1
    for a, axis in enumerate(("dp", "tp")):
        if any(isinstance(p[a], Shard) for p in (*s.inputs, *s.outputs, *s.params)) and not any(
                isinstance(p[a], Partial) for p in s.inputs):
            f *= mesh[axis]
    return f


def annotate(struct: GraphStructure, registry: StrategyRegistry, cluster: Cluster, cand: Candidate, *,
             precision: str, optimizer: str, reserve_fraction: float, allowed: frozenset[str],
             stage_devices: Sequence[DeviceSpec], host_bandwidth: float,
             strategy_cache: Optional[dict] = None, table_cache: Optional[dict] = None) -> CostedGraph:
    """Price every unit x strategy, every edge, every state config for candidate ``cand``.

    ``table_cache`` (a dict the caller owns) reuses the node and edge tables between
    candidates that differ only in schedule or stage sizes."""
    g = struct.graph
    mesh = cand.mesh
    m = cand.num_microbatches
    dtype = _dtype(precision)
    links = {a: _link(cluster, mesh, a, table_cache) for a in ("dp", "tp") if mesh[a] > 1}
    # ranks that synchronise arrive apart: a multi-rank step's compute is stretched by the
    # wait for the last rank (LinkSpec.skew_fraction, measured in place; 0 for catalog links)
    stretch = 1.0 + max((_link(cluster, mesh, a, table_cache).skew_fraction
                         for a in ("dp", "tp", "pp") if mesh[a] > 1), default=0.0)
    devices = {d.name: d for d in stage_devices}
    # a pipeline's idle stages give their cores to the busy ones where processes share cores
    shared = {d.name: shared_host_factor(cand.pp, m, cand.dp * cand.tp, d.shared_speedup, cand.virtual_stages,
                                         backward_factor=BACKWARD_FACTOR, drain_syncs=cand.dp * cand.tp > 1)
              for d in stage_devices}
    cache = strategy_cache if strategy_cache is not None else {}

    def strats(name: str) -> list[Strategy]:
        key = (name, cand.dp, cand.tp)
        if key not in cache:
            cache[key] = strategies_for(struct, registry, name, cand.dp, cand.tp)
        return cache[key]

    configs = tuple(c for c in STATE_CONFIGS if _config_allowed(c, cand.dp, allowed, devices))
    # node costs depend on the schedule's virtual stages only through the shared-host factor
    key = (cand.dp, cand.tp, cand.pp, m, tuple(sorted(devices)), precision, optimizer, allowed,
           tuple(sorted(shared.items())))
    if table_cache is not None and key in table_cache:
        nodes, edges = table_cache[key]
        return _finish(struct, cluster, cand, nodes, edges, configs, stage_devices, reserve_fraction, devices,
                       allowed, table_cache, precision)
    nodes: list[NodeCosts] = []
    # the model output is handed to the loss as the runtime's output placement (batch rows on
    # dp, whole on tp: autopar.runtime.steps.OUTPUT_PLACEMENT); a unit that feeds it in another
    # placement pays that reshard (and its gradient's) every microbatch
    feeds_output = {src for info in g.nodes.values() if info.kind is OpKind.OUTPUT for src in info.inputs}
    out_want = _output_placement(cand)
    for u in struct.units:
        info = g.nodes[u]
        ss = strats(u)
        batched = struct.batched[u]
        kind = _op_kind(info)
        kernel = _kernel_of(info, struct.contexts[u])
        comp: dict[str, tuple] = {}
        fwd: dict[str, tuple] = {}
        out_cost = [0.0] * len(ss)
        if u in feeds_output and info.outputs and (cand.dp > 1 or cand.tp > 1) and struct.place[u] != "block":
            spec = info.outputs[0]
            nbytes = spec.numel * _elem_bytes(spec, precision) / (m if batched else 1)
            want_grad = out_want if struct.has_grad(u, spec) else None
            out_cost = [_edge_cost(nbytes, st.outputs[0], out_want, want_grad, mesh, links) for st in ss]
        if struct.contexts[u].batch_norm_module:
            out_cost = [c + _sync_batch_norm_s(struct.contexts[u], st, mesh, links)
                        for c, st in zip(out_cost, ss)]
        for dname, dev in devices.items():
            c_list, f_list = [], []
            for k, s in enumerate(ss):
                if info.kind is OpKind.INPUT or (kind is None and dev.node_overhead_s <= 0):
                    c_list.append(out_cost[k])
                    f_list.append(0.0)
                    continue
                flops = info.flops / (m if batched else 1) / _work_factor(s, mesh)
                moved = sum(_local(spec, pl, mesh, batched, m, precision) for spec, pl in zip(info.outputs, s.outputs))
                out_bytes = moved
                elems = sum(_local(spec, pl, mesh, batched, m, precision) / _elem_bytes(spec, precision)
                            for spec, pl in zip(info.outputs, s.outputs))
                for src, pl in zip(info.inputs, s.inputs):
                    sinfo = g.nodes[src]
                    if sinfo.outputs:
                        moved += _local(sinfo.outputs[0], pl, mesh, struct.batched[src], m, precision)
                for p, pl in zip(info.params, s.params):
                    if p in g.params:
                        moved += _local(g.params[p], pl, mesh, False, 1, precision)
                # measured runtime per-node overhead and non-matmul kernel rates where the device has them
                t, b = node_time(flops, moved, elems, dtype, dev, kind, kernel, out_bytes=out_bytes)
                c_list.append(stretch * shared[dname] * (t + b) + out_cost[k])
                f_list.append(stretch * shared[dname] * t)
            comp[dname] = tuple(c_list)
            fwd[dname] = tuple(f_list)
        # what the backward keeps of this unit, measured at capture (NodeInfo.saved_fraction);
        # graphs captured without it: every costed op's output
        if info.kind is OpKind.INPUT:
            kept = 0.0
        elif info.saved_fraction is not None:
            kept = info.saved_fraction
        else:
            kept = 1.0 if kind is not None else 0.0
        outb = tuple(sum(_local(spec, pl, mesh, batched, m, precision) for spec, pl in zip(info.outputs, s.outputs))
                     for s in ss)
        act = tuple(o * kept for o in outb)
        owned = [p for p in info.params if struct.owner.get(p) == u]
        tp_sync = []
        for s in ss:
            t = 0.0
            for p, pl, gpl in zip(info.params, s.params, s.param_grads):
                if p in owned and isinstance(gpl[1], Partial) and cand.tp > 1:
                    nbytes = _local(g.params[p], pl, mesh, False, 1, precision)
                    t += _bucketed("all_reduce", nbytes, cand.tp, links["tp"])
            tp_sync.append(t)
        state = None
        if owned:
            state = {dname: tuple(tuple(_state_cost(g, owned, info, s, c, cand, precision, optimizer, links,
                                                    dev, host_bandwidth, stretch) for c in configs) for s in ss)
                     for dname, dev in devices.items()}
        nodes.append(NodeCosts(u, struct.place[u], tuple(ss), comp, fwd, act, outb, tuple(tp_sync), state))

    by_name = {n.name: n for n in nodes}
    edges: list[EdgeCosts] = []
    memo: dict = {}  # (bytes, placements) -> seconds: many edges carry same-shaped tensors
    for e in struct.edges:
        src, dst = by_name[e.src], by_name[e.dst]
        if e.kind == "param":
            spec = g.params[e.param]
            pi_src = g.nodes[e.src].params.index(e.param)
            pi_dst = g.nodes[e.dst].params.index(e.param)
            mat = tuple(tuple(_param_edge(spec, a.params[pi_src], b.params[pi_dst], mesh, links, precision)
                              for b in dst.strategies) for a in src.strategies)
        else:
            spec = g.nodes[e.src].outputs[min(e.out_index, len(g.nodes[e.src].outputs) - 1)]
            batched = struct.batched[e.src]
            has_grad = struct.has_grad(e.src, spec)
            nbytes = spec.numel * _elem_bytes(spec, precision) / (m if batched else 1)
            mat = tuple(tuple(_edge_cost_memo(memo, nbytes, a.outputs[min(e.out_index, len(a.outputs) - 1)],
                                              b.inputs[e.index], b.input_grads[e.index] if has_grad else None,
                                              mesh, links) for b in dst.strategies) for a in src.strategies)
        if any(v > 0 for row in mat for v in row):
            edges.append(EdgeCosts(e.src, e.dst, e.kind, mat))
    if table_cache is not None:
        table_cache[key] = (nodes, edges)
    return _finish(struct, cluster, cand, nodes, edges, configs, stage_devices, reserve_fraction, devices, allowed,
                   table_cache, precision)


def _output_placement(cand: Candidate) -> tuple[Placement, Placement]:
    """The (dp, tp) placement the runtime hands the model output to the loss in: batch rows on
    dp, whole on tp (autopar.runtime.steps.OUTPUT_PLACEMENT)."""
    return (Shard(0) if cand.dp > 1 else R, R)


def _loss_bytes(struct: GraphStructure, cand: Candidate, precision: str) -> float:
    """Bytes the loss holds at its backward (CostedGraph.loss_bytes), per microbatch."""
    g = struct.graph
    want = _output_placement(cand)
    total = 0.0
    for info in g.nodes.values():
        if info.kind is not OpKind.OUTPUT:
            continue
        for src in info.inputs:
            outs = g.nodes[src].outputs
            if outs and outs[0].dtype.startswith(("float", "bfloat")):
                total += _local(outs[0], want, cand.mesh, struct.batched[src], cand.num_microbatches, precision)
    return mem.LOSS_BACKWARD_OUTPUTS * total


def _finish(struct, cluster, cand, nodes, edges, configs, stage_devices, reserve_fraction, devices, allowed,
            table_cache=None, precision="fp32"):
    mesh = cand.mesh
    m = cand.num_microbatches
    stages = _stage_specs(cand, stage_devices, reserve_fraction, struct)
    if cand.pp > 1:
        pl = _link(cluster, mesh, "pp", table_cache)
        p2p_b, p2p_l = 1.0 / pl.bandwidth, pl.latency
    else:
        p2p_b = p2p_l = 0.0
    host_bw = {n: (d.host_link_bandwidth if d.host_link != "none" else 0.0) for n, d in devices.items()}
    mbs = struct.graph.batch_size // (cand.dp * m) if struct.graph.batch_size % (cand.dp * m) == 0 else 1
    overlap = min((_link(cluster, mesh, a, table_cache).overlap_efficiency
                   for a in ("dp", "tp", "pp") if mesh[a] > 1), default=1.0)
    return CostedGraph(cand, tuple(nodes), tuple(edges), stages, configs, struct.num_blocks,
                       struct.chain_outputs, p2p_b, p2p_l, host_bw, max(1, mbs), allowed, overlap,
                       _loss_bytes(struct, cand, precision))


def _link(cluster: Cluster, mesh: Mapping[str, int], axis: str, cache: Optional[dict]) -> LinkSpec:
    """axis_link, remembered per mesh in the caller's cache (it walks every rank)."""
    if cache is None:
        return axis_link(cluster, mesh, axis)
    key = ("link", mesh["pp"], mesh["dp"], mesh["tp"], axis)
    if key not in cache:
        cache[key] = axis_link(cluster, mesh, axis)
    return cache[key]


def _config_allowed(c: StateConfig, dp: int, allowed: frozenset[str], devices: Mapping[str, DeviceSpec]) -> bool:
    if dp == 1 and c.zero_stage > 0:
        # nothing to shard: the stage only names the configuration. Offloading gradients
        # (stage 2) or weights too (stage 3) still saves device memory - one GPU training a model
        # larger than itself (ZeRO-Infinity) - so keep one config per offloaded set
        if c.zero_stage != _DP1_STAGE.get(c.offload):
            return False
    elif c.zero_stage > 0 and "zero" not in allowed:
        return False
    if c.offload:
        if "offload" not in allowed:
            return False
        if all(d.host_link == "none" for d in devices.values()):
            return False
    return True


def _bare_collective_time(kind: str, nbytes: float, n: int, link: LinkSpec) -> float:
    """A collective the runtime issues itself (torch.distributed), not through a DTensor
    redistribute: the link's ``sync_s`` (a redistribute's extra cost) is not charged."""
    return collective_time(kind, nbytes, n, link) - link.sync_s


def _bucketed(kind: str, nbytes: float, n: int, link: LinkSpec) -> float:
    """Time of ``nbytes`` moved by a bucketed collective: linear at BUCKET_BYTES messages
    (bucket all-reduces are bare collectives)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return _bare_collective_time(kind, BUCKET_BYTES, n, link) * nbytes / BUCKET_BYTES


def _edge_cost_memo(memo: dict, nbytes: float, src: tuple, dst: tuple, dst_grad: Optional[tuple], mesh,
                    links) -> float:
    key = (nbytes, src, dst, dst_grad)
    v = memo.get(key)
    if v is None:
        v = memo[key] = _edge_cost(nbytes, src, dst, dst_grad, mesh, links)
    return v


def _edge_cost(nbytes: float, src: tuple, dst: tuple, dst_grad: Optional[tuple], mesh, links) -> float:
    """Forward reshard src -> dst plus backward reshard of the gradient back to src's form
    (``nbytes``: the full tensor of one microbatch)."""
    if src == dst and (dst_grad is None or dst_grad == tuple(R if isinstance(p, Partial) else p for p in src)):
        return 0.0
    sub = {"dp": mesh["dp"], "tp": mesh["tp"]}
    t, _ = reshard_cost_multi(dict(zip(("dp", "tp"), src)), dict(zip(("dp", "tp"), dst)), nbytes, sub, links)
    if dst_grad is not None:
        want = tuple(R if isinstance(p, Partial) else p for p in src)
        tb, _ = reshard_cost_multi(dict(zip(("dp", "tp"), dst_grad)), dict(zip(("dp", "tp"), want)), nbytes, sub,
                                   links)
        t += tb
    return t


def _param_edge(spec: TensorSpec, src: tuple, dst: tuple, mesh, links, precision: str) -> float:
    """A tied parameter read in another placement: reshard it forward, its gradient back."""
    if src == dst:
        return 0.0
    nbytes = spec.numel * mem.param_bytes(1, precision)
    sub = {"dp": mesh["dp"], "tp": mesh["tp"]}
    t, _ = reshard_cost_multi(dict(zip(("dp", "tp"), src)), dict(zip(("dp", "tp"), dst)), nbytes, sub, links)
    tb, _ = reshard_cost_multi(dict(zip(("dp", "tp"), dst)), dict(zip(("dp", "tp"), src)), nbytes, sub, links)
    return t + tb


def _sync_batch_norm_s(ctx: OpContext, st: Strategy, mesh: Mapping[str, int], links) -> float:
    """Per microbatch: a BatchNorm module whose batch is sharded all-reduces its per-channel
    statistic sums over the sharding axes (autopar.runtime.sync_batch_norm): the sum and the
    centred sum of squares in the forward, ``sum dy`` and ``sum dy * x_hat`` in the backward."""
    spec = ctx.input_specs[0] if ctx.input_specs else None
    if spec is None or len(spec.shape) < 2 or not st.inputs:
        return 0.0
    pl = st.inputs[0]
    channels = spec.shape[1] / (mesh["tp"] if pl[1] == Shard(1) else 1)
    nbytes = channels * 4  # the sums are taken in fp32
    t = 0.0
    for axis, q in zip(("dp", "tp"), pl):
        if isinstance(q, Shard) and q.dim == 0 and mesh[axis] > 1:
            t += 2 * _bare_collective_time("all_reduce", nbytes, mesh[axis], links[axis])
            t += _bare_collective_time("all_reduce", 2 * nbytes, mesh[axis], links[axis])
    return t


def zero3_ok(spec: TensorSpec, pl: tuple, mesh: Mapping[str, int]) -> bool:
    """ZeRO-3 stores a parameter Shard(0) on dp: dim 0 (after tp sharding) must divide by dp."""
    if not spec.shape:
        return False
    d0 = spec.shape[0]
    if isinstance(pl[1], Shard) and pl[1].dim == 0:
        d0 //= mesh["tp"]
    return d0 % mesh["dp"] == 0


def _state_cost(g: Graph, owned: list[str], info: NodeInfo, s: Strategy, c: StateConfig, cand: Candidate,
                precision: str, optimizer: str, links, dev: DeviceSpec, host_bw_cpu: float,
                stretch: float = 1.0) -> StateCost:
    """Training state of the params ``owned`` by a node under strategy s and config c
    (``stretch``: the skew factor applied to compute, here to the optimizer step)."""
    mesh = cand.mesh
    dp, m = cand.dp, cand.num_microbatches
    memory = working = overlap = sync = step = host = gather = grads = step_sum = step_max = 0.0
    inf = math.inf
    host_link = dev.host_link_bandwidth if dev.host_link != "none" else 0.0
    foreach = dev.kind == "gpu"
    for p, pl, gpl in zip(info.params, s.params, s.param_grads):
        if p not in owned:
            continue
        spec = g.params[p]
        numel = spec.numel
        if isinstance(pl[1], Shard):
            numel = numel / mesh["tp"]
        z = c.zero_stage
        if z == 3 and not zero3_ok(spec, pl, mesh):
            return StateCost(inf, inf, inf, inf, inf, inf)
        shard = numel / dp
        pb = mem.param_bytes(1, precision) * (shard if z >= 3 else numel)
        gb = mem.grad_bytes(1, precision) * (shard if z >= 2 else numel)
        ob = mem.optimizer_state_bytes(1, optimizer, precision) * (shard if z >= 1 else numel)
        full_p = mem.param_bytes(1, precision) * numel
        full_g = mem.grad_bytes(1, precision) * numel
        for cls, b in (("params", pb), ("grads", gb), ("optimizer_state", ob)):
            if cls in c.offload:
                host += b
            else:
                memory += b
        if "grads" not in c.offload:
            grads += gb
        if "optimizer_state" not in c.offload:
            tmp = mem.optimizer_step_temp_bytes(int(shard if z >= 1 else numel), optimizer, foreach)
            if foreach:
                step_sum += tmp
            else:
                step_max = max(step_max, tmp)
        if z >= 3 or "params" in c.offload:
            # the runtime gathers a ZeRO-3 parameter at its op and does not keep it for the
            # backward (saved-tensor hooks gather it again there: reshard after forward), so
            # only one node's parameters are whole at a time: in its backward, with their
            # whole gradients until the reduce-scatter
            gather += full_p + full_g
        elif "grads" in c.offload:
            # an offloaded gradient is made on the device and moved out as soon as it is final
            gather += full_g
        # data-parallel communication, as the runtime (autopar.runtime.apply) issues it: ZeRO-0
        # gradients are all-reduced in buckets (a kept flat buffer per bucket of several);
        # ZeRO gathers and reduce-scatters are one collective per parameter (DTensor
        # redistribute), issued where they are needed and waited for at once
        tp_summed = mesh["tp"] > 1 and isinstance(gpl[1], Partial)  # all-reduced over tp in buckets
        if full_g < BUCKET_BYTES and ((dp > 1 and z == 0) or tp_summed):
            # shares a bucket: summed in the bucket's flat buffer, kept between steps
            working += full_g
        if dp > 1:
            dl = links["dp"]
            if z == 0:
                sync += _bucketed("all_reduce", full_g, dp, dl)
            elif z == 1:  # updated params all-gathered after the optimizer step: exposed
                sync += collective_time("reduce_scatter", full_g, dp, dl)
                step += collective_time("all_gather", full_p, dp, dl)
            elif z == 2:  # gradients reduce-scattered every microbatch (they are not kept whole)
                sync += collective_time("reduce_scatter", full_g, dp, dl)
                overlap += (m - 1) * collective_time("reduce_scatter", full_g, dp, dl)
                step += collective_time("all_gather", full_p, dp, dl)
            else:  # ZeRO-3: gathered at use in the forward and again in the backward, then
                # reduce-scattered, every microbatch (FSDP's volume); the runtime waits for
                # each gather before the op runs
                step += m * (2 * collective_time("all_gather", full_p, dp, dl)
                             + collective_time("reduce_scatter", full_g, dp, dl))
        # offload traffic over the host link
        if c.offload:
            if host_link <= 0:
                return StateCost(inf, inf, inf, inf, inf, inf)
            if "params" in c.offload:
                overlap += 2 * m * pb / host_link
            if "grads" in c.offload:
                overlap += m * gb / host_link
            if "optimizer_state" in c.offload:
                # ZeRO-Offload: gradients go down, updated params come back, Adam runs on the host
                # (memory-bound there: state + master read and written once).
                step += (gb if "grads" not in c.offload else 0.0) / host_link + pb / host_link
                # the host's measured optimizer rate where the profile has one (a local GPU),
                # else the host DRAM roofline (state + master read and written once)
                t_host = optimizer_step_time(shard if z >= 1 else numel, 1, optimizer, dev, on_host=True)
                step += stretch * t_host if t_host is not None else 2 * (ob + pb) / host_bw_cpu
            else:
                step += 2 * (ob + pb) / (dev.memory_bandwidth * dev.memory_bw_efficiency)
        else:
            # measured optimizer rate + per-tensor cost where the profile has them (local
            # devices); otherwise the memory roofline: state + master read and written once.
            t_opt = optimizer_step_time(shard if z >= 1 else numel, 1, optimizer, dev)
            step += stretch * t_opt if t_opt is not None else (
                (2 * (ob + pb) + gb) / (dev.memory_bandwidth * dev.memory_bw_efficiency))
        # the runtime's own per-parameter cost (gradient accumulation through DTensor and, where
        # a collective syncs the gradient, its bookkeeping), measured both ways
        synced = dp > 1 or (mesh["tp"] > 1 and not isinstance(pl[1], Shard))
        per_param = dev.param_overhead_s if synced or dev.param_overhead_local_s <= 0 else dev.param_overhead_local_s
        step += stretch * m * per_param
    return StateCost(memory, working, overlap, sync, step, host, gather, grads, step_sum, step_max)


def _stage_specs(cand: Candidate, stage_devices: Sequence[DeviceSpec], reserve: float,
                 struct: GraphStructure) -> tuple[StageSpec, ...]:
    from autopar.cost_model.pipeline import inflight_microbatches

    out = []
    p = cand.pp
    for i in range(p):
        dev = stage_devices[i]
        if cand.schedule == "none" or p == 1:
            infl = 1.0
        else:
            infl = float(inflight_microbatches(cand.schedule, i, p, cand.num_microbatches, cand.virtual_stages))
        out.append(StageSpec(i, dev.name, cand.partition[i] if cand.partition else 0, infl, i == 0, i == p - 1,
                             dev.memory_bytes * (1.0 - reserve), dev.host_link != "none",
                             dev.host_memory_bytes * (1.0 - reserve)))
    return tuple(out)
