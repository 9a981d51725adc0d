"""Hand-built plans and a process spawner, for tests and benchmarks.

:func:`make_plan` writes a *valid, complete* Plan (a NodeStrategy for every compute node, a
ParamPlan for every parameter) for one of the classic layouts, so the runtime can be checked
on every plan kind without the solver:

- ``dp``: batch ``S(0)`` on dp everywhere, parameters replicated.
- ``fsdp``: as dp, parameters ZeRO-3 (stored ``S(0)`` on dp, gathered at use).
- ``tp``: Megatron pairs. A Linear whose output reaches another Linear through elementwise ops
  only is column-parallel (W ``S(0)``, output ``S(last)``), that next Linear row-parallel
  (W ``S(1)``, input ``S(last)``, output ``P`` if it has no bias, else made ``R``); any other
  Linear is column-parallel with its output gathered; embeddings are vocab-parallel (W ``S(0)``,
  output ``R`` after the all-reduce); everything else runs replicated on tp.
- ``dp_tp``, ``pp``, ``pp_dp``, ``pp_tp``: the combinations; pipeline stages cut the compute
  nodes into ``pp`` contiguous parts of equal node count, moved to block boundaries when blocks
  exist.

It is deliberately simple: it is a test oracle for the runtime, not a planner.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from typing import Any, Sequence

from autopar.graph import Graph, OpKind
from autopar.placements import Partial, Replicate, Shard, rank_of
from autopar.plan import (BlockPolicy, ModelInfo, NodeStrategy, ParamPlan, Pipeline, Plan, Predicted,
                          Stage, Training)

KIND_MESH = {
    "dp": lambda n: {"pp": 1, "dp": n, "tp": 1},
    "fsdp": lambda n: {"pp": 1, "dp": n, "tp": 1},
    "tp": lambda n: {"pp": 1, "dp": 1, "tp": n},
    "dp_tp": lambda n: {"pp": 1, "dp": 2, "tp": n // 2},
    "pp": lambda n: {"pp": n, "dp": 1, "tp": 1},
    "pp_dp": lambda n: {"pp": 2, "dp": n // 2, "tp": 1},
    "pp_tp": lambda n: {"pp": 2, "dp": 1, "tp": n // 2},
    "single": lambda n: {"pp": 1, "dp": 1, "tp": 1},
}

_ELEMENTWISE_CHAIN = (OpKind.ELEMENTWISE,)


def make_plan(
    graph: Graph,
    kind: str = "dp",
    world_size: int = 2,
    *,
    mesh: dict | None = None,
    schedule: str | None = None,
    microbatches: int = 1,
    recompute: bool = False,
    offload: "bool | tuple[str, ...]" = False,
    offload_activations: bool | None = None,
    zero_stage: int | None = None,
    virtual_stages: int = 1,
    vocab_partial: bool = False,
    optimizer: str = "adam",
) -> Plan:
    """A complete Plan of ``kind`` for ``graph`` on ``world_size`` ranks (see module docstring).

    ``recompute`` / ``offload_activations`` apply to every block (and to nodes outside blocks);
    ``offload`` puts every parameter's optimizer state (and its step) on the host; a tuple names
    the classes to offload instead (``("params", "grads", "optimizer_state")``: ZeRO-Infinity).
    ``vocab_partial`` leaves a vocab-parallel embedding's output a partial sum on the tp axis,
    reduced where its consumer needs it whole (a layout the solver picks when that is cheaper).
    ``optimizer`` is the plan's ``training.optimizer`` (what ``train_step`` is expected to get).
    """
    if kind not in KIND_MESH and mesh is None:
        raise ValueError(f"unknown plan kind {kind!r}; choose from {sorted(KIND_MESH)}")
    mesh = dict(mesh or KIND_MESH[kind](world_size))
    mesh = {a: mesh.get(a, 1) for a in ("pp", "dp", "tp")}
    ws = mesh["pp"] * mesh["dp"] * mesh["tp"]
    dp, tp, pp = mesh["dp"], mesh["tp"], mesh["pp"]
    if zero_stage is None:
        zero_stage = 3 if kind == "fsdp" else 0
    offload_classes = tuple(offload) if isinstance(offload, (tuple, list)) else (
        ("optimizer_state",) if offload else ())
    if schedule is None:
        schedule = "gpipe" if pp > 1 else "none"
    if virtual_stages > 1:
        schedule = "interleaved_1f1b"
    n_stages = pp * virtual_stages

    B = graph.batch_size
    nodes = graph.nodes
    compute = [n for n in nodes.values() if n.kind not in (OpKind.INPUT, OpKind.PARAM, OpKind.OUTPUT)]
    consumers: dict[str, list[str]] = {}
    for n in compute:
        for s in n.inputs:
            consumers.setdefault(s, []).append(n.name)

    def dp_pl(spec) -> Any:
        return Shard(0) if dp > 1 and spec.shape and spec.shape[0] == B and B % dp == 0 else Replicate()

    # --- tensor-parallel roles
    role: dict[str, str] = {}  # node -> colwise | rowwise | chain | vocab
    if tp > 1:
        linears = [n for n in compute if n.kind is OpKind.LINEAR and n.params]
        for n in linears:
            if n.name in role:
                continue
            w = graph.params[n.params[0]].shape
            if w[0] % tp:
                continue
            # follow single-consumer elementwise chain to another linear
            chain, cur = [], n.name
            nxt = None
            while True:
                cs = consumers.get(cur, [])
                if len(cs) != 1:
                    break
                c = nodes[cs[0]]
                if c.kind is OpKind.LINEAR and c.params and c.name not in role:
                    nxt = c
                    break
                if c.kind in _ELEMENTWISE_CHAIN and len(c.inputs) == 1:
                    chain.append(c.name)
                    cur = c.name
                    continue
                break
            if nxt is not None and graph.params[nxt.params[0]].shape[1] % tp == 0:
                role[n.name] = "colwise"
                for c in chain:
                    role[c] = "chain"
                role[nxt.name] = "rowwise"
            else:
                role[n.name] = "colwise_gather"
        for n in compute:
            if n.kind is OpKind.EMBEDDING and n.params and graph.params[n.params[0]].shape[0] % tp == 0:
                role[n.name] = "vocab"

    def last(spec) -> Shard:
        return Shard(len(spec.shape) - 1)

    strategies: list[NodeStrategy] = []
    param_pl: dict[str, tuple] = {}
    for n in compute:
        r = role.get(n.name, "replicate" if tp > 1 else "dp")
        ins, outs = [], []
        for s in n.inputs:
            spec = nodes[s].outputs[0] if nodes[s].outputs else None
            if spec is None:
                ins.append((Replicate(), Replicate()))
                continue
            t = Replicate()
            if r in ("rowwise", "chain"):
                t = last(spec)
            ins.append((dp_pl(spec), t))
        for i, spec in enumerate(n.outputs):
            t = Replicate()
            if r in ("colwise", "chain"):
                t = last(spec)
            elif r == "rowwise":
                has_bias = len(n.params) > 1
                t = Replicate() if has_bias else Partial()
            elif r == "vocab" and vocab_partial:
                t = Partial()
            outs.append((dp_pl(spec), t))
        for p in n.params:
            shape = graph.params[p].shape if p in graph.params else None
            if shape is None:
                continue
            t = Replicate()
            if r in ("colwise", "colwise_gather", "vocab"):
                t = Shard(0)
            elif r == "rowwise" and len(shape) == 2:
                t = Shard(1)
            prev = param_pl.get(p)
            param_pl[p] = (Replicate(), t) if prev is None or prev == (Replicate(), t) else (Replicate(), Replicate())
        strategies.append(NodeStrategy(n.name, r, tuple(ins), tuple(outs)))

    # --- pipeline stages
    stage_nodes: list[list[str]] = [[n.name for n in compute]]
    if n_stages > 1:
        cuts = _cut_points(graph, compute, n_stages)
        stage_nodes = [[n.name for n in compute[a:b]] for a, b in zip([0] + cuts, cuts + [len(compute)])]
    stage_of = {nm: i for i, ns in enumerate(stage_nodes) for nm in ns}
    params = []
    for name, spec in graph.params.items():
        pl = param_pl.get(name, (Replicate(), Replicate()))
        users = [stage_of[n.name] for n in compute if name in n.params]
        zs = zero_stage
        shards = dp * (tp if pl[1] == Shard(0) else 1)
        if zs and (not spec.shape or spec.shape[0] % shards):
            zs = 0  # the runtime refuses uneven ZeRO storage, as the solver must
        params.append(ParamPlan(name, tuple(spec.shape), pl, zs, offload_classes, users[0] if users else 0))
    stages = ()
    if n_stages > 1:  # stage i runs on pp index i % pp (interleaved: virtual_stages per rank)
        stages = tuple(
            Stage(i, tuple(ns), tuple(sorted({nodes[x].block for x in ns if nodes[x].block})),
                  tuple(rank_of(mesh, i % pp, d, t) for d in range(dp) for t in range(tp)), "cpu")
            for i, ns in enumerate(stage_nodes))
    oa = bool(offload) if offload_activations is None else offload_activations
    blocks = tuple(BlockPolicy(b, "full" if recompute else "none", oa) for b in list(graph.blocks) + ["*"])
    return Plan(
        cluster={"name": f"local:{ws}", "world_size": ws},
        model=ModelInfo(type(graph.module).__name__, graph.fingerprint(), graph.num_params, graph.ir),
        training=Training("fp32", optimizer, B),
        mesh=mesh,
        nodes=tuple(strategies),
        params=tuple(params),
        pipeline=Pipeline(schedule, microbatches, max(1, B // (dp * microbatches)), virtual_stages, stages),
        blocks=blocks,
        predicted=Predicted(step_time_s=0.0),
    )


def _cut_points(graph: Graph, compute, pp: int) -> list[int]:
    """Indices where stages 1..pp-1 start: equal node counts, snapped to a block start."""
    n = len(compute)
    starts = [i for i, c in enumerate(compute)
              if c.block and (i == 0 or compute[i - 1].block != c.block)]
    cuts = []
    for k in range(1, pp):
        target = round(k * n / pp)
        best = min(starts, key=lambda i: abs(i - target)) if starts else target
        if cuts and best <= cuts[-1]:
            best = target
        cuts.append(max(best, (cuts[-1] + 1) if cuts else 1))
    return cuts


# ---------------------------------------------------------------------------------------
# multi-process runs for tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_steps(step, n: int) -> list[float]:
    """Seconds of each of ``n`` calls of ``step()``, every rank held at a barrier before and
    after each, so a step's time is the slowest rank's (how the benchmarks time training)."""
    import time

    import torch.distributed as dist

    out = []
    for _ in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        out.append(time.perf_counter() - t0)
    return out


def long_job_timeout_s() -> float:
    """Seconds a test launch that runs a whole matrix of cases may take before it is killed as
    hung: 600, or ``AUTOPAR_TEST_JOB_TIMEOUT_S``. Only there to end a hang: the exactness
    matrices take 66-98 s on the 2-core VM, and one CI run with the hypervisor stealing 27 % of
    its CPU took the 2-rank launch past the 280 s these had before."""
    return float(os.environ.get("AUTOPAR_TEST_JOB_TIMEOUT_S", "600"))


#: what gloo says on a rank whose peer went away: that rank failed because another did
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _root_failure(codes: Sequence, errs: Sequence[str], first: int) -> int:
    """The rank whose failure ended the job: of the ranks that exited non-zero, the first whose
    error is not a lost peer (a failing rank destroys its process group at exit, so its peers'
    collectives fail within the same poll), else ``first``, the first one seen."""
    bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
    own = [r for r in bad if not any(m in errs[r] for m in PEER_LOST)]
    return own[0] if own else first


def run_workers(script: str, nproc: int, args: Sequence[str] = (), *, timeout_s: float = 240,
                env: dict | None = None) -> list[str]:
    """Run ``python script args`` as ``nproc`` gloo ranks (RANK/WORLD_SIZE/MASTER_* env vars).

    Returns each rank's stdout. Raises RuntimeError with the failing rank's stderr tail if any
    rank fails, and kills every rank on a timeout, so a test never hangs.
    """
    port = free_port()
    procs = []
    logs = []
    base = dict(os.environ)
    base.update(env or {})
    base.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
                 "OMP_NUM_THREADS": "1", "AUTOPAR_PG_TIMEOUT_S": str(int(timeout_s))})
    for r in range(nproc):
        e = dict(base, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc))
        out = tempfile.TemporaryFile(mode="w+")
        err = tempfile.TemporaryFile(mode="w+")
        procs.append(subprocess.Popen([sys.executable, script, *args], env=e, stdout=out, stderr=err))
        logs.append((out, err))
    import time

    deadline = time.monotonic() + timeout_s
    failed = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad and failed is None:
                failed = bad[0]
                time.sleep(2.0)  # let the peers notice and exit on their own
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                failed = -1
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for out, err in logs:
        out.seek(0)
        err.seek(0)
        outs.append((out.read(), err.read()))
    if failed is not None and failed >= 0:
        failed = _root_failure([p.returncode for p in procs], [e for _, e in outs], failed)
    if failed is not None:
        who = "timed out" if failed < 0 else f"rank {failed} failed (exit {procs[failed].returncode})"
        r = max(failed, 0)
        others = "".join(f"\n--- rank {i} stderr (tail) ---\n{e[-1500:]}"
                         for i, (_, e) in enumerate(outs) if i != r and e.strip())
        raise RuntimeError(f"{script}: {who}\n--- rank {r} stderr (tail) ---\n{outs[r][1][-6000:]}"
                           f"\n--- rank {r} stdout (tail) ---\n{outs[r][0][-2000:]}{others}")
    return [o for o, _ in outs]
