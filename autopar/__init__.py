"""autopar: automatic parallelism compiler for PyTorch.

The functional entry point is :func:`plan` (capture -> cost -> solve); :func:`parallelize`
is the one-line decorator that also applies the plan on every rank::

    import autopar
    plan = autopar.plan(model, example_inputs, cluster="h100x8")
    print(plan.mesh, plan.predicted.step_time_s)

Names are imported lazily so ``import autopar`` (for reading a Plan, say) does not pull in
OR-Tools or torch.distributed.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "capture",
    "Graph",
    "CaptureError",
    "Cluster",
    "Plan",
    "PlanError",
    "plan",
    "SolverOptions",
    "InfeasibleError",
    "parallelize",
    "apply_plan",
    "Shard",
    "Replicate",
    "Partial",
    "MeshAxis",
    "__version__",
]

_LAZY: dict[str, tuple[str, str]] = {
    "capture": ("autopar.graph", "capture"),
    "Graph": ("autopar.graph", "Graph"),
    "CaptureError": ("autopar.graph", "CaptureError"),
    "Plan": ("autopar.plan", "Plan"),
    "PlanError": ("autopar.plan", "PlanError"),
    "Cluster": ("autopar.cost_model.cluster", "Cluster"),
    "plan": ("autopar.solvers.api", "plan"),
    "SolverOptions": ("autopar.solvers.options", "SolverOptions"),
    "InfeasibleError": ("autopar.solvers.options", "InfeasibleError"),
    "parallelize": ("autopar.decorator", "parallelize"),
    "apply_plan": ("autopar.runtime.apply", "apply_plan"),
    "Shard": ("autopar.placements", "Shard"),
    "Replicate": ("autopar.placements", "Replicate"),
    "Partial": ("autopar.placements", "Partial"),
    "MeshAxis": ("autopar.placements", "MeshAxis"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'autopar' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from autopar.cost_model.cluster import Cluster
    from autopar.decorator import parallelize
    from autopar.graph import CaptureError, Graph, capture
    from autopar.placements import MeshAxis, Partial, Replicate, Shard
    from autopar.plan import Plan, PlanError
    from autopar.runtime.apply import apply_plan
    from autopar.solvers.api import plan
    from autopar.solvers.options import InfeasibleError, SolverOptions
