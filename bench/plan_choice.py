"""Does the solver pick the fastest plan? Measure every candidate plan kind and its choice.

    python bench/plan_choice.py [--nproc 4] [--steps 6] [--models mlp,gpt,llama]

For each model (small configs of the zoo's MLP, GPT and LLaMA, big enough that compute is
not all Python overhead on CPU), on ``nproc`` local gloo processes:

- candidates: the solver's plan with the mesh pinned to each layout that fits the world size
  (dp, tp, dp x tp, pp, pp x dp; ZeRO-3 dp too), each with its predicted step time, plus the
  solver's free choice on ``local:N``; a candidate the solver cannot produce falls back to the
  hand-written layout of :func:`autopar.runtime.testing.make_plan` (marked "hand");
- every candidate is applied and trained (Adam, synthetic batch) alone, as a training job
  would run it: built, 2 warm-up steps, its share of ``steps`` timed steps, freed; two passes
  over the candidates in alternating order so drift of a shared machine's speed hits all of
  them alike; step time is the median of its timed steps. When the
  solver's choice is the same plan as a candidate (same mesh, placements, pipeline) it is
  measured once and both rows show that figure ("same plan as ..."): on the 2-core VM two
  runs of one plan in the same round-robin differed by up to 24 %.

Prints a table per model and the solver's choice / fastest measured (target <= 1.10). Rank 0
solves and broadcasts each plan so every rank runs the same one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def models():
    import torch

    from autopar.models import gpt, llama, mlp

    def m_mlp():
        cfg = mlp.MLPConfig(d_in=512, d_hidden=1024, d_out=512, n_layer=4)
        model = mlp.MLP(cfg)
        x = torch.randn(64, 512)
        return model, (x,), torch.randn(64, 512), mlp.loss_fn

    def m_gpt():
        cfg = gpt.GPTConfig(vocab_size=1024, block_size=64, n_layer=4, n_head=4, d_model=128, tie_embeddings=False)
        model = gpt.GPT(cfg)
        idx = torch.randint(0, 1024, (16, 64))
        return model, (idx,), torch.randint(0, 1024, (16, 64)), gpt.loss_fn

    def m_llama():
        cfg = llama.LlamaConfig(vocab_size=1024, max_seq_len=64, n_layer=4, n_head=4, n_kv_head=4, d_model=128,
                                d_ff=344, rope_theta=10000.0)
        model = llama.Llama(cfg)
        idx = torch.randint(0, 1024, (16, 64))
        return model, (idx,), torch.randint(0, 1024, (16, 64)), llama.loss_fn

    return {"mlp": m_mlp, "gpt": m_gpt, "llama": m_llama}


CANDIDATES = [  # (label, solver constraints, make_plan kind, make_plan kwargs)
    ("dp", {"dp": 4, "tp": 1, "pp": 1, "zero": 0}, "dp", {}),
    ("fsdp", {"dp": 4, "tp": 1, "pp": 1, "zero": 3}, "fsdp", {}),
    ("tp", {"dp": 1, "tp": 4, "pp": 1}, "tp", {}),
    ("dp2xtp2", {"dp": 2, "tp": 2, "pp": 1}, "dp_tp", {}),
    ("pp4", {"dp": 1, "tp": 1, "pp": 4, "num_microbatches": 4}, "pp", {"microbatches": 4}),
    ("pp2xdp2", {"dp": 2, "tp": 1, "pp": 2, "num_microbatches": 2}, "pp_dp", {"microbatches": 2}),
]


def _plan_on_rank0(make):
    import torch.distributed as dist

    from autopar.plan import Plan

    box = [None]
    if dist.get_rank() == 0:
        try:
            p = make()
            box = [(p.to_json(), None)]
        except Exception as e:  # noqa: BLE001 -- reported in the table
            box = [(None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")]
    dist.broadcast_object_list(box, src=0)
    text, err = box[0]
    return (Plan.from_json(text) if text else None), err


def _same_plan(a, b) -> bool:
    """The same decisions (mesh, per-node and per-parameter placements, pipeline, blocks), whatever
    the solver reported about how it found them."""
    da, db = a.to_json(), b.to_json()
    da, db = (json.loads(x) if isinstance(x, str) else x for x in (da, db))
    keys = ("mesh", "nodes", "params", "pipeline", "blocks", "training")
    return all(da.get(k) == db.get(k) for k in keys)


def _measure_all(graph, plans: dict, inputs, targets, loss_fn, steps, rounds: int = 2) -> dict:
    """Median step time per plan. Each plan runs as a training job would: built, warmed up
    (2 steps), timed for its share of ``steps`` steps, then freed before the next plan is
    built, so no plan runs beside the others' parameters and optimizer state. ``rounds``
    passes over the plans, in alternating order, so slow drift of this shared machine's speed
    hits every plan alike. (An earlier version interleaved single steps of all plans kept
    alive at once: on the 2-core VM that measured GPT dp4 at 210 ms against 140 ms alone.)"""
    import gc

    import torch
    import torch.distributed as dist

    from autopar.runtime.apply import apply_plan

    factory = lambda ps: torch.optim.Adam(ps, lr=1e-4)  # noqa: E731
    times: dict[str, list[float]] = {k: [] for k in plans}
    errors: dict[str, str] = {}
    per_round = max(3, -(-steps // rounds))
    order = list(plans)
    for r in range(rounds):
        for label in (order if r % 2 == 0 else order[::-1]):
            if label in errors:
                continue
            try:
                pm = apply_plan(graph, plans[label])
                for _ in range(2):  # warm-up
                    pm.train_step(inputs, targets, loss_fn, factory)
            except Exception as e:  # noqa: BLE001 -- a plan the runtime refuses is reported
                errors[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                continue
            for _ in range(per_round):
                dist.barrier()
                t0 = time.perf_counter()
                pm.train_step(inputs, targets, loss_fn, factory)
                dist.barrier()
                times[label].append(time.perf_counter() - t0)
            del pm
            gc.collect()
    out = {k: (statistics.median(v), None) for k, v in times.items() if v and k not in errors}
    out.update({k: (None, e) for k, e in errors.items()})
    return out


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from autopar.graph import capture
    from autopar.runtime.mesh import init_distributed
    from autopar.runtime.testing import make_plan

    init_distributed("cpu")
    ws, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ws))  # what the profile measured
    cluster = f"local:{ws}"
    try:
        from autopar.solvers.api import solve
    except ImportError:
        solve = None
    rows_all = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, inputs, targets, loss_fn = models()[name]()
        graph = capture(model, inputs)
        cands = [(lbl, c, k, kw) for lbl, c, k, kw in CANDIDATES
                 if c["dp"] * c["tp"] * c["pp"] == ws]
        plans, meta, rows = {}, {}, []
        for label, cons, kind, kw in cands + [("solver", None, None, None)]:
            src = "solver"
            if label == "solver":
                plan, err = _plan_on_rank0(lambda: solve(graph, cluster, optimizer="adam")) if solve else (None, "no solver")
            else:
                plan, err = (None, "no solver")
                if solve:
                    plan, err = _plan_on_rank0(lambda: solve(graph, cluster, optimizer="adam", constraints=cons))
                if plan is None:
                    plan, src = make_plan(graph, kind, ws, **kw), "hand"
            if plan is None:
                meta[label] = (src, None, None, err)
                continue
            m = plan.mesh
            plans[label] = plan
            meta[label] = (src, f"pp{m['pp']}/dp{m['dp']}/tp{m['tp']} mb{plan.pipeline.num_microbatches}",
                           plan.predicted.step_time_s if src == "solver" else None, None)
        # the solver's choice is often one of the candidates: measure that plan once (more
        # steps) rather than twice, so two noisy samples of one plan cannot disagree
        same = next((lbl for lbl, pl in plans.items()
                     if lbl != "solver" and "solver" in plans and _same_plan(pl, plans["solver"])), None)
        to_run = {k: v for k, v in plans.items() if not (same and k == "solver")}
        measured = _measure_all(graph, to_run, inputs, targets, loss_fn, args.steps)
        if same:
            measured["solver"] = measured[same]
            meta["solver"] = meta["solver"][:3] + (None,)
        for label, (src, mesh, pred, err) in meta.items():
            t, err2 = measured.get(label, (None, None))
            note = f"same plan as {same}" if (same and label == "solver") else None
            rows.append((label, src, mesh, pred, t, err or err2 or note))
        rows_all[name] = rows
    if rank == 0:
        print(f"plan choice on {cluster} ({ws} gloo CPU processes, this machine), median of {args.steps} steps")
        for name, rows in rows_all.items():
            print(f"\n{name}:")
            print(f"  {'candidate':<10}{'source':<8}{'mesh':<24}{'predicted ms':>13}{'measured ms':>13}")
            for label, src, mesh, pred, t, err in rows:
                p = f"{pred * 1e3:13.2f}" if pred else f"{'-':>13}"
                mm = f"{t * 1e3:13.2f}" if t else f"{'-':>13}"
                print(f"  {label:<10}{src:<8}{(mesh or '-'):<24}{p}{mm}" + (f"  ({err})" if err else ""))
            measured = [(t, label) for label, _, _, _, t, _ in rows if t and label != "solver"]
            choice = [t for label, _, _, _, t, _ in rows if label == "solver" and t]
            if measured and choice:
                best_t, best = min(measured)
                print(f"  solver's choice / fastest measured ({best}): {choice[0] / best_t:.3f}  (target <= 1.10)")
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--models", default="mlp,gpt,llama")
    ap.add_argument("--profile", default="",
                    help="use this profile JSON for local:N instead of profiling now")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker or "RANK" in os.environ:
        worker(args)
        return
    from autopar.runtime.testing import run_workers

    # The solver predicts local:N from a profile of this machine measured in the same run (the
    # catalog fallback knows nothing of this host), handed to the workers via AUTOPAR_PROFILE.
    if args.profile:
        os.environ["AUTOPAR_PROFILE"] = os.path.abspath(args.profile)
    else:
        import tempfile

        from autopar.cost_model.profiler import profile

        path = os.path.join(tempfile.mkdtemp(prefix="autopar-plan-choice-"), "profile.json")
        t0 = time.perf_counter()
        profile(nproc=args.nproc, out=path, progress=lambda m: print(f"  profile: {m}", flush=True))
        print(f"profiled this machine for local:{args.nproc} in {time.perf_counter() - t0:.1f} s", flush=True)
        os.environ["AUTOPAR_PROFILE"] = path

    argv2 = list(argv if argv is not None else sys.argv[1:]) + ["--worker"]
    outs = run_workers(os.path.abspath(__file__), args.nproc, argv2, timeout_s=1800)
    print(outs[0], end="")


if __name__ == "__main__":
    main()
