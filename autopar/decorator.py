"""``@autopar.parallelize``: the one-line way in.

    @autopar.parallelize(cluster="local:4")
    class GPT(nn.Module): ...

    model = GPT(cfg)          # captured, planned (or read from the plan cache), sharded
    print(model.plan)         # the Plan, readable
    loss = model.train_step(inputs, targets, loss_fn, optimizer)

What happens when the model is built, on every rank:

1. The cluster is resolved: a :class:`Cluster`, a name (``"h100x8"``, ``"local:4"``), a
   cluster/profile JSON path, or None = ``local:<world size>``.
2. Example inputs (one global batch) come from ``example_inputs=`` or the model's
   ``example_inputs()`` method; the model is captured (:func:`autopar.capture`).
3. The plan: ``plan=`` (a Plan or a plan file, checked against the graph fingerprint), else
   the plan cache (:mod:`autopar.cache`), else the solver. Under torchrun, rank 0 gets it and
   broadcasts it, so every rank runs the same plan.
4. Under torchrun (``WORLD_SIZE`` > 1) the runtime applies the plan (``apply_plan``) and
   the model becomes a ``ParallelModule`` (the model's plain attributes, e.g. ``config``,
   are copied onto it). As one plain process (no torchrun) the same code still runs: a
   1-device plan that recomputes or offloads is applied by the runtime on a one-process
   group; a 1-device plan that does neither *is* the plain module, which is returned; a plan
   for more devices is made (``model.plan`` shows it) and the model runs unsharded in this
   process, with a one-line note on stderr.

The result always has ``.plan`` and ``.train_step(inputs, targets, loss_fn, optimizer)``.
Progress lines go to stderr on rank 0; ``AUTOPAR_QUIET=1`` silences them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from autopar.cache import PlanCache, plan_key, share_plan
from autopar.plan import Plan

if TYPE_CHECKING:
    from torch import nn

QUIET_ENV = "AUTOPAR_QUIET"


class ParallelizeError(RuntimeError):
    """The decorator cannot set up the model; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ParallelizeConfig:
    """Everything ``parallelize`` was given (one value, passed around instead of kwargs)."""

    cluster: Any = None
    example_inputs: Any = None
    constraints: Mapping[str, Any] | None = None
    precision: str = "fp32"
    optimizer: str = "adam"
    options: Any = None  # autopar.solvers.options.SolverOptions
    plan: Any = None  # Plan or path of a saved plan
    cache_dir: Any = None
    # Shortcuts for common SolverOptions fields (applied with dataclasses.replace).
    time_limit_s: float | None = None
    objective: str | None = None
    memory_reserve: float | None = None
    allow: tuple[str, ...] | None = None
    name: str | None = None


# parallelize() shortcut -> the SolverOptions field it sets.
_OPTION_FIELDS = {
    "time_limit_s": "time_limit_s",  # seconds for the whole search
    "objective": "objective",  # "time" (seconds per step)
    "memory_reserve": "memory_reserve_fraction",  # share of device memory kept free
    "allow": "allowed",  # features the solver may use: dp, tp, pp, zero, offload, recompute
}


def parallelize(cls_or_instance: Any = None, *, cluster: Any = None, example_inputs: Any = None,
                constraints: Mapping[str, Any] | None = None, precision: str = "fp32",
                optimizer: str = "adam", options: Any = None, plan: Any = None, cache_dir: Any = None,
                time_limit_s: float | None = None, objective: str | None = None,
                memory_reserve: float | None = None, allow: tuple[str, ...] | None = None,
                name: str | None = None):
    """Parallelize a model class (decorator) or instance (call). See the module docstring.

    cluster: Cluster | name ("h100x8", "local:4") | path of a cluster/profile JSON | None
        (= "local:<WORLD_SIZE>", 1 for a plain process).
    example_inputs: one global batch (a tensor or tuple); default ``model.example_inputs()``.
    constraints: pins parts of the plan, e.g. {"tp": 2, "pp": 1, "recompute": "full"}.
    optimizer: what the step is priced for: "adam" / "sgd" (torch.optim.Adam or AdamW / SGD
        with momentum, PyTorch's default implementation) or "adam_fused" / "sgd_fused"
        (built with ``fused=True``); ``train_step`` warns when given another.
    options: a SolverOptions; time_limit_s / objective / memory_reserve / allow override
        its fields of the same meaning.
    plan: a Plan or plan file to use instead of solving (must match the model's graph).
    cache_dir: plan cache folder (default $AUTOPAR_CACHE_DIR or ~/.cache/autopar/plans).
    """
    cfg = ParallelizeConfig(cluster, example_inputs, dict(constraints) if constraints else None, precision,
                            optimizer, options, plan, cache_dir, time_limit_s, objective, memory_reserve,
                            tuple(allow) if allow is not None else None, name)

    from torch import nn

    def apply(target: Any):
        if isinstance(target, type) and issubclass(target, nn.Module):
            return _wrap_class(target, cfg)
        if isinstance(target, nn.Module):
            return parallelize_module(target, cfg)
        raise TypeError(f"autopar.parallelize expects an nn.Module subclass or instance, got "
                        f"{type(target).__name__}")

    return apply if cls_or_instance is None else apply(cls_or_instance)


