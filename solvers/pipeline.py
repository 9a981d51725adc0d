"""Pipeline stages: which devices each stage runs on, how many blocks it gets, which schedules.

Stages are contiguous runs of repeated blocks; the nodes before the first block (embeddings)
go with stage 0 and the nodes after the last (final norm, LM head) with the last stage. The
number of blocks per stage is a candidate the ILP is solved for, so the stage *time* balance
(embedding and LM head included, each stage priced on its own device) is decided exactly
among the candidates enumerated here:

* every composition of L blocks into p non-empty stages when there are at most ``limit`` of
  them (exact: all partitions are tried);
* otherwise the sizes proportional to each stage's device speed (largest remainder), and
  the variants moving one block off the first and/or last stage onto the middle ones (where
  embedding and LM head make those stages heavy). This pruning is reported in the plan.

Heterogeneous clusters: stage i runs on ranks [i*dp*tp, (i+1)*dp*tp), which must lie in one
device group; groups come in cluster order, so a faster group's stages get more blocks.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Optional, Sequence

from autopar.cost_model.cluster import Cluster
from autopar.cost_model.device import DeviceSpec


def stage_devices(cluster: Cluster, pp: int, dp: int, tp: int) -> Optional[list[DeviceSpec]]:
    """The device of each pipeline rank, or None if some stage would straddle two groups."""
    per = dp * tp
    out = []
    for i in range(pp):
        g0 = cluster.locate(i * per)[0]
        g1 = cluster.locate((i + 1) * per - 1)[0]
        if g0 != g1:
            return None
        out.append(cluster.groups[g0].device)
    return out


def _speed(dev: DeviceSpec, dtype: str) -> float:
    return dev.peak_flops[dtype] * dev.matmul_eff_max[dtype]


def proportional(total: int, weights: Sequence[float]) -> tuple[int, ...]:
    """Split ``total`` into len(weights) parts >= 1 proportional to weights (largest remainder)."""
    p = len(weights)
    if total < p:
        return ()
    s = sum(weights)
    raw = [1 + (total - p) * w / s for w in weights]
    base = [int(math.floor(r)) for r in raw]
    rest = total - sum(base)
    order = sorted(range(p), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return tuple(base)


def partitions(num_blocks: int, devices: Sequence[DeviceSpec], dtype: str, limit: int) -> tuple[list[tuple[int, ...]], bool]:
    """Candidate blocks-per-stage tuples, and whether the list is every composition."""
    p = len(devices)
    L = num_blocks
    if p == 1:
        return [(L,)], True
    if L < p:
        return [], True
    if math.comb(L - 1, p - 1) <= limit:
        out = []
        for cuts in combinations(range(1, L), p - 1):
            bounds = (0, *cuts, L)
            out.append(tuple(bounds[i + 1] - bounds[i] for i in range(p)))
        return out, True
    base = proportional(L, [_speed(d, dtype) for d in devices])
    cands = [base]
    for a in range(0, 2):
        for b in range(0, 2):
            if a == b == 0:
                continue
            parts = list(base)
            if parts[0] - a < 1 or parts[-1] - b < 1 or p < 3:
                continue
            parts[0] -= a
            parts[-1] -= b
            mid = proportional(sum(parts[1:-1]) + a + b, [_speed(d, dtype) for d in devices[1:-1]])
            if not mid:
                continue
            cands.append((parts[0], *mid, parts[-1]))
    seen, out = set(), []
    for c in cands:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out, False


def schedules(pp: int, num_blocks: int, num_microbatches: int, pinned: Optional[str]) -> list[tuple[str, int]]:
    """(schedule, virtual stages) candidates. GPipe has 1F1B's time and more memory in flight,
    so it is only tried when pinned (dominated: pruning is loss-free)."""
    if pp == 1:
        return [("none", 1)] if pinned in (None, "none") else []
    out = []
    if pinned in (None, "1f1b"):
        out.append(("1f1b", 1))
    if pinned == "gpipe":
        out.append(("gpipe", 1))
    if pinned in (None, "interleaved_1f1b"):
        for v in (2, 4):
            if num_blocks % (pp * v) == 0 and num_microbatches % pp == 0:
                out.append(("interleaved_1f1b", v))
    return out
