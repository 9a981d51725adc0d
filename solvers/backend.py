"""Run a built model with OR-Tools and read the decision back (the only OR-Tools calls)."""
from __future__ import annotations

import time
from typing import Optional

from ortools.linear_solver import pywraplp

from .costed import CostedGraph
from .evaluate import Decision
from .formulation import MS, Model
from .options import SolveResult, SolverOptions


def run(model: Model, cg: CostedGraph, options: SolverOptions, time_limit_s: Optional[float] = None
        ) -> tuple[SolveResult, Optional[Decision]]:
    """Solve deterministically (fixed seed and threads); return the result and the decision."""
    res = _solve(model.solver, options, time_limit_s)
    if res.status == "infeasible":
        return res, None
    return res, _decision(model, cg)


def run_split(models: list[Model], cgs: list[CostedGraph], options: SolverOptions,
              time_limit_s: Optional[float] = None) -> tuple[SolveResult, Optional[list[Decision]]]:
    """Solve a :func:`.formulation.build_split` model (one solver, one Model per stage)."""
    res = _solve(models[0].solver, options, time_limit_s)
    if res.status == "infeasible":
        return res, None
    return res, [_decision(md, cg) for md, cg in zip(models, cgs)]


def _solve(s, options: SolverOptions, time_limit_s: Optional[float]) -> SolveResult:
    limit = options.time_limit_s if time_limit_s is None else time_limit_s
    s.SetTimeLimit(max(1, int(limit * 1000)))
    s.SetNumThreads(max(1, options.workers))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, options.relative_gap)
    if options.backend == "SCIP":
        s.SetSolverSpecificParametersAsString(f"randomization/randomseedshift = {options.seed}\n")
    t0 = time.perf_counter()
    code = s.Solve(params)
    wall = time.perf_counter() - t0
    nv, nc = s.NumVariables(), s.NumConstraints()
    if code not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return SolveResult("infeasible", float("inf"), float("inf"), wall, nv, nc)
    obj = s.Objective().Value() / MS
    bound = s.Objective().BestBound() / MS
    gap = 0.0 if code == pywraplp.Solver.OPTIMAL else max(0.0, (obj - bound) / max(abs(obj), 1e-12))
    status = "optimal" if code == pywraplp.Solver.OPTIMAL else "feasible"
    return SolveResult(status, obj, gap, wall, nv, nc)


def _decision(model: Model, cg: CostedGraph) -> Decision:
    strategy = {u: max(range(len(vs)), key=lambda k: vs[k].solution_value()) for u, vs in model.x.items()}
    config = {g: max(range(len(vs)), key=lambda k: vs[k].solution_value()) for g, vs in model.w.items()}
    for n in cg.nodes:  # groups without params still need an entry
        config.setdefault("block" if n.place == "block" else "outside", 0)
    rec = tuple(int(round(v.solution_value())) if not isinstance(v, int) else v for v in model.r)
    off = tuple(int(round(v.solution_value())) if not isinstance(v, int) else v for v in model.o)
    return Decision(strategy, config, rec, off)
