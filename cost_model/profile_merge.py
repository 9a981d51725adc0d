"""Several profiles of one machine merged into one: every measured figure the median.

Why: on a shared host one profile is one draw of a noisy process. On the 2-core development
VM (2026-11-23) two profiles taken ten minutes apart by the same code gave 2-process
predictions 75-190 % apart (the 2-process all-reduce fit: 0.20 vs 1.31 ms latency, 1.67 vs
0.49 GB/s; the runtime's per-node overhead 78 vs 192 us), while the step times those
predictions are checked against repeated within 6 % (mean absolute) over the same window.
The per-figure median of a few profiles taken back to back is what :func:`profile` writes
when asked to repeat (``autopar profile --repeat K``); one profile spoiled by a burst of
foreign load (a third one taken while other work ran read a 16 ms stall per collective) then
moves nothing.

The median is taken figure by figure over identically shaped profile documents: numbers at
the same place in every document (ints by the lower median, so counts stay counts), lists
element by element when they have the same length everywhere; anything else (strings, lists
whose length differs, keys not in every document) is the first document's. Fitted pairs
such as a link's latency and bandwidth are each the median of their own figures, so they may
come from different profiles: each is still one a profile measured.
"""
from __future__ import annotations

import numbers
import statistics
from typing import Any, Mapping, Sequence


def median_figures(values: Sequence[Any]) -> Any:
    """The figure-by-figure median of ``values`` (equally shaped JSON-like documents)."""
    if not values:
        raise ValueError("median_figures: no values to merge")
    first = values[0]
    if isinstance(first, bool):
        return first
    if isinstance(first, numbers.Real):
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
            return first
        if all(isinstance(v, int) for v in values):
            return statistics.median_low(values)
        return float(statistics.median(values))
    if isinstance(first, Mapping):
        if not all(isinstance(v, Mapping) for v in values):
            return first
        return {k: (median_figures([v[k] for v in values]) if all(k in v for v in values) else x)
                for k, x in first.items()}
    if isinstance(first, list):
        if all(isinstance(v, list) and len(v) == len(first) for v in values):
            return [median_figures([v[i] for v in values]) for i in range(len(first))]
        return first
    return first


def merge_profiles(profiles: Sequence[Mapping]) -> dict:
    """One ``"profile"`` section from several of the same machine and process count.

    Raises ValueError when they cannot describe the same thing: different hosts, process
    counts, core counts, torch versions or measured process counts. The result records the
    dates and wall times of its parts (``"merged"``) and says so in every device's and link's
    provenance notes.
    """
    if not profiles:
        raise ValueError("merge_profiles: no profiles given")
    if len(profiles) == 1:
        return dict(profiles[0])
    first = profiles[0]
    for i, p in enumerate(profiles[1:], 1):
        for key in ("host", "nproc", "cpu_count", "torch", "gpu_count", "version", "host_allocator"):
            if p.get(key) != first.get(key):
                raise ValueError(f"merge_profiles: profile {i} has {key}={p.get(key)!r}, profile 0 has "
                                 f"{first.get(key)!r}; only profiles of one machine and process count merge")
        for table in ("device_by_nproc", "link_by_nproc"):
            if sorted(p.get(table, {})) != sorted(first.get(table, {})):
                raise ValueError(f"merge_profiles: profile {i} measured {table} for process counts "
                                 f"{sorted(p.get(table, {}))}, profile 0 for {sorted(first.get(table, {}))}")
    merged = median_figures(list(profiles))
    dates = [str(p.get("date", "")) for p in profiles]
    merged["date"] = dates[-1]
    merged["wall_s"] = float(sum(float(p.get("wall_s", 0.0)) for p in profiles))
    merged["merged"] = {"count": len(profiles), "dates": dates,
                        "wall_s": [float(p.get("wall_s", 0.0)) for p in profiles],
                        # each part's specs (not its raw samples), to see what one profile alone predicts
                        "parts": [{"date": d, "device_by_nproc": p["device_by_nproc"],
                                   "link_by_nproc": p["link_by_nproc"]} for d, p in zip(dates, profiles)]}
    note = f"each figure the median of {len(profiles)} profiles taken {dates[0]} .. {dates[-1]}"
    for table in ("device_by_nproc", "link_by_nproc"):
        for spec in merged.get(table, {}).values():
            prov = spec.get("provenance")
            if isinstance(prov, dict):
                prov["notes"] = (prov.get("notes", "") + "; " if prov.get("notes") else "") + note
    return merged


def profile_parts(profile: Mapping) -> list[dict]:
    """The single profiles a merged ``"profile"`` section was made from, each a section that
    :func:`autopar.cost_model.cluster.cluster_from_profile` reads (the merged raw samples
    stand in for theirs); ``[profile]`` itself when it was not merged."""
    parts = (profile.get("merged") or {}).get("parts")
    if not parts:
        return [dict(profile)]
    return [dict(profile, date=p["date"], device_by_nproc=p["device_by_nproc"], link_by_nproc=p["link_by_nproc"],
                 merged=None) for p in parts]
