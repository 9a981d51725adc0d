"""Unit tests of the runtime's pure parts: step planning, refusals, launch command lines."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch

from autopar.graph import capture
from autopar.placements import Partial, Replicate, Shard
from autopar.runtime.steps import Move, RuntimeRefusal, collective_kind, plan_steps
from autopar.runtime.testing import make_plan


class TwoLayer(torch.nn.Module):
    def __init__(self, bias2: bool = False):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 8, bias=bias2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Stack(torch.nn.Module):
    def __init__(self, n=4, tied=False):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.blocks = torch.nn.ModuleList(TwoLayer() for _ in range(n))
        self.head = torch.nn.Linear(8, 32, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


@pytest.fixture(scope="module")
def mlp_graph():
    return capture(TwoLayer(), (torch.randn(8, 8),))


def test_collective_kinds():
    assert collective_kind(Shard(0), Replicate()) == "all-gather"
    assert collective_kind(Partial(), Replicate()) == "all-reduce"
    assert collective_kind(Partial(), Shard(1)) == "reduce-scatter"
    assert collective_kind(Shard(0), Shard(1)) == "all-to-all"
    assert collective_kind(Replicate(), Shard(0)) == "slice"
    assert Move("x", (Shard(0), Partial()), (Shard(0), Replicate())).collectives() == (("tp", "all-reduce"),)


def test_tp_plan_puts_collectives_where_megatron_does(mlp_graph):
    plan = make_plan(mlp_graph, "tp", 2)
    prog = plan_steps(mlp_graph, plan)
    by = {s.node: s for s in prog.steps}
    # fc1 colwise -> relu on the shard -> fc2 rowwise: no movement inside the pair
    assert all(m is None for m in by["relu"].moves) and all(m is None for m in by["fc2"].moves)
    assert by["fc1"].outputs[0][1] == Shard(1)
    assert by["fc2"].outputs[0][1] == Partial()  # no bias: the sum stays pending ...
    assert prog.output_move.collectives() == (("tp", "all-reduce"),)  # ... until the output
    assert prog.params["fc1.weight"].compute == (Replicate(), Shard(0))
    assert prog.params["fc2.weight"].compute == (Replicate(), Shard(1))


def test_fsdp_stores_sharded_and_gathers_at_use(mlp_graph):
    prog = plan_steps(mlp_graph, make_plan(mlp_graph, "fsdp", 2))
    lay = prog.params["fc1.weight"]
    assert lay.storage == (Shard(0), Replicate()) and lay.compute == (Replicate(), Replicate())
    assert lay.gather == "use"
    fc1 = next(s for s in prog.steps if s.node == "fc1")
    assert [m.tensor for m in fc1.param_moves] == ["fc1.weight", "fc1.bias"]
    assert fc1.param_moves[0].collectives() == (("dp", "all-gather"),)
    zero2 = plan_steps(mlp_graph, make_plan(mlp_graph, "fsdp", 2, zero_stage=2))
    assert zero2.params["fc1.weight"].gather == "step" and len(zero2.step_gathers()) == 3


def test_uneven_zero3_is_refused_naming_the_param(mlp_graph):
    plan = make_plan(mlp_graph, "fsdp", 2)
    params = tuple(dataclasses.replace(p, zero_stage=3) for p in plan.params)
    bad = dataclasses.replace(plan, mesh={"pp": 1, "dp": 3, "tp": 1}, params=params,
                              cluster={"world_size": 3})
    with pytest.raises(RuntimeRefusal, match=r"fc1\.weight.*does not divide 16|dp=3"):
        plan_steps(mlp_graph, bad)


def test_missing_strategy_and_uneven_batch_are_refused(mlp_graph):
    plan = make_plan(mlp_graph, "dp", 2)
    with pytest.raises(RuntimeRefusal, match="node 'relu'.*no strategy"):
        plan_steps(mlp_graph, dataclasses.replace(plan, nodes=tuple(n for n in plan.nodes if n.node != "relu")))
    with pytest.raises(RuntimeRefusal, match="global batch 8 does not split evenly into dp=2 x num_microbatches=3"):
        plan_steps(mlp_graph, dataclasses.replace(plan, pipeline=dataclasses.replace(plan.pipeline,
                                                                                     num_microbatches=3)))


def test_pipeline_stages_and_boundaries():
    g = capture(Stack(), (torch.randint(0, 32, (4, 5)),))
    prog = plan_steps(g, make_plan(g, "pp", 2, microbatches=2))
    assert len(prog.stages) == 2
    s0, s1 = prog.stages
    assert s0.inputs == ("idx",) and s1.outputs == (prog.output,)
    assert s0.outputs == s1.inputs and len(s0.outputs) == 1  # the residual stream crosses the cut
    assert {s.stage for s in prog.steps} == {0, 1}
    # cut at a block boundary
    first1 = next(s for s in prog.steps if s.stage == 1)
    assert first1.block in (None, "blocks.2") or first1.block.startswith("blocks.")


def test_tied_weights_across_stages_refused():
    g = capture(Stack(tied=True), (torch.randint(0, 32, (4, 5)),))
    with pytest.raises(RuntimeRefusal, match="emb.weight.*stages \\[0, 1\\]"):
        plan_steps(g, make_plan(g, "pp", 2, microbatches=2))


def test_recompute_and_offload_flags_follow_block_policy():
    g = capture(Stack(), (torch.randint(0, 32, (4, 5)),))
    prog = plan_steps(g, make_plan(g, "dp", 2, recompute=True, offload_activations=True))
    in_blocks = [s for s in prog.steps if s.block]
    assert in_blocks and all(s.recompute and s.offload_activations for s in in_blocks)
    assert "recompute offload-act" in prog.describe()


def test_torchrun_command():
    from autopar.runtime.launch import torchrun_command

    cmd = torchrun_command("train.py", 4, ["--lr", "1"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=4" in cmd and "--standalone" in cmd
    assert cmd[-3:] == ["train.py", "--lr", "1"]
    multi = torchrun_command("t.py", 8, nnodes=2, node_rank=1, rdzv_endpoint="host:29500")
    assert "--node-rank=1" in multi and "--rdzv-endpoint=host:29500" in multi
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command("t.py", 8, nnodes=2)


def test_worker_failure_reports_the_failing_rank_and_does_not_hang(tmp_path):
    from autopar.runtime.testing import run_workers

    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import os, torch, torch.distributed as dist
        from autopar.runtime.mesh import init_distributed
        init_distributed("cpu")
        if dist.get_rank() == 1:
            raise ValueError("boom on rank one")
        dist.barrier()   # rank 0 would wait here forever without timeouts / the watcher
    """))
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed.*boom on rank one"):
        run_workers(str(script), 2, timeout_s=60)


