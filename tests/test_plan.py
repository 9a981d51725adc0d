"""Plan schema: JSON round trip, JSON Schema, and errors that name the field."""
import json
import os

import pytest

jsonschema = pytest.importorskip("jsonschema")

from autopar.placements import Partial, Replicate, Shard, parse_placement  # noqa: E402
from autopar.plan import (  # noqa: E402
    BlockPolicy,
    ModelInfo,
    NodeStrategy,
    ParamPlan,
    Pipeline,
    Plan,
    PlanError,
    Predicted,
    SolverReport,
    Stage,
    Training,
    schema_path,
)

R, S0, S1, P = Replicate(), Shard(0), Shard(1), Partial()


def sample_plan() -> Plan:
    stages = (
        Stage(0, ("emb", "h_0_fc1"), ("h.0",), (0, 1), "h100-sxm", 1e-3, 10 << 20),
        Stage(1, ("h_1_fc1", "head"), ("h.1",), (2, 3), "h100-sxm", 1.2e-3, 12 << 20),
    )
    return Plan(
        cluster={"name": "local:4", "world_size": 4},
        model=ModelInfo("tiny", "0123abcd", 1234, "fx"),
        training=Training("bf16-mixed", "adam", 8),
        mesh={"pp": 2, "dp": 1, "tp": 2},
        nodes=(
            NodeStrategy("h_0_fc1", "colwise", ((S0, R),), ((S0, Shard(2)),), 1e-4, 0.0),
            NodeStrategy("h_0_fc2", "rowwise", ((S0, Shard(2)),), ((S0, P),), 1e-4, 2e-5),
        ),
        params=(
            ParamPlan("h.0.fc1.weight", (128, 32), (R, S0), 3, ("optimizer_state",), 0),
            ParamPlan("h.1.fc1.weight", (128, 32), (R, S1), 0, (), 1),
        ),
        pipeline=Pipeline("1f1b", 4, 2, 1, stages),
        blocks=(BlockPolicy("h.0", "full", False), BlockPolicy("*", "none", True)),
        predicted=Predicted(0.5, 0.3, 0.1, 0.05, 0.05, (1, 2, 3, 4), {"params": 10}, 99, 1e12, 80 << 30),
        solver=SolverReport("optimal", 0.5, 0.0, 0.2, 100, 50, 6, ("blocks deduplicated",)),
    )


def test_round_trip_unchanged():
    p = sample_plan()
    q = Plan.from_json(p.to_json())
    assert q == p
    assert q.to_json() == p.to_json()
    assert q.mesh == {"pp": 2, "dp": 1, "tp": 2} and q.world_size == 4
    assert q.strategy_of("h_0_fc2").outputs[0][1] == P
    assert q.block_policy("h.0").recompute == "full"
    assert q.block_policy("h.7").recompute == "none"


def test_json_schema_accepts_plans_and_rejects_bad_ones():
    schema = json.load(open(schema_path()))
    jsonschema.Draft202012Validator.check_schema(schema)
    data = json.loads(sample_plan().to_json())
    jsonschema.validate(data, schema)
    bad = json.loads(sample_plan().to_json())
    bad["nodes"][0]["inputs"][0][0] = "Shard0"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = json.loads(sample_plan().to_json())
    bad["pipeline"]["schedule"] = "zigzag"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema_version=2), "schema_version is 2"),
        (lambda d: d.pop("mesh"), "missing field 'mesh'"),
        (lambda d: d["nodes"][0]["inputs"][0].__setitem__(1, "X"), r"plan.nodes\[0\].inputs\[0\]\[1\]: unknown placement 'X'"),
        (lambda d: d["nodes"][1]["outputs"][0].pop(), r"plan.nodes\[1\].outputs\[0\]: expected 2 placements"),
        (lambda d: d["mesh"].update(dp=3), "do not multiply to the world size 4"),
        (lambda d: d["mesh"].update(ep=2), "unknown axis 'ep'"),
        (lambda d: d["pipeline"].update(schedule="zigzag"), "pipeline.schedule 'zigzag'"),
        (lambda d: d["pipeline"].update(num_microbatches=0), "num_microbatches must be a positive integer"),
        (lambda d: d["params"][0].update(zero_stage=4), r"plan.params\[0\].*zero_stage must be 0..3"),
        (lambda d: d["params"][1].update(stage=5), r"params\[1\].*stage 5"),
        (lambda d: d["training"].update(precision="fp8"), "training.precision 'fp8'"),
        (lambda d: d["pipeline"]["stages"][1].update(ranks=[2, 9]), "ranks \\[9\\] outside world size 4"),
        (lambda d: d["blocks"][0].update(recompute="some"), "recompute 'some'"),
        (lambda d: d["predicted"].update(step_time_s="fast"), "plan.predicted.step_time_s: expected a number"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "two strategies"),
    ],
)
def test_corrupted_plan_names_the_field(mutate, message):
    data = json.loads(sample_plan().to_json())
    mutate(data)
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data)


def test_not_json():
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json('{"schema_version": 1,')
    with pytest.raises(PlanError, match="expected an object"):
        Plan.from_json("[1, 2]")


def test_save_is_atomic(tmp_path, monkeypatch):
    p = sample_plan()
    path = tmp_path / "plan.json"
    p.save(path)
    assert Plan.load(path) == p
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def boom(self, indent=2):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Plan, "to_json", boom)
    with pytest.raises(RuntimeError):
        p.save(tmp_path / "other.json")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plan.json"]  # no half-written file
    with pytest.raises(PlanError, match="cannot read plan file"):
        Plan.load(tmp_path / "missing.json")


def test_placements_print_short_and_parse_back():
    for p, s in [(Shard(0), "S(0)"), (Shard(3), "S(3)"), (Replicate(), "R"), (Partial(), "P")]:
        assert str(p) == s and parse_placement(s) == p
    assert repr(Shard(1)) == "Shard(dim=1)"
    with pytest.raises(ValueError, match="unknown placement"):
        parse_placement("S(x)")
    with pytest.raises(TypeError):
        Shard("0")
