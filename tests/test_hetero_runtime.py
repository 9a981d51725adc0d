"""The solver's mixed-cluster plans run exactly on 4 gloo CPU processes declared as two kinds.

Two plans, both solved for a Cluster JSON of 2 + 2 local processes with different profiles:

- a tiny GPT (6 blocks) on a cluster where one kind is twice as fast, pp pinned to 2: the fast
  kind's stage holds more blocks;
- a tiny DLRM (no repeated blocks): a split pipeline, the embedding tables and their lookups on
  one kind's ranks, the MLPs and the interaction on the other's.

The test solves the plans (and checks their shape), writes them, and runs this file as the
worker on 4 ranks (one spawn for both); each rank trains 3 SGD-momentum steps under each plan
and compares the loss at every step and every parameter afterwards with a single-process run
(torch.testing.assert_close, fp32 defaults, as :mod:`autopar.runtime.exactness`).
"""
from __future__ import annotations

import json
import sys

import torch

STEPS = 3


def build(name: str):
    """(model, inputs, targets, loss_fn), seeded, identical on every rank."""
    torch.manual_seed(1234)
    if name == "gpt6":  # untied: pipelines refuse weights tied across stages
        from autopar.models import gpt

        cfg = gpt.GPTConfig(vocab_size=64, block_size=16, n_layer=6, n_head=2, d_model=32, tie_embeddings=False)
        model = gpt.GPT(cfg)
        inputs = (torch.randint(0, cfg.vocab_size, (8, cfg.block_size)),)
        return model, inputs, gpt.make_targets(model, inputs), gpt.loss_fn
    if name == "dlrm":
        from autopar.models import dlrm

        model, inputs = dlrm.build("tiny", batch_size=8)
        return model, inputs, dlrm.make_targets(model, inputs), dlrm.loss_fn
    raise KeyError(name)


def mixed_plans() -> dict:
    from test_hetero import mixed_speed_cluster  # tests/ is on sys.path under pytest

    from autopar.graph import capture
    from autopar.solvers import solve

    plans = {}
    model, inputs, _, _ = build("gpt6")
    plans["gpt6"] = solve(capture(model, inputs), mixed_speed_cluster(fast_first=True), optimizer="sgd",
                          constraints={"pp": 2, "tp": 1, "num_microbatches": 4})
    model, inputs, _, _ = build("dlrm")
    plans["dlrm"] = solve(capture(model, inputs), mixed_speed_cluster(fast_first=False), optimizer="sgd")
    return plans


def test_mixed_plans_match_one_process(tmp_path):
    from autopar.runtime.testing import long_job_timeout_s, run_workers

    plans = mixed_plans()
    fast, slow = plans["gpt6"].pipeline.stages
    assert (fast.device, slow.device) == ("cpu-fast", "cpu-slow")
    assert len(fast.blocks) > len(slow.blocks)
    d0, d1 = plans["dlrm"].pipeline.stages
    assert d0.device != d1.device
    assert all(x.stage == 0 for x in plans["dlrm"].params if x.name.startswith("tables."))
    assert all(x.stage == 1 for x in plans["dlrm"].params if x.name.startswith(("top.", "bottom.")))
    assert any(s.startswith("placement:") for s in plans["dlrm"].solver.shortcuts)
    args = []
    for name, p in plans.items():
        path = tmp_path / f"{name}.plan.json"
        p.save(str(path))
        args.append(f"{name}={path}")
    outs = run_workers(__file__, 4, args, timeout_s=long_job_timeout_s())
    res = {r["case"]: r for r in (json.loads(line) for line in outs[0].splitlines() if line.startswith("{"))}
    for name in plans:
        assert res[name]["ok"], res[name]
        assert res[name]["loss_err"] <= 1e-5 and res[name]["param_err"] <= 1e-5


def worker(cases: list[str]) -> None:
    import torch.distributed as dist

    from autopar.graph import capture
    from autopar.plan import Plan
    from autopar.runtime.apply import apply_plan
    from autopar.runtime.exactness import make_optimizer, reference
    from autopar.runtime.mesh import init_distributed

    init_distributed("cpu")
    for case in cases:
        name, _, plan_path = case.partition("=")
        model, inputs, targets, loss_fn = build(name)
        graph = capture(model, inputs)
        ref_losses, ref_params = reference(model, inputs, targets, loss_fn, steps=STEPS)
        pm = apply_plan(graph, Plan.load(plan_path))
        factory = lambda ps: make_optimizer(ps, "sgd")  # noqa: E731 (one factory: the runtime keeps its optimizer)
        losses = [pm.train_step(inputs, targets, loss_fn, factory) for _ in range(STEPS)]
        for i, (a, b) in enumerate(zip(losses, ref_losses)):
            torch.testing.assert_close(torch.as_tensor(float(a)), b.float(),
                                       msg=lambda m, i=i: f"{name}: loss at step {i}: {m}")
        full = pm.full_state_dict()
        param_err = 0.0
        for k, ref in ref_params.items():
            got = full[graph.param_aliases.get(k, k)]
            param_err = max(param_err, float((got - ref).abs().max()))
            torch.testing.assert_close(got, ref, msg=lambda m, k=k: f"{name}: param {k}: {m}")
        loss_err = max(abs(float(a) - float(b)) for a, b in zip(losses, ref_losses))
        dist.barrier()
        if dist.get_rank() == 0:
            print(json.dumps({"case": name, "ok": True, "loss_err": loss_err, "param_err": param_err}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1:])
