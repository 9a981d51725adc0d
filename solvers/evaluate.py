"""The step time and memory of one complete decision, in plain Python.

This is the cost model the ILP (:mod:`.formulation`) encodes linearly; keeping it as a
separate function lets tests enumerate every decision of a small case and check the ILP
returns the same optimum, and lets the decoder report the predicted figures of the plan.

Per pipeline rank i with k_i blocks, device d_i, recomputing r_i blocks and offloading the
activations of o_i blocks (per microbatch):

    base_i  = sum_u mult_i(u) c_u(s_u) + sum_e mult_i(e) c_e(s_src, s_dst) + r_i F(s)
    t_i     = max(base_i, o_i * 2 (A(s) - C(s)) / host_bw)          offload overlaps compute
    mem_i   = sum_params mult_i * state_mem(s, cfg) + working + max_params gather(s, cfg)
              + inflight_i * (sum_u mult_i(u) act_u(s) - (r_i + o_i)(A(s) - C(s)))  <= capacity
    host_i  = sum_params mult_i * state_host(s, cfg) + inflight_i o_i (A(s) - C(s)) <= host capacity

(gather: a ZeRO-3 or host-streamed parameter node's whole parameters and gradients, alive
only while that node runs), with A the saved activations of one block, C its checkpoint (the block output), F its
forward time; mult_i(u) = k_i for block units, 1 on the stage that holds a prefix/suffix
unit. Per step:

    T = m t_max + (sum_i t_i - t_max)/v + 2 (v p - 1) p2p(s) + max_i (expA_i + expG_i + step_i)
    expA_i = max(0, overlap_i - e m t_i, (1 - e) overlap_i)    ZeRO-3 gathers, param/grad streaming
    expG_i = max(0, sync_i - e beta t_i, (1 - e) sync_i)      gradient sync overlapping the last backward

with e the overlap efficiency of the candidate's links (1: communication hides behind compute
up to the compute's length; 0: none of it does, as on CPU ranks that use every core).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

from .costed import BACKWARD_SHARE, CostedGraph, EdgeCosts, NodeCosts, StageSpec


@dataclass(frozen=True)
class Decision:
    strategy: Mapping[str, int]  # unit -> strategy index
    config: Mapping[str, int]  # param group ("block" | "outside") -> state config index
    recompute: tuple[int, ...]  # per pipeline rank: blocks recomputed
    offload_act: tuple[int, ...]  # per pipeline rank: blocks whose activations go to host


@dataclass(frozen=True)
class Breakdown:
    step_time_s: float
    stage_time_s: tuple[float, ...]  # per microbatch, per pipeline rank
    compute_s: float  # m * sum over the critical stage of compute
    communication_s: float
    bubble_s: float
    offload_s: float
    memory_bytes: tuple[float, ...]  # per pipeline rank
    memory_breakdown: tuple[Mapping[str, float], ...]
    host_bytes: tuple[float, ...]  # offloaded to host memory, per device of each rank
    feasible: bool
    over: tuple[float, ...] = field(default=())  # bytes over device (plus host) capacity per stage
    memory_moment: tuple[str, ...] = field(default=())  # per pipeline rank: when it peaks (moments)


#: Bytes a stage may exceed its capacity by and still count as fitting: the ILP's feasibility
#: tolerance (1e-6 in its GiB units), so the two agree on a plan that fills memory exactly.
MEMORY_TOLERANCE_BYTES = 1024.0


def group_of(n: NodeCosts) -> str:
    return "block" if n.place == "block" else "outside"


def stage_mult(cg: CostedGraph, place: str, i: int) -> int:
    st = cg.stages[i]
    if place == "block":
        return st.num_blocks
    if place == "prefix":
        return 1 if st.prefix else 0
    return 1 if st.suffix else 0


def edge_mult(cg: CostedGraph, e: EdgeCosts, dst_place: str, i: int) -> int:
    st = cg.stages[i]
    if e.kind == "chain":
        return st.num_blocks - (1 if i == 0 else 0)
    if e.kind in ("intra", "fanin"):
        return st.num_blocks
    return stage_mult(cg, dst_place, i)


def param_holders(cg: CostedGraph, n: NodeCosts) -> list[tuple[int, int]]:
    """(stage, multiplicity) of the stages holding a node's params (tied copies included)."""
    out = {}
    for i in range(len(cg.stages)):
        k = stage_mult(cg, n.place, i)
        if k:
            out[i] = k
    places = {x.name: x.place for x in cg.nodes}
    for e in cg.edges:
        if e.kind == "param" and e.src == n.name:
            for i in range(len(cg.stages)):
                if stage_mult(cg, places[e.dst], i) and i not in out:
                    out[i] = 1
    return sorted(out.items())


