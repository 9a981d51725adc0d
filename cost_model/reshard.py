"""Cost of turning one placement into another: the ILP's edge costs.

On one mesh axis of size n, with ``nbytes`` the size of the tensor *as seen by that axis's
group* (the full tensor divided by the shards held on other axes):

    same -> same          0, no collective
    Shard(i) -> Replicate all_gather
    Partial -> Replicate  all_reduce
    Partial -> Shard(i)   reduce_scatter
    Shard(i) -> Shard(j)  all_to_all
    Replicate -> Shard(i) 0 (each rank keeps its local slice)
    Replicate/Shard -> Partial   not allowed (a value cannot become a pending sum for free
                          without choosing which rank keeps it); returns ``inf``

These are the transitions ``torch.distributed.tensor``'s redistribute performs.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

from autopar.placements import Partial, Replicate, Shard

from .cluster import LinkSpec
from .collectives import collective_time


def reshard_kind(src, dst) -> Optional[str]:
    """The collective that turns ``src`` into ``dst`` on one axis, None when free, or
    ``"invalid"`` for a transition that is not allowed."""
    if src == dst:
        return None
    if isinstance(dst, Partial):
        return "invalid"
    if isinstance(src, Replicate):
        if isinstance(dst, Shard):
            return None
    elif isinstance(src, Partial):
        if isinstance(dst, Replicate):
            return "all_reduce"
        if isinstance(dst, Shard):
            return "reduce_scatter"
    elif isinstance(src, Shard):
        if isinstance(dst, Replicate):
            return "all_gather"
        if isinstance(dst, Shard):
            return "all_to_all"
    raise TypeError(f"unknown placements {src!r} -> {dst!r}: expected Shard, Replicate or Partial")


def reshard_cost(src, dst, nbytes: float, n: int, link: LinkSpec) -> tuple[float, Optional[str]]:
    """``(seconds, collective kind or None)`` to go from ``src`` to ``dst`` on one axis of
    ``n`` ranks. Invalid transitions return ``(inf, None)``."""
    kind = reshard_kind(src, dst)
    if kind == "invalid":
        return math.inf, None
    if kind is None or n == 1:
        return 0.0, None
    return collective_time(kind, nbytes, n, link), kind


def reshard_cost_multi(src: Mapping[str, object], dst: Mapping[str, object], nbytes: float,
                       mesh: Mapping[str, int], links: Mapping[str, LinkSpec]
                       ) -> tuple[float, list[tuple[str, str]]]:
    """Total seconds to go from ``src`` to ``dst`` (dicts axis -> placement) on a mesh.

    ``nbytes`` is the full (global) tensor size; ``mesh`` gives axis sizes and ``links`` the
    link of each axis (see :func:`autopar.cost_model.cluster.axis_link`). Axes are changed one
    at a time, like DTensor's redistribute: first the free Replicate -> Shard steps (they
    shrink what later collectives move), then the others in mesh order. Each step moves the
    tensor as seen by that axis's group: ``nbytes`` divided by the sizes of the *other* axes
    on which the tensor is currently sharded. Returns the time and the list of
    ``(axis, collective)`` performed; ``inf`` if any axis transition is invalid.
    """
    axes = [a for a in mesh if a in src or a in dst]
    for a in axes:
        if a not in src or a not in dst:
            raise ValueError(f"reshard: axis {a!r} has a placement in only one of src={dict(src)} dst={dict(dst)}")
        if a not in links and mesh[a] > 1:
            raise ValueError(f"reshard: no link given for mesh axis {a!r}")
    current = dict(src)
    free_first = [a for a in axes if reshard_kind(src[a], dst[a]) is None]
    rest = [a for a in axes if a not in free_first]
    total, steps = 0.0, []
    for a in free_first + rest:
        local = nbytes / math.prod(mesh[b] for b in axes if b != a and isinstance(current[b], Shard))
        secs, kind = reshard_cost(current[a], dst[a], local, mesh[a], links.get(a))  # type: ignore[arg-type]
        if math.isinf(secs):
            return math.inf, steps
        total += secs
        if kind is not None:
            steps.append((a, kind))
        current[a] = dst[a]
    return total, steps
