"""The ILP returns the enumerated optimum of the same cost model (DESIGN.md: exact solver).

Each case is small enough to enumerate every decision: a strategy per unit, a state config
per parameter group, and recompute / activation-offload counts per pipeline rank. The brute
force evaluates each with :func:`autopar.solvers.evaluate.evaluate` (plain Python), keeps the
memory-feasible ones, and must agree with the MIP to 1e-6 relative — including memory-tight
cases where the unconstrained optimum does not fit.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn

from autopar.cost_model.cluster import Cluster, NodeGroup
from autopar.cost_model import catalog
from autopar.graph import capture
from autopar.solvers import SolverOptions, backend, formulation, solve
from autopar.solvers.costed import Candidate, analyze, annotate
from autopar.solvers.evaluate import Decision, evaluate
from autopar.solvers.pipeline import stage_devices
from autopar.solvers.search import _host_bw
from autopar.solvers.strategies import default_registry


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


class Stack(nn.Module):
    """Input projection, L identical blocks, a head: prefix / blocks / suffix."""

    def __init__(self, d=64, layers=2, out=32):
        super().__init__()
        self.h = nn.ModuleList([Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, out)

    def forward(self, x):
        for b in self.h:
            x = b(x)
        return self.head(x)


def cluster(n: int, memory_gib: float, per_node: int | None = None, host_link: bool = True,
            host_gib: float | None = None) -> Cluster:
    dev = catalog.h100_sxm().replace(name=f"h100-{memory_gib}g", memory_bytes=int(memory_gib * 2**30))
    if host_gib is not None:
        dev = dev.replace(host_memory_bytes=int(host_gib * 2**30))
    if not host_link:
        dev = dev.replace(host_link="none", host_link_bandwidth=0.0)
    per = per_node or n
    return Cluster(name=f"test{n}", groups=(NodeGroup(dev, per, n // per, catalog.nvlink4(), catalog.ib_ndr()),),
                   inter_node_link=catalog.ib_ndr())


def brute_force(cg) -> float:
    units = [n for n in cg.nodes]
    groups = sorted({("block" if n.place == "block" else "outside") for n in cg.nodes if n.state is not None})
    rec_ok = "recompute" in cg.allowed and any(n.place == "block" for n in cg.nodes)
    best = math.inf
    stage_rec = [range(st.num_blocks + 1) if rec_ok else range(1) for st in cg.stages]
    stage_off = [range(st.num_blocks + 1) if ("offload" in cg.allowed and st.host_link and st.num_blocks) else range(1)
                 for st in cg.stages]
    for combo in itertools.product(*[range(len(n.strategies)) for n in units]):
        strat = {n.name: k for n, k in zip(units, combo)}
        for cfg in itertools.product(range(len(cg.configs)), repeat=len(groups)):
            config = dict(zip(groups, cfg))
            config.setdefault("block", 0)
            config.setdefault("outside", 0)
            for rec in itertools.product(*stage_rec):
                for off in itertools.product(*stage_off):
                    if any(r + o > st.num_blocks for r, o, st in zip(rec, off, cg.stages)):
                        continue
                    br = evaluate(cg, Decision(strat, config, rec, off))
                    if br.feasible and br.step_time_s < best:
                        best = br.step_time_s
    return best


def costed(model, x, cl, cand, precision="fp32", optimizer="adam", allowed=None):
    g = capture(model, (x,))
    reg = default_registry()
    st = analyze(g, reg)
    opts = SolverOptions(allowed=allowed) if allowed else SolverOptions()
    devs = stage_devices(cl, cand.pp, cand.dp, cand.tp)
    return annotate(st, reg, cl, cand, precision=precision, optimizer=optimizer, reserve_fraction=0.1,
                    allowed=opts.allowed, stage_devices=devs, host_bandwidth=_host_bw())


def ilp(cg, solver: str = "CBC") -> float:
    model = formulation.build(cg, solver)
    res, dec = backend.run(model, cg, SolverOptions(backend=solver))
    if dec is None:
        return math.inf
    # the decoded decision, re-evaluated in plain Python, is what the MIP claimed
    assert evaluate(cg, dec).step_time_s == pytest.approx(res.objective, rel=1e-6)
    return evaluate(cg, dec).step_time_s


CASES = [
    # (pp, dp, tp, m, partition, world, allowed)
    (1, 2, 2, 1, (2,), 4, {"dp", "tp", "zero", "recompute"}),
    (1, 1, 4, 2, (2,), 4, {"tp", "recompute", "offload"}),
    (2, 1, 2, 2, (1, 1), 4, {"tp", "pp", "recompute"}),
    (2, 2, 1, 2, (1, 1), 4, {"dp", "pp", "zero", "recompute", "offload"}),
]


@pytest.mark.parametrize("pp,dp,tp,m,part,world,allowed", CASES)
def test_ilp_matches_enumeration(pp, dp, tp, m, part, world, allowed):
    torch.manual_seed(0)
    model = Stack(d=64, layers=2)
    x = torch.randn(8, 64)
    cand = Candidate(pp, dp, tp, m, "1f1b" if pp > 1 else "none", 1, part)
    cg = costed(model, x, cluster(world, 80), cand, allowed=frozenset(allowed))
    assert ilp(cg) == pytest.approx(brute_force(cg), rel=1e-6)


@pytest.mark.parametrize("efficiency", [0.0, 0.4])
@pytest.mark.parametrize("pp,dp,tp,m,part,world,allowed", CASES)
def test_ilp_matches_enumeration_partial_overlap(pp, dp, tp, m, part, world, allowed, efficiency):
    """Links where communication hides only partly behind compute (measured CPU links), and
    ranks that arrive apart (skew): the MIP's two lower bounds per exposed term still give
    the enumeration's optimum."""
    torch.manual_seed(0)
    model = Stack(d=64, layers=2)
    x = torch.randn(8, 64)
    cand = Candidate(pp, dp, tp, m, "1f1b" if pp > 1 else "none", 1, part)
    base = cluster(world, 80)
    g = base.groups[0]
    link = dataclasses.replace(g.intra_node_link, overlap_efficiency=efficiency, skew_fraction=0.25, sync_s=2e-5)
    cl = Cluster(name=base.name, groups=(NodeGroup(g.device, g.devices_per_node, g.num_nodes, link, link),),
                 inter_node_link=link)
    cg = costed(model, x, cl, cand, allowed=frozenset(allowed))
    assert cg.overlap_efficiency == efficiency
    ref = costed(model, x, base, cand, allowed=frozenset(allowed))
    assert ilp(cg) == pytest.approx(brute_force(cg), rel=1e-6)
    assert ilp(cg) > ilp(ref)  # skew and exposed sync only cost time