def _wrap_class(cls: type, cfg: ParallelizeConfig) -> type:
    """A subclass whose construction builds the user's model, then parallelizes it.

    ``__new__`` returns an object that is not an instance of the subclass (the user's model
    or the runtime's ParallelModule), so Python does not call ``__init__`` a second time.
    """

    def __new__(klass, *args, **kwargs):
        module = cls(*args, **kwargs)
        return parallelize_module(module, dataclasses.replace(cfg, name=cfg.name or cls.__qualname__))

    wrapped = type(cls.__name__, (cls,), {"__new__": __new__, "__doc__": cls.__doc__,
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                          "__wrapped__": cls, "autopar_config": cfg})
    return wrapped


# ---------------------------------------------------------------------------------------
# the steps


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    ws = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    return rank, ws


def resolve_cluster(spec: Any, world_size: int):
    """A Cluster from a Cluster, a name, a cluster/profile JSON path, or None (local:world)."""
    from autopar.cost_model.cluster import Cluster, cluster_from_profile

    if spec is None:
        return Cluster.parse(f"local:{world_size}")
    if isinstance(spec, Cluster):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text.endswith(".json") or os.path.isfile(text):
            try:
                data = json.loads(Path(text).read_text())
            except OSError as e:
                raise ParallelizeError(f"cannot read cluster file {text}: {e.strerror}") from None
            except json.JSONDecodeError as e:
                raise ParallelizeError(f"cluster file {text} is not valid JSON: {e.msg} at line {e.lineno}") from None
            if isinstance(data, dict) and data.get("profile"):
                return cluster_from_profile(data, world_size)
            return Cluster.from_json(data)
        return Cluster.parse(text)
    raise TypeError(f"cluster must be a Cluster, a name like 'h100x8' / 'local:4', or a JSON path; "
                    f"got {type(spec).__name__}")


def resolve_inputs(module: nn.Module, given: Any) -> tuple:
    if given is None:
        hook = getattr(module, "example_inputs", None)
        if not callable(hook):
            raise ParallelizeError(
                f"{type(module).__name__}: autopar needs example inputs (one global batch) to plan; "
                f"pass parallelize(..., example_inputs=(x,)) or give the model an example_inputs() method")
        given = hook()
    return tuple(given) if isinstance(given, (tuple, list)) else (given,)


def solver_options(cfg: ParallelizeConfig):
    """SolverOptions from ``cfg.options`` plus the shortcut fields (None when nothing is set)."""
    shortcuts = {k: getattr(cfg, k) for k in _OPTION_FIELDS if getattr(cfg, k) is not None}
    if not shortcuts:
        return cfg.options
    try:
        from autopar.solvers.options import SolverOptions
    except ImportError as e:
        raise ParallelizeError(f"solver options {sorted(shortcuts)} need autopar.solvers, which cannot be "
                               f"imported: {e}") from None
    base = cfg.options if cfg.options is not None else SolverOptions()
    changes = {_OPTION_FIELDS[k]: (frozenset(v) if k == "allow" else v) for k, v in shortcuts.items()}
    try:
        return dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as e:
        raise ParallelizeError(f"solver options {changes}: {e}") from None


def plan_settings(cfg: ParallelizeConfig, options: Any) -> dict:
    """The settings part of the cache key."""
    return {"precision": cfg.precision, "optimizer": cfg.optimizer, "constraints": cfg.constraints or {},
            "options": options}


def load_plan(spec: Any) -> Plan:
    if isinstance(spec, Plan):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return Plan.load(spec)
    raise TypeError(f"plan= must be a Plan or the path of a plan file, got {type(spec).__name__}")


def check_plan_fits(plan: Plan, graph: Any, cluster: Any) -> list[str]:
    """A reused plan must be for this graph and this cluster's devices; returns warnings
    (same devices, other figures) and raises on a mismatch."""
    from autopar.validate import check_plan_for_cluster

    fp = graph.fingerprint()
    if plan.model.fingerprint != fp:
        raise ParallelizeError(
            f"the plan was made for graph {plan.model.fingerprint} ({plan.model.name}) but this model "
            f"captures as graph {fp}: the model, its config or the example input shapes changed; "
            f"make a new plan (drop plan=, or run `autopar plan` again)")
    errors, warnings = check_plan_for_cluster(plan, cluster)
    if errors:
        raise ParallelizeError("; ".join(errors))
    return warnings


def solve(graph: Any, cluster: Any, cfg: ParallelizeConfig, options: Any, model_name: str) -> Plan:
    try:
        from autopar.solvers.api import solve as _solve
    except ImportError as e:
        raise ParallelizeError(f"planning needs autopar.solvers.api, which cannot be imported ({e}); "
                               f"pass plan= a saved plan instead") from None
    return _solve(graph, cluster, precision=cfg.precision, optimizer=cfg.optimizer,
                  constraints=dict(cfg.constraints or {}), options=options, model_name=model_name)


