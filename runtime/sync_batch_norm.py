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
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial as DPartial
from torch.distributed.tensor import Shard as DShard


def batch_sharded_dims(x) -> list[int]:
    """Mesh dims on which DTensor ``x`` is sharded along its batch (dim 0)."""
    if not isinstance(x, DTensor):
        return []
    return [i for i, p in enumerate(x.placements) if isinstance(p, DShard) and p.dim == 0]


def applies(module: nn.Module, x) -> bool:
    """A training-mode BatchNorm module whose input is batch-sharded: run it here."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
            and bool(batch_sharded_dims(x)) and x.dim() >= 2)


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


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, groups, count: int):
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        mean = _all_reduce(x.sum(dims), groups) / count
        xc = x - mean.view(shape)
        var = _all_reduce((xc * xc).sum(dims), groups) / count
        invstd = torch.rsqrt(var + eps)
        xhat = xc * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.groups, ctx.count, ctx.dims, ctx.shape = groups, count, dims, shape
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape, count = ctx.dims, ctx.shape, ctx.count
        sums = torch.stack([dy.sum(dims), (dy * xhat).sum(dims)])
        gw = sums[1].clone() if weight is not None else None  # local partial sums
        gb = sums[0].clone() if weight is not None else None
        _all_reduce(sums, ctx.groups)
        scale = invstd if weight is None else invstd * weight
        dx = scale.view(shape) * (dy - sums[0].view(shape) / count - xhat * (sums[1].view(shape) / count))
        return dx, gw, gb, None, None, None


def sync_batch_norm(module: nn.modules.batchnorm._BatchNorm, x: DTensor, weight, bias) -> DTensor:
    """``module(x)`` in training mode for a batch-sharded DTensor ``x``; ``weight``/``bias``
    are the module's (DTensor) affine parameters as the runtime holds them, or None."""
    mesh = x.device_mesh
    on = batch_sharded_dims(x)
    groups = [mesh.get_group(i) for i in on]
    local = x.to_local()
    count = local.numel() // local.shape[1]
    for i in on:
        count *= mesh.size(i)

    def local_param(p):
        if p is None:
            return None
        if not isinstance(p, DTensor):
            return p
        grad_pl = [DPartial() if i in on else pl for i, pl in enumerate(p.placements)]
        return p.to_local(grad_placements=grad_pl)

    y, mean, var = _SyncBatchNorm.apply(local, local_param(weight), local_param(bias), module.eps, groups, count)
    if module.track_running_stats and module.running_mean is not None:
        with torch.no_grad():
            if module.num_batches_tracked is not None:
                _local(module.num_batches_tracked).add_(1)
            if module.momentum is None:  # cumulative moving average
                factor = 1.0 / float(_local(module.num_batches_tracked))
            else:
                factor = module.momentum
            _local(module.running_mean).mul_(1 - factor).add_(mean, alpha=factor)
            unbiased = var * (count / max(1, count - 1))
            _local(module.running_var).mul_(1 - factor).add_(unbiased, alpha=factor)
    return DTensor.from_local(y, mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride())


def _local(t):
    return t._local_tensor if isinstance(t, DTensor) else t
