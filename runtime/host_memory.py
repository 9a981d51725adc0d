"""glibc malloc settings for training on a CPU: keep a step's tensors in memory already mapped.

Why: with glibc's defaults, memory freed at the top of the heap goes back to the kernel once
more than the trim threshold is free (twice the dynamic mmap threshold, so a few MiB for a step
of MiB-sized tensors), and the next step's tensors fault the same pages in again: on the 2-core
development VM (2026-11-24), the one-process DLRM step of ``bench/cost_model_accuracy.py``
faulted 43 MiB a step (``getrusage`` minor faults: 20 MiB in forward + backward, 23 MiB in
Adam's temporaries over its four 5 MiB embedding tables) and took 72-81 ms; with the settings
below it faulted none and took 50-52 ms (the GPT step of the same bench: 9-20 MiB faulted,
207-231 ms against 166-187). Where a CPU training process would otherwise reach for
jemalloc or tcmalloc through ``LD_PRELOAD``, this gets the same effect from the allocator the
process already has.

What: ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` (the largest glibc accepts on 64-bit, its
``DEFAULT_MMAP_THRESHOLD_MAX``) and ``mallopt(M_TRIM_THRESHOLD, 1 GiB)``. Setting either turns
glibc's dynamic adjustment off. Allocations below 32 MiB come from the heap, which keeps up to
1 GiB free at its top between steps instead of returning it; from 32 MiB up every allocation is
freshly mapped and pays its page faults, which the cost model charges
(:data:`autopar.cost_model.compute.FRESH_MAPPING_BYTES` is this threshold). The cost: the
process's resident memory stays near its high-water mark (what a caching allocator does on a
GPU); the live-tensor peak the planner budgets for is unchanged.

Applied by :func:`autopar.runtime.apply.apply_plan` and by the profiler's measuring processes,
so that the profile and the runs see the same allocator. ``AUTOPAR_HOST_ALLOCATOR=system``
leaves glibc as it is (the cost model then under-prices steps that fault); on a C library
other than glibc (or with a preloaded allocator, whose own settings rule) this does nothing.
"""
from __future__ import annotations

import ctypes
import os
import platform

from autopar.cost_model.compute import FRESH_MAPPING_BYTES

#: glibc's mallopt(3) parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = FRESH_MAPPING_BYTES
#: free memory the heap keeps at its top before giving it back: more than any step here frees
TRIM_THRESHOLD_BYTES = 1 << 30
ENV = "AUTOPAR_HOST_ALLOCATOR"

_state: "str | None" = None


def on_glibc() -> bool:
    """Whether this process's C library is glibc on Linux (where the settings apply)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def configure_host_allocator() -> str:
    """Apply the settings above once per process; returns what this process's allocator is
    (also :func:`host_allocator`): ``"glibc tuned"``, ``"system"`` (left alone on request or
    on another C library) or ``"glibc default (mallopt refused)"``."""
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(ENV, "tuned").strip().lower()
    if choice not in ("tuned", "system"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: use 'tuned' (the default) or 'system'")
    if choice == "system" or not on_glibc():
        _state = "system"
        return _state
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
              and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    except (OSError, AttributeError):
        ok = False
    _state = "glibc tuned" if ok else "glibc default (mallopt refused)"
    return _state


def host_allocator() -> str:
    """What :func:`configure_host_allocator` did in this process (``"not configured"`` before)."""
    return _state if _state is not None else "not configured"
