"""The plan cache: solve once, start fast ever after; and one plan for every rank.

On disk. A plan is stored as ``<dir>/<key>.json`` where ``dir`` is the ``cache_dir``
argument, else ``$AUTOPAR_CACHE_DIR``, else ``~/.cache/autopar/plans``, and ``key`` is the
SHA-256 of the canonical JSON of everything the solver's answer depends on:

- the graph fingerprint (program, parameter shapes, example input shapes),
- the cluster JSON (devices, links, and for ``local:N`` the measured profile),
- the settings: precision, optimizer, constraints, solver options,
- the autopar version and a digest of the planner's source (graph capture, cost model,
  solver, plan format): a new cost model or solver must not reuse old plans, and in a
  development checkout the version alone does not change with the code.

Writes go through :meth:`Plan.save` (temporary file + ``os.replace``), so a reader sees the
old file, the new file or none, never half of one; two processes writing the same key write
the same plan. A file that no longer loads (older schema, hand-edited) is treated as a miss
and overwritten.

One plan for all ranks. Solving is not guaranteed to be deterministic (CP-SAT with several
workers under a time limit may return different optima of equal cost) and each node of a
cluster may have its own disk, so ranks must not solve independently. The rule: **rank 0
gets the plan (from its cache or by solving) and broadcasts it to every rank over the
default process group** (``torch.distributed.broadcast_object_list``; gloo or NCCL). The
other ranks never solve and need no shared file system. If rank 0 fails (infeasible model,
bad constraint), it broadcasts the error message, so every rank raises the same error
instead of waiting for a plan that never comes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from autopar.plan import Plan, PlanError

ENV_DIR = "AUTOPAR_CACHE_DIR"


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "autopar" / "plans"


def _jsonable(v: Any) -> Any:
    """Settings as canonical JSON-able values (dataclasses as dicts, tuples as lists)."""
    if is_dataclass(v) and not isinstance(v, type):
        return _jsonable(asdict(v))
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple, set, frozenset)):
        items = [_jsonable(x) for x in v]
        return sorted(items, key=repr) if isinstance(v, (set, frozenset)) else items
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


_PLANNER_DIGEST: str | None = None


def planner_digest() -> str:
    """SHA-256 (16 hex chars) of the source files whose change can change a plan: graph
    capture, the cost model, the solvers and the plan format. Computed once per process."""
    global _PLANNER_DIGEST
    if _PLANNER_DIGEST is None:
        import autopar
        import autopar.cost_model
        import autopar.graph
        import autopar.plan
        import autopar.solvers

        files = [Path(autopar.graph.__file__), Path(autopar.plan.__file__)]
        for pkg in (autopar.cost_model, autopar.solvers):
            for d in pkg.__path__:
                files += sorted(Path(d).glob("*.py"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        _PLANNER_DIGEST = h.hexdigest()[:16]
    return _PLANNER_DIGEST


def plan_key(fingerprint: str, cluster_json: Mapping, settings: Mapping, version: str | None = None) -> str:
    """The cache key: SHA-256 (hex, 32 chars) of graph, cluster, settings and autopar version
    (by default ``__version__`` plus :func:`planner_digest`)."""
    if version is None:
        from autopar import __version__
        version = f"{__version__}+{planner_digest()}"
    blob = json.dumps({"graph": fingerprint, "cluster": _jsonable(cluster_json),
                       "settings": _jsonable(settings), "autopar": version},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class PlanCache:
    """Plans on disk by key. ``get`` -> Plan or None; ``put`` writes atomically."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> Plan | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return Plan.load(p)
        except PlanError as e:
            print(f"autopar: ignoring unreadable cached plan {p}: {e}", file=sys.stderr)
            return None

    def put(self, key: str, plan: Plan) -> Path:
        p = self.path(key)
        plan.save(p)
        return p

    def get_or_solve(self, key: str, solve: Callable[[], Plan]) -> tuple[Plan, bool]:
        """``(plan, hit)``: the cached plan, or a fresh one from ``solve()`` (then stored)."""
        plan = self.get(key)
        if plan is not None:
            return plan, True
        plan = solve()
        try:
            self.put(key, plan)
        except OSError as e:  # a read-only home must not stop training
            print(f"autopar: could not write the plan cache {self.path(key)}: {e.strerror}", file=sys.stderr)
        return plan, False


class PlanShareError(RuntimeError):
    """Rank 0 could not produce a plan; raised on every rank with rank 0's message."""


def share_plan(get_plan: Callable[[], Plan], *, rank: int, world_size: int, group: Any = None) -> Plan:
    """Rank 0 calls ``get_plan``; every rank returns the same plan (see module docstring).

    Needs an initialised default process group when ``world_size > 1``. With world size 1
    this is just ``get_plan()``.
    """
    if world_size <= 1:
        return get_plan()
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(f"share_plan: rank {rank} of {world_size} needs torch.distributed initialised "
                           f"(launch with `autopar run` or torchrun)")
    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload[0] = ("ok", get_plan().to_json(indent=None))
        except Exception as e:  # sent to the other ranks, then re-raised here unchanged
            payload[0] = ("error", f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(payload, src=0, group=group)
            raise
    dist.broadcast_object_list(payload, src=0, group=group)
    status, body = payload[0]
    if status == "error":
        raise PlanShareError(f"rank 0 could not make the plan, so rank {rank} cannot run: {body}")
    return Plan.from_json(body)