class Moment(NamedTuple):
    """What is alive at one moment a stage's peak can sit: microbatches of saved activations,
    whether the gradients exist, whether the optimizer step's temporaries do, loss bytes."""

    acts: float
    grads: bool
    step: bool
    loss: float


def moments(st: StageSpec, m: int, loss: float) -> dict[str, Moment]:
    """The three moments a stage's peak can sit at, and why there are three.

    A training step's live bytes rise through the forward (saved activations) and, in the
    backward, trade activations for gradients layer by layer, then the optimizer step adds
    its temporaries. With layers alike the trade is linear, so the fullest moment is one of:

    * ``loss_backward``: every in-flight activation plus the loss's tensors, before any
      gradient exists (the previous step's ``zero_grad(set_to_none=True)`` freed them);
    * ``with_gradients``: gradients whole while microbatches are still in flight: after the
      first backward, the rest of the in-flight microbatches and, where more forwards follow
      (1F1B's steady state, gradient accumulation), one refilled; with one microbatch, none
      (the step end's training state);
    * ``optimizer_step``: gradients whole, activations gone, the step's temporaries.

    Counting every gradient beside every activation, as this model did before, was 8-19 %
    over the measured peaks on the accuracy bench (2026-11-23). evaluate() and the ILP
    (formulation._memory) both price these."""
    later = min(st.inflight, m - 1)
    return {"loss_backward": Moment(st.inflight, False, False, loss),
            "with_gradients": Moment(later, True, False, loss if later > 0 else 0.0),
            "optimizer_step": Moment(0.0, True, True, 0.0)}


def moment_breakdown(mo: Moment, state: float, grads: float, working: float, act_mb: float,
                     step_temps: float) -> dict[str, float]:
    """A moment's bytes by kind (training state, working buffers: gradient buckets and
    gathered parameters, activations with the loss's tensors, and at the optimizer step its
    temporaries); their sum is the moment's total."""
    out = {"training_state": state - (0.0 if mo.grads else grads), "working": working,
           "activations": mo.acts * act_mb + mo.loss}
    if mo.step:
        out["optimizer_temporaries"] = step_temps
    return out


def peak_moments(st: StageSpec, m: int, state: float, grads: float, working: float, act_mb: float,
                 loss: float, step_temps: float) -> dict[str, float]:
    """A stage's bytes at each of its :func:`moments`."""
    return {name: sum(moment_breakdown(mo, state, grads, working, act_mb, step_temps).values())
            for name, mo in moments(st, m, loss).items()}


