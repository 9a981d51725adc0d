"""apply_plan: (captured Graph or module, Plan) -> a ParallelModule that trains on N ranks exactly.

How a plan is executed (in this order, each a small function below):

1. ``plan_steps`` (pure, :mod:`autopar.runtime.steps`) turns the plan into per-node steps and
   checks it; a plan it cannot run exactly is refused there with the node/param at fault.
2. ``build_mesh`` makes the (pp, dp, tp) DeviceMesh; placements live on this rank's (dp, tp)
   stage submesh.
3. ``_materialize_params``: each rank keeps only its local shard of its stage's parameters, as
   ``torch.distributed.tensor`` DTensors with the *storage* placements (ZeRO: ``S(0)`` on dp);
   on a GPU, weights the plan offloads keep their shard in pinned host memory and are copied
   in at each use like a ZeRO-3 gather (ZeRO-Infinity), their gradients coming back to the host.
   A model built on the meta device is initialised one owning module at a time on the host
   (``reset_parameters`` under a per-module seed derived from ``seed``), sliced, and dropped:
   the extra host memory is the largest single module's parameters. :func:`materialize` does the
   same to an unsharded model, which is the single-device reference for the same seed.
4. ``Executor`` walks the steps like an ``fx.Interpreter``: it redistributes each node's inputs to
   the planned placements, gathers ZeRO-3 parameters at use (the all-gather's backward is a
   reduce-scatter: FSDP), runs the node on DTensors (global semantics; DTensor inserts nothing
   the plan did not ask for except inside ops it must), and makes the outputs the planned
   placements. Blocks with ``recompute="full"`` run under ``torch.utils.checkpoint``; blocks with
   ``offload_activations`` save their activations on the host (saved-tensor hooks). Where
   DTensor has no rule for an op under the given placements (CPU SDPA is run head-parallel on
   local shards instead), the op runs on whole tensors - always correct, costs a gather - and
   the node is listed in ``Executor.fallbacks``.
5. Gradients: a Replicate parameter read with batch-sharded activations gets a ``Partial`` grad
   from DTensor (a pending sum over dp). ``sync_grads`` makes every grad the parameter's storage
   placement (all-reduce, or reduce-scatter for ZeRO) before the optimizer runs; a post-accumulate
   hook does it for plain ``loss.backward()`` too; on the last microbatch the dp all-reduces
   start inside the backward (overlapped, like DDP).
6. The optimizer steps on plain local views of the shards (host copies for offloaded optimizer
   state, ZeRO-Offload), see :meth:`ParallelModule.optimizer_params`.
7. Pipelines (``plan.pipeline.stages``) run through :mod:`autopar.runtime.pipeline`
   (torch.distributed.pipelining: GPipe, 1F1B, interleaved 1F1B).

Inputs to ``train_step`` and ``forward`` are the GLOBAL batch, identical on every rank (each rank
takes its rows). ``optimizer`` is a ``torch.optim`` instance built over ``model.parameters()`` or
a factory ``lambda params: torch.optim.Adam(params, lr=...)``; a factory is needed for
optimizer-state offload on a GPU (the optimizer must be built over host copies).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial as DPartial
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard

from autopar.graph import Graph, capture
from autopar.placements import Replicate as _Rep
from autopar.placements import check_mesh, to_dtensor_placement
from autopar.plan import Plan
from autopar.runtime import optimizers, shard_local
from autopar.runtime import sync_batch_norm as sync_bn
from autopar.runtime.host_memory import configure_host_allocator
from autopar.runtime.mesh import RankMesh, build_mesh
from autopar.runtime.steps import NodeStep, Program, RuntimeRefusal, plan_steps

_R = _Rep()


def _dt(pl) -> list:
    return [to_dtensor_placement(p) for p in pl]


# ---------------------------------------------------------------------------------------
# parameter materialisation


def _module_seed(seed: int, module_path: str) -> int:
    return zlib.crc32(f"{seed}:{module_path}".encode()) & 0x7FFFFFFF


def _init_owner(module: nn.Module, owner: str, seed: int) -> nn.Module:
    """A host copy of submodule ``owner`` with freshly reset parameters (deterministic per path)."""
    mod = module.get_submodule(owner) if owner else module
    if not hasattr(mod, "reset_parameters"):
        raise RuntimeRefusal(
            f"module {owner or type(module).__name__!r} ({type(mod).__name__}) is on the meta device and "
            f"has no reset_parameters(): autopar cannot initialise it shard by shard; build the model "
            f"with real weights or give it reset_parameters()"
        )
    clone = copy.deepcopy(mod).to_empty(device="cpu", recurse=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_module_seed(seed, owner))
        with torch.no_grad():
            clone.reset_parameters()
    return clone


def materialize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give a meta-device model real host weights, as apply_plan(seed=seed) initialises its shards.

    Every module that directly owns parameters is reset with ``reset_parameters`` under the seed
    ``crc32(f"{seed}:{path}")``, so values do not depend on sharding or on initialisation order.
    Returns the module (modified in place).
    """
    owners = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        owner, _, pname = name.rpartition(".")
        owners.setdefault(owner, []).append(pname)
    done: dict[int, torch.Tensor] = {}
    for owner, pnames in owners.items():
        mod = module.get_submodule(owner) if owner else module
        if not any(getattr(mod, n).is_meta for n in pnames):
            continue
        fresh = _init_owner(module, owner, seed)
        for n in pnames:
            old = getattr(mod, n)
            if id(old) in done:
                setattr(mod, n, done[id(old)])
                continue
            new = nn.Parameter(getattr(fresh, n).detach().clone(), requires_grad=old.requires_grad)
            done[id(old)] = new
            setattr(mod, n, new)
    for name, b in module.named_buffers():
        if b.is_meta:
            raise RuntimeRefusal(f"buffer {name!r} is on the meta device; autopar cannot recreate buffers")
    return module


