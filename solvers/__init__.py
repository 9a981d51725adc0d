"""autopar.solvers: strategy rules, cost tables, the OR-Tools formulation and the outer search.

    solve(graph, cluster, precision=, optimizer=, constraints=, options=) -> Plan
    plan(model, example_inputs, cluster=, ...) -> Plan        (capture, then solve)
    compare(graph, cluster, pinned_constraints) -> {"autopar", "pinned", "speedup"}

Mixed clusters (two device kinds): block pipelines with each stage priced on its own group's
device, competing with split pipelines (:mod:`.hetero`: the embedding tables on one group, the
rest on the other). ``Predicted.communication_bytes`` is counted by :mod:`.traffic`.
"""
from .api import check_constraints, compare, plan, solve, summary
from .options import InfeasibleError, SolveResult, SolverOptions
from .strategies import StrategyRegistry, default_registry

__all__ = ["solve", "plan", "compare", "summary", "check_constraints", "SolverOptions", "SolveResult",
           "InfeasibleError", "StrategyRegistry", "default_registry"]
