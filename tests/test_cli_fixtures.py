"""Hand-made plans for the interface tests (show, validate, explain, cache, CLI).

They are built from a real capture of the zoo's tiny GPT so node and block names are the ones
the solver would write, but every decision is set here, so the display code is tested without
depending on the solver. Not a test module itself (no test functions); imported by the others.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from functools import lru_cache

from autopar.placements import Replicate, Shard
from autopar.plan import (
    BlockPolicy,
    ModelInfo,
    NodeStrategy,
    ParamPlan,
    Pipeline,
    Plan,
    Predicted,
    SolverReport,
    Stage,
    Training,
)

AUTOPAR = os.path.join(os.path.dirname(sys.executable), "autopar")
GIB = 1024**3


@lru_cache(maxsize=None)
def tiny_gpt_graph(n_layer: int = 4):
    import autopar.graph as G
    from autopar.models import gpt

    cfg = dataclasses.replace(gpt.GPTConfig.tiny(), n_layer=n_layer)
    model = gpt.GPT(cfg)
    inputs = gpt.example_inputs(cfg, 4)
    return G.capture(model, inputs)


def make_plan(mesh=None, schedule="1f1b", microbatches=4, cluster="h100x8", graph=None,
              memory_gib=(30.0, 20.0), model_name="autopar.models.gpt:tiny") -> Plan:
    """A complete, valid plan: blocks split evenly over pp stages, linears alternate
    colwise/rowwise when tp > 1, memory per device from ``memory_gib`` per stage."""
    from autopar.cost_model.cluster import Cluster

    mesh = dict(mesh or {"pp": 2, "dp": 2, "tp": 2})
    c = Cluster.parse(cluster)
    g = graph if graph is not None else tiny_gpt_graph()
    pp, dp, tp = mesh["pp"], mesh["dp"], mesh["tp"]
    work = [n for n in g.nodes.values() if n.kind.value not in ("input", "param", "output")]
    # stage of each node: by block index (nodes before the first block go to stage 0, after to the last)
    blocks = list(g.blocks)
    per = max(1, -(-len(blocks) // pp))
    stage_of_block = {b: min(i // per, pp - 1) for i, b in enumerate(blocks)}
    stage_nodes: list[list[str]] = [[] for _ in range(pp)]
    cur = 0
    for n in work:
        if n.block is not None:
            cur = stage_of_block[n.block]
        stage_nodes[cur].append(n.name)
    nodes, flip = [], 0
    for n in work:
        if n.kind.value == "linear" and tp > 1:
            strat = "colwise" if flip % 2 == 0 else "rowwise"
            flip += 1
        else:
            strat = "dp" if dp > 1 else "replicate"
        pl = (Shard(0), Replicate())
        nodes.append(NodeStrategy(n.name, strat, tuple(pl for _ in n.inputs), tuple(pl for _ in n.outputs),
                                  compute_s=1e-4, reshard_s=0.0))
    params = tuple(ParamPlan(name, tuple(spec.shape), (Replicate(), Replicate()), zero_stage=1 if dp > 1 else 0,
                             stage=0) for name, spec in g.params.items())
    stages = tuple(
        Stage(i, tuple(stage_nodes[i]), tuple(b for b in blocks if stage_of_block[b] == i),
              tuple(r for r in range(pp * dp * tp) if r // (dp * tp) == i), c.groups[0].device.name,
              compute_s=0.01 * (1 + 0.1 * i), memory_bytes=int(memory_gib[min(i, len(memory_gib) - 1)] * GIB))
        for i in range(pp)
    ) if pp > 1 else ()
    mem = tuple(int(memory_gib[min(r // (dp * tp), len(memory_gib) - 1)] * GIB) for r in range(pp * dp * tp))
    return Plan(
        cluster=c.to_json(),
        model=ModelInfo(model_name, g.fingerprint(), g.num_params, g.ir),
        training=Training("bf16-mixed", "adam", g.batch_size),
        mesh=mesh,
        nodes=tuple(nodes),
        params=params,
        pipeline=Pipeline(schedule if pp > 1 else "none", microbatches if pp > 1 else 1, 1, 1, stages),
        blocks=tuple(BlockPolicy(b, "full" if i % 2 == 0 else "none") for i, b in enumerate(blocks)),
        predicted=Predicted(step_time_s=0.12, compute_s=0.08, communication_s=0.02, bubble_s=0.015,
                            offload_s=0.005, memory_per_device_bytes=mem,
                            memory_breakdown={"params": 10 * GIB, "optimizer_state": 12 * GIB,
                                              "activations": 8 * GIB},
                            communication_bytes=3 * GIB, flops_per_step=2.0e13,
                            memory_capacity_bytes=76 * GIB),
        solver=SolverReport("optimal", 0.12, 0.0, 1.5, 1200, 3400, 6, ("identical blocks solved once",)),
    )


def main_in_process(capsys, *args, cwd=None):
    """``autopar ARGS`` through cli.main in this process (fast: torch is already imported);
    for variants of a case whose real entry point another test already covers.
    Returns (exit code, stdout, stderr)."""
    from autopar.cli import main

    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_cli(*args, env=None, cwd=None, timeout=120):
    """Run the installed console script; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.setdefault("AUTOPAR_CACHE_DIR", os.path.join(cwd or os.getcwd(), ".autopar-cache"))
    if env:
        e.update(env)
    return subprocess.run([AUTOPAR, *map(str, args)], capture_output=True, text=True, env=e, cwd=cwd,
                          timeout=timeout)