def _local_slice(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    idx = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full[idx] if idx else full


# ---------------------------------------------------------------------------------------
# activation offload (saved-tensor hooks that understand DTensors)


def _offload_pack_unpack(device: torch.device):
    """Saved-tensor hooks that keep saved activations on the host; on a CPU run the copies are
    no-ops (same tensor)."""
    host = torch.device("cpu")

    def pack(t):
        if isinstance(t, DTensor):
            loc = t._local_tensor.detach()
            return ("dt", loc.to(host, non_blocking=True), t.device_mesh, t.placements, t.shape, t.stride())
        return ("t", t.to(host, non_blocking=True), t.device)

    def unpack(packed):
        if packed[0] == "dt":
            _, loc, mesh, pl, shape, stride = packed
            return DTensor.from_local(loc.to(device, non_blocking=True), mesh, pl, run_check=False,
                                      shape=shape, stride=stride)
        _, t, dev = packed
        return t.to(dev, non_blocking=True)

    return pack, unpack


def _weights_on_host(lay, device: torch.device) -> bool:
    """The plan offloads this parameter's weights and there is a host apart from the device to
    hold them (on a CPU the host is the device: the weights stay where they are)."""
    return "params" in lay.offload and device.type != "cpu"


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into pinned host memory (a no-op on a CPU). Pinned, because a copy to
    pageable memory is staged by the driver: on the lent H100 (PCIe 5, 52 GB/s pinned) the
    gradients of a 1.3 B model went to pageable memory at ~1 GB/s, 5.3 s of a 9.8 s step."""
    if t.device.type == "cpu":
        return t
    buf = torch.empty(t.size(), dtype=t.dtype, pin_memory=True)
    buf.copy_(t)  # waits for the copy: the host reads it next (accumulation, optimizer)
    return buf


class _HostToDevice(torch.autograd.Function):
    """A host-held weight's copy to the device, whose backward brings the gradient back to
    pinned host memory (``Tensor.to``'s backward would copy it to pageable memory).

    The copy runs on the compute stream. A side stream (so the copy engine would start while
    earlier ops compute) measured no faster on the lent H100: 4.96 s a step against 4.38.
    Those were different machines of the same kind, so this is not a clean A/B."""

    @staticmethod
    def forward(ctx, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return host.to(device, non_blocking=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _to_host(grad), None


@dataclass(frozen=True)
class _Regather:
    """Kept for backward in place of a view of a gathered ZeRO-3 parameter: how to gather
    it again and take the same view."""

    fqn: str
    size: tuple
    stride: tuple
    offset: int
    dtensor: "tuple | None"  # (mesh, placements, shape, stride) of a DTensor view; None: plain


class _ZeroThreeGathers:
    """ZeRO-3 reshard after forward, as FSDP does it: a parameter gathered for an op is not
    kept alive by that op's saved tensors until the backward; saved-tensor hooks keep a
    :class:`_Regather` instead and gather the parameter again when the backward needs it.

    Why: an op saves its weight for its backward (a matmul saves both operands), so without
    this every gathered parameter of the forward stayed alive until its backward, and ZeRO-3
    held the whole unsharded model at the end of the forward (it saved memory only with
    recompute). The backward pays one more all-gather per parameter (FSDP's volume: gather,
    gather, reduce-scatter).

    Gathers are recognised by storage: :meth:`note` records the gathered local tensor's
    storage, and a finalizer forgets it when that storage is freed (so a later tensor reusing
    the address is not mistaken for it). Views of the parameter taken by other nodes (a
    separate ``t()``) are recognised too, since they share the storage."""

    def __init__(self, executor: "Executor") -> None:
        self.ex = executor
        self.live: dict[int, str] = {}  # storage data_ptr -> fqn

    def note(self, fqn: str, full) -> None:
        st = full._local_tensor.untyped_storage()
        key = st.data_ptr()
        self.live[key] = fqn
        weakref.finalize(st, self.live.pop, key, None)

    def hooks(self, inner: "tuple | None" = None):
        """Saved-tensor hooks; ``inner`` (pack, unpack) handles every other saved tensor (the
        activation-offload hooks of the segment), else they are kept as they are."""
        live = self.live

        def pack(t):
            loc = t._local_tensor if isinstance(t, DTensor) else t
            fqn = live.get(loc.untyped_storage().data_ptr()) if live and loc.layout == torch.strided else None
            if fqn is None:
                return inner[0](t) if inner else t
            dt = (t.device_mesh, t.placements, t.shape, t.stride()) if isinstance(t, DTensor) else None
            return _Regather(fqn, tuple(loc.size()), tuple(loc.stride()), loc.storage_offset(), dt)

        def unpack(x):
            if not isinstance(x, _Regather):
                return inner[1](x) if inner else x
            with torch.no_grad():
                full = self.ex.gather_param(x.fqn)
            loc = full._local_tensor.as_strided(x.size, x.stride, x.offset)
            if x.dtensor is None:
                return loc
            mesh, pl, shape, stride = x.dtensor
            return DTensor.from_local(loc, mesh, pl, run_check=False, shape=shape, stride=stride)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


# ---------------------------------------------------------------------------------------
# the executor


def _is_sdpa(target) -> bool:
    return target is F.scaled_dot_product_attention or (
        isinstance(target, torch._ops.OpOverload) and "scaled_dot_product" in str(target)
    ) or (isinstance(target, torch._ops.OpOverloadPacket) and "scaled_dot_product" in str(target))


def _is_assert(target) -> bool:
    name = getattr(target, "__name__", "") or str(target)
    return "_assert_tensor_metadata" in name or "_assert_async" in name or "sym_constrain_range" in name


def _replicated_fallback(target, args, kwargs, mesh):
    """An op DTensor has no sharding rule for: run it on whole (replicated) tensors.

    Always correct (``full_tensor`` is differentiable; its backward takes each rank's part of
    the gradient) but it gathers the inputs, so the plan's placements for this node cost an
    all-gather; the result is Replicate and then made the planned output placement.
    """
    def full(x):
        return x.full_tensor() if isinstance(x, DTensor) else x

    args = torch.utils._pytree.tree_map(full, args)
    kwargs = torch.utils._pytree.tree_map(full, kwargs)
    out = target(*args, **kwargs)
    return torch.utils._pytree.tree_map(
        lambda t: DTensor.from_local(t, mesh, [DReplicate()] * mesh.ndim, run_check=False)
        if isinstance(t, torch.Tensor) else t, out)


def _local_sdpa(target, args, kwargs):
    """SDPA on DTensors is batch- and head-parallel: run it on local shards.

    DTensor has no CPU SDPA rule, so the plan's head-parallel choice (q/k/v ``S(0)``/``S(1)`` on
    (B, H, T, D)) is executed here directly; any other placement is first made Replicate on
    that axis (correct, and the plan's own redistribution already happened before).
    """
    q, k, v = args[:3]
    if not isinstance(q, DTensor):
        return target(*args, **kwargs)
    mesh = q.device_mesh
    pl = []
    for p in q.placements:
        pl.append(p if isinstance(p, DShard) and p.dim in (0, 1) else DReplicate())
    rest = list(args[3:])
    mask = kwargs.get("attn_mask", rest[0] if rest else None)
    if isinstance(mask, DTensor) or (isinstance(mask, torch.Tensor) and mask.dim() >= 3):
        pl = [DReplicate()] * len(pl)  # a per-batch/head mask would need slicing too; keep it simple
    locs = []
    for t in (q, k, v):
        t = t.redistribute(mesh, pl) if tuple(t.placements) != tuple(pl) else t
        locs.append(t.to_local())
    rest = [r.full_tensor() if isinstance(r, DTensor) else r for r in rest]
    kw = {k_: (v_.full_tensor() if isinstance(v_, DTensor) else v_) for k_, v_ in kwargs.items()}
    out = target(*locs, *rest, **kw)
    return DTensor.from_local(out, mesh, pl, run_check=False)  # shards are even (checked by the plan)


def _masked_partial_as_partial(t: DTensor, want) -> DTensor:
    """``t`` with each vocab-parallel ``_MaskPartial`` placement whose wanted placement is a plain
    ``Partial`` turned into that ``Partial``: rows this rank's embedding shard does not hold are
    zeroed (the mask DTensor would apply at its reduction), and the local values are then a
    plain partial sum. DTensor refuses that redistribution ("redistributing to Partial is for
    internal use only"), so a plan that keeps an embedding's output partial for a later
    reduction (fused into a reduce-scatter, or summed after the next op) needs it done here.
    The gradient of the local values is the incoming replicated gradient, masked the same way."""
    pls = list(t.placements)
    idx = [i for i, (p, w) in enumerate(zip(pls, want))
           if p.is_partial() and type(p) is not DPartial and hasattr(p, "mask_buffer")
           and type(w) is DPartial and w.reduce_op == p.reduce_op]
    if not idx:
        return t
    local = t.to_local(grad_placements=[DReplicate() if i in idx else p for i, p in enumerate(pls)])
    for i in idx:
        mask = pls[i].mask_buffer.data
        if mask is None:
            raise RuntimeError(f"autopar runtime: a vocab-parallel embedding output on mesh dim {i} has no "
                               "mask to apply (it was reduced already)")
        keep = (~mask).to(local.dtype)
        local = local * (keep if keep.ndim == local.ndim else keep.unsqueeze(-1))
        pls[i] = DPartial(pls[i].reduce_op)
    return DTensor.from_local(local, t.device_mesh, pls, run_check=False, shape=t.shape, stride=t.stride())


class _GradAs(torch.autograd.Function):
    """Identity whose backward makes the gradient ``placements`` first.

    DTensor cannot turn a ``Partial`` gradient into the ``MaskPartial`` that a vocab-parallel
    embedding's output had (the backward of its redistribution); making the gradient the
    forward output's own placement first (an all-reduce when it is Partial) avoids that path.
    """

    @staticmethod
    def forward(ctx, x, placements):
        ctx.placements = placements
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if isinstance(g, DTensor) and tuple(g.placements) != tuple(ctx.placements):
            g = g.redistribute(g.device_mesh, ctx.placements)
        return g, None


class Executor:
    """Runs a stage's :class:`NodeStep` s on DTensors (see module docstring, step 4)."""

    def __init__(self, gm: fx.GraphModule, program: Program, rmesh: RankMesh, params: dict,
                 stage: int):
        self.gm = gm
        self.program = program
        self.rmesh = rmesh
        self.mesh = rmesh.stage_mesh
        self.params = params  # fqn -> storage nn.Parameter (DTensor), this rank's stages only
        self.stage = stage
        self.fx_nodes = {n.name: n for n in gm.graph.nodes}
        self.steps = program.steps_of_stage(stage)
        self.step_compute: dict[str, Any] = {}
        self.fallbacks: dict[str, str] = {}  # node -> why it ran on whole tensors
        self._segments = self._make_segments()
        # values die after their last reader on this stage: the environment must not keep a
        # stage's every intermediate alive to the end of its forward (saved activations that
        # are offloaded or recomputed would otherwise stay on the device all the same)
        self._pos = {s.node: i for i, s in enumerate(self.steps)}
        last: dict[str, int] = {}
        for i, s in enumerate(self.steps):
            for name in s.inputs:  # the node's non-parameter inputs (graph._node_inputs)
                last[name] = i
        self._dies_at: dict[int, list[str]] = {}
        for name, i in last.items():
            self._dies_at.setdefault(i, []).append(name)
        #: weights kept in (pinned) host memory and copied to the device at each use, as the
        #: plan's 'params' offload says (ZeRO-Infinity); on a CPU the host is the device
        self.host_params = frozenset(f for f, lay in program.params.items()
                                     if f in params and _weights_on_host(lay, rmesh.device))
        zero3 = any(lay.gather == "use" for f, lay in program.params.items() if f in params)
        self._zero3 = _ZeroThreeGathers(self) if zero3 or self.host_params else None
        self._owner: dict[str, dict[str, str]] = {}  # call_module node -> {local param name: fqn}
        for s in self.steps:
            n = self.fx_nodes[s.node]
            if n.op == "call_module":
                names = {}
                sub = gm.get_submodule(n.target)
                for pname, _ in sub.named_parameters(remove_duplicate=False):
                    fqn = program_alias(program, f"{n.target}.{pname}", gm)
                    names[pname] = fqn
                self._owner[s.node] = names

    # -- segments: consecutive steps with the same (block, recompute, offload) policy
    def _make_segments(self):
        segs = []
        for s in self.steps:
            key = (s.block, s.recompute, s.offload_activations)
            if segs and segs[-1][0] == key and (s.recompute or s.offload_activations):
                segs[-1][1].append(s)
            else:
                segs.append((key, [s]))
        return segs

    # -- values
    def wrap(self, t: Any, placements=(_R, _R)) -> Any:
        """A rank-identical plain tensor (inputs sliced by caller, constants) as a DTensor."""
        if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
            return DTensor.from_local(t, self.mesh, _dt(placements), run_check=False)
        return t

    def param_value(self, fqn: str, step: NodeStep | None = None):
        p = self.params[fqn]
        lay = self.program.params[fqn]
        if lay.gather == "none" and fqn not in self.host_params:
            return p
        if lay.gather == "step":
            return self.step_compute[fqn]
        # ZeRO-3: gather at use (the gather's backward reduce-scatters); host-held weights are
        # copied in here, and like a ZeRO-3 gather not kept for the backward (fetched again there)
        full = self.gather_param(fqn)
        if self._zero3 is not None and torch.is_grad_enabled():
            self._zero3.note(fqn, full)
        return full

    def gather_param(self, fqn: str):
        p = self.params[fqn]
        if fqn in self.host_params:
            # host -> device inside autograd: the copy's backward brings the gradient to the host,
            # where the parameter (and, by the state configs that offload weights, its optimizer
            # state) lives; the gradient never stays on the device
            loc = _HostToDevice.apply(p.to_local(), self.rmesh.device)
            p = DTensor.from_local(loc, self.mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        return p.redistribute(self.mesh, _dt(self.program.params[fqn].compute))

    def begin_step(self) -> None:
        """ZeRO-1/2: gather this stage's parameters once (inside autograd: grads reduce-scatter)."""
        self.step_compute = {
            fqn: self.gather_param(fqn)
            for fqn, lay in self.program.params.items()
            if lay.gather == "step" and fqn in self.params
            and (len(self.program.stages) <= 1 or lay.stage == self.stage)
        }

    def _drop_dead(self, env: dict, start: int, upto: int, keep) -> int:
        """Drop the values whose last reader is a step in positions ``start..upto``; returns
        the next position to look at."""
        for i in range(start, upto + 1):
            for name in self._dies_at.get(i, ()):
                if name not in keep:
                    env.pop(name, None)
        return max(start, upto + 1)

    def run(self, env: dict, keep=()) -> dict:
        """Run this stage's steps; ``env`` maps value names to values (updated and returned).
        A value is dropped from ``env`` after its last reader here, unless named in ``keep``
        (what the caller reads afterwards: the stage's outputs)."""
        keep = set(keep)
        dropped = 0
        for (block, recompute, offload), steps in self._segments:
            inner = _offload_pack_unpack(self.rmesh.device) if offload else None
            if self._zero3 is not None and torch.is_grad_enabled():
                ctx = self._zero3.hooks(inner)
            elif inner is not None:
                ctx = torch.autograd.graph.saved_tensors_hooks(*inner)
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                if recompute and torch.is_grad_enabled():
                    self._run_checkpointed(steps, env)
                    dropped = self._drop_dead(env, dropped, self._pos[steps[-1].node], keep)
                else:
                    for s in steps:
                        env[s.node] = self._run_step(s, env)
                        dropped = self._drop_dead(env, dropped, self._pos[s.node], keep)
        return env

    def _run_checkpointed(self, steps: list[NodeStep], env: dict) -> None:
        from torch.utils.checkpoint import checkpoint

        inside = {s.node for s in steps}
        ext: list[str] = []
        for s in steps:
            for a in self.fx_nodes[s.node].all_input_nodes:
                if a.name not in inside and a.op != "get_attr" and a.name not in ext:
                    ext.append(a.name)
        outs = [s.node for s in steps if any(u.name not in inside for u in self.fx_nodes[s.node].users)]

        def fn(*vals):
            local = dict(zip(ext, vals))
            for s in steps:
                local[s.node] = self._run_step(s, local)
            return tuple(local[o] for o in outs)

        res = checkpoint(fn, *[env[e] for e in ext], use_reentrant=False)
        env.update(zip(outs, res))

    def _run_step(self, s: NodeStep, env: dict):
        n = self.fx_nodes[s.node]
        moved = {}
        for src, mv in zip(s.inputs, s.moves):
            if mv is not None and isinstance(env.get(src), DTensor):
                moved[src] = env[src].redistribute(self.mesh, _dt(mv.dst))

        def load(a: fx.Node):
            if a.op == "get_attr":
                fqn = program_alias(self.program, str(a.target), self.gm)
                if fqn in self.params:
                    return self.param_value(fqn, s)
                return _get_attr(self.gm, str(a.target))
            return moved[a.name] if a.name in moved else env[a.name]

        try:
            args = fx.node.map_arg(n.args, load)
            kwargs = fx.node.map_arg(n.kwargs, load)
            if n.op == "call_module" and str(n.target).startswith("_guards"):
                return None  # torch.export's input guards (shape checks of the example batch)
            if n.op == "call_module":
                sub = self.gm.get_submodule(n.target)
                names = self._owner.get(s.node, {})

                def own() -> dict:  # the module's parameters as this node computes with them
                    return {pn: self.param_value(f, s) if f in self.params else getattr(sub, pn)
                            for pn, f in names.items()}

                if args and not kwargs and sync_bn.applies(sub, args[0]):  # batch-local: statistic sums only
                    vals = own()
                    if sync_bn.params_match(args[0], vals.get("weight"), vals.get("bias")):
                        out = sync_bn.sync_batch_norm(sub, args[0], vals.get("weight"), vals.get("bias"))
                    else:  # affine parameters split otherwise: DTensor's rule
                        out = torch.func.functional_call(sub, vals, tuple(args), kwargs, strict=False)
                elif len(args) == 1 and not kwargs and shard_local.conv_applies(sub, args[0]):
                    vals = own()
                    w, b = vals.get("weight", sub.weight), vals.get("bias", sub.bias)
                    if shard_local.conv_params_match(args[0], w, b):  # each rank's rows, no collective
                        out = shard_local.conv(sub, args[0], w, b)
                    else:  # a split weight (tensor-parallel channels): DTensor's rule
                        out = torch.func.functional_call(sub, vals, tuple(args), kwargs, strict=False)
                elif any(self.program.params[f].gather != "none" or f in self.host_params
                         for f in names.values() if f in self.program.params):
                    vals = {pn: self.param_value(f, s) for pn, f in names.items() if f in self.params}
                    out = torch.func.functional_call(sub, vals, tuple(args), kwargs, strict=False)
                else:
                    out = sub(*args, **kwargs)
            elif n.op == "call_function":
                if _is_sdpa(n.target):
                    out = _local_sdpa(n.target, args, kwargs)
                elif _is_assert(n.target):  # export's metadata checks: no data, no sharding rule
                    return None
                elif "wrap_with_set_grad_enabled" in str(n.target):  # export HOP: run its body
                    with torch.set_grad_enabled(bool(args[0])):  # body has export asserts: run whole
                        out = _replicated_fallback(args[1], tuple(args[2:]), kwargs, self.mesh)
                else:
                    fn = n.target
                    if fn in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
                        fn = torch.ops.aten.reshape.default  # as for the method form below
                    out = self._call_with_fallback(s, fn, args, kwargs)
            elif n.op == "call_method":
                # view -> reshape: same values, but reshape's backward copies a non-contiguous
                # local gradient shard where view's backward fails on it under DTensor
                meth = "reshape" if n.target == "view" and isinstance(args[0], DTensor) else n.target
                out = self._call_with_fallback(
                    s, lambda obj, *a, **k: getattr(obj, meth)(*a, **k), args, kwargs)
            else:
                raise RuntimeRefusal(f"unexpected op {n.op!r} in a compute step")
            return self._make_outputs(s, out)
        except (RuntimeRefusal, _StopRecompute):
            raise
        except Exception as e:
            raise RuntimeError(
                f"autopar runtime: node {n.format_node()} failed under placements "
                f"in={[str(m) if m else 'as-is' for m in s.moves]} out="
                f"{['(' + ','.join(map(str, o)) + ')' for o in s.outputs]}: {type(e).__name__}: {e}"
            ) from e

    def _call_with_fallback(self, s: NodeStep, fn, args, kwargs):
        """Run ``fn`` on DTensors; if DTensor has no rule for it under these placements (no
        sharding strategy, or a view that cannot be expressed on the shards), run it on whole
        tensors instead (always correct; the gather is the cost) and note the node in
        ``self.fallbacks`` so the cost can be seen."""
        try:
            return fn(*args, **kwargs)
        except _StopRecompute:
            raise
        except (NotImplementedError, RuntimeError) as e:
            if not any(isinstance(a, DTensor) for a in torch.utils._pytree.tree_leaves((args, kwargs))):
                raise
            self.fallbacks[s.node] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return _replicated_fallback(fn, args, kwargs, self.mesh)

    def _placed(self, out, want):
        """``out`` redistributed to the plan's placements ``want``. A vocab-parallel
        embedding's MaskPartial becomes a plain Partial where that is wanted; any other special
        partial is redistributed with its gradient made ``want`` first (:class:`_GradAs`)."""
        if not isinstance(out, DTensor) or tuple(out.placements) == tuple(want):
            return out
        out = _masked_partial_as_partial(out, want)
        special = any(p.is_partial() and type(p) is not DPartial for p in out.placements)
        out = out.redistribute(self.mesh, want)
        return _GradAs.apply(out, tuple(want)) if special else out

    def _make_outputs(self, s: NodeStep, out):
        if isinstance(out, torch.Tensor):
            out = self.wrap(out, (_R, _R))
            if s.outputs:
                out = self._placed(out, _dt(s.outputs[0]))
            if isinstance(out, DTensor) and out.requires_grad:
                # DTensor's backward of a view (unflatten, flatten) calls view() on the local
                # gradient shard, which fails when that shard is strided (it arrives transposed
                # from a transpose's backward): keep every node's incoming gradient dense.
                out.register_hook(_dense_grad)
            return out
        if isinstance(out, (tuple, list)) and len(out) == len(s.outputs) and all(
                isinstance(o, torch.Tensor) for o in out):
            res = [self._placed(self.wrap(o, (_R, _R)), _dt(pl)) for o, pl in zip(out, s.outputs)]
            return type(out)(res) if isinstance(out, tuple) else res
        return out


try:  # checkpoint's early-stop signal must pass through untouched
    from torch.utils.checkpoint import _StopRecomputationError as _StopRecompute
except ImportError:  # pragma: no cover
    class _StopRecompute(Exception):
        pass


def _dense_grad(g):
    # DTensor.contiguous() looks at the global layout and can return the strided shard as is
    if isinstance(g, DTensor) and not g._local_tensor.is_contiguous():
        return DTensor.from_local(g._local_tensor.contiguous(), g.device_mesh, g.placements,
                                  run_check=False, shape=g.shape, stride=g.stride())
    return g


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    """Make the gradient arriving at ``t`` contiguous: DTensor's to_local backward views it
    into the global layout and fails on a strided gradient (e.g. from ``flatten`` in a loss)."""
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def program_alias(program: Program, name: str, gm: fx.GraphModule) -> str:
    """Canonical fqn of a (possibly tied) parameter name (aliases recorded on the local gm)."""
    aliases = getattr(gm, "_autopar_aliases", {})
    return aliases.get(name, name)


# ---------------------------------------------------------------------------------------
# the module


#: Bytes of gradients summed by one all-reduce. Smaller than DDP's 25 MB (``bucket_cap_mb``):
#: on the 2-core development VM, 25 MB buckets made a 4 x Linear(1024) dp step 1.15-1.18x
#: DDP's (the one bucket waits for the whole backward, then a copy in and out), 4 MB buckets
#: with in-place single-gradient buckets 0.97-1.09x (bench/runtime_overhead.py), while GPT's
#: 53 small gradients still go in a few all-reduces. The cost model prices gradient sync in
#: buckets of the same size (``autopar.solvers.costed.BUCKET_BYTES``).
BUCKET_BYTES = 4 * 2**20
#: The first bucket (the last layers' gradients, ready first) is smaller so its all-reduce
#: starts early: DDP's ``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES`` (1 MiB).
FIRST_BUCKET_BYTES = 1 * 2**20


class _GradBuckets:
    """Gradient all-reduces in buckets, the way DDP does them (one set of buckets per group of
    mesh axes the gradients are pending sums over: dp, tp, or both).

    Parameters are assigned to buckets in reverse registration order (roughly the order the
    backward produces their gradients), up to ``BUCKET_BYTES`` of local gradient each (the
    first ``FIRST_BUCKET_BYTES``, so communication starts early, as in DDP), at the
    first :meth:`finish` (the local gradient sizes are known then). During the last
    microbatch's backward :meth:`ready` marks a gradient final; when every gradient of a
    bucket is final, its local gradients are copied into one flat buffer and an async
    all-reduce of the buffer starts. :meth:`finish` starts the buckets that did not fill
    (unused parameters, a backward run without the hook) and a last one for gradients no
    bucket holds (parameters first used after the first step), waits for all, and copies the
    sums back. Every rank builds the same buckets from the same graph and launches them in
    the same order, which gloo and NCCL require.
    """

    def __init__(self, order: list[str], groups: tuple) -> None:
        self.order = list(reversed(order))
        self.groups = groups  # summed over each in turn: over dp, tp or both
        self.members: list[list[str]] = []
        self.bucket_of: dict[str, int] = {}
        self._ready: dict[int, dict[str, Any]] = {}  # bucket -> fqn -> final grad
        self._works: list[tuple[Any, torch.Tensor, list[Any]]] = []
        self._launched: set[int] = set()
        self._flat: dict[int, torch.Tensor] = {}  # bucket -> its buffer, kept between steps

    def _assign(self, grads: dict[str, Any]) -> None:
        size = 0
        for fqn in self.order:
            if fqn not in grads:
                continue
            loc = grads[fqn]._local_tensor
            nbytes = loc.numel() * loc.element_size()
            cap = FIRST_BUCKET_BYTES if len(self.members) <= 1 else BUCKET_BYTES
            if not self.members or (self.members[-1] and size + nbytes > cap):
                self.members.append([])
                size = 0
            self.members[-1].append(fqn)
            self.bucket_of[fqn] = len(self.members) - 1
            size += nbytes

    def ready(self, fqn: str, grad) -> None:
        b = self.bucket_of.get(fqn)
        if b is None or b in self._launched:
            return  # finish() takes it
        got = self._ready.setdefault(b, {})
        got[fqn] = grad
        if len(got) == len(self.members[b]):
            self._launch(b, [got[f] for f in self.members[b]])

    def _launch(self, b: "int | None", grads: list[Any]) -> None:
        if b is not None:
            self._launched.add(b)
            self._ready.pop(b, None)
        if not grads:
            return
        locs = [g._local_tensor for g in grads]
        if len(locs) == 1 and locs[0].is_contiguous():  # a bucket of one: summed in place, no copies
            buf, flat = locs[0], None
        else:
            numel = sum(t.numel() for t in locs)
            flat = self._flat.get(b) if b is not None else None
            if flat is None or flat.numel() != numel or flat.dtype != locs[0].dtype or flat.device != locs[0].device:
                # one buffer per bucket, reused: a fresh one every step page-faults its memory in
                flat = torch.empty(numel, dtype=locs[0].dtype, device=locs[0].device)
                if b is not None:
                    self._flat[b] = flat
            torch.cat([t.reshape(-1) for t in locs], out=flat)
            buf = flat
        # over two axes: the first sum is waited for before the second starts (rare: a grad
        # Partial on both dp and tp); over one, the all-reduce runs behind the backward
        for grp in self.groups[:-1]:
            dist.all_reduce(buf, group=grp)
        self._works.append((dist.all_reduce(buf, group=self.groups[-1], async_op=True), flat, locs))

    def finish(self, grads: dict[str, Any]) -> None:
        """Sum every gradient in ``grads`` (fqn -> Partial DTensor grad) over this set's
        groups, in place."""
        if not self.members:
            self._assign(grads)
        for b, names in enumerate(self.members):
            if b not in self._launched:
                self._launch(b, [grads[f] for f in names if f in grads])
        late = [g for f, g in grads.items() if f not in self.bucket_of]
        self._launch(None, late)
        for work, flat, locs in self._works:
            work.wait()
            if flat is None:
                continue
            off = 0
            for loc in locs:
                loc.copy_(flat[off:off + loc.numel()].view_as(loc))
                off += loc.numel()
        self._works.clear()
        self._launched.clear()
        self._ready.clear()


class ParallelModule(nn.Module):
    """The model as this rank runs it under a Plan.

    - ``train_step(inputs, targets, loss_fn, optimizer) -> loss``: one global batch (all
      microbatches, grads made exact, optimizer step); returns the global-batch loss as a 0-dim
      tensor, equal on every rank. Works for every plan, pipelines included.
    - ``forward(*inputs)``: the full (global) output on every rank; ``loss_fn(model(x), y).backward()``
      then gives exact grads (plans without pipeline stages only).
    - ``parameters()``: this rank's storage shards (DTensors) - build optimizers over these.
    - ``full_state_dict()``: gathered, unsharded parameters by fqn (for tests; all ranks of a
      stage take part, pipelines gather over pp as well).
    """

    def __init__(self, graph: Graph, plan: Plan, program: Program, rmesh: RankMesh, gm: fx.GraphModule,
                 params: dict):
        super().__init__()
        self.plan = plan
        self.graph = graph
        self.program = program
        self.rmesh = rmesh
        self.gm = gm  # registered: its parameters are this rank's storage shards
        self.local_stages = program.local_stages(rmesh.coords["pp"], plan.mesh["pp"])
        self.local_params = params
        self.executors = {s: Executor(gm, program, rmesh, params, s) for s in self.local_stages}
        self.executor = self.executors[self.local_stages[0]]
        self._defer_sync = False
        self._overlap = False  # set during the last microbatch's backward (see _grad_hook)
        self._bucket_sets: dict[tuple[int, ...], _GradBuckets] = {}  # Partial axes -> buckets
        self._opt = None
        self._opt_key = None
        self._opt_checked: set[int] = set()
        self._views: dict[str, nn.Parameter] = {}  # optimizer's plain views
        self._pipeline = None
        on_device = rmesh.device.type != "cpu"
        #: the plan offloads these gradients (not their weights) to host memory: each is made its
        #: storage placement and moved to the host as soon as autograd finishes it (per
        #: microbatch), so no whole-model gradient is ever held on the device; the optimizer
        #: steps on the host sums (``_host_grads``). On a CPU the host is the device: nothing moves
        self._grads_to_host = frozenset(
            f for f in params if on_device and "grads" in program.params[f].offload
            and "params" not in program.params[f].offload)
        self._host_grads: dict[str, torch.Tensor] = {}
        for fqn, p in params.items():
            p.register_post_accumulate_grad_hook(self._grad_hook(fqn))

    @property
    def is_pipelined(self) -> bool:
        return len(self.program.stages) > 1

    @property
    def device(self) -> torch.device:
        return self.rmesh.device

    # -- grads
    def _grad_hook(self, fqn: str):
        def hook(p):
            if fqn in self._grads_to_host:
                self._sync_one(fqn, p)
                loc = _to_host(p.grad._local_tensor)
                acc = self._host_grads.get(fqn)
                self._host_grads[fqn] = loc if acc is None else acc.add_(loc)
                p.grad = None
                return
            axes = self._sum_axes(p) if self._overlap else ()
            if axes:
                # last microbatch: this grad is final; when its bucket is complete the bucket's
                # all-reduce starts while the rest of the backward runs (DDP's overlap)
                self._buckets(axes).ready(fqn, p.grad)
            elif not self._defer_sync:
                self._sync_one(fqn, p)
        return hook

    def _sum_axes(self, p) -> tuple[int, ...]:
        """Mesh axes (0 = dp, 1 = tp) over which ``p``'s grad is a pending sum that the
        parameter stores replicated, when that is all that differs: such grads are summed in
        buckets. () when the grad needs anything else (then DTensor's redistribute does it)."""
        g = p.grad
        if not isinstance(g, DTensor):
            return ()
        axes = []
        for i, (gp, pp) in enumerate(zip(g.placements, p.placements)):
            if gp == pp:
                continue
            if type(gp) is DPartial and gp.reduce_op == "sum" and pp.is_replicate() and self.plan.mesh[
                    ("dp", "tp")[i]] > 1:
                axes.append(i)
            else:
                return ()
        return tuple(axes)

    def _buckets(self, axes: tuple[int, ...]) -> "_GradBuckets":
        b = self._bucket_sets.get(axes)
        if b is None:
            groups = tuple(self.rmesh.dp_group if i == 0 else self.rmesh.tp_group for i in axes)
            b = self._bucket_sets[axes] = _GradBuckets(list(self.local_params), groups)
        return b

    def _sync_one(self, fqn: str, p) -> None:
        g = p.grad
        if g is None:
            return
        if not isinstance(g, DTensor):
            raise RuntimeError(f"param {fqn!r}: gradient is a plain tensor, expected a DTensor")
        if tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)

    def sync_grads(self) -> None:
        """Make every grad equal to its parameter's storage placement (dp all-reduce etc.).

        The common case - a grad that is ``Partial`` (a pending sum) on dp and/or tp where the
        parameter is ``Replicate``, equal elsewhere - is summed in buckets of about
        ``BUCKET_BYTES`` (one all-reduce of a flat buffer per bucket, as DDP does: one latency
        per bucket, not per parameter), started during the backward of the last microbatch by
        the grad hook (overlapped) or here; everything else goes through DTensor's
        redistribute.
        """
        summed: dict[tuple[int, ...], dict[str, Any]] = {}
        for fqn, p in self.local_params.items():
            axes = self._sum_axes(p)
            if axes:
                summed.setdefault(axes, {})[fqn] = p.grad
            else:
                self._sync_one(fqn, p)
        for axes in sorted(set(summed) | set(self._bucket_sets)):  # the same order on every rank
            self._buckets(axes).finish(summed.get(axes, {}))
        for fqn in (f for grads in summed.values() for f in grads):
            p = self.local_params[fqn]
            p.grad = DTensor.from_local(p.grad._local_tensor, p.device_mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride())

    # -- data
    def _shard_batch(self, x: Any) -> Any:
        """This dp rank's rows of a global-batch tensor."""
        if not isinstance(x, torch.Tensor):
            return x
        dp, i = self.plan.mesh["dp"], self.rmesh.coords["dp"]
        x = x.to(self.device)
        if dp == 1:
            return x
        if x.shape[0] % dp:
            raise RuntimeRefusal(f"batch of {x.shape[0]} rows does not split evenly over dp={dp}")
        return x.chunk(dp, dim=0)[i]

    def _forward_dt(self, inputs: Sequence[Any]) -> DTensor:
        if len(inputs) != len(self.program.graph_inputs):
            raise TypeError(f"model takes {len(self.program.graph_inputs)} inputs "
                            f"{list(self.program.graph_inputs)}, got {len(inputs)}")
        ex = self.executor
        env = {name: ex.wrap(self._shard_batch(x), self.program.input_placement)
               for name, x in zip(self.program.graph_inputs, inputs)}
        ex.begin_step()
        ex.run(env, keep=(self.program.output,))
        out = env[self.program.output]
        if not isinstance(out, DTensor):
            out = ex.wrap(out, (_R, _R))
        want = _dt(self.program.output_placement)
        return out.redistribute(ex.mesh, want) if tuple(out.placements) != tuple(want) else out

    def forward(self, *inputs):
        if self.is_pipelined:
            raise RuntimeError(
                f"this plan is a {len(self.program.stages)}-stage pipeline ({self.program.schedule}): "
                f"call model.train_step(inputs, targets, loss_fn, optimizer) instead of model(x); "
                f"a pipeline interleaves forward and backward over microbatches"
            )
        return self._forward_dt(inputs).full_tensor()

    # -- training
    def _optimizer(self, optimizer) -> torch.optim.Optimizer:
        if isinstance(optimizer, torch.optim.Optimizer):
            ours = {id(p) for p in self.parameters()} | {id(p) for p in self._views.values()}
            for g in optimizer.param_groups:
                for p in g["params"]:
                    if id(p) not in ours:
                        raise ValueError(
                            "optimizer holds parameters that are not this ParallelModule's: build it "
                            "over model.parameters() after apply_plan, or pass a factory "
                            "`lambda params: torch.optim.Adam(params, lr=...)`")
            if self._offloaded() and self.device.type != "cpu":
                raise ValueError("this plan offloads optimizer state to the host: pass an optimizer "
                                 "factory `lambda params: ...` so autopar builds it over host copies")
            self._check_optimizer(optimizer)
            return optimizer
        if not callable(optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or a factory, got {type(optimizer)}")
        if self._opt is None or self._opt_key is not optimizer:
            self._opt = optimizer(self.optimizer_params())
            self._opt_key = optimizer
            self._check_optimizer(self._opt)
        return self._opt

    def _check_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """Warn once per optimizer when it is not what the plan's figures were priced for
        (:func:`autopar.runtime.optimizers.mismatch`); the run stays exact either way."""
        if id(opt) in self._opt_checked:
            return
        self._opt_checked.add(id(opt))
        why = optimizers.mismatch(self.plan.training.optimizer, opt)
        if why:
            warnings.warn(why, optimizers.PlanOptimizerMismatch, stacklevel=4)

    def _offloaded(self) -> list[str]:
        return [f for f in self.local_params if "optimizer_state" in self.program.params[f].offload]

    def optimizer_params(self) -> list[nn.Parameter]:
        """What an optimizer factory is called with: plain tensors holding this rank's shards.

        The optimizer steps on each parameter's LOCAL shard as a plain tensor (no DTensor
        dispatch per optimizer op): exact for elementwise optimizers (Adam, AdamW, SGD - what a
        Plan's ``training.optimizer`` names) on any placement, and for any optimizer on
        replicated parameters. The views share storage with the shards, so nothing is copied.
        ZeRO-Offload: for parameters whose optimizer state is offloaded, the view is a host (CPU)
        copy instead; the step runs there and the result is copied back (on a CPU run the
        "copy" is the shard itself).
        """
        offloaded = set(self._offloaded())
        out = []
        for fqn, p in self.local_params.items():
            if fqn not in self._views:
                loc = p._local_tensor.detach()
                if fqn in offloaded and loc.device.type != "cpu":
                    loc = loc.cpu()
                self._views[fqn] = nn.Parameter(loc, requires_grad=p.requires_grad)
            out.append(self._views[fqn])
        return out

    def _optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        for fqn, h in self._views.items():
            if fqn in self._host_grads:
                h.grad = self._host_grads[fqn].to(h.device)
                continue
            g = self.local_params[fqn].grad
            h.grad = None if g is None else g._local_tensor.to(h.device)
        self._host_grads = {}
        if self.device.type == "cuda" and any(e.host_params for e in self.executors.values()):
            # host-held weights are read by asynchronous copies to the device; the host step
            # below writes them in place, so every copy queued by this step must be done
            torch.cuda.synchronize(self.device)
        opt.step()
        with torch.no_grad():
            for fqn, h in self._views.items():
                loc = self.local_params[fqn]._local_tensor
                if loc.data_ptr() != h.data_ptr():
                    loc.copy_(h.detach(), non_blocking=True)

    def train_step(self, inputs, targets, loss_fn: Callable, optimizer, *, loss_over: str = "shard") -> torch.Tensor:
        """One optimizer step on one global batch; returns the global-batch loss on every rank.

        ``loss_over="shard"`` (the plan contract): each dp rank computes ``loss_fn`` on its rows
        (per microbatch) and the results are averaged: exact for mean-reduced losses, which see
        equal shards. For a loss that is not a plain mean over rows (``ignore_index`` in a
        masked-LM loss, sums), pass ``loss_over="global"``: the output is gathered over dp and the
        loss computed once on the whole batch (an all-gather of the output; no pipeline and one
        microbatch only).
        """
        if loss_over not in ("shard", "global"):
            raise ValueError(f"loss_over must be 'shard' or 'global', got {loss_over!r}")
        if loss_over == "global" and (self.is_pipelined or self.program.num_microbatches > 1):
            raise RuntimeRefusal(
                f"loss_over='global' needs the whole batch in one forward; this plan has "
                f"{len(self.program.stages)} stage(s) and {self.program.num_microbatches} microbatches")
        if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (tuple, list)):
            inputs = (inputs,)
        opt = self._optimizer(optimizer)
        opt.zero_grad(set_to_none=True)
        self._host_grads = {}
        for p in self.local_params.values():
            p.grad = None
        if self.is_pipelined:
            from autopar.runtime.pipeline import pipeline_step

            loss = pipeline_step(self, inputs, targets, loss_fn)
        else:
            loss = self._accumulate(inputs, targets, loss_fn, loss_over)
        self._optimizer_step(opt)
        return loss

    def _accumulate(self, inputs, targets, loss_fn, loss_over: str = "shard") -> torch.Tensor:
        if loss_over == "global":
            self._defer_sync = True
            try:
                loss = loss_fn(self._forward_dt(inputs).full_tensor(), targets.to(self.device))
                loss.backward()
            finally:
                self._defer_sync = False
            self.sync_grads()
            return loss.detach()
        m = self.program.num_microbatches
        dp = self.plan.mesh["dp"]
        xs = [x.chunk(m, dim=0) if isinstance(x, torch.Tensor) else [x] * m for x in inputs]
        ys = targets.chunk(m, dim=0)
        total = torch.zeros((), device=self.device)
        self._defer_sync = True
        try:
            for i in range(m):
                out = _contiguous_grad(self._forward_dt([x[i] for x in xs]).to_local())
                loss = loss_fn(out, self._shard_batch(ys[i])) / (m * dp)
                self._overlap = i == m - 1
                try:
                    loss.backward()
                finally:
                    self._overlap = False
                total += loss.detach()
        finally:
            self._defer_sync = False
        self.sync_grads()
        if dp > 1:
            dist.all_reduce(total, group=self.rmesh.dp_group)
        return total

    # -- state
    def local_param_bytes(self) -> int:
        """Bytes of this rank's parameter shards (what it stores, not what it gathers)."""
        return sum(t.numel() * t.element_size()
                   for t in (getattr(p, "_local_tensor", p) for p in self.local_params.values()))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded parameters by canonical fqn, on every rank (collective over all ranks)."""
        out = {}
        for fqn in self.graph.params:
            p = self.local_params.get(fqn)
            if p is not None and p._local_tensor.device != self.device:  # host-held weights
                p = DTensor.from_local(p._local_tensor.to(self.device), p.device_mesh, p.placements,
                                       run_check=False, shape=p.shape, stride=p.stride())
            full = p.full_tensor().detach().cpu() if p is not None else None
            if self.is_pipelined:
                lay = self.program.params[fqn]
                src_rank = self.program.stages[lay.stage].ranks[0]
                buf = full if full is not None and dist.get_rank() == src_rank else \
                    torch.empty(self.graph.params[fqn].shape, dtype=getattr(torch, self.graph.params[fqn].dtype))
                buf = buf.to(self.device).contiguous()
                dist.broadcast(buf, src=src_rank)
                full = buf.cpu()
            out[fqn] = full
        return out


# ---------------------------------------------------------------------------------------
# entry point


def _local_gm(graph: Graph) -> fx.GraphModule:
    """A copy of graph.gm whose parameters are meta placeholders (no weight data is copied)."""
    memo = {}
    for _, p in graph.gm.named_parameters(remove_duplicate=False):
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), p.requires_grad)
    gm = copy.deepcopy(graph.gm, memo)
    aliases = dict(graph.param_aliases)
    gm._autopar_aliases = aliases
    return gm


def _set_param(gm: nn.Module, fqn: str, value) -> None:
    owner, _, name = fqn.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if name in mod._parameters:
        del mod._parameters[name]
    if isinstance(value, nn.Parameter):
        mod.register_parameter(name, value)
    else:
        setattr(mod, name, value)


def _materialize_params(graph: Graph, program: Program, rmesh: RankMesh, gm: fx.GraphModule,
                        stages: tuple[int, ...], seed: int | None) -> dict[str, nn.Parameter]:
    """Storage shards of these stages' parameters, installed into ``gm`` (aliases included)."""
    src = dict(graph.gm.named_parameters(remove_duplicate=False))
    aliases_of: dict[str, list[str]] = {}
    for alias, canon in graph.param_aliases.items():
        aliases_of.setdefault(canon, []).append(alias)
    owner_cache: dict[str, nn.Module] = {}
    params: dict[str, nn.Parameter] = {}
    n_stages = len(program.stages)
    for fqn, lay in program.params.items():
        names = [fqn] + aliases_of.get(fqn, [])
        if n_stages > 1 and lay.stage not in stages:
            for nm in names:
                _set_param(gm, nm, torch.empty(lay.shape, device="meta"))
            continue
        full = src[fqn]
        if full.is_meta:
            full = _init_from_owner(graph.module, fqn, seed if seed is not None else 0, owner_cache)
        placements = _dt(lay.storage)
        on_host = _weights_on_host(lay, rmesh.device)
        with torch.no_grad():
            loc = _local_slice(full.detach(), rmesh.stage_mesh, placements)
            # offloaded weights stay in pinned host memory (asynchronous copies to the device)
            loc = loc.clone().pin_memory() if on_host else loc.to(rmesh.device).clone()
        if on_host:
            dt = _host_dtensor(loc, rmesh.stage_mesh, placements, full)
        else:
            dt = DTensor.from_local(loc, rmesh.stage_mesh, placements, run_check=False,
                                    shape=full.shape, stride=full.stride() if not full.is_meta else None)
        p = nn.Parameter(dt, requires_grad=full.requires_grad)
        for nm in names:
            _set_param(gm, nm, p)
        params[fqn] = p
        if len(owner_cache) > 4:
            owner_cache.clear()
    for name, b in list(gm.named_buffers()):
        if b.is_meta:
            raise RuntimeRefusal(f"buffer {name!r} is on the meta device; autopar cannot recreate buffers")
        owner, _, bname = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        mod._buffers[bname] = DTensor.from_local(b.to(rmesh.device), rmesh.stage_mesh,
                                                 [DReplicate(), DReplicate()], run_check=False)
    return params


def _host_dtensor(loc: torch.Tensor, mesh, placements, full: torch.Tensor) -> DTensor:
    """A DTensor on ``mesh`` (a GPU mesh) whose local shard stays in host memory.

    ``DTensor.from_local`` moves the shard to the mesh's device type, so the DTensor is built
    from its spec directly (the constructor autograd itself uses for DTensor gradients). Only
    :meth:`Executor.gather_param` reads it as a whole: it copies the shard to the device first."""
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    stride = torch.empty(full.shape, device="meta").stride()
    spec = DTensorSpec(mesh, tuple(placements), tensor_meta=TensorMeta(tuple(full.shape), stride, loc.dtype))
    return DTensor(loc, spec, requires_grad=False)


def _init_from_owner(module: nn.Module, fqn: str, seed: int, cache: dict) -> torch.Tensor:
    owner, _, pname = fqn.rpartition(".")
    if owner not in cache:
        cache[owner] = _init_owner(module, owner, seed)
    return getattr(cache[owner], pname)


def apply_plan(graph_or_module: Graph | nn.Module, plan: Plan, *, example_inputs=None,
               device: torch.device | str | None = None, seed: int | None = None,
               mesh: RankMesh | None = None) -> ParallelModule:
    """Build this rank's :class:`ParallelModule` for ``plan`` (call on every rank).

    ``graph_or_module``: a captured Graph, or a module (then ``example_inputs``, one global batch,
    are needed to capture it). ``seed`` initialises meta-device weights (see :func:`materialize`);
    real weights are used as they are. ``mesh``: a :class:`RankMesh` already built for the plan's
    degrees (``build_mesh(..., ranks=...)`` runs a plan on part of the world); by default the
    whole world. Raises :class:`RuntimeRefusal` for plans it cannot run exactly, naming the node
    or parameter at fault.
    """
    # heap memory kept between steps instead of faulted in again (see runtime.host_memory)
    configure_host_allocator()
    if isinstance(graph_or_module, Graph):
        graph = graph_or_module
    elif isinstance(graph_or_module, nn.Module):
        if example_inputs is None:
            raise TypeError("apply_plan(module, plan) needs example_inputs (one global batch) to capture it")
        graph = capture(graph_or_module, example_inputs, ir=plan.model.ir if plan.model.ir in ("fx", "export") else "auto")
    else:
        raise TypeError(f"apply_plan needs a Graph or an nn.Module, got {type(graph_or_module).__name__}")
    fp = graph.fingerprint()
    if plan.model.fingerprint and plan.model.fingerprint != fp:
        raise RuntimeRefusal(f"plan was made for graph fingerprint {plan.model.fingerprint}, this model's "
                             f"is {fp} (different model, shapes or batch): re-plan it")
    program = plan_steps(graph, plan)
    if plan.pipeline.num_microbatches > 1:
        bn = sync_bn.training_batch_norms(graph.gm)
        if bn:
            raise RuntimeRefusal(
                f"batch norm {bn[0]!r}{' (and ' + str(len(bn) - 1) + ' more)' if len(bn) > 1 else ''} normalises "
                f"with the statistics of the batch it sees; with {plan.pipeline.num_microbatches} microbatches "
                f"each sees 1/{plan.pipeline.num_microbatches} of it, which is not one device's result: re-plan "
                f"with num_microbatches=1 (no pipeline), or put the model in eval() mode")
    if mesh is not None and dict(mesh.degrees) != check_mesh(dict(plan.mesh)):
        raise ValueError(f"apply_plan: mesh degrees {dict(mesh.degrees)} are not the plan's {dict(plan.mesh)}")
    rmesh = mesh if mesh is not None else build_mesh(plan.mesh, device)
    stages = program.local_stages(rmesh.coords["pp"], plan.mesh["pp"])
    gm = _local_gm(graph)
    params = _materialize_params(graph, program, rmesh, gm, stages, seed)
    return ParallelModule(graph, plan, program, rmesh, gm, params)