def test_launch_script_ends_job_on_worker_failure(tmp_path):
    from autopar.runtime.launch import launch_script

    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import torch.distributed as dist, time
        from autopar.runtime.mesh import init_distributed
        init_distributed("cpu")
        if dist.get_rank() == 0:
            raise SystemExit(3)
        time.sleep(600)
    """))
    rc = launch_script(str(script), 2, timeout_s=90, env={"AUTOPAR_PG_TIMEOUT_S": "30"})
    assert rc not in (0, 124)  # failed, and not by our timeout: torchrun stopped the sleeping rank


def test_cut_through_a_tuple_is_refused_before_any_process_starts():
    from autopar.runtime.exactness import build_model

    model, inputs, _, _ = build_model("gpt")
    g = capture(model, inputs)
    # 8 stages over 2 blocks: some cut falls between chunk() and its getitems
    with pytest.raises(RuntimeRefusal, match="tuple-valued node"):
        plan_steps(g, make_plan(g, "pp", 4, microbatches=4, virtual_stages=2))


def test_interleaved_stages_map_round_robin_to_pp_ranks():
    g = capture(Stack(n=4), (torch.randint(0, 32, (4, 5)),))
    prog = plan_steps(g, make_plan(g, "pp", 2, microbatches=2, virtual_stages=2))
    assert len(prog.stages) == 4
    assert prog.local_stages(0, 2) == (0, 2) and prog.local_stages(1, 2) == (1, 3)
    assert prog.stages[2].ranks == (0,) and prog.stages[3].ranks == (1,)


def test_run_model_trains_and_reports_measured_vs_predicted(tmp_path):
    import json

    from autopar.runtime.launch import run_model

    out = tmp_path / "report.json"
    rc = run_model("mlp", "local:2", steps=3, kind="dp", out_json=str(out), timeout_s=180)
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["mesh"] == {"pp": 1, "dp": 2, "tp": 1} and rep["steps"] == 3
    assert rep["measured_step_s"] > 0 and rep["measured_peak_bytes"] > 0
    assert "predicted_step_s" in rep and "predicted_peak_bytes" in rep


def test_a_plan_runs_on_part_of_the_world_with_one_process_numbers(tmp_path):
    """``build_mesh(ranks=...)`` + ``apply_plan(mesh=...)``: a dp2 plan on ranks 0 and 1 of a
    3-rank world trains as one process does while rank 2 sits out (the profiler times the
    runtime at 2 processes this way inside its 4-process launch)."""
    from autopar.runtime.testing import run_workers

    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from autopar.graph import capture
        from autopar.runtime.apply import apply_plan
        from autopar.runtime.mesh import build_mesh, init_distributed
        from autopar.runtime.testing import make_plan
        init_distributed("cpu")
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        x, y = torch.randn(8, 8), torch.randn(8, 4)
        g = capture(model, (x,))
        try:
            build_mesh({"dp": 2}, "cpu", ranks=[0, 0])
        except ValueError as e:
            assert "distinct ranks" in str(e), e
        else:
            raise AssertionError("a repeated rank was accepted")
        rmesh = build_mesh({"dp": 2}, "cpu", ranks=[0, 1])
        if rmesh is None:
            print("outside")
        else:
            pm = apply_plan(g, make_plan(g, "dp", 2), mesh=rmesh)
            loss_fn = lambda o, t: ((o - t) ** 2).mean()
            losses = [pm.train_step(x, y, loss_fn, lambda ps: torch.optim.SGD(ps, lr=0.1)).item()
                      for _ in range(3)]
            ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
            ref.load_state_dict(model.state_dict())
            opt = torch.optim.SGD(ref.parameters(), lr=0.1)
            for want in losses:
                opt.zero_grad(); loss = loss_fn(ref(x), y); loss.backward(); opt.step()
                torch.testing.assert_close(torch.tensor(want), loss.detach())
            print("exact", rmesh.coords["dp"])
        dist.barrier()
    """))
    out = run_workers(str(script), 3, timeout_s=120)
    assert [o.strip() for o in out] == ["exact 0", "exact 1", "outside"]
