"""The accuracy benchmark's statistics and case parsing (bench/cost_model_accuracy.py)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "cost_model_accuracy.py"
_spec = importlib.util.spec_from_file_location("cost_model_accuracy", _PATH)
acc = importlib.util.module_from_spec(_spec)
sys.modules["cost_model_accuracy"] = acc  # dataclasses look their module up there
_spec.loader.exec_module(acc)


def test_ranks_average_ties():
    assert acc.ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]


def test_spearman_monotone_and_reversed():
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert acc.spearman(a, [x ** 3 for x in a]) == pytest.approx(1.0)
    assert acc.spearman(a, [-x for x in a]) == pytest.approx(-1.0)
    # one swapped pair of five: 1 - 6 * 2 / (5 * 24) = 0.9
    assert acc.spearman(a, [1.0, 3.0, 2.0, 4.0, 5.0]) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        acc.spearman([1.0], [1.0])


def test_mape():
    assert acc.mape([110.0, 90.0], [100.0, 100.0]) == pytest.approx(10.0)


def test_cases_parse_and_name_the_culprit():
    cases = acc.parse_cases(["gpt:dp2", "mlp:single"])
    assert [(c.model, c.plan, c.nproc) for c in cases] == [("gpt", "dp2", 2), ("mlp", "single", 1)]
    with pytest.raises(ValueError, match="unknown plan 'dp3'"):
        acc.parse_cases(["gpt:dp3"])
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        acc.parse_cases(["gpt5:dp2"])
    assert len(acc.parse_cases(acc.FULL_CASES)) >= 12


def test_every_small_model_builds_and_plans_pin_a_full_mesh():
    for name in acc.SMALL:
        model, inputs, targets, loss_fn = acc.build_small(name)
        assert loss_fn(model(*inputs), targets).ndim == 0, name
    for plan, (n, cons) in acc.PLANS.items():
        assert cons["dp"] * cons["tp"] * cons["pp"] == n, plan


def test_profile_reference_is_the_profiles_own_largest_square():
    n = acc.REF_N
    data = {"profile": {"raw": {"matmul": {"2": {"fp32": [[2.0 * 128 ** 3, 1e-5], [2.0 * n ** 3, 0.012]]}}}}}
    assert acc.profile_reference_s(data, 2) == 0.012
    assert acc.profile_reference_s(data, 4) == 0.0  # not profiled: no drift figure, not a wrong one


def test_plan_shape_keeps_what_a_plan_does_and_drops_what_it_predicts():
    import copy
    import json

    plan = {"mesh": {"pp": 1, "dp": 2, "tp": 1}, "training": {"optimizer": "adam"},
            "params": [{"name": "w", "placements": ["R", "R"]}], "blocks": [],
            "nodes": [{"node": "fc", "strategy": "dp", "inputs": [["S0", "R"]], "compute_s": 1e-3, "reshard_s": 0.0}],
            "pipeline": {"schedule": "gpipe", "num_microbatches": 1,
                         "stages": [{"index": 0, "nodes": ["fc"], "compute_s": 1e-3, "memory_bytes": 10,
                                     "device": "local-cpu/2"}]},
            "predicted": {"step_time_s": 0.1}, "cluster": {"name": "local:2"}, "solver": {"wall_s": 0.01}}
    other = copy.deepcopy(plan)  # the same plan priced under another profile
    other["nodes"][0]["compute_s"] = 2e-3
    other["pipeline"]["stages"][0].update(compute_s=2e-3, memory_bytes=11)
    other["predicted"]["step_time_s"] = 0.2
    other["solver"]["wall_s"] = 0.5
    assert acc.plan_shape(json.dumps(plan)) == acc.plan_shape(json.dumps(other))
    moved = copy.deepcopy(plan)
    moved["nodes"][0]["strategy"] = "tp_col"
    assert acc.plan_shape(json.dumps(plan)) != acc.plan_shape(json.dumps(moved))
    deeper = copy.deepcopy(plan)
    deeper["pipeline"]["num_microbatches"] = 2
    assert acc.plan_shape(json.dumps(plan)) != acc.plan_shape(json.dumps(deeper))
