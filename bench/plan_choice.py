"""Does the solver pick the fastest plan? Measure every candidate plan kind and its choice.

    python bench/plan_choice.py [--nproc 4] [--steps 6] [--models mlp,gpt,llama]

For each model (small configs of the zoo's MLP, GPT and LLaMA, big enough that compute is
not all Python overhead on CPU), on ``nproc`` local gloo processes:

- candidates: the solver's plan with the mesh pinned to each layout that fits the world size
  (dp, tp, dp x tp, pp, pp x dp; ZeRO-3 dp too), each with its predicted step time, plus the
  solver's free choice on ``local:N``; a candidate the solver cannot produce falls back to the
  hand-written layout of :func:`autopar.runtime.testing.make_plan` (marked "hand");
- the predictions come from a profile of this machine taken in the same run: by default the
  figure-by-figure median of three profiles back to back (``--profile-repeat``), since one
  profile of a shared host is one noisy draw and the candidates are often within 10 % of each
  other;
- every candidate is applied and trained (Adam, synthetic batch) alone, as a training job
  would run it: in its own N fresh processes, built, 2 warm-up steps, its share of ``steps``
  timed steps; ``--rounds`` passes (default 3) over the candidates in alternating order so
  drift of a shared machine's speed hits all of them alike; step time is the median of its
  timed steps. Three passes, not two: with two, one disturbed pass holds half of a plan's
  steps and moves its median (GPT's dp read 254 ms in one run where its own processes, timed
  alone in the same hour, read 138-154). (An
  earlier version ran every candidate one after the other in the same N processes: on the
  2-core VM GPT's interleaved pp2 x dp2 then measured 167-206 ms after the ZeRO-3 plan had
  run there, against 127-154 ms after the tensor-parallel ones, and that moved the verdict.)
  When the solver's choice is the same plan as a candidate (same mesh, placements, pipeline)
  it is measured once and both rows show that figure ("same plan as ..."): on the 2-core VM
  two runs of one plan in the same round-robin differed by up to 24 %.

Prints a table per model and the solver's choice / fastest measured (target <= 1.10). This
process solves every plan and hands it to the measuring processes as plan JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


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


def _same_plan(a, b) -> bool:
    """The same decisions (mesh, per-node and per-parameter placements, pipeline, blocks), whatever
    the solver reported about how it found them."""
    da, db = a.to_json(), b.to_json()
    da, db = (json.loads(x) if isinstance(x, str) else x for x in (da, db))
    keys = ("mesh", "nodes", "params", "pipeline", "blocks", "training")
    return all(da.get(k) == db.get(k) for k in keys)


#: Seconds one plan's launch may take (the largest, llama's ZeRO-3, takes ~30 s). On the
#: 2-core VM a gloo all-gather once hung for good (a rank spinning in gloo's UnboundBuffer
#: destructor); every rank is then killed and the pass counted as hung.
LAUNCH_TIMEOUT_S = 300


def _plans(name: str, ws: int) -> tuple[dict, dict]:
    """Every candidate's plan for model ``name`` on ``local:ws`` (solved here; a candidate the
    solver cannot produce falls back to the hand-written layout) and the solver's free
    choice: ``({label: Plan}, {label: (source, mesh, predicted s, error)})``."""
    import torch

    from autopar.graph import capture
    from autopar.runtime.testing import make_plan

    try:
        from autopar.solvers.api import solve
    except ImportError:
        solve = None
    cluster = f"local:{ws}"
    torch.manual_seed(0)
    model, inputs, _, _ = models()[name]()
    graph = capture(model, inputs)
    cands = [(lbl, c, k, kw) for lbl, c, k, kw in CANDIDATES if c["dp"] * c["tp"] * c["pp"] == ws]
    plans, meta = {}, {}
    for label, cons, kind, kw in cands + [("solver", None, None, None)]:
        plan, err, src = None, "no solver", "solver"
        if solve:
            try:
                plan, err = solve(graph, cluster, optimizer="adam", constraints=cons), None
            except Exception as e:  # noqa: BLE001 -- reported in the table
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if plan is None and label != "solver":
            plan, src = make_plan(graph, kind, ws, **kw), "hand"
        if plan is None:
            meta[label] = (src, None, None, err)
            continue
        m = plan.mesh
        plans[label] = plan
        meta[label] = (src, f"pp{m['pp']}/dp{m['dp']}/tp{m['tp']} mb{plan.pipeline.num_microbatches}",
                       plan.predicted.step_time_s if src == "solver" else None, None)
    return plans, meta


def _steps_per_round(steps: int, rounds: int) -> int:
    """Timed steps in each pass: ``steps`` spread over the passes, at least 3 a pass."""
    return max(3, -(-steps // rounds))


def _measure(name: str, plans: dict, nproc: int, steps: int, rounds: int = 3) -> dict:
    """``{label: (median step s, None) or (None, error)}``: each plan trained in its own
    ``nproc`` fresh processes (:func:`measure_worker`), ``rounds`` passes over the plans in
    alternating order, ``steps`` timed steps in all per plan."""
    import tempfile

    from autopar.runtime.testing import run_workers

    per_round = _steps_per_round(steps, rounds)
    times: dict[str, list[float]] = {k: [] for k in plans}
    errors: dict[str, str] = {}
    hung: dict[str, int] = {}
    order = list(plans)
    with tempfile.TemporaryDirectory(prefix="autopar-plan-choice-") as tmp:
        files = {}
        for label, plan in plans.items():
            files[label] = os.path.join(tmp, f"{label}.json")
            plan.save(files[label])
        for r in range(rounds):
            for label in (order if r % 2 == 0 else order[::-1]):
                if label in errors:
                    continue
                out = os.path.join(tmp, f"{label}.{r}.times")
                try:
                    run_workers(os.path.abspath(__file__), nproc,
                                ["--measure", name, files[label], out, str(per_round)], timeout_s=LAUNCH_TIMEOUT_S)
                    times[label] += json.loads(Path(out).read_text())
                except RuntimeError as e:
                    if "timed out" in str(e).splitlines()[0]:  # every rank was killed; the next pass may run
                        hung[label] = hung.get(label, 0) + 1
                        continue
                    last = [ln for ln in str(e).splitlines() if ln.strip()]  # a plan the runtime refuses
                    errors[label] = (last[-1] if last else str(e))[:160]
    res = {k: (statistics.median(v), f"{hung[k]} pass(es) hung, killed" if k in hung else None)
           for k, v in times.items() if v and k not in errors}
    res.update({k: (None, e) for k, e in errors.items()})
    res.update({k: (None, f"hung in every pass (killed after {LAUNCH_TIMEOUT_S} s)")
                for k in hung if k not in res})
    return res


def measure_worker(name: str, plan_file: str, out: str, steps: int) -> None:
    """One rank of one plan's measurement: build, 2 warm-up steps, ``steps`` timed steps (a
    barrier either side); rank 0 writes the step times (JSON list) to ``out``."""
    import torch
    import torch.distributed as dist

    from autopar.graph import capture
    from autopar.plan import Plan
    from autopar.runtime.apply import apply_plan
    from autopar.runtime.mesh import init_distributed
    from autopar.runtime.testing import timed_steps

    init_distributed("cpu")
    ws = dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ws))  # what the profile measured
    torch.manual_seed(0)
    model, inputs, targets, loss_fn = models()[name]()
    graph = capture(model, inputs)
    pm = apply_plan(graph, Plan.from_json(Path(plan_file).read_text()))
    factory = lambda ps: torch.optim.Adam(ps, lr=1e-4)  # noqa: E731
    for _ in range(2):  # warm-up
        pm.train_step(inputs, targets, loss_fn, factory)
    times = timed_steps(lambda: pm.train_step(inputs, targets, loss_fn, factory), steps)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def _report(name: str, rows: list) -> None:
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the candidates (default 3)")
    ap.add_argument("--models", default="mlp,gpt,llama")
    ap.add_argument("--profile", default="",
                    help="use this profile JSON for local:N instead of profiling now")
    ap.add_argument("--profile-repeat", type=int, default=3, metavar="K",
                    help="profiles taken back to back, each figure their median (default 3)")
    ap.add_argument("--save-profile", default="",
                    help="write the profile measured now here too (to re-predict these runs later)")
    ap.add_argument("--measure", nargs=4, metavar=("MODEL", "PLAN", "OUT", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.profile_repeat < 1:
        ap.error(f"--profile-repeat must be at least 1, got {args.profile_repeat}")
    if args.measure:
        name, plan_file, out, steps = args.measure
        measure_worker(name, plan_file, out, int(steps))
        from autopar.runtime.mesh import exit_worker

        exit_worker()

    # The solver predicts local:N from a profile of this machine measured in the same run (the
    # catalog fallback knows nothing of this host), found through AUTOPAR_PROFILE.
    if args.profile:
        os.environ["AUTOPAR_PROFILE"] = os.path.abspath(args.profile)
    else:
        import tempfile

        from autopar.cost_model.profiler import profile

        path = (os.path.abspath(args.save_profile) if args.save_profile
                else os.path.join(tempfile.mkdtemp(prefix="autopar-plan-choice-"), "profile.json"))
        t0 = time.perf_counter()
        profile(nproc=args.nproc, out=path, progress=lambda m: print(f"  profile: {m}", flush=True),
                repeat=args.profile_repeat)
        print(f"profiled this machine for local:{args.nproc} in {time.perf_counter() - t0:.1f} s", flush=True)
        os.environ["AUTOPAR_PROFILE"] = path

    print(f"plan choice on local:{args.nproc} ({args.nproc} gloo CPU processes, this machine), "
          f"median of {_steps_per_round(args.steps, args.rounds) * args.rounds} steps in {args.rounds} "
          f"alternating passes, each plan in its own processes each pass", flush=True)
    for name in args.models.split(","):
        plans, meta = _plans(name, args.nproc)
        # the solver's choice is often one of the candidates: measure that plan once (more
        # steps) rather than twice, so two noisy samples of one plan cannot disagree
        same = next((lbl for lbl, pl in plans.items()
                     if lbl != "solver" and "solver" in plans and _same_plan(pl, plans["solver"])), None)
        to_run = {k: v for k, v in plans.items() if not (same and k == "solver")}
        measured = _measure(name, to_run, args.nproc, args.steps, args.rounds)
        if same:
            measured["solver"] = measured[same]
            meta["solver"] = meta["solver"][:3] + (None,)
        rows = []
        for label, (src, mesh, pred, err) in meta.items():
            t, err2 = measured.get(label, (None, None))
            note = f"same plan as {same}" if (same and label == "solver") else None
            rows.append((label, src, mesh, pred, t, err or err2 or note))
        _report(name, rows)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