@pytest.mark.parametrize("pp,dp,tp,m,part,world,allowed", CASES)
def test_ilp_matches_enumeration_memory_tight(pp, dp, tp, m, part, world, allowed):
    """Capacity set below what the unconstrained optimum needs: the binding memory
    constraint changes the answer, and the ILP still finds the enumerated optimum."""
    model = Stack(d=256, layers=2, out=256)
    x = torch.randn(64, 256)
    cand = Candidate(pp, dp, tp, m, "1f1b" if pp > 1 else "none", 1, part)
    big = costed(model, x, cluster(world, 80), cand, allowed=frozenset(allowed))
    model_ = formulation.build(big, "CBC")
    _, dec = backend.run(model_, big, SolverOptions())
    need = max(evaluate(big, dec).memory_bytes)
    # 80% of the unconstrained optimum's peak, after the 10% reserve
    tight_gib = 0.8 * need / 0.9 / 2**30
    cg = costed(model, x, cluster(world, tight_gib), cand, allowed=frozenset(allowed))
    want = brute_force(cg)
    for solver in ("CBC", "SCIP"):  # the formulation, not one backend, is exact
        assert ilp(cg, solver) == pytest.approx(want, rel=1e-6)
    if math.isfinite(want):
        assert want > evaluate(big, dec).step_time_s * (1 - 1e-9)  # memory made it no faster


def test_ilp_matches_enumeration_host_memory_tight():
    """Offload only, with device memory too small and host memory too small to take all the
    optimizer state: both capacity constraints bind."""
    model = Stack(d=256, layers=2, out=256)
    x = torch.randn(64, 256)
    cand = Candidate(1, 2, 1, 1, "none", 1, (2,))
    allowed = frozenset({"dp", "zero", "offload"})
    big = costed(model, x, cluster(2, 80), cand, allowed=allowed)
    _, dec = backend.run(formulation.build(big, "CBC"), big, SolverOptions())
    need = max(evaluate(big, dec).memory_bytes)
    results = []
    for host in (None, 0.1):  # plenty of host memory, then too little for what must go there
        cl = cluster(2, 0.35 * need / 0.9 / 2**30, host_gib=None if host is None else host * need / 0.9 / 2**30)
        cg = costed(model, x, cl, cand, allowed=allowed)
        want = brute_force(cg)
        assert ilp(cg) == pytest.approx(want, rel=1e-6)
        results.append(want)
    assert math.isfinite(results[0]) and math.isinf(results[1])  # the host capacity binds


def hetero_cluster() -> Cluster:
    """Two H100s then two A100s, one node each kind (stages map to groups in order)."""
    h = NodeGroup(catalog.h100_sxm(), 2, 1, catalog.nvlink4(), catalog.ib_ndr())
    a = NodeGroup(catalog.a100_80gb_sxm(), 2, 1, catalog.nvlink3(), catalog.ib_hdr())
    return Cluster("h100x2+a100x2", (h, a), catalog.ib_hdr())


