"""The ``torch.optim`` optimizer a plan was priced for, and a check of the one a run is given.

Why: a plan's predicted step time and peak memory include the optimizer step as its
``training.optimizer`` names it - the update rule (Adam or SGD with momentum) and the
implementation, which on a CPU matters as much as the rule: on the 2-core dev VM (torch 2.13,
2026-11-24) ``Adam(fused=True)`` stepped 8 x 256 K elements in 1.4 ms against 8.1 for the
default single-tensor loop, allocated no temporaries (the loop holds two of the largest
tensor), and does not slow down where the state is zero (the loop's ``exp_avg_sq.sqrt()`` ran
6-9x slower over zeros: embedding rows no batch has touched). Any optimizer trains exactly on
any plan (the runtime steps plain local shards); one of another kind or implementation only
makes the plan's figures describe a different run, so :func:`mismatch` says which and the
runtime warns once.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from autopar.cost_model import memory as mem

class PlanOptimizerMismatch(UserWarning):
    """The optimizer a run steps is not the one its plan was priced for (the run is exact)."""


#: torch.optim classes that run each update rule (AdamW is Adam with decoupled weight decay:
#: the same kernels, the same state)
_CLASSES = {"adam": (torch.optim.Adam, torch.optim.AdamW), "sgd": (torch.optim.SGD,)}


def factory(name: str, **hyper) -> Callable[[list], torch.optim.Optimizer]:
    """``lambda params: torch.optim.X(params, **hyper)`` for a plan's ``training.optimizer``
    (``adam``, ``sgd``, ``adam_fused``, ``sgd_fused``): what ``train_step`` takes. SGD gets
    ``momentum=0.9`` unless given (the plan prices SGD's momentum buffer)."""
    kind, fused = mem.optimizer_kind(name), mem.is_fused(name)
    cls = _CLASSES[kind][0]
    kw = dict(hyper)
    if kind == "sgd":
        kw.setdefault("momentum", 0.9)
    if fused:
        kw["fused"] = True
    return lambda params: cls(params, **kw)


def describe(opt: torch.optim.Optimizer) -> str:
    """``torch.optim.Adam(fused=True)``-style name of an optimizer instance."""
    d = opt.defaults
    impl = "fused=True" if d.get("fused") else "foreach=True" if d.get("foreach") else "default implementation"
    return f"torch.optim.{type(opt).__name__}({impl})" if type(opt).__module__.startswith("torch.optim") \
        else f"{type(opt).__module__}.{type(opt).__name__}"


def mismatch(name: str, opt: torch.optim.Optimizer) -> Optional[str]:
    """Why ``opt`` is not the optimizer the plan named ``name`` was priced for, or None.
    Only torch's Adam / AdamW / SGD are judged (a custom optimizer's cost is unknown to the
    plan either way, and is named as such)."""
    kind, fused = mem.optimizer_kind(name), mem.is_fused(name)
    known = tuple(c for cs in _CLASSES.values() for c in cs)
    if not isinstance(opt, known):
        return (f"the plan was priced for training.optimizer {name!r}; {describe(opt)} is not a torch "
                "optimizer it prices, so its predicted step time and memory leave this optimizer's step out")
    if not isinstance(opt, _CLASSES[kind]):
        return (f"the plan was priced for training.optimizer {name!r} but the run steps {describe(opt)}: "
                "its predicted step time and optimizer-state memory describe the other optimizer")
    if bool(opt.defaults.get("fused")) != fused:
        want = f"{_CLASSES[kind][0].__name__}(..., fused=True)" if fused else "the default implementation"
        return (f"the plan was priced for training.optimizer {name!r} ({want}) but the run steps "
                f"{describe(opt)}: its predicted step time and memory describe the other implementation "
                "(solve with optimizer=" + repr(f"{kind}_fused" if not fused else kind) + " to match this run)")
    return None