def evaluate(cg: CostedGraph, d: Decision) -> Breakdown:
    cand = cg.candidate
    m, v, p = cand.num_microbatches, cand.virtual_stages, cand.pp
    places = {n.name: n.place for n in cg.nodes}
    idx = {n.name: d.strategy[n.name] for n in cg.nodes}
    block_units = [n for n in cg.nodes if n.place == "block"]
    t_list, mem_list, brk_list, host_list, over, moment_list = [], [], [], [], [], []
    comp_list, comm_list, off_list, q_list = [], [], [], []
    for i, st in enumerate(cg.stages):
        dev = st.device
        compute = sum(stage_mult(cg, n.place, i) * n.compute_s[dev][idx[n.name]] for n in cg.nodes)
        comm = 0.0
        for e in cg.edges:
            k = edge_mult(cg, e, places[e.dst], i)
            if k:
                comm += k * e.cost_s[idx[e.src]][idx[e.dst]]
        F = sum(n.forward_s[dev][idx[n.name]] for n in block_units)
        A = sum(n.act_bytes[idx[n.name]] for n in block_units)
        C = sum(cg.node(u).out_bytes[idx[u]] for u in cg.chain_outputs)
        r, o = d.recompute[i], d.offload_act[i]
        base = compute + comm + r * F
        hb = cg.host_bw.get(dev, 0.0)
        aoff = (o * 2 * (A - C) / hb) if (o and hb > 0) else 0.0
        t = max(base, aoff)
        state_mem = working = gather = overlap = sync = step = host = grads = step_sum = step_max = 0.0
        for n in cg.nodes:
            sync += stage_mult(cg, n.place, i) * n.tp_sync_s[idx[n.name]]
            if n.state is None:
                continue
            sc = n.state[dev][idx[n.name]][d.config[group_of(n)]]
            for (j, k) in param_holders(cg, n):
                if j != i:
                    continue
                state_mem += k * sc.memory_bytes
                grads += k * sc.grad_bytes
                step_sum += k * sc.step_sum_bytes
                step_max = max(step_max, sc.step_max_bytes)
                host += k * sc.host_bytes
                working += k * sc.working_bytes
                gather = max(gather, sc.gather_bytes)
                overlap += k * sc.overlap_s
                sync += k * sc.sync_s
                step += k * sc.step_s
        act = sum(stage_mult(cg, n.place, i) * n.act_bytes[idx[n.name]] for n in cg.nodes)
        act_mb = act - (r + o) * (A - C)
        host += st.inflight * o * (A - C)
        at = moments(st, m, cg.loss_bytes if st.suffix else 0.0)
        brk = {name: moment_breakdown(mo, state_mem, grads, working + gather, act_mb, step_sum + step_max)
               for name, mo in at.items()}
        peak = max(brk, key=lambda name: sum(brk[name].values()))
        memory = sum(brk[peak].values())
        moment_list.append(peak)
        e = cg.overlap_efficiency
        exp_a = max(0.0, overlap - e * m * t, (1.0 - e) * overlap)
        exp_g = max(0.0, sync - e * BACKWARD_SHARE * t, (1.0 - e) * sync)
        q_list.append(exp_a + exp_g + step)
        t_list.append(t)
        mem_list.append(memory)
        host_list.append(host)
        brk_list.append(brk[peak])
        over.append(max(0.0, memory - st.capacity_bytes) + max(0.0, host - st.host_capacity_bytes))
        comp_list.append(compute + r * F)
        comm_list.append(comm)
        off_list.append(t - base)
    t_max = max(t_list)
    crit = t_list.index(t_max)
    p2p = 0.0
    if p > 1:
        nbytes = sum(cg.node(u).out_bytes[idx[u]] for u in cg.chain_outputs)
        p2p = 2 * (v * p - 1) * (cg.p2p_latency_s + nbytes * cg.p2p_s_per_byte)
    q = max(q_list)
    T = m * t_max + (sum(t_list) - t_max) / v + p2p + q
    feasible = all(x <= MEMORY_TOLERANCE_BYTES for x in over) and math.isfinite(T)
    return Breakdown(
        step_time_s=T, stage_time_s=tuple(t_list), compute_s=m * comp_list[crit],
        communication_s=m * comm_list[crit] + p2p + (q - 0.0 if q else 0.0),
        bubble_s=(sum(t_list) - t_max) / v, offload_s=m * off_list[crit],
        memory_bytes=tuple(mem_list), memory_breakdown=tuple(brk_list), host_bytes=tuple(host_list),
        feasible=feasible, over=tuple(over), memory_moment=tuple(moment_list))


def memory_lower_bound(cg: CostedGraph) -> tuple[float, ...]:
    """Per pipeline rank, bytes no decision can go below: each parameter node at its
    smallest (strategy, state config), every block recomputed or offloaded (only its
    checkpoint C stays), every other unit at its smallest saved activation, at the loss's
    backward (no gradients yet) and at the optimizer step (gradients, no activations; see
    :func:`moments`). A candidate whose bound exceeds the capacity is infeasible
    without building its ILP."""
    out = []
    block_ckpt = sum(min(cg.node(u).out_bytes) for u in cg.chain_outputs)
    for i, st in enumerate(cg.stages):
        dev = st.device
        state = 0.0  # smallest training state without gradients (the loss's backward)
        whole = 0.0  # and with them (the optimizer step)
        act = 0.0
        for n in cg.nodes:
            k = stage_mult(cg, n.place, i)
            if k and n.place != "block":
                act += k * min(n.act_bytes)
            if n.state is None:
                continue
            for j, kk in param_holders(cg, n):
                if j == i:
                    state += min(kk * (sc.memory_bytes - sc.grad_bytes + sc.working_bytes)
                                 for row in n.state[dev] for sc in row)
                    whole += min(kk * (sc.memory_bytes + sc.working_bytes) for row in n.state[dev] for sc in row)
        act += st.num_blocks * block_ckpt if any(n.place == "block" for n in cg.nodes) else 0.0
        if not any(n.place == "block" for n in cg.nodes):
            act = sum(stage_mult(cg, n.place, i) * min(n.act_bytes) for n in cg.nodes)
        out.append(max(state + st.inflight * act + (cg.loss_bytes if st.suffix else 0.0), whole))
    return tuple(out)
