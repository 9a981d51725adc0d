"""Planner scaling: capture + costing + solving wall time, ILP size, gap and the plan chosen.

    /work/venv/bin/python bench/solver_scaling.py [--cases gpt2,llama8b,gpt3] [--time-limit 30]

Targets (issue #4, end to end incl. capture, on a 2-core machine): GPT-2 small on h100x8
< 2 s; LLaMA-3-8B-shaped on 64 H100 (8 nodes) < 5 s; GPT-3 175B on 1,024 H100 < 15 s. The
example inputs are ONE global batch on the meta device (GPT-3: 1536 x 2048 tokens).
"""
from __future__ import annotations

import argparse
import time

import torch

from autopar.graph import capture
from autopar.solvers import SolverOptions
from autopar.solvers.api import decode, summary
from autopar.solvers.costed import analyze
from autopar.solvers.search import search
from autopar.solvers.strategies import default_registry
from autopar.cost_model.cluster import Cluster


def _gpt(size: str, batch: int):
    from autopar.models import gpt

    return gpt.build(size, batch_size=batch, device="meta")


def _llama(batch: int):
    from autopar.models import llama

    return llama.build("llama3_8b", batch_size=batch, device="meta")


CASES = {
    # name: (builder, cluster, precision, target seconds)
    "gpt2": (lambda: _gpt("gpt2_small", 8), "h100x8", "bf16-mixed", 2.0),
    "llama8b": (lambda: _llama(512), "h100x64", "bf16-mixed", 5.0),  # 512 x 8192 = 4M tokens
    "gpt3": (lambda: _gpt("gpt3_175b", 1536), "h100x1024", "bf16-mixed", 15.0),  # 1536 x 2048
}


def run_case(name: str, time_limit: float) -> dict:
    build, cluster_name, precision, target = CASES[name]
    t0 = time.perf_counter()
    model, inputs = build()
    graph = capture(model, inputs)
    t1 = time.perf_counter()
    reg = default_registry()
    struct = analyze(graph, reg)
    t2 = time.perf_counter()
    cluster = Cluster.parse(cluster_name)
    out = search(struct, reg, cluster, precision=precision, optimizer="adam",
                 options=SolverOptions(time_limit_s=time_limit), constraints={})
    t3 = time.perf_counter()
    p = decode(struct, out, cluster, precision=precision, optimizer="adam", model_name=name, pinned=False,
               wall_s=t3 - t2)
    total = t3 - t0
    costing = (t2 - t1) + out.timings["costing_s"]
    solving = out.timings["solving_s"]
    return {"name": name, "cluster": cluster_name, "capture_s": t1 - t0, "costing_s": costing, "solving_s": solving,
            "other_s": total - (t1 - t0) - costing - solving, "total_s": total, "target_s": target,
            "ilps": out.candidates, "enumerated": out.enumerated, "lp_bounds": out.timings.get("lp_bounds", 0),
            "vars": p.solver.num_variables, "constraints": p.solver.num_constraints, "gap": p.solver.gap,
            "status": p.solver.status, "nodes": len(graph.nodes), "params": graph.num_params, "plan": summary(p)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--time-limit", type=float, default=30.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    for name in args.cases.split(","):
        r = run_case(name.strip(), args.time_limit)
        ok = "OK " if r["total_s"] < r["target_s"] else "SLOW"
        print(f"== {r['name']} on {r['cluster']}: {r['params'] / 1e9:.2f} B params, {r['nodes']} fx nodes")
        print(f"   [{ok}] total {r['total_s']:.2f} s (target < {r['target_s']:.0f} s) = capture {r['capture_s']:.2f} "
              f"+ costing {r['costing_s']:.2f} + solving {r['solving_s']:.2f} + other {r['other_s']:.2f}")
        print(f"   ILP of the plan: {r['vars']} variables, {r['constraints']} constraints; {r['ilps']} ILPs solved, "
              f"{r['lp_bounds']} LP bounds, {r['enumerated']} candidates; status {r['status']}, gap {r['gap']:.2g}")
        for line in r["plan"].splitlines():
            print("   " + line)


if __name__ == "__main__":
    main()
