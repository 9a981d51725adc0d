"""The Plan: what the solver decided, what the runtime executes, what a person reads.

A Plan is a value: a tree of frozen, slotted dataclasses with no behaviour beyond
validation and (de)serialisation. It can be solved on a laptop for a 1,024-GPU cluster,
saved as JSON, inspected, and run later. Loading checks ``schema_version`` and every field,
and errors name the field by its JSON path (``plan.nodes[3].inputs[0][1]``).

Conventions
- ``placement_axes`` = ("dp", "tp"): every placement tuple has one entry per axis, in that order.
  pp is not a placement axis: it cuts the graph into :class:`Stage` s.
- Ranks are laid out as rank = (pp_i * dp + dp_i) * tp + tp_i (tp innermost, inside a node).
- Times are seconds, sizes bytes, rates per second. ``predicted`` is per training step, where
  a step is one global batch (all microbatches, the optimizer step included).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from autopar.placements import (
    MESH_AXES,
    PLACEMENT_AXES,
    Placement,
    check_mesh,
    parse_placement,
)

SCHEMA_VERSION = 1
SCHEDULES = ("none", "gpipe", "1f1b", "interleaved_1f1b")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
#: torch.optim.Adam / SGD (momentum), default implementation or ``fused=True`` (``*_fused``):
#: see :data:`autopar.cost_model.memory.OPTIMIZERS`, which this must equal
OPTIMIZERS = ("adam", "sgd", "adam_fused", "sgd_fused")
RECOMPUTE = ("none", "full")
OFFLOADABLE = ("params", "grads", "optimizer_state")

Placements = tuple[Placement, ...]  # one per placement axis (dp, tp)


class PlanError(ValueError):
    """A plan (or plan file) that is malformed; the message names the field at fault."""


# ---------------------------------------------------------------------------------------
# values


@dataclass(frozen=True, slots=True)
class NodeStrategy:
    """How one graph node runs: placements of its tensor inputs and outputs on (dp, tp)."""

    node: str  # fx node name
    strategy: str  # rule name, e.g. "dp", "colwise", "rowwise", "replicate"
    inputs: tuple[Placements, ...]  # per tensor input, in NodeInfo.inputs order
    outputs: tuple[Placements, ...]  # per tensor output
    compute_s: float = 0.0  # predicted fwd+bwd time of the node per step on one device
    reshard_s: float = 0.0  # predicted time of the resharding collectives feeding it

    def __post_init__(self) -> None:
        for what, group in (("inputs", self.inputs), ("outputs", self.outputs)):
            for i, pl in enumerate(group):
                if len(pl) != len(PLACEMENT_AXES):
                    raise PlanError(
                        f"node {self.node!r} {what}[{i}] has {len(pl)} placements; expected one "
                        f"per placement axis {list(PLACEMENT_AXES)}"
                    )


@dataclass(frozen=True, slots=True)
class ParamPlan:
    """Where one parameter lives and how its training state is sharded."""

    name: str  # fully qualified parameter name
    shape: tuple[int, ...]
    placements: Placements  # compute placement on (dp, tp)
    zero_stage: int = 0  # 0 replicated; 1 optimizer state, 2 + grads, 3 + params sharded on dp
    offload: tuple[str, ...] = ()  # subset of OFFLOADABLE kept in host memory
    stage: int = 0  # pipeline stage that owns it

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise PlanError(f"param {self.name!r}: zero_stage must be 0..3, got {self.zero_stage}")
        bad = set(self.offload) - set(OFFLOADABLE)
        if bad:
            raise PlanError(f"param {self.name!r}: unknown offload class {sorted(bad)}; "
                            f"allowed {list(OFFLOADABLE)}")
        if len(self.placements) != len(PLACEMENT_AXES):
            raise PlanError(f"param {self.name!r} has {len(self.placements)} placements; "
                            f"expected {len(PLACEMENT_AXES)} ({list(PLACEMENT_AXES)})")


@dataclass(frozen=True, slots=True)
class Stage:
    """A contiguous part of the graph run by one group of ranks."""

    index: int
    nodes: tuple[str, ...]  # fx node names, contiguous in topological order
    blocks: tuple[str, ...]  # repeated blocks it holds
    ranks: tuple[int, ...]  # global ranks that run it (dp x tp of them)
    device: str  # device kind, e.g. "h100-sxm", "graviton4"
    compute_s: float = 0.0  # predicted fwd+bwd time per microbatch
    memory_bytes: int = 0  # predicted peak per device of this stage


@dataclass(frozen=True, slots=True)
class Pipeline:
    schedule: str = "none"  # one of SCHEDULES; "none" = a single stage
    num_microbatches: int = 1
    microbatch_size: int = 1  # samples per microbatch per data-parallel rank
    virtual_stages: int = 1  # stages per rank for interleaved 1F1B
    stages: tuple[Stage, ...] = ()

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise PlanError(f"pipeline.schedule {self.schedule!r} is not one of {list(SCHEDULES)}")
        for name in ("num_microbatches", "microbatch_size", "virtual_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise PlanError(f"pipeline.{name} must be a positive integer, got {v!r}")
        if self.schedule != "interleaved_1f1b" and self.virtual_stages != 1:
            raise PlanError(f"pipeline.virtual_stages={self.virtual_stages} needs schedule "
                            f"'interleaved_1f1b', not {self.schedule!r}")
        for i, s in enumerate(self.stages):
            if s.index != i:
                raise PlanError(f"pipeline.stages[{i}].index is {s.index}; stages must be in order")


@dataclass(frozen=True, slots=True)
class BlockPolicy:
    """Per repeated block (or "*" for nodes outside blocks): recomputation and offload."""

    block: str
    recompute: str = "none"  # one of RECOMPUTE
    offload_activations: bool = False  # saved activations kept in host memory

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE:
            raise PlanError(f"block {self.block!r}: recompute {self.recompute!r} is not one of "
                            f"{list(RECOMPUTE)}")


@dataclass(frozen=True, slots=True)
class Predicted:
    """The cost model's figures for this plan, per training step."""

    step_time_s: float
    compute_s: float = 0.0
    communication_s: float = 0.0  # exposed (not overlapped) collective time
    bubble_s: float = 0.0
    offload_s: float = 0.0  # exposed host<->device transfer time
    memory_per_device_bytes: tuple[int, ...] = ()
    memory_breakdown: Mapping[str, int] = field(default_factory=dict)  # on the fullest device
    communication_bytes: int = 0  # per device per step
    flops_per_step: float = 0.0
    memory_capacity_bytes: int = 0  # usable per device (after the reserve)
    #: when the fullest device peaks: loss_backward | with_gradients | optimizer_step
    #: (autopar.solvers.evaluate.moments); "" in plans written before it was recorded
    memory_peak_at: str = ""


