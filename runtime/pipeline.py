"""Pipeline stages cut where the plan says, run by torch.distributed.pipelining.

Each pp rank wraps *its* stage's steps (:class:`autopar.runtime.steps.StageIO`) in a small
``nn.Module`` whose forward takes the local shards of the values crossing into the stage, runs
the stage's nodes on DTensors over the stage's (dp, tp) submesh (so dp and tp inside a stage
work exactly as without a pipeline), and returns the local shards of the values the later
stages need. Values needed two stages later are forwarded through the stages between. Every
tp rank exchanges with the same tp rank of the next stage (the pp group is fixed (dp, tp)),
so any placement, Partial included, crosses a cut unchanged.

Each dp replica pipelines its own rows of the global batch, split into
``plan.pipeline.num_microbatches`` microbatches; the loss of a microbatch is divided by
``num_microbatches * dp`` so the accumulated grads are the global-batch mean, and the grads
are made their storage placement (dp all-reduce) once, after the schedule. The reported loss is
summed on the last stage, all-reduced over dp and broadcast over pp: every rank returns it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from autopar.placements import to_dtensor_placement
from autopar.runtime.steps import RuntimeRefusal


def _dt(pl):
    return [to_dtensor_placement(p) for p in pl]


def microbatch_specs(graph, mb_rows: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global (shape, dtype) of every single-tensor value for one microbatch of ``mb_rows`` rows.

    Runs the program on fake tensors (no memory), like capture does for the full batch.
    """
    import torch.fx as fx

    from autopar.graph import run_on_fake

    specs: dict[str, Any] = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            if n.op == "call_module" and str(n.target).startswith("_guards"):
                return None  # export's guards check the example batch size, not a microbatch's
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                specs[n.name] = (tuple(out.shape), out.dtype)
            return out

    run_on_fake(graph.gm, Rec(graph.gm),
                lambda fake: tuple(fake((mb_rows, *t.shape[1:]), getattr(torch, t.dtype)) for t in graph.inputs))
    return specs


class StageModule(nn.Module):
    """This rank's pipeline stage: local shards in, local shards out (see module docstring)."""

    def __init__(self, pm, stage_io, is_last: bool):
        super().__init__()
        self.pm = pm
        self.ex = pm.executors[stage_io.index]
        self.io = stage_io
        self.is_last = is_last
        self.holder = pm.gm  # registers the stage's parameters (PipelineStage reads them)

    def forward(self, *locals_):
        pm, ex = self.pm, self.ex
        env = {}
        for name, t in zip(self.io.inputs, locals_):
            if t.requires_grad:  # gloo sends only contiguous tensors; input grads go back by p2p
                t.register_hook(lambda g: g.contiguous())
            pl = pm.program.placement_of[name]
            env[name] = DTensor.from_local(t, ex.mesh, _dt(pl), run_check=False)
        ex.begin_step()
        ex.run(env, keep=self.io.outputs)
        outs = []
        for name in self.io.outputs:
            v = env[name]
            want = _dt(pm.program.output_placement if (self.is_last and name == pm.program.output)
                       else pm.program.placement_of[name])
            if not isinstance(v, DTensor):
                v = ex.wrap(v)
            if tuple(v.placements) != tuple(want):
                v = v.redistribute(ex.mesh, want)
            outs.append(v.to_local().contiguous())
        return outs[0] if len(outs) == 1 else tuple(outs)


def _local_shape(shape, mesh, placements):
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(shape, mesh, placements)[0]


def build_pipeline(pm, loss_fn):
    """PipelineStage(s) for this rank's stage(s) and the plan's schedule."""
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleaved1F1B)

    prog, plan = pm.program, pm.plan
    n_stages = len(prog.stages)
    dp = plan.mesh["dp"]
    m = prog.num_microbatches
    B = pm.graph.batch_size
    specs = microbatch_specs(pm.graph, B // m)
    mesh = pm.executor.mesh

    def args_for(names, last=False):
        out = []
        for name in names:
            if name not in specs:
                raise RuntimeRefusal(f"value {name!r} crosses a pipeline cut but is not a single tensor")
            shape, dtype = specs[name]
            pl = prog.output_placement if (last and name == prog.output) else prog.placement_of[name]
            t = torch.empty(_local_shape(shape, mesh, _dt(pl)), dtype=dtype, device=pm.device)
            out.append(t.requires_grad_(True) if dtype.is_floating_point else t)
        return tuple(out)

    stages = []
    for me in pm.local_stages:
        io = prog.stages[me]
        is_last = me == n_stages - 1
        mod = StageModule(pm, io, is_last)
        stages.append(PipelineStage(mod, me, n_stages, pm.device, input_args=args_for(io.inputs),
                                    output_args=args_for(io.outputs, last=is_last), group=pm.rmesh.pp_group))
    scale = float(m * dp)

    def scaled_loss(out, tgt):
        return loss_fn(out, tgt) / scale

    if prog.schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, m, loss_fn=scaled_loss, scale_grads=False)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}.get(prog.schedule)
    if cls is None:
        raise RuntimeRefusal(f"pipeline schedule {prog.schedule!r} is not supported by the runtime; "
                             f"use 'gpipe', '1f1b' or 'interleaved_1f1b'")
    if len(stages) != 1:
        raise RuntimeRefusal(f"schedule {prog.schedule!r} runs one stage per rank; this rank has stages "
                             f"{list(pm.local_stages)} (use 'interleaved_1f1b' for virtual stages)")
    return cls(stages[0], m, loss_fn=scaled_loss, scale_grads=False)


def pipeline_step(pm, inputs, targets, loss_fn) -> torch.Tensor:
    """One global batch through the pipeline (forward, backward, grads synced); returns the loss."""
    key = id(loss_fn)
    if pm._pipeline is None or pm._pipeline[0] != key:
        pm._pipeline = (key, build_pipeline(pm, loss_fn))
    sched = pm._pipeline[1]
    n_stages = len(pm.program.stages)
    first, last = 0 in pm.local_stages, (n_stages - 1) in pm.local_stages
    losses: list[torch.Tensor] = []
    pm._defer_sync = True
    try:
        args = [pm._shard_batch(x) for x in inputs] if first else []
        kw = {"target": pm._shard_batch(targets), "losses": losses} if last else {}
        sched.step(*args, **kw)
    finally:
        pm._defer_sync = False
    pm.sync_grads()
    total = torch.zeros((), device=pm.device)
    if losses:
        total = torch.stack([loss.detach().to(pm.device).reshape(()) for loss in losses]).sum()
        if pm.plan.mesh["dp"] > 1:
            dist.all_reduce(total, group=pm.rmesh.dp_group)
    last_rank = dist.get_global_rank(pm.rmesh.pp_group, (n_stages - 1) % pm.plan.mesh["pp"])
    dist.broadcast(total, src=last_rank, group=pm.rmesh.pp_group)
    return total
