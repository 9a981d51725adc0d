"""parallelize (class and instance), the plan cache, and one plan shared by every rank."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import autopar.decorator as D
from autopar.cache import PlanCache, PlanShareError, plan_key, share_plan
from autopar.plan import Plan
from autopar.models import gpt
from test_cli_fixtures import make_plan


@pytest.fixture(autouse=True)
def _plain_process(monkeypatch, tmp_path):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path / "cache"))


def tiny_cfg():
    return dataclasses.replace(gpt.GPTConfig.tiny(), n_layer=4)


# --------------------------------------------------------------------------- cache


def test_plan_key_depends_on_each_part():
    c = {"name": "h100x8", "groups": []}
    s = {"precision": "fp32", "optimizer": "adam", "constraints": {"tp": 2}}
    k = plan_key("abc", c, s, "1")
    assert k == plan_key("abc", dict(c), dict(s), "1")  # stable
    assert k == plan_key("abc", c, {"optimizer": "adam", "constraints": {"tp": 2}, "precision": "fp32"}, "1")
    assert k != plan_key("abd", c, s, "1")
    assert k != plan_key("abc", {**c, "name": "h100x16"}, s, "1")
    assert k != plan_key("abc", c, {**s, "constraints": {"tp": 4}}, "1")
    assert k != plan_key("abc", c, s, "2")
    # by default the version carries a digest of the planner's source: code that plans
    # differently does not reuse a plan cached by the old code
    from autopar import __version__
    from autopar.cache import planner_digest
    assert len(planner_digest()) == 16 and planner_digest() == planner_digest()
    assert plan_key("abc", c, s) == plan_key("abc", c, s, f"{__version__}+{planner_digest()}")
    assert plan_key("abc", c, s) != plan_key("abc", c, s, __version__)


def test_cache_roundtrip_and_second_start_skips_solve(tmp_path):
    cache = PlanCache(tmp_path / "plans")
    plan = make_plan()
    solves = []

    def solve():
        solves.append(1)
        return plan

    p1, hit1 = cache.get_or_solve("k1", solve)
    p2, hit2 = PlanCache(tmp_path / "plans").get_or_solve("k1", solve)  # a "second start"
    assert (hit1, hit2) == (False, True) and len(solves) == 1
    assert p2 == p1
    assert not [f for f in os.listdir(tmp_path / "plans") if f.startswith(".plan-")]  # no temp files left


def test_unreadable_cache_entry_is_a_miss(tmp_path, capsys):
    cache = PlanCache(tmp_path)
    cache.path("k").write_text('{"schema_version": 99}')
    assert cache.get("k") is None
    assert "ignoring unreadable cached plan" in capsys.readouterr().err


def _share_worker(rank, world, init_file, result_dir, plan_json):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    lines = []
    for fail in (False, True):
        calls = []

        def get():
            calls.append(rank)
            if fail:
                raise ValueError("needs 41.2 GiB per device")
            return Plan.from_json(plan_json)

        try:
            out = share_plan(get, rank=rank, world_size=world).to_json(indent=None)
        except (PlanShareError, ValueError) as e:
            out = f"ERROR {type(e).__name__}: {e}"
        lines.append(f"{len(calls)}\t{out}")
    with open(os.path.join(result_dir, f"{rank}.txt"), "w") as f:
        f.write("\n".join(lines))
    dist.destroy_process_group()


def test_rank0_solves_and_every_rank_gets_the_same_plan(tmp_path):
    """Rank 0 alone calls get_plan; its plan (or its error) reaches every rank."""
    import torch.multiprocessing as mp

    world = 2
    plan_json = make_plan().to_json()
    mp.spawn(_share_worker, args=(world, str(tmp_path / "init"), str(tmp_path), plan_json), nprocs=world, join=True)
    res = [[line.split("\t", 1) for line in (tmp_path / f"{r}.txt").read_text().splitlines()]
           for r in range(world)]
    ok = [r[0] for r in res]
    assert [int(c) for c, _ in ok] == [1, 0]
    assert ok[0][1] == ok[1][1] == make_plan().to_json(indent=None)
    bad = [r[1] for r in res]
    assert [int(c) for c, _ in bad] == [1, 0]
    assert bad[0][1].startswith("ERROR ValueError")
    for _, out in bad[1:]:
        assert out.startswith("ERROR PlanShareError") and "41.2 GiB" in out


# --------------------------------------------------------------------------- decorator


def test_class_decorator_with_saved_plan_runs_as_one_plain_process(tmp_path, capsys):
    plan = make_plan()
    path = tmp_path / "plan.json"
    plan.save(path)

    @D.parallelize(cluster="h100x8", plan=str(path))
    class MyGPT(gpt.GPT):
        def example_inputs(self):
            return gpt.example_inputs(self.config, 4)

    model = MyGPT(tiny_cfg())
    assert isinstance(model, gpt.GPT) and MyGPT.__name__ == "MyGPT"
    assert model.plan == plan
    assert "Plan for" in str(model.plan)
    assert "running unsharded" in capsys.readouterr().err
    x = gpt.example_inputs(model.config, 4)
    y = gpt.make_targets(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = [float(model.train_step(x, y, gpt.loss_fn, opt)) for _ in range(3)]
    assert losses[2] < losses[0]


def test_instance_with_plan_for_another_graph_is_refused(tmp_path):
    plan = make_plan()
    model = gpt.GPT(dataclasses.replace(tiny_cfg(), n_layer=2))
    with pytest.raises(D.ParallelizeError, match="made for graph .* captures as graph"):
        D.parallelize(model, cluster="h100x8", plan=plan, example_inputs=gpt.example_inputs(model.config, 4))


def test_plan_for_another_cluster_is_refused():
    plan = make_plan()  # 8 devices
    model = gpt.GPT(tiny_cfg())
    with pytest.raises(D.ParallelizeError, match="made for 8 devices .* has 16"):
        D.parallelize(model, cluster="h100x16", plan=plan, example_inputs=gpt.example_inputs(model.config, 4))
    with pytest.raises(D.ParallelizeError, match="made for cluster 'h100x8' .* not for 'a100x8'"):
        D.parallelize(model, cluster="a100x8", plan=plan, example_inputs=gpt.example_inputs(model.config, 4))


def test_missing_example_inputs_says_how_to_give_them():
    with pytest.raises(D.ParallelizeError, match="example_inputs"):
        D.parallelize(gpt.GPT(tiny_cfg()), cluster="h100x8")


def test_torchrun_world_size_must_match_cluster(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    model = gpt.GPT(tiny_cfg())
    with pytest.raises(D.ParallelizeError, match="4 devices but this job runs 2 processes"):
        D.parallelize(model, cluster="local:4", example_inputs=gpt.example_inputs(model.config, 4))


def test_default_cluster_is_local_world_size(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_PROFILE", str(tmp_path / "none.json"))
    assert D.resolve_cluster(None, 1).world_size == 1
    assert D.resolve_cluster(None, 3).world_size == 3
    assert D.resolve_cluster("h100x16", 1).world_size == 16


def test_decorator_solves_once_then_reads_the_cache(tmp_path, capsys):
    api = pytest.importorskip("autopar.solvers.api")
    assert hasattr(api, "solve")
    cfg = dataclasses.replace(gpt.GPTConfig.tiny(), n_layer=2)

    @D.parallelize(cluster="local:1", cache_dir=tmp_path / "c")
    class Small(gpt.GPT):
        def example_inputs(self):
            return gpt.example_inputs(self.config, 2)

    m1 = Small(cfg)
    err1 = capsys.readouterr().err
    m2 = Small(cfg)
    err2 = capsys.readouterr().err
    assert "solved plan" in err1 and "plan from cache" in err2
    assert m1.plan == m2.plan and m1.plan.world_size == 1
    assert len(list((tmp_path / "c").glob("*.json"))) == 1
    x = gpt.example_inputs(cfg, 2)
    y = gpt.make_targets(m2, x)
    opt = torch.optim.SGD(m2.parameters(), lr=0.1)
    assert torch.isfinite(torch.as_tensor(m2.train_step(x, y, gpt.loss_fn, opt))).all()


def test_option_shortcuts_map_onto_solver_options():
    opts_mod = pytest.importorskip("autopar.solvers.options")
    cfg = D.ParallelizeConfig(time_limit_s=5.0, memory_reserve=0.2, allow=("dp", "tp"), objective="time")
    o = D.solver_options(cfg)
    assert isinstance(o, opts_mod.SolverOptions)
    assert (o.time_limit_s, o.memory_reserve_fraction, o.allowed, o.objective) == (5.0, 0.2, frozenset({"dp", "tp"}),
                                                                                  "time")
    base = opts_mod.SolverOptions(seed=7)
    o2 = D.solver_options(D.ParallelizeConfig(options=base, time_limit_s=1.0))
    assert o2.seed == 7 and o2.time_limit_s == 1.0
    assert D.solver_options(D.ParallelizeConfig(options=base)) is base
    # the settings part of the cache key changes with an option
    k1 = plan_key("g", {}, D.plan_settings(cfg, o))
    k2 = plan_key("g", {}, D.plan_settings(cfg, o2))
    assert k1 != k2

