"""Mixed clusters: stages balanced by each group's own speed, DLRM's tables on the CPU group when
that pays, infeasible mixed clusters explained; and the predicted communication volume."""
from __future__ import annotations

import pytest
import torch

from autopar.cost_model import catalog
from autopar.cost_model import memory as mem
from autopar.cost_model.cluster import Cluster, NodeGroup
from autopar.graph import OpKind, capture
from autopar.models import dlrm, mlp
from autopar.models.gpt import GPT, GPTConfig
from autopar.plan import Plan
from autopar.solvers import InfeasibleError, solve

GIB = 2**30


def scaled_cpu(name: str, factor: float):
    """The catalog's x86 socket made ``factor`` times as fast in every respect the cost model
    prices: peak FLOP/s, memory bandwidth and per-op launch cost (the matmul half-efficiency
    point stays in FLOPs, so small matmuls speed up by the same factor)."""
    base = catalog.x86_server()
    return base.replace(name=name, peak_flops={k: v * factor for k, v in base.peak_flops.items()},
                        memory_bandwidth=base.memory_bandwidth * factor, op_overhead_s=base.op_overhead_s / factor)


def mixed_speed_cluster(fast_first: bool) -> Cluster:
    """Four local processes declared as two kinds, one twice as fast, via a Cluster JSON."""
    link = catalog.local_shm()
    fast = NodeGroup(scaled_cpu("cpu-fast", 2.0), 2, 1, link)
    slow = NodeGroup(scaled_cpu("cpu-slow", 1.0), 2, 1, link)
    groups = (fast, slow) if fast_first else (slow, fast)
    return Cluster.from_json(Cluster("two-kinds", groups, link).to_json())


def small_gpt_graph(n_layer: int = 6):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, d_model=32)
    return capture(GPT(cfg), (torch.randint(0, 64, (8, 16)),))


@pytest.fixture(scope="module")
def dlrm_large_graph():
    """8 tables x 10M rows x 128: 152.6 GiB of fp32 Adam state, MLPerf-sized MLPs."""
    return capture(*dlrm.dlrm_large())


# ------------------------------------------------------------------- communication volume


def test_dp_communication_bytes_is_ring_all_reduce_of_the_gradients():
    g = capture(*mlp.tiny(batch_size=8))
    n = 4
    for precision in ("fp32", "bf16-mixed"):
        p = solve(g, "h100x4", precision=precision,
                  constraints={"dp": n, "tp": 1, "pp": 1, "zero": 0, "offload": "none", "num_microbatches": 1})
        grad_bytes = mem.grad_bytes(g.num_params, precision)
        assert p.predicted.communication_bytes == int(2 * (n - 1) / n * grad_bytes)


def test_zero3_communication_counts_gathers_and_scatters_per_microbatch():
    g = capture(*mlp.tiny(batch_size=8))
    n, m = 4, 2
    p = solve(g, "h100x4", constraints={"dp": n, "tp": 1, "pp": 1, "zero": 3, "offload": "none",
                                        "num_microbatches": m})
    zero3_ok = [x for x in p.params if x.zero_stage == 3]
    assert zero3_ok, "ZeRO-3 was pinned"
    P = mem.param_bytes(g.num_params, "fp32")
    G = mem.grad_bytes(g.num_params, "fp32")
    # reduce-scatter of the gradients per microbatch, all-gather of the params for forward and backward
    expect = m * (n - 1) / n * G + 2 * m * (n - 1) / n * P
    assert p.predicted.communication_bytes == pytest.approx(expect, rel=1e-6)


def test_pipeline_communication_is_the_block_boundary_activations():
    """pp=2 on two devices, no dp/tp: stage 0 sends each microbatch's boundary activation
    forward, stage 1 its gradient back; per step that is one global batch of [B, T, d] fp32."""
    g = small_gpt_graph(n_layer=2)
    B, T = g.inputs[0].shape
    p = solve(g, "h100x2", constraints={"pp": 2, "dp": 1, "tp": 1, "num_microbatches": 4, "zero": 0,
                                        "offload": "none", "schedule": "1f1b"})
    assert p.predicted.communication_bytes == B * T * 32 * 4