@pytest.mark.parametrize("kind", ["homogeneous", "heterogeneous"])
def test_search_matches_enumeration_over_all_candidates(kind):
    """The outer search (with its bound-based pruning) returns the best plan over every
    candidate mesh, microbatch count and stage split, each enumerated exhaustively."""
    from autopar.solvers.search import meshes
    from autopar.solvers.pipeline import partitions, schedules

    torch.manual_seed(0)
    model = Stack(d=64, layers=3 if kind == "heterogeneous" else 2)
    x = torch.randn(8, 64)
    cl = cluster(4, 80) if kind == "homogeneous" else hetero_cluster()
    L = len(model.h)
    allowed = frozenset({"dp", "tp", "pp", "zero", "recompute"})
    g = capture(model, (x,))
    plan = solve(g, cl, options=SolverOptions(allowed=allowed))
    best = math.inf
    for pp, dp, tp in meshes(cl, L, allowed, {}):
        devs = stage_devices(cl, pp, dp, tp)
        if devs is None:
            continue
        # m >= pp for pipelines: torch.distributed.pipelining (the runtime) refuses fewer
        for m in [k for k in range(1, 9) if 8 % (dp * k) == 0 and (pp == 1 or k >= pp)]:
            parts, complete = partitions(L, devs, "fp32", 12) if pp > 1 else ([(L,)], True)
            assert complete
            for sched, v in schedules(pp, L, m, None):
                for part in (parts if v == 1 else [tuple([L // pp] * pp)]):
                    cg = costed(model, x, cl, Candidate(pp, dp, tp, m, sched, v, part), allowed=allowed)
                    best = min(best, brute_force(cg))
    assert plan.predicted.step_time_s == pytest.approx(best, rel=1e-6)
    assert plan.solver.status == "optimal"


def test_block_deduplication_is_loss_free_without_memory_pressure():
    """Solving one block and reusing it for every identical block gives the same optimum as
    solving every node on its own (pp = 1, sharding only: the shortcut the plan reports)."""
    from autopar.models import gpt
    from autopar.solvers.search import search

    model, x = gpt.tiny(batch_size=8)
    g = capture(model, x)
    reg = default_registry()
    cl = cluster(4, 80)
    opts = SolverOptions(allowed=frozenset({"dp", "tp"}))
    cons = {"pp": 1, "num_microbatches": 1}
    deduped = search(analyze(g, reg, dedupe=True), reg, cl, precision="fp32", optimizer="adam", options=opts,
                     constraints=cons)
    full = search(analyze(g, reg, dedupe=False), reg, cl, precision="fp32", optimizer="adam", options=opts,
                  constraints=cons)
    assert len(full.costed.nodes) > len(deduped.costed.nodes)
    assert deduped.result.objective == pytest.approx(full.result.objective, rel=1e-9)
    assert any("deduplication" in s for s in deduped.shortcuts)


def test_output_in_another_placement_pays_the_reshard_to_the_loss():
    """The loss gets the model output as the runtime's output placement (batch rows on dp,
    whole on tp). The head's batch-on-tp strategy costs the same work whether or not the head
    is the last op, plus the all-gather to that placement when it is."""

    class Tail(nn.Module):
        def __init__(self, last: bool):
            super().__init__()
            self.head = nn.Linear(64, 64)
            self.last = last

        def forward(self, x):
            y = self.head(x)
            return y if self.last else torch.relu(y)

    from autopar.placements import Replicate, Shard

    x = torch.randn(16, 64)
    cand = Candidate(1, 1, 4, 1, "none", 1, (0,))
    cost = {}
    for last in (True, False):
        torch.manual_seed(0)
        cg = costed(Tail(last), x, cluster(4, 80), cand)
        head = cg.node("head")
        k = next(i for i, s in enumerate(head.strategies) if s.outputs[0] == (Replicate(), Shard(0)))
        dev = next(iter(head.compute_s))
        cost[last] = head.compute_s[dev][k]
    assert cost[True] > cost[False] * 1.01


def test_zero3_holds_one_nodes_gathered_parameters_at_a_time():
    """ZeRO-3 keeps 1/dp of each parameter, plus whole only the parameters (and gradients)
    of the node running (the runtime regathers in the backward instead of keeping them): it
    fits where ZeRO-2 does not, and the MIP's max over nodes matches the enumeration."""
    torch.manual_seed(0)
    model = Stack(d=512, layers=4, out=512)
    x = torch.randn(16, 512)
    cand = Candidate(1, 4, 1, 1, "none", 1, (4,))
    allowed = frozenset({"dp", "zero"})
    roomy = costed(model, x, cluster(4, 80), cand, allowed=allowed)
    _, dec = backend.run(formulation.build(roomy, "CBC"), roomy, SolverOptions())
    idx = {(c.zero_stage, c.offload): k for k, c in enumerate(roomy.configs)}
    def with_zero(z):
        return evaluate(roomy, Decision(dec.strategy, {"block": idx[z, ()], "outside": idx[z, ()]},
                                        dec.recompute, dec.offload_act))
    z2, z3 = with_zero(2), with_zero(3)
    one_node = (512 * 512 + 512) * 4 * 2  # the largest linear's fp32 weight + bias, and their grads
    assert z3.memory_breakdown[0]["working"] == pytest.approx(one_node)
    assert z3.memory_bytes[0] < z2.memory_bytes[0]
    # room for ZeRO-3 but not for ZeRO-2: the enumeration and the MIP both pick ZeRO-3
    gib = (z3.memory_bytes[0] + z2.memory_bytes[0]) / 2 / 0.9 / 2**30
    cg = costed(model, x, cluster(4, gib), cand, allowed=allowed)
    want = brute_force(cg)
    assert math.isfinite(want) and ilp(cg) == pytest.approx(want, rel=1e-6)
    _, tight = backend.run(formulation.build(cg, "CBC"), cg, SolverOptions())
    assert cg.configs[tight.config["block"]].zero_stage == 3


def test_parameters_without_a_gradient_sync_pay_the_local_per_parameter_cost():
    """``param_overhead_local_s`` (measured without a gradient sync) is what a dp = 1 pipeline
    stage's parameters cost; with dp > 1 every parameter pays ``param_overhead_s``."""
    torch.manual_seed(0)
    model, x = Stack(d=64, layers=2), torch.randn(8, 64)
    def on(world):
        base = cluster(world, 80)
        g = base.groups[0]
        dev = g.device.replace(param_overhead_s=1e-3, param_overhead_local_s=1e-5)
        return Cluster(name=base.name, groups=(NodeGroup(dev, g.devices_per_node, g.num_nodes, g.intra_node_link,
                                                         g.inter_node_link),), inter_node_link=base.inter_node_link)

    def steps(cand):
        cl = on(cand.pp * cand.dp * cand.tp)
        cg = costed(model, x, cl, cand, allowed=frozenset())
        name = cl.groups[0].device.name
        return sorted({round(sc.step_s, 9) for n in cg.nodes if n.state
                       for per_s in n.state[name] for sc in per_s})

    m = 2
    piped = steps(Candidate(2, 1, 1, m, "1f1b", 1, (1, 1)))
    synced = steps(Candidate(2, 2, 1, m, "1f1b", 1, (1, 1)))
    # a node holds one weight and one bias: 2 params x m microbatches x the per-parameter cost,
    # on top of the optimizer step, which is the same in both
    assert min(synced) - min(piped) == pytest.approx(2 * m * (1e-3 - 1e-5), rel=0.05)


def test_peak_moments_follow_the_schedule():
    """One microbatch: activations and gradients never coexist (the peak is the larger of
    the loss's backward and the optimizer step). GPipe's m microbatches: after the first
    backward, m - 1 of them sit beside whole gradients. 1F1B's steady state refills one."""
    from autopar.solvers.costed import StageSpec
    from autopar.solvers.evaluate import moment_breakdown, moments, peak_moments

    def stage(inflight, suffix=True):
        return StageSpec(0, "d", 2, inflight, True, suffix, 1e12, False)

    state, grads, work, act, loss, temps = 400.0, 100.0, 10.0, 50.0, 8.0, 20.0
    one = peak_moments(stage(1.0), 1, state, grads, work, act, loss, temps)
    assert one == {"loss_backward": 300 + 10 + 50 + 8, "with_gradients": 410, "optimizer_step": 430}
    gpipe = peak_moments(stage(4.0), 4, state, grads, work, act, loss, temps)
    assert gpipe["loss_backward"] == 300 + 10 + 4 * 50 + 8
    assert gpipe["with_gradients"] == 400 + 10 + 3 * 50 + 8
    f1b = peak_moments(stage(2.0, suffix=False), 8, state, grads, work, act, 0.0, temps)
    assert f1b["with_gradients"] == 400 + 10 + 2 * 50  # a forward refills the one the backward freed
    at = moments(stage(4.0), 4, loss)  # each moment's breakdown, by kind
    assert moment_breakdown(at["loss_backward"], state, grads, work, act, temps) == {
        "training_state": 300, "working": 10, "activations": 4 * 50 + 8}
    assert moment_breakdown(at["optimizer_step"], state, grads, work, act, temps) == {
        "training_state": 400, "working": 10, "activations": 0, "optimizer_temporaries": 20}
