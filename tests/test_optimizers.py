"""The optimizer a plan names - update rule and implementation - is what it is priced for,
and the runtime says when a run steps another one."""
import warnings

import pytest
import torch

from autopar.cost_model import memory as mem
from autopar.runtime import optimizers
from autopar.runtime.optimizers import PlanOptimizerMismatch


def _params():
    return [torch.nn.Parameter(torch.randn(8, 4))]


def test_fused_names_keep_the_rule_state_and_drop_the_temporaries():
    for kind in ("adam", "sgd"):
        fused = f"{kind}_fused"
        assert mem.optimizer_kind(fused) == kind and mem.is_fused(fused) and not mem.is_fused(kind)
        for precision in mem.PRECISIONS:
            assert mem.optimizer_state_bytes(1000, fused, precision) == mem.optimizer_state_bytes(1000, kind,
                                                                                                  precision)
    assert mem.optimizer_step_temp_bytes(1000, "adam", foreach=False) == 2 * 4000
    assert mem.optimizer_step_temp_bytes(1000, "adam_fused", foreach=False) == 0
    assert mem.optimizer_step_temp_bytes(1000, "adam_fused", foreach=True) == 0
    with pytest.raises(ValueError, match="'adamw_fused'"):
        mem.optimizer_state_bytes(10, "adamw_fused", "fp32")


def test_a_fused_adam_step_allocates_no_tensor():
    """What the ``*_fused`` names' zero temporaries rest on, checked against this torch."""
    from autopar.runtime.live_memory import LiveTensorBytes
    ps = [torch.nn.Parameter(torch.randn(1 << 16)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn_like(p)
    for name, expect in (("adam_fused", 0), ("adam", 2 * 4 * (1 << 16))):
        opt = optimizers.factory(name, lr=1e-3)(ps)
        opt.step()  # makes the state
        with LiveTensorBytes() as probe:
            opt.step()
        assert probe.peak_bytes >= expect if expect else probe.peak_bytes == 0, (name, probe.peak_bytes)


def test_factory_builds_what_the_name_says():
    a = optimizers.factory("adam_fused", lr=1e-3)(_params())
    assert type(a) is torch.optim.Adam and a.defaults["fused"] and a.defaults["lr"] == 1e-3
    s = optimizers.factory("sgd", lr=0.1)(_params())
    assert type(s) is torch.optim.SGD and not s.defaults.get("fused") and s.defaults["momentum"] == 0.9
    assert optimizers.mismatch("adam_fused", a) is None and optimizers.mismatch("sgd", s) is None
    assert optimizers.mismatch("adam", torch.optim.AdamW(_params())) is None  # AdamW runs Adam's kernels


def test_mismatch_names_the_plans_optimizer_and_the_runs():
    plain = torch.optim.Adam(_params(), lr=1e-3)
    why = optimizers.mismatch("adam_fused", plain)
    assert "'adam_fused'" in why and "torch.optim.Adam(default implementation)" in why and "optimizer='adam'" in why
    why = optimizers.mismatch("adam", torch.optim.Adam(_params(), fused=True))
    assert "fused=True" in why and "optimizer='adam_fused'" in why
    assert "torch.optim.SGD" in optimizers.mismatch("adam", torch.optim.SGD(_params(), lr=0.1))

    class Mine(torch.optim.Optimizer):
        def __init__(self, ps):
            super().__init__(ps, {})
    assert "Mine is not a torch optimizer it prices" in optimizers.mismatch("sgd", Mine(_params()))


def test_runtime_warns_once_when_the_optimizer_is_not_the_plans(one_rank_mesh):
    from autopar.graph import capture
    from autopar.models import ZOO
    from autopar.runtime.apply import apply_plan
    from autopar.solvers.api import solve

    e = ZOO["mlp"]
    model, inputs = e.build("tiny", batch_size=4)
    targets = e.make_targets(model, inputs)
    graph = capture(model, inputs)
    cons = dict(dp=1, tp=1, pp=1, num_microbatches=1, zero=0, offload="none", schedule="none")
    plan = solve(graph, "local:1", optimizer="adam_fused", constraints=cons)
    assert plan.training.optimizer == "adam_fused"
    pm = apply_plan(graph, plan)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        ok = optimizers.factory(plan.training.optimizer, lr=1e-3)
        for _ in range(2):
            pm.train_step(inputs, targets, e.loss_fn, ok)
        assert not [w for w in got if issubclass(w.category, PlanOptimizerMismatch)]
        other = lambda ps: torch.optim.Adam(ps, lr=1e-3)  # noqa: E731
        for _ in range(3):
            pm.train_step(inputs, targets, e.loss_fn, other)
    mine = [w for w in got if issubclass(w.category, PlanOptimizerMismatch)]
    assert len(mine) == 1 and "'adam_fused'" in str(mine[0].message), [str(w.message) for w in got]
    assert mine[0].filename == __file__  # points at the caller's train_step


def test_fused_plan_prices_its_own_rate_and_no_temporaries():
    """Same graph, same one-device mesh, a CPU profiled for both implementations (rates in
    the ratio measured on the dev VM): the fused plan's step is shorter by exactly the two
    optimizer steps' difference, and its peak at the optimizer step holds no temporaries."""
    import dataclasses

    from autopar.cost_model.cluster import local_cluster
    from autopar.cost_model.compute import optimizer_step_time
    from autopar.graph import capture
    from autopar.models import ZOO
    from autopar.solvers.api import solve

    base = local_cluster(1)
    g0 = base.groups[0]
    dev = g0.device.replace(optimizer_rates={"adam": 2.5e8, "adam_fused": 1.5e9},
                            optimizer_tensor_overhead_s={"adam": 3e-5, "adam_fused": 5e-6})
    cluster = dataclasses.replace(base, groups=(dataclasses.replace(g0, device=dev),))
    e = ZOO["mlp"]
    model, inputs = e.build("tiny", batch_size=4)
    graph = capture(model, inputs)
    cons = dict(dp=1, tp=1, pp=1, num_microbatches=1, zero=0, offload="none", schedule="none", recompute="none")
    a = solve(graph, cluster, optimizer="adam", constraints=cons)
    f = solve(graph, cluster, optimizer="adam_fused", constraints=cons)
    numels = [p.numel for p in graph.params.values()]
    diff = sum(optimizer_step_time(n, 1, "adam", dev) - optimizer_step_time(n, 1, "adam_fused", dev)
               for n in numels)
    assert diff > 0
    assert a.predicted.step_time_s - f.predicted.step_time_s == pytest.approx(diff, rel=0.05)
    temps = a.predicted.memory_breakdown.get("optimizer_temporaries", 0)
    assert temps == 2 * 4 * max(numels) or a.predicted.memory_peak_at != "optimizer_step"
    assert f.predicted.memory_breakdown.get("optimizer_temporaries", 0) == 0


def test_plan_schema_and_cost_model_name_the_same_optimizers():
    import json
    from pathlib import Path

    import autopar
    from autopar import plan
    schema = json.loads((Path(autopar.__file__).parent / "schema" / "plan.schema.json").read_text())
    enum = schema["properties"]["training"]["properties"]["optimizer"]["enum"]
    assert tuple(enum) == plan.OPTIMIZERS == mem.OPTIMIZERS