def test_single_device_plan_sends_nothing():
    g = capture(*mlp.tiny(batch_size=8))
    assert solve(g, "h100x1").predicted.communication_bytes == 0


# ------------------------------------------------------------------- mixed-speed pipelines


@pytest.mark.parametrize("fast_first", [True, False])
def test_faster_kind_gets_more_blocks(fast_first):
    g = small_gpt_graph()
    cl = mixed_speed_cluster(fast_first)
    p = solve(g, cl, constraints={"pp": 2, "tp": 1, "num_microbatches": 4})
    s0, s1 = p.pipeline.stages
    fast, slow = (s0, s1) if fast_first else (s1, s0)
    assert fast.device == "cpu-fast" and slow.device == "cpu-slow"
    assert len(fast.blocks) > len(slow.blocks)
    assert len(fast.blocks) + len(slow.blocks) == 6
    # balanced by each group's own costs: per-microbatch stage times within one block's time
    per_block_slow = slow.compute_s / len(slow.blocks)
    assert abs(fast.compute_s - slow.compute_s) <= per_block_slow
    assert Plan.from_json(p.to_json()) == p


# ------------------------------------------------------------------- DLRM on GPUs + ARM CPUs


def _table_params(p: Plan):
    return [x for x in p.params if x.name.startswith("tables.")]


def test_dlrm_tables_go_to_the_cpu_group_when_the_gpus_cannot_hold_them(dlrm_large_graph):
    g = dlrm_large_graph
    p = solve(g, "h100x2+graviton4x2")
    s0, s1 = p.pipeline.stages
    assert s0.device == "graviton4" and s1.device == "h100-sxm"
    assert {x.stage for x in _table_params(p)} == {0}
    assert all(x.stage == 1 for x in p.params if x.name.startswith("top."))
    emb_nodes = [n for n, i in g.nodes.items() if i.kind is OpKind.EMBEDDING]
    assert set(emb_nodes) <= set(s0.nodes)
    # the CPU group holds the tables within its memory, the GPUs hold the MLPs
    cap_cpu = catalog.graviton4().memory_bytes * 0.9
    assert s0.memory_bytes <= cap_cpu and s0.memory_bytes > 100 * GIB / 2
    line = next(s for s in p.solver.shortcuts if s.startswith("placement:"))
    assert "graviton4 (CPU)" in line and "h100-sxm group holds 144.0 GiB" in line and "152.6 GiB" in line
    # the plan is a value: it round-trips, and its cluster lists the CPU group first (stage 0's ranks)
    assert Plan.from_json(p.to_json()) == p
    assert p.cluster["groups"][0]["device"]["name"] == "graviton4"
    assert any(s.startswith("ranks renumbered") and "'graviton4x2+h100x2'" in s for s in p.solver.shortcuts)
    assert p.predicted.communication_bytes > 0


def test_dlrm_tables_stay_on_the_gpus_when_they_fit(dlrm_large_graph):
    p = solve(dlrm_large_graph, "h100x8+graviton4x8")
    s0, _ = p.pipeline.stages
    assert s0.device == "h100-sxm"
    assert {x.stage for x in _table_params(p)} == {0}
    line = next(s for s in p.solver.shortcuts if s.startswith("placement:"))
    assert "on h100-sxm (GPU)" in line and "tables on graviton4 (CPU):" in line
    # the alternative it names is slower by the model's own numbers
    alt_ms = float(line.split("tables on graviton4 (CPU): ")[1].split(" ms")[0])
    assert alt_ms > p.predicted.step_time_s * 1e3