@dataclass(frozen=True, slots=True)
class SolverReport:
    status: str = "pinned"  # "optimal" | "feasible" | "pinned" (everything fixed: prediction only)
    objective: float = 0.0
    gap: float = 0.0  # relative optimality gap at stop
    wall_s: float = 0.0
    num_variables: int = 0
    num_constraints: int = 0
    candidates: int = 0  # mesh x microbatch candidates evaluated
    shortcuts: tuple[str, ...] = ()  # heuristics used, stated so a reader can judge them


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    fingerprint: str  # Graph.fingerprint() the plan was solved for
    num_params: int
    ir: str = "fx"


@dataclass(frozen=True, slots=True)
class Training:
    precision: str = "fp32"
    optimizer: str = "adam"
    global_batch_size: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PlanError(f"training.precision {self.precision!r} is not one of {list(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(f"training.optimizer {self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if not isinstance(self.global_batch_size, int) or self.global_batch_size < 1:
            raise PlanError(f"training.global_batch_size must be >= 1, got {self.global_batch_size!r}")


@dataclass(frozen=True, slots=True)
class Plan:
    """A complete parallel training plan (see module docstring for conventions)."""

    cluster: Mapping[str, Any]  # Cluster.to_json() of the cluster it was made for
    model: ModelInfo
    training: Training
    mesh: Mapping[str, int]  # {"pp": .., "dp": .., "tp": ..}
    nodes: tuple[NodeStrategy, ...]
    params: tuple[ParamPlan, ...]
    pipeline: Pipeline
    blocks: tuple[BlockPolicy, ...]
    predicted: Predicted
    solver: SolverReport = SolverReport()
    schema_version: int = SCHEMA_VERSION
    placement_axes: tuple[str, ...] = PLACEMENT_AXES

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise PlanError(f"schema_version {self.schema_version} is not supported "
                            f"(this autopar reads version {SCHEMA_VERSION})")
        if tuple(self.placement_axes) != PLACEMENT_AXES:
            raise PlanError(f"placement_axes {list(self.placement_axes)} must be {list(PLACEMENT_AXES)}")
        world = self.cluster.get("world_size") if isinstance(self.cluster, Mapping) else None
        try:
            mesh = check_mesh(dict(self.mesh), world)
        except ValueError as e:
            raise PlanError(f"mesh: {e}") from None
        object.__setattr__(self, "mesh", mesh)
        seen: set[str] = set()
        for i, ns in enumerate(self.nodes):
            if ns.node in seen:
                raise PlanError(f"nodes[{i}]: node {ns.node!r} has two strategies")
            seen.add(ns.node)
        n_stages = max(1, len(self.pipeline.stages))
        if self.pipeline.stages and len(self.pipeline.stages) != mesh["pp"] * self.pipeline.virtual_stages:
            raise PlanError(
                f"pipeline has {len(self.pipeline.stages)} stages but mesh pp={mesh['pp']} x "
                f"virtual_stages={self.pipeline.virtual_stages}"
            )
        for i, p in enumerate(self.params):
            if not 0 <= p.stage < n_stages:
                raise PlanError(f"params[{i}] ({p.name!r}) is on stage {p.stage}; plan has {n_stages}")
        ws = mesh["pp"] * mesh["dp"] * mesh["tp"]
        for s in self.pipeline.stages:
            bad = [r for r in s.ranks if not 0 <= r < ws]
            if bad:
                raise PlanError(f"pipeline.stages[{s.index}] names ranks {bad} outside world size {ws}")
        if self.predicted.memory_per_device_bytes and len(self.predicted.memory_per_device_bytes) != ws:
            raise PlanError(f"predicted.memory_per_device_bytes has "
                            f"{len(self.predicted.memory_per_device_bytes)} entries for {ws} devices")

    def __str__(self) -> str:
        """The readable summary (``autopar show``); ``repr`` stays the exact dataclass form."""
        from autopar.show import summary

        return summary(self)

    # -- convenience reads (no behaviour beyond looking things up) ----------------------
    @property
    def world_size(self) -> int:
        return self.mesh["pp"] * self.mesh["dp"] * self.mesh["tp"]

    def strategy_of(self, node: str) -> NodeStrategy | None:
        for ns in self.nodes:
            if ns.node == node:
                return ns
        return None

    def param(self, name: str) -> ParamPlan | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def block_policy(self, block: str | None) -> BlockPolicy:
        key = block or "*"
        for b in self.blocks:
            if b.block == key:
                return b
        return BlockPolicy(block=key)

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _encode(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @staticmethod
    def from_dict(data: Any) -> "Plan":
        return _decode_plan(data)

    @staticmethod
    def from_json(text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return _decode_plan(data)

    def save(self, path) -> None:
        """Write atomically: a crash never leaves a half-written plan file behind."""
        from autopar.atomic_io import write_text_atomic

        write_text_atomic(path, self.to_json(), prefix=".plan-", suffix=".json")

    @staticmethod
    def load(path) -> "Plan":
        import os

        try:
            with open(os.fspath(path)) as f:
                text = f.read()
        except OSError as e:
            raise PlanError(f"cannot read plan file {path}: {e.strerror}") from None
        return Plan.from_json(text)


# ---------------------------------------------------------------------------------------
# encoding


def _encode(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        if _is_placement(v):
            return str(v)
        return {f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (tuple, list)):
        return [_encode(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _encode(x) for k, x in v.items()}
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)
    return v


def _is_placement(v: Any) -> bool:
    from autopar.placements import Partial, Replicate, Shard

    return isinstance(v, (Shard, Replicate, Partial))


class _Reader:
    """Walks JSON data with a path, so every error names the field at fault."""

    def __init__(self, data: Any, path: str = "plan"):
        self.data, self.path = data, path

    def fail(self, msg: str) -> PlanError:
        return PlanError(f"{self.path}: {msg}")

    def obj(self) -> dict:
        if not isinstance(self.data, dict):
            raise self.fail(f"expected an object, got {type(self.data).__name__}")
        return self.data

    def get(self, key: str, default: Any = dataclasses.MISSING) -> "_Reader":
        d = self.obj()
        if key not in d:
            if default is dataclasses.MISSING:
                raise PlanError(f"{self.path}: missing field {key!r}")
            return _Reader(default, f"{self.path}.{key}")
        return _Reader(d[key], f"{self.path}.{key}")

    def items(self) -> list["_Reader"]:
        if not isinstance(self.data, list):
            raise self.fail(f"expected a list, got {type(self.data).__name__}")
        return [_Reader(x, f"{self.path}[{i}]") for i, x in enumerate(self.data)]

    def int(self) -> int:
        if not isinstance(self.data, int) or isinstance(self.data, bool):
            raise self.fail(f"expected an integer, got {self.data!r}")
        return self.data

    def num(self) -> float:
        if isinstance(self.data, str) and self.data in ("inf", "-inf", "nan"):
            return float(self.data)
        if not isinstance(self.data, (int, float)) or isinstance(self.data, bool):
            raise self.fail(f"expected a number, got {self.data!r}")
        return float(self.data)

    def str(self) -> str:
        if not isinstance(self.data, str):
            raise self.fail(f"expected a string, got {self.data!r}")
        return self.data

    def bool(self) -> bool:
        if not isinstance(self.data, bool):
            raise self.fail(f"expected true/false, got {self.data!r}")
        return self.data

    def placement(self) -> Placement:
        try:
            return parse_placement(self.str())
        except ValueError as e:
            raise self.fail(str(e)) from None

    def placements(self) -> Placements:
        items = self.items()
        if len(items) != len(PLACEMENT_AXES):
            raise self.fail(f"expected {len(PLACEMENT_AXES)} placements (one per axis "
                            f"{list(PLACEMENT_AXES)}), got {len(items)}")
        return tuple(r.placement() for r in items)


def _build(r: _Reader, fn):
    """Run a constructor, re-raising its validation error with the JSON path."""
    try:
        return fn()
    except PlanError as e:
        if str(e).startswith("plan"):
            raise
        raise PlanError(f"{r.path}: {e}") from None


def _decode_plan(data: Any) -> Plan:
    r = _Reader(data)
    r.obj()
    version = r.get("schema_version").int()
    if version != SCHEMA_VERSION:
        raise PlanError(f"plan.schema_version is {version}; this autopar reads version "
                        f"{SCHEMA_VERSION}. Re-create the plan with `autopar plan`.")

    def node(n: _Reader) -> NodeStrategy:
        return _build(n, lambda: NodeStrategy(
            node=n.get("node").str(),
            strategy=n.get("strategy").str(),
            inputs=tuple(x.placements() for x in n.get("inputs").items()),
            outputs=tuple(x.placements() for x in n.get("outputs").items()),
            compute_s=n.get("compute_s", 0.0).num(),
            reshard_s=n.get("reshard_s", 0.0).num(),
        ))

    def param(p: _Reader) -> ParamPlan:
        return _build(p, lambda: ParamPlan(
            name=p.get("name").str(),
            shape=tuple(x.int() for x in p.get("shape").items()),
            placements=p.get("placements").placements(),
            zero_stage=p.get("zero_stage", 0).int(),
            offload=tuple(x.str() for x in p.get("offload", []).items()),
            stage=p.get("stage", 0).int(),
        ))

    def stage(s: _Reader) -> Stage:
        return _build(s, lambda: Stage(
            index=s.get("index").int(),
            nodes=tuple(x.str() for x in s.get("nodes").items()),
            blocks=tuple(x.str() for x in s.get("blocks", []).items()),
            ranks=tuple(x.int() for x in s.get("ranks").items()),
            device=s.get("device").str(),
            compute_s=s.get("compute_s", 0.0).num(),
            memory_bytes=s.get("memory_bytes", 0).int(),
        ))

    pr = r.get("pipeline")
    pipeline = _build(pr, lambda: Pipeline(
        schedule=pr.get("schedule").str(),
        num_microbatches=pr.get("num_microbatches").int(),
        microbatch_size=pr.get("microbatch_size").int(),
        virtual_stages=pr.get("virtual_stages", 1).int(),
        stages=tuple(stage(s) for s in pr.get("stages").items()),
    ))
    br = r.get("blocks")
    blocks = tuple(
        _build(b, lambda b=b: BlockPolicy(
            block=b.get("block").str(),
            recompute=b.get("recompute", "none").str(),
            offload_activations=b.get("offload_activations", False).bool(),
        ))
        for b in br.items()
    )
    q = r.get("predicted")
    predicted = Predicted(
        step_time_s=q.get("step_time_s").num(),
        compute_s=q.get("compute_s", 0.0).num(),
        communication_s=q.get("communication_s", 0.0).num(),
        bubble_s=q.get("bubble_s", 0.0).num(),
        offload_s=q.get("offload_s", 0.0).num(),
        memory_per_device_bytes=tuple(x.int() for x in q.get("memory_per_device_bytes", []).items()),
        memory_breakdown={k: _Reader(v, f"{q.path}.memory_breakdown.{k}").int()
                          for k, v in q.get("memory_breakdown", {}).obj().items()},
        communication_bytes=q.get("communication_bytes", 0).int(),
        flops_per_step=q.get("flops_per_step", 0.0).num(),
        memory_capacity_bytes=q.get("memory_capacity_bytes", 0).int(),
        memory_peak_at=q.get("memory_peak_at", "").str(),
    )
    sr = r.get("solver", {})
    solver = SolverReport(
        status=sr.get("status", "pinned").str(),
        objective=sr.get("objective", 0.0).num(),
        gap=sr.get("gap", 0.0).num(),
        wall_s=sr.get("wall_s", 0.0).num(),
        num_variables=sr.get("num_variables", 0).int(),
        num_constraints=sr.get("num_constraints", 0).int(),
        candidates=sr.get("candidates", 0).int(),
        shortcuts=tuple(x.str() for x in sr.get("shortcuts", []).items()),
    )
    mr = r.get("model")
    model = ModelInfo(
        name=mr.get("name").str(),
        fingerprint=mr.get("fingerprint").str(),
        num_params=mr.get("num_params").int(),
        ir=mr.get("ir", "fx").str(),
    )
    tr = r.get("training")
    training = _build(tr, lambda: Training(
        precision=tr.get("precision").str(),
        optimizer=tr.get("optimizer").str(),
        global_batch_size=tr.get("global_batch_size").int(),
    ))
    mesh_r = r.get("mesh")
    mesh = {k: _Reader(v, f"{mesh_r.path}.{k}").int() for k, v in mesh_r.obj().items()}
    for k in mesh:
        if k not in MESH_AXES:
            raise PlanError(f"plan.mesh: unknown axis {k!r}; axes are {list(MESH_AXES)}")
    cluster = r.get("cluster").obj()
    axes = tuple(x.str() for x in r.get("placement_axes", list(PLACEMENT_AXES)).items())
    nodes_r = r.get("nodes")
    params_r = r.get("params")
    return _build(r, lambda: Plan(
        cluster=cluster,
        model=model,
        training=training,
        mesh=mesh,
        nodes=tuple(node(n) for n in nodes_r.items()),
        params=tuple(param(p) for p in params_r.items()),
        pipeline=pipeline,
        blocks=blocks,
        predicted=predicted,
        solver=solver,
        schema_version=version,
        placement_axes=axes,
    ))


def schema_path() -> str:
    """Path of the shipped JSON Schema (draft 2020-12) for plan files."""
    import os

    return os.path.join(os.path.dirname(__file__), "schema", "plan.schema.json")
