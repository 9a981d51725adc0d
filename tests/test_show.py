"""show: text summary, layer grouping, memory rows, schedule simulation, PNG, validation."""
from __future__ import annotations

import json

import pytest

from autopar.plan import Plan
from autopar.show import (
    fmt_ranks,
    layer_groups,
    memory_rows,
    render_png,
    simulate_schedule,
    summary,
    summary_dict,
)
from autopar.validate import validate_file
from test_cli_fixtures import GIB, make_plan, tiny_gpt_graph


def test_fmt_ranks_compresses_runs():
    assert fmt_ranks([0, 1, 2, 3, 8, 9, 11]) == "0-3,8-9,11"
    assert fmt_ranks([5]) == "5"


def test_summary_has_mesh_stages_memory_and_time_breakdown():
    plan = make_plan()
    text = summary(plan)
    assert "pp=2 x dp=2 x tp=2" in text
    assert "stage 0: h.0..h.1" in text and "stage 1: h.2..h.3" in text
    assert "ranks 0-3" in text and "ranks 4-7" in text
    # memory against capacity: stage 0 holds 30 GiB of 76 usable
    assert "30.0 GiB / 76.0 GiB" in text and "39%" in text
    for part in ("compute", "communication", "bubble", "offload"):
        assert part in text
    assert str(plan) == text  # print(plan) is the summary


def test_repeated_blocks_are_grouped_the_same_with_or_without_the_graph():
    plan = make_plan()
    g = tiny_gpt_graph()
    without, with_graph = layer_groups(plan), layer_groups(plan, g)
    assert [(x.stage, x.blocks) for x in without] == [(x.stage, x.blocks) for x in with_graph]
    blocks = [x.blocks for x in without if x.blocks]
    assert blocks == [("h.0", "h.1", "h.2", "h.3")]  # equal strategies: one group, across the stage boundary
    # every planned node appears exactly once across groups (blocks counted per block)
    total = sum(len(x.rows) * max(1, len(x.blocks)) for x in without)
    assert total == len(plan.nodes)


def test_blocks_with_different_strategies_are_not_grouped():
    plan = make_plan(mesh={"pp": 1, "dp": 2, "tp": 4})
    nodes = list(plan.nodes)
    i = next(k for k, n in enumerate(nodes) if n.node == "h_2_mlp_c_fc")
    nodes[i] = type(nodes[i])(nodes[i].node, "replicate", nodes[i].inputs, nodes[i].outputs)
    import dataclasses

    plan2 = dataclasses.replace(plan, nodes=tuple(nodes))
    labels = [x.label for x in layer_groups(plan2) if x.blocks]
    assert labels == ["h.0..h.1", "h.2", "h.3"]
    assert "h.2: ln_1" in summary(plan2) and "mlp_c_fc replicate" in summary(plan2)


def test_memory_rows_follow_stages_and_flag_overflow():
    plan = make_plan(memory_gib=(80.0, 10.0))
    rows = memory_rows(plan)
    assert [r.label for r in rows] == ["stage 0", "stage 1"]
    assert rows[0].max_bytes == 80 * GIB and rows[1].max_bytes == 10 * GIB
    line = next(x for x in summary(plan).splitlines() if x.strip().startswith("stage 0") and "/ 76.0 GiB" in x)
    assert line.rstrip().endswith("105%") and "]!" in line  # over the 76 GiB capacity


@pytest.mark.parametrize("schedule,virtual", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)])
def test_schedule_simulation_respects_dependencies(schedule, virtual):
    import dataclasses

    from autopar.plan import Pipeline, Stage

    pp, m = 4, 8
    stages = tuple(Stage(i, (), (), (i,), "h100-sxm", compute_s=0.3) for i in range(pp * virtual))
    plan = make_plan(mesh={"pp": 1, "dp": 8, "tp": 1})
    plan = dataclasses.replace(plan, mesh={"pp": pp, "dp": 2, "tp": 1},
                               pipeline=Pipeline(schedule, m, 1, virtual, stages))
    boxes = simulate_schedule(plan)
    assert len(boxes) == 2 * m * pp * virtual
    fin = {(b.kind, b.chunk * pp + b.rank, b.microbatch): b for b in boxes}
    for b in boxes:
        j = b.chunk * pp + b.rank
        if b.kind == "F" and j > 0:
            assert b.start >= fin[("F", j - 1, b.microbatch)].end - 1e-12
        if b.kind == "B":
            assert b.start >= fin[("F", j, b.microbatch)].end - 1e-12
            if j < pp * virtual - 1:
                assert b.start >= fin[("B", j + 1, b.microbatch)].end - 1e-12
    # no rank runs two things at once
    for r in range(pp):
        mine = sorted((b.start, b.end) for b in boxes if b.rank == r)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(mine, mine[1:]))
    # bubble: makespan over busy time per rank matches (p-1)/(v m) for equal stages
    makespan = max(b.end for b in boxes)
    busy = m * 0.3 * virtual
    assert makespan / busy - 1 == pytest.approx((pp - 1) / (virtual * m), rel=1e-6)


def test_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    render_png(make_plan(), str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_summary_dict_is_json(tmp_path):
    d = summary_dict(make_plan())
    json.dumps(d)
    assert d["mesh"] == {"pp": 2, "dp": 2, "tp": 2}
    assert [s["ranks"] for s in d["pipeline"]["stages"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_validate_file_reports_schema_and_cluster_problems(tmp_path):
    from autopar.cost_model.cluster import Cluster

    plan = make_plan()
    good = tmp_path / "good.json"
    plan.save(good)
    assert validate_file(str(good)).ok
    assert validate_file(str(good), Cluster.parse("h100x8")).ok
    bad_cluster = validate_file(str(good), Cluster.parse("a100x8"))
    assert not bad_cluster.ok and "a100" in bad_cluster.errors[0]
    other_size = validate_file(str(good), Cluster.parse("h100x16"))
    assert not other_size.ok and "8 devices" in other_size.errors[0] and "16" in other_size.errors[0]

    data = json.loads(good.read_text())
    data["nodes"][3]["inputs"][0][1] = "Q(1)"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    rep = validate_file(str(bad))
    assert not rep.ok
    assert any("plan.nodes[3].inputs[0][1]" in e for e in rep.errors)


def test_plan_roundtrip_keeps_summary(tmp_path):
    plan = make_plan()
    p = tmp_path / "p.json"
    plan.save(p)
    assert summary(Plan.load(p)) == summary(plan)


def test_same_devices_other_figures_is_a_warning(tmp_path):
    from autopar.cost_model.cluster import Cluster

    data = make_plan().to_dict()
    data["cluster"]["groups"][0]["intra_node_link"]["bandwidth"] *= 2  # e.g. re-measured links
    p = tmp_path / "p.json"
    p.write_text(json.dumps(data))
    rep = validate_file(str(p), Cluster.parse("h100x8"))
    assert rep.ok and len(rep.warnings) == 1 and "groups" in rep.warnings[0]