def test_split_ilp_objective_equals_its_plain_evaluation():
    """build_split's objective and hetero.combine over evaluate() are the same cost model."""
    from autopar.solvers import SolverOptions, default_registry, hetero
    from autopar.solvers.costed import analyze
    from autopar.solvers.search import _host_bw

    model, inputs = dlrm.build("tiny", batch_size=8)
    g = capture(model, inputs)
    reg = default_registry()
    struct = analyze(g, reg)
    link = catalog.local_shm()
    cl = Cluster("kinds", (NodeGroup(scaled_cpu("cpu-a", 1.0), 2, 1, link),
                           NodeGroup(scaled_cpu("cpu-b", 2.0), 2, 1, link)), link)
    assert hetero.applicable(struct, cl, SolverOptions()) is None
    part = hetero.embedding_part(struct)
    assert {u for u in part if g.nodes[u].kind is OpKind.EMBEDDING} == {"tables_0", "tables_1", "tables_2"}
    assert not any(g.nodes[u].kind is OpKind.LINEAR for u in part)  # the MLPs stay out
    import time

    outs = hetero.search_splits(struct, reg, cl, precision="fp32", optimizer="adam", options=SolverOptions(),
                                constraints={}, deadline=time.perf_counter() + 30, host_bandwidth=_host_bw())
    assert len(outs) == 2  # tables on either kind
    for o in outs:
        assert o.result.objective == pytest.approx(o.step_time_s, rel=1e-6)
        assert o.candidate.num_microbatches >= o.candidate.pp


def test_uneven_groups_use_several_gpu_stages():
    """8 GPUs + 4 CPUs: every stage has the same dp x tp, so the CPUs are one stage of 4 and
    the GPUs two more; the GPU-first orientation is impossible and says so."""
    g = capture(*dlrm.build("dlrm_criteo_1tb", batch_size=2048, device="meta"))
    p = solve(g, "h100x8+graviton4x4")
    assert [s.device for s in p.pipeline.stages] == ["graviton4", "h100-sxm", "h100-sxm"]
    assert p.mesh["pp"] == 3 and p.mesh["dp"] * p.mesh["tp"] == 4
    line = next(s for s in p.solver.shortcuts if s.startswith("placement:"))
    assert "do not form stages" in line


def test_infeasible_mixed_cluster_raises_with_numbers(dlrm_large_graph):
    small_cpu = catalog.graviton4().replace(name="graviton4-64g", memory_bytes=64 * GIB)
    h100 = catalog.h100_sxm()
    cl = Cluster("h100x1+graviton4-64gx1", (NodeGroup(h100, 1, 1, catalog.nvlink4()),
                                            NodeGroup(small_cpu, 1, 1, catalog.local_shm())),
                 catalog.ethernet_efa_200g())
    # offload forbidden: with it, the H100 keeps the tables (41 GB) and puts their gradients
    # and Adam state in its host's 256 GiB (ZeRO-Offload at dp=1)
    with pytest.raises(InfeasibleError) as e:
        solve(dlrm_large_graph, cl, constraints={"offload": "none"})
    msg = str(e.value)
    assert "152.6 GiB" in msg and "graviton4-64g" in msg and "h100-sxm" in msg and "57.6 GiB" in msg


# ------------------------------------------------------------------- the CLI on a mixed cluster


def test_cli_plans_dlrm_criteo_on_gpus_plus_graviton(tmp_path, capsys):
    """`autopar plan autopar.models.dlrm:dlrm_criteo_1tb --cluster h100x8+graviton4x4` prints the
    mixed plan with its placement reason and writes a plan that validates for its cluster."""
    import json

    from test_cli_fixtures import main_in_process  # tests/ is on sys.path under pytest

    out = tmp_path / "criteo.plan.json"
    rc, stdout, err = main_in_process(capsys, "plan", "autopar.models.dlrm:dlrm_criteo_1tb", "--cluster",
                                      "h100x8+graviton4x4", "--json", out, "--quiet", cwd=tmp_path)
    assert rc == 0, err
    assert "graviton4" in stdout and "placement: 26 embedding tables" in stdout
    plan = json.loads(out.read_text())
    assert [s["device"] for s in plan["pipeline"]["stages"]] == ["graviton4", "h100-sxm", "h100-sxm"]
    assert plan["predicted"]["communication_bytes"] > 0
    rc, stdout, err = main_in_process(capsys, "validate", out, "--cluster", plan["cluster"]["name"], cwd=tmp_path)
    assert rc == 0, stdout + err
