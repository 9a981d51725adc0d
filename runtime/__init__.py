"""autopar.runtime: run a Plan on N ranks with the same numbers as one device.

Entry point::

    from autopar.runtime import apply_plan
    model = apply_plan(graph_or_module, plan, example_inputs=batch)   # on every rank
    loss = model.train_step(inputs, targets, loss_fn, lambda ps: torch.optim.Adam(ps, lr=1e-3))

Order of application (each a small function; see :mod:`autopar.runtime.apply`):
``plan_steps`` (pure: the per-node moves, checked) -> ``build_mesh`` (process groups) ->
parameter shards (meta init per module) -> per-node execution on DTensors (redistribute inputs,
gather ZeRO-3 params, recompute / offload by block) -> grads made their storage placement ->
optimizer on local shards (host copies when offloaded) -> pipelines via
torch.distributed.pipelining (GPipe, 1F1B, interleaved 1F1B).

Also: :mod:`~autopar.runtime.checkpoint` (DCP save/load across plans and world sizes, atomic),
:mod:`~autopar.runtime.launch` (torchrun launcher, ``run_model``), :mod:`~autopar.runtime.testing`
(hand-built plans, process spawner) and :mod:`~autopar.runtime.exactness` (the N-rank vs
1-process check).
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "apply_plan",
    "ParallelModule",
    "materialize",
    "plan_steps",
    "Program",
    "RuntimeRefusal",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "launch_script",
    "run_model",
    "build_mesh",
]

_LAZY = {
    "apply_plan": "autopar.runtime.apply",
    "ParallelModule": "autopar.runtime.apply",
    "materialize": "autopar.runtime.apply",
    "plan_steps": "autopar.runtime.steps",
    "Program": "autopar.runtime.steps",
    "RuntimeRefusal": "autopar.runtime.steps",
    "save_checkpoint": "autopar.runtime.checkpoint",
    "load_checkpoint": "autopar.runtime.checkpoint",
    "CheckpointError": "autopar.runtime.checkpoint",
    "launch_script": "autopar.runtime.launch",
    "run_model": "autopar.runtime.launch",
    "build_mesh": "autopar.runtime.mesh",
}


def __getattr__(name: str) -> Any:  # lazy: importing the package does not start torch.distributed
    if name not in _LAZY:
        raise AttributeError(f"module 'autopar.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