def _say(rank: int, msg: str) -> None:
    if rank == 0 and not os.environ.get(QUIET_ENV):
        print(f"autopar: {msg}", file=sys.stderr, flush=True)


def parallelize_module(module: "nn.Module", cfg: ParallelizeConfig) -> "nn.Module":
    """Capture, plan and apply (see the module docstring); returns the model to train."""
    from autopar.graph import capture

    rank, ws = world()
    cluster = resolve_cluster(cfg.cluster, ws)
    distributed = ws > 1
    if distributed and cluster.world_size != ws:
        raise ParallelizeError(
            f"cluster {cluster.name!r} has {cluster.world_size} devices but this job runs {ws} processes "
            f"(WORLD_SIZE={ws}); launch with `autopar run SCRIPT --nproc {cluster.world_size}` or use "
            f"cluster='local:{ws}'")
    name = cfg.name or type(module).__qualname__
    inputs = resolve_inputs(module, cfg.example_inputs)
    graph = capture(module, inputs)

    if cfg.plan is not None:
        plan = load_plan(cfg.plan)
        for w in check_plan_fits(plan, graph, cluster):
            _say(rank, f"warning: {w}")
    else:
        options = solver_options(cfg)
        key = plan_key(graph.fingerprint(), cluster.to_json(), plan_settings(cfg, options))
        cache = PlanCache(cfg.cache_dir)

        def get() -> Plan:
            t0 = time.perf_counter()
            p, hit = cache.get_or_solve(key, lambda: solve(graph, cluster, cfg, options, name))
            _say(rank, f"{'plan from cache' if hit else 'solved plan'} for {name} on {cluster.name} "
                       f"({time.perf_counter() - t0:.2f} s): mesh {dict(p.mesh)}, predicted step "
                       f"{p.predicted.step_time_s:.4g} s; {cache.path(key)}")
            return p

        if distributed:
            _init_distributed()
        plan = share_plan(get, rank=rank, world_size=ws)

    if distributed:
        return _apply(graph, plan)
    if cluster.world_size == 1:
        if _is_trivial(plan):
            return _plain(module, plan)  # nothing to shard, recompute or offload: the module is the plan
        _init_single_process()
        return _apply(graph, plan)
    _say(rank, f"the plan is for {cluster.world_size} devices; running unsharded in this one process "
               f"(launch with `autopar run SCRIPT --nproc {cluster.world_size}` to use it)")
    return _plain(module, plan)


def _is_trivial(plan: Plan) -> bool:
    """One device, no recomputation, no offload: running the plain module is running the plan."""
    return (plan.world_size == 1 and not any(b.recompute != "none" or b.offload_activations for b in plan.blocks)
            and not any(p.offload for p in plan.params) and len(plan.pipeline.stages) <= 1)


def _init_distributed() -> None:
    try:
        from autopar.runtime.mesh import init_distributed
    except ImportError as e:
        raise ParallelizeError(f"running on several processes needs autopar.runtime ({e})") from None
    init_distributed()


def _init_single_process() -> None:
    """A world of one, in-process (HashStore): the runtime's mesh needs a process group even
    for one device, and a plain `python train.py` has no torchrun environment to build one."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    from autopar.runtime.mesh import destroy_at_exit

    destroy_at_exit()


def _apply(graph: Any, plan: Plan) -> "nn.Module":
    try:
        from autopar.runtime.apply import apply_plan
    except ImportError as e:
        raise ParallelizeError(f"applying a plan needs autopar.runtime.apply, which cannot be imported "
                               f"({e})") from None
    out = apply_plan(graph, plan)
    _set_plan(out, plan)
    _copy_plain_attributes(graph.module, out)
    return out


def _copy_plain_attributes(src: Any, dst: Any) -> None:
    """Keep the model's plain attributes (``model.config``, hyper-parameters) readable on the
    parallel module. Submodules, tensors and callables are not copied: they would be the
    unsharded originals, not what this rank runs."""
    import torch
    from torch import nn

    for k, v in vars(src).items():
        if k.startswith("_") or k == "training" or hasattr(dst, k):
            continue
        if isinstance(v, (nn.Module, torch.Tensor)) or callable(v):
            continue
        object.__setattr__(dst, k, v)


def _set_plan(obj: Any, plan: Plan) -> None:
    if getattr(obj, "plan", None) is not plan:
        object.__setattr__(obj, "plan", plan)


def _plain_train_step(self: nn.Module, inputs: Any, targets: Any, loss_fn: Any, optimizer: Any):
    """One step of plain single-process training: what every plan must reproduce."""
    optimizer.zero_grad(set_to_none=True)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    loss = loss_fn(self(*args), targets)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _plain(module: nn.Module, plan: Plan) -> nn.Module:
    """The user's module, unsharded, with ``.plan`` and ``.train_step`` attached."""
    _set_plan(module, plan)
    if not hasattr(module, "train_step"):
        object.__setattr__(module, "train_step", types.MethodType(_plain_train_step, module))
    return module


__all__ = ["parallelize", "parallelize_module", "ParallelizeError", "ParallelizeConfig", "resolve_cluster"]
