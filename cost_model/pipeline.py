"""Pipeline-parallel schedules: bubble, step time and activation memory in flight.

Notation (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", sec. 2.2): p stages, m microbatches per step, v model chunks
per device (interleaved schedule).

Bubble fraction = bubble time / ideal compute time:

    gpipe, 1f1b          (p - 1) / m
    interleaved_1f1b     (p - 1) / (v m)

(GPipe: Huang et al. 2019; 1F1B = PipeDream-Flush, Narayanan et al. 2021.) 1F1B has the
same bubble as GPipe but keeps at most p - i microbatches of activations on stage i instead
of all m.
"""
from __future__ import annotations

from typing import Sequence, Union

SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved_1f1b")


def _check(schedule: str, num_stages: int, num_microbatches: int, virtual_stages: int = 1) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: expected one of {SCHEDULES}")
    if num_stages < 1 or num_microbatches < 1 or virtual_stages < 1:
        raise ValueError(f"pipeline {schedule}: stages ({num_stages}), microbatches ({num_microbatches}) "
                         f"and virtual_stages ({virtual_stages}) must all be >= 1")
    if schedule != "interleaved_1f1b" and virtual_stages != 1:
        raise ValueError(f"pipeline {schedule}: virtual_stages={virtual_stages} needs 'interleaved_1f1b'")
    if schedule == "interleaved_1f1b" and num_stages > 1 and num_microbatches % num_stages:
        raise ValueError(f"interleaved_1f1b needs num_microbatches ({num_microbatches}) to be a multiple "
                         f"of num_stages ({num_stages}) (Megatron-LM's requirement)")


def bubble_fraction(schedule: str, num_stages: int, num_microbatches: int, virtual_stages: int = 1) -> float:
    """Bubble time over ideal time: (p-1)/m, or (p-1)/(v m) interleaved."""
    _check(schedule, num_stages, num_microbatches, virtual_stages)
    return (num_stages - 1) / (virtual_stages * num_microbatches)


def pipeline_time(stage_fwd_bwd_times: Sequence[Union[float, Sequence[float]]], num_microbatches: int,
                  schedule: str = "1f1b", virtual_stages: int = 1, p2p_time: float = 0.0) -> float:
    """Seconds for one step of ``num_microbatches`` through the pipeline.

    ``stage_fwd_bwd_times[i]`` is stage i's forward+backward time for one microbatch (a float,
    or a (fwd, bwd) pair that is summed), all v chunks of the device together. With
    t_max the slowest stage:

        T = m * t_max + (sum_i t_i - t_max) / v + 2 (v p - 1) * p2p_time

    For equal stages this is (m + (p-1)/v) * t, i.e. ideal time times (1 + bubble
    fraction). The slowest stage sets the steady state; the fill and drain cross every
    other stage once (1/v of it per chunk when interleaved). Point-to-point transfers are
    assumed overlapped in steady state and exposed on the fill/drain path, forward and
    backward, across v p - 1 chunk boundaries.
    """
    times = [float(sum(t)) if isinstance(t, (tuple, list)) else float(t) for t in stage_fwd_bwd_times]
    p, m, v = len(times), num_microbatches, virtual_stages
    _check(schedule, p, m, v)
    if any(t < 0 for t in times) or p2p_time < 0:
        raise ValueError(f"pipeline_time: stage times {times} and p2p_time {p2p_time} must be >= 0")
    t_max = max(times)
    comm = 2 * (v * p - 1) * p2p_time if p > 1 else 0.0
    return m * t_max + (sum(times) - t_max) / v + comm


def shared_host_factor(num_stages: int, num_microbatches: int, ranks_per_stage: int,
                       shared_speedup: Sequence[float], virtual_stages: int = 1,
                       backward_factor: float = 2.0, drain_syncs: bool = False) -> float:
    """How much of its all-ranks-busy compute time a pipeline step takes on a host whose
    processes share cores (``DeviceSpec.shared_speedup``; 1.0 where nothing is shared).

    Fill and drain leave stages idle. On GPUs that changes nothing for the busy ones; on a
    host with fewer cores than processes the busy ones get the idle ones' cores (a rank
    blocked in a gloo receive uses no CPU: measured, 0.00 s of CPU over a 2 s wait). With
    v m chunk-microbatches through p stages, time slot s (0 .. v m + p - 2) of the forward
    has ``k_s = min(s + 1, p, v m, v m + p - 1 - s)`` stages busy, i.e. ``k_s *
    ranks_per_stage`` processes, and runs 1 / speedup[busy - 1] as long as with every process
    busy. The backward (``backward_factor`` times the forward's work) fills the same way. Its
    drain (the last p - 1 slots) is priced all-busy when a stage's ranks have peers
    (``drain_syncs``: dp or tp > 1), and like the fill when each stage is one rank. With
    peers the early-finishing stages all-reduce their gradients (gloo's reduction work on CPU
    ranks) and the busy stages' tensor-parallel collectives keep them in step; a lone rank has
    only its optimizer step left, which the step time adds after the pipeline already (see
    ``solvers.evaluate``). The factor is the work-weighted mean over the slots, and
    multiplies stage compute in :func:`pipeline_time`'s ``(m + (p - 1) / v) t``; GPipe and
    1F1B fill and drain alike.

    Measured on the 2-core VM: GPT pp4 with 4 microbatches had been predicted 2.5x its
    measured 118 ms with every slot priced at the 4-busy-process rate. With every drain priced
    all-busy, over six plan-choice runs pp4's predicted / measured step over dp's read
    0.84-2.26 for GPT and LLaMA (median 1.33, above 1 in 11 of the 12). Pricing every drain
    like the fill instead made LLaMA's pp2 x dp2 and the MLP's pp2 x tp2 the predicted best,
    and those measured slower than dp (LLaMA, 1.13x, median of the same runs) and tp4 (MLP,
    65-110 ms against 57-69 in earlier runs)."""
    p, mv = num_stages, num_microbatches * virtual_stages
    if p <= 1 or not shared_speedup:
        return 1.0
    n = len(shared_speedup)
    slots = mv + p - 1

    def slot_time(s: int) -> float:
        busy = min(s + 1, p, mv, slots - s) * ranks_per_stage
        return 1.0 / shared_speedup[min(n, max(1, busy)) - 1]

    forward = sum(slot_time(s) for s in range(slots))
    backward = forward
    if drain_syncs:
        ramp = min(p - 1, slots)  # the backward's drain: the last p - 1 slots
        backward = sum(slot_time(s) for s in range(slots - ramp)) + ramp
    return (forward + backward_factor * backward) / ((1.0 + backward_factor) * slots)


def inflight_microbatches(schedule: str, stage_index: int, num_stages: int, num_microbatches: int,
                          virtual_stages: int = 1) -> float:
    """Microbatches of activations stage ``stage_index`` holds at its peak.

    gpipe: all m (every forward runs before any backward). 1f1b: min(p - i, m).
    interleaved_1f1b: Megatron-LM warms up ``(p - i - 1) * 2 + (v - 1) * p`` chunk-microbatches
    and holds one more, each 1/v of the stage's activations, so the result is
    ``min(that + 1, v m) / v`` stage-microbatches (a float).
    """
    _check(schedule, num_stages, num_microbatches, virtual_stages)
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_index {stage_index} out of range for {num_stages} stages")
    p, i, m, v = num_stages, stage_index, num_microbatches, virtual_stages
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(p - i, m)
    warmup = (p - i - 1) * 2 + (v - 1) * p
    return min(warmup + 1, v * m) / v
