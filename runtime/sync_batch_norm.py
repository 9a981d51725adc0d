"""Training-mode batch norm over a batch sharded across ranks, with one device's numbers.

Why: a plan that shards the batch of a CNN on dp must normalise with the statistics of the
whole batch, or its loss is not the single-device loss. DTensor's own ``batch_norm`` gets
there by all-gathering the activation (the whole batch on every rank: an all-gather of every
BN input, and replicated compute). This is what SyncBatchNorm does instead: each rank reduces
its shard to per-channel sums and only those (``C`` floats) are all-reduced - twice in the
forward (the sum, then the centred sum of squares, for a two-pass variance as accurate as one
device's) and once in the backward (``sum dy`` and ``sum dy * x_hat`` together).

The weight and bias gradients leave as local partial sums (DTensor ``Partial`` on the sharding
axes), summed with the other gradients by the runtime's bucketed all-reduce. Running
statistics are updated identically on every rank from the global mean and unbiased variance,
with ``momentum`` (or the cumulative average when it is None), as ``nn.BatchNorm`` does.

Speed: the statistics are the only thing that needs the other ranks, so everything else is
torch's fused kernels. The normalisation is one ``batch_norm`` call in eval form with the
global mean and variance, and the backward takes both per-channel sums and ``dy * invstd * w``
from one ``native_batch_norm_backward`` call. When no rank shares the batch (a one-rank mesh
axis, as in a one-process plan), it is the plain fused training kernel on the local tensor.
On the 2-core VM the single-op chain's forward took 105 us where torch's fused training
kernel takes 47 (a 16x32x8x8 input; this forward 85), and the accuracy bench's ResNet spent
309 us a batch-norm node in the runtime's forward against 91 us in eager PyTorch.

The whole node is one autograd.Function from DTensors to a DTensor
(:mod:`autopar.runtime.shard_local`): x, weight and bias used to cross three ``to_local``
nodes and the output a ``from_local`` node, each backward building a ``DTensorSpec``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard

from autopar.runtime import shard_local
from autopar.runtime.shard_local import batch_dims, local_of, partial_on


def _batch_or_channel(p) -> bool:
    return isinstance(p, DReplicate) or (isinstance(p, DShard) and p.dim in (0, 1))


def applies(module: nn.Module, x) -> bool:
    """A training-mode BatchNorm module whose input is split at most along its batch and its
    channels: run it here (its affine parameters must match: :func:`params_match`)."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
            and isinstance(x, DTensor) and x.dim() >= 2 and all(_batch_or_channel(p) for p in x.placements))


def params_match(x: DTensor, *params) -> bool:
    """Every affine parameter given is absent, or a DTensor on ``x``'s mesh split on the mesh
    axes that split ``x``'s channels and whole on the others: each rank then holds the
    parameters of its own channels."""
    def ok(p) -> bool:
        if not isinstance(p, DTensor) or p.device_mesh != x.device_mesh:
            return False
        return all(isinstance(q, DShard) and q.dim == 0 if isinstance(xp, DShard) and xp.dim == 1
                   else isinstance(q, DReplicate) for xp, q in zip(x.placements, p.placements))
    return all(p is None or ok(p) for p in params)


def training_batch_norms(gm) -> list[str]:
    """Nodes of ``gm`` that normalise with batch statistics: training-mode BatchNorm modules,
    and functional batch norms called with ``training=True`` (torch.export graphs)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or not mod.track_running_stats):
                out.append(str(n.target))
        elif n.op == "call_function" and "batch_norm" in str(n.target):
            training = n.kwargs.get("training", n.args[5] if len(n.args) > 5 else False)
            if training is True:
                out.append(n.name)
    return out


def _all_reduce(t: torch.Tensor, groups) -> torch.Tensor:
    for g in groups:
        dist.all_reduce(t, group=g)
    return t


def _shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _sync_forward(x, weight, bias, eps: float, groups, count: int):
    """``(y, mean, var)``: ``x`` normalised with the statistics of the whole batch (biased
    variance, two passes), every rank's local rows reduced to per-channel sums."""
    dims = [0, *range(2, x.dim())]
    shape = _shape(x)
    mean = _all_reduce(x.sum(dims), groups) / count
    xc = x - mean.view(shape)
    var = _all_reduce((xc * xc).sum(dims), groups) / count
    del xc
    # eval form: normalise with the given (global) statistics, one fused kernel
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps), mean, var


