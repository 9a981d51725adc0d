"""Alpha-beta times of collectives over n ranks joined by one link.

``nbytes`` is always the size of the **full (unsharded) tensor**: for an all-gather the
output, for a reduce-scatter the input, for an all-reduce the buffer. ``link.latency`` is
alpha (seconds per message step), ``link.bandwidth`` is beta (bytes/s per direction).

Ring algorithms (Thakur, Rabenseifner & Gropp 2005, "Optimization of collective
communication operations in MPICH"; NCCL's ring):

    all_reduce      2(n-1)/n * B/bw + 2(n-1) * alpha    (reduce-scatter + all-gather)
    all_gather      (n-1)/n * B/bw  + (n-1) * alpha
    reduce_scatter  (n-1)/n * B/bw  + (n-1) * alpha
    all_to_all      (n-1)/n^2 * B/bw ... each rank holds B/n and sends (n-1)/n of it, in
                    n-1 pairwise steps: (n-1) * (alpha + B/(n^2 bw))
    broadcast       pipelined chain: B/bw + (n-1) * alpha
    send_recv       one message of B bytes: alpha + B/bw  (n is the group size, must be >= 2)

Tree all-reduce (NCCL's double binary tree, Sanders, Speck & Traeff 2009): each rank sends
and receives about B twice (reduce up, broadcast down, two half-size trees), so
``2 * B/bw + 2 * ceil(log2 n) * alpha``. Its bandwidth term is worse than the ring's
(2 vs 2(n-1)/n) but its latency grows with log n instead of n, so NCCL picks it for small
messages or many ranks. ``algorithm="auto"`` takes the cheaper of the two, as NCCL's tuner
does; ``"ring"`` / ``"tree"`` force one.

A link may carry measured per-collective (alpha, beta) pairs (``LinkSpec.collective_fits``,
written by ``autopar profile``); they replace the link-wide pair for that collective, and
a measured all_reduce is used in its ring form only (the backend's own algorithm choice is
already in the measurement). A link's ``sync_s`` (what a DTensor redistribute adds to the
collective it issues, measured by the profiler; 0 for catalog links) is added to every
collective.
"""
from __future__ import annotations

import math

from .cluster import LinkSpec

COLLECTIVES: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                                "broadcast", "send_recv")


def _check(kind: str, nbytes: float, n: int) -> None:
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective {kind!r}: expected one of {COLLECTIVES}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"collective {kind}: group size n must be an int >= 1, got {n!r}")
    if nbytes < 0 or not math.isfinite(nbytes):
        raise ValueError(f"collective {kind}: nbytes must be finite and >= 0, got {nbytes!r}")


def ring_all_reduce_time(nbytes: float, n: int, link: LinkSpec) -> float:
    return 2 * (n - 1) / n * nbytes / link.bandwidth + 2 * (n - 1) * link.latency


def tree_all_reduce_time(nbytes: float, n: int, link: LinkSpec) -> float:
    return 2 * nbytes / link.bandwidth + 2 * math.ceil(math.log2(n)) * link.latency


def collective_time(kind: str, nbytes: float, n: int, link: LinkSpec, algorithm: str = "auto") -> float:
    """Seconds for one collective of ``kind`` on a tensor of ``nbytes`` (full size) over
    ``n`` ranks joined by ``link``: the alpha-beta time plus the link's per-call ``sync_s``
    and ``stall_s`` (both 0 on catalog links). ``n == 1`` costs 0."""
    _check(kind, nbytes, n)
    if n == 1 or nbytes == 0:
        return 0.0
    return link.sync_s + link.stall_s + _alpha_beta_time(kind, nbytes, n, link, algorithm)


def _alpha_beta_time(kind: str, nbytes: float, n: int, link: LinkSpec, algorithm: str) -> float:
    alpha, bw = link.alpha_beta(kind)
    if kind == "all_reduce" and link.has_fit(kind):
        # measured on this backend: its own algorithm is in the fit, use the ring form
        return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * alpha
    if kind == "all_reduce":
        if algorithm == "ring":
            return ring_all_reduce_time(nbytes, n, link)
        if algorithm == "tree":
            return tree_all_reduce_time(nbytes, n, link)
        if algorithm != "auto":
            raise ValueError(f"all_reduce algorithm must be 'auto', 'ring' or 'tree', got {algorithm!r}")
        return min(ring_all_reduce_time(nbytes, n, link), tree_all_reduce_time(nbytes, n, link))
    if kind in ("all_gather", "reduce_scatter"):
        return (n - 1) / n * nbytes / bw + (n - 1) * alpha
    if kind == "all_to_all":
        return (n - 1) * (alpha + nbytes / (n * n * bw))
    if kind == "broadcast":
        return nbytes / bw + (n - 1) * alpha
    # send_recv
    return alpha + nbytes / bw


def collective_bytes_per_rank(kind: str, nbytes: float, n: int) -> float:
    """Bytes each rank sends for one collective (what profilers call bus traffic)."""
    _check(kind, nbytes, n)
    if n == 1:
        return 0.0
    return {"all_reduce": 2 * (n - 1) / n * nbytes,
            "all_gather": (n - 1) / n * nbytes,
            "reduce_scatter": (n - 1) / n * nbytes,
            "all_to_all": (n - 1) / (n * n) * nbytes,
            "broadcast": nbytes,
            "send_recv": nbytes}[kind]


def alpha_beta_factors(kind: str, n: int) -> tuple[float, float]:
    """(latency steps, bandwidth factor) with time = steps*alpha + factor*B/bw (ring forms).

    Used by the profiler to fit alpha and beta from measured times."""
    _check(kind, 0, n)
    if n == 1:
        return 0.0, 0.0
    return {"all_reduce": (2 * (n - 1), 2 * (n - 1) / n),
            "all_gather": (n - 1, (n - 1) / n),
            "reduce_scatter": (n - 1, (n - 1) / n),
            "all_to_all": (n - 1, (n - 1) / (n * n)),
            "broadcast": (n - 1, 1.0),
            "send_recv": (1, 1.0)}[kind]