def _sync_backward(dy, x, weight, mean, var, eps: float, groups, count: int):
    """``(dx, dweight, dbias)`` of :func:`_sync_forward`; the affine gradients are local
    partial sums, ``dx`` the exact gradient (one all-reduce of ``sum dy``, ``sum dy * x_hat``)."""
    shape = _shape(x)
    # eval-form backward: dy * invstd * w, sum(dy * x_hat) and sum(dy), fused
    dx, s_dyxhat, s_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, mean, var, None, None, False, eps, [True, True, True])
    gw = s_dyxhat.clone() if weight is not None else None  # local partial sums
    gb = s_dy.clone() if weight is not None else None
    sums = _all_reduce(torch.stack([s_dy, s_dyxhat]), groups)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight
    # dx = scale * (dy - sum(dy)/N - x_hat * sum(dy * x_hat)/N), x_hat = (x - mean) * invstd
    k = (scale * invstd * sums[1] / count).view(shape)
    c = (scale * sums[0] / count).view(shape)
    xc = x - mean.view(shape)
    dx.sub_(xc.mul_(k).add_(c))
    return dx, gw, gb


def _count_batch(module: nn.modules.batchnorm._BatchNorm) -> float:
    """nn.BatchNorm's bookkeeping before a training forward, on the local buffers: count the
    batch and return the running statistics' update factor (``momentum``, or 1/n for the
    cumulative average when it is None)."""
    factor = 0.0 if module.momentum is None else module.momentum
    if module.track_running_stats and module.num_batches_tracked is not None:
        with torch.no_grad():
            local_of(module.num_batches_tracked).add_(1)
        if module.momentum is None:  # cumulative moving average
            factor = 1.0 / float(local_of(module.num_batches_tracked))
    return factor


class _BatchNormOnShards(torch.autograd.Function):
    """DTensor x, weight, bias in; DTensor y out; one autograd node (as
    :mod:`autopar.runtime.shard_local`): the local tensors are normalised with torch's fused
    training kernels when no rank shares the batch (``groups`` empty), else with the global
    statistics (eval-form forward, fused backward, the sums all-reduced)."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, groups, count: int, grad_placements):
        xl, wl, bl = x._local_tensor, local_of(weight), local_of(bias)
        running = module.track_running_stats and module.running_mean is not None
        ctx.groups, ctx.eps, ctx.count = groups, module.eps, count
        ctx.mesh, ctx.x_placements, ctx.grad_placements = x.device_mesh, x.placements, grad_placements
        ctx.has_weight = weight is not None
        if not groups:  # nobody else holds part of this batch: the plain training kernel
            factor = _count_batch(module)
            rm = local_of(module.running_mean) if running else None
            rv = local_of(module.running_var) if running else None
            y, save_mean, save_invstd = torch.native_batch_norm(xl, wl, bl, rm, rv, True, factor, module.eps)
            ctx.save_for_backward(xl, wl, rm, rv, save_mean, save_invstd)
        else:
            y, mean, var = _sync_forward(xl, wl, bl, module.eps, groups, count)
            if running:
                factor = _count_batch(module)
                unbiased = var * (count / max(1, count - 1))
                local_of(module.running_mean).mul_(1 - factor).add_(mean, alpha=factor)
                local_of(module.running_var).mul_(1 - factor).add_(unbiased, alpha=factor)
            ctx.save_for_backward(xl, wl, mean, var)
        return shard_local.wrap_local(y, x.device_mesh, x.placements)

    @staticmethod
    def backward(ctx, dy):
        dyl = shard_local.grad_local(dy, ctx.x_placements).contiguous()
        need = list(ctx.needs_input_grad[:3])
        if not ctx.groups:
            xl, wl, rm, rv, save_mean, save_invstd = ctx.saved_tensors
            dx, dw, db = torch.ops.aten.native_batch_norm_backward(
                dyl, xl, wl, rm, rv, save_mean, save_invstd, True, ctx.eps, need)
        else:
            xl, wl, mean, var = ctx.saved_tensors
            dx, dw, db = _sync_backward(dyl, xl, wl, mean, var, ctx.eps, ctx.groups, ctx.count)
        wrap = lambda t, pl: shard_local.wrap_local(t, ctx.mesh, pl) if t is not None else None  # noqa: E731
        return (wrap(dx, ctx.x_placements) if need[0] else None,
                wrap(dw, ctx.grad_placements) if need[1] and ctx.has_weight else None,
                wrap(db, ctx.grad_placements) if need[2] and ctx.has_weight else None,
                None, None, None, None)


def sync_batch_norm(module: nn.modules.batchnorm._BatchNorm, x: DTensor, weight, bias) -> DTensor:
    """``module(x)`` in training mode for a DTensor ``x`` split at most along its batch and
    channels (:func:`applies`); ``weight``/``bias`` are the module's (DTensor) affine
    parameters as the runtime holds them (:func:`params_match`), or None."""
    mesh = x.device_mesh
    on = batch_dims(x)
    groups = [mesh.get_group(i) for i in on if mesh.size(i) > 1]
    local = x._local_tensor
    count = local.numel() // local.shape[1]
    for i in on:
        count *= mesh.size(i)
    # the affine gradients: local partial sums over the batch axes, as in any placement
    grad_pl = partial_on(on, mesh, weight.placements) if isinstance(weight, DTensor) else None
    return _BatchNormOnShards.apply(x, weight, bias, module, groups, count, grad_pl)

