"""The runtime's batch norm (runtime/sync_batch_norm.py) against torch's on one process.

The multi-rank statistics are checked end to end by the exactness matrix (ResNet under data
parallel plans on 2 and 4 gloo ranks); these pin the kernels and the bookkeeping.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from autopar.runtime import sync_batch_norm as sbn


@pytest.fixture(scope="module")
def mesh(one_rank_mesh):
    return one_rank_mesh


@pytest.mark.parametrize("offset", [0.0, 50.0])
@pytest.mark.parametrize("shape,affine", [((16, 8, 5, 5), True), ((8, 5, 7), False), ((6, 4), True)])
def test_statistics_kernel_matches_torch(shape, affine, offset):
    """The multi-rank kernel with no other rank: values and gradients as close to an fp64
    batch norm as torch's own fp32 one is (within 2x), also for data whose mean is far from
    zero (where a one-pass variance would lose digits)."""
    torch.manual_seed(0)
    c = shape[1]
    x64 = torch.randn(*shape, dtype=torch.float64) * 3 + offset
    w64 = torch.rand(c, dtype=torch.float64) + 0.5 if affine else None
    b64 = torch.randn(c, dtype=torch.float64) if affine else None
    dy = torch.randn(shape, dtype=torch.float64)

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (x64, w64, b64) if t is not None]
        y = fn(*ins) if affine else fn(ins[0], None, None)
        return (y, *torch.autograd.grad(y, ins, dy.to(dtype)))

    def torch_bn(x, w, b):
        return F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)

    class Ours(torch.autograd.Function):  # the multi-rank forward and backward, no other rank
        @staticmethod
        def forward(ctx, x, w, b):
            y, mean, var = sbn._sync_forward(x, w, b, 1e-5, [], x.numel() // c)
            ctx.save_for_backward(x, w, mean, var)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, w, mean, var = ctx.saved_tensors
            return sbn._sync_backward(dy.contiguous(), x, w, mean, var, 1e-5, [], x.numel() // c)

    def ours(x, w, b):
        return Ours.apply(x, w, b)

    truth = run(torch_bn, torch.float64)
    for got, ref, want in zip(run(ours, torch.float32), run(torch_bn, torch.float32), truth):
        err = (got.double() - want).abs().max().item()
        ref_err = (ref.double() - want).abs().max().item()
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("placement", [Replicate(), Shard(0)])
def test_unsplit_batch_is_torch_batch_norm(mesh, momentum, placement):
    """No rank shares the batch (a one-rank mesh): output, gradients and running statistics
    are nn.BatchNorm2d's, over three steps."""
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(6, momentum=momentum)
    mine = nn.BatchNorm2d(6, momentum=momentum)
    mine.load_state_dict(ref.state_dict())
    w = distribute_tensor(mine.weight.detach().clone(), mesh, [Replicate(), Replicate()]).requires_grad_()
    b = distribute_tensor(mine.bias.detach().clone(), mesh, [Replicate(), Replicate()]).requires_grad_()
    for step in range(3):
        x = torch.randn(4, 6, 3, 3) * (step + 1) + step
        xd = distribute_tensor(x, mesh, [placement, Replicate()])
        assert sbn.applies(mine, xd) and sbn.params_match(xd, w, b)
        out = sbn.sync_batch_norm(mine, xd, w, b)
        want = ref(x)
        assert isinstance(out, DTensor) and out.placements == xd.placements
        torch.testing.assert_close(out.full_tensor(), want)
        dy = torch.randn_like(want)
        gw, gb = torch.autograd.grad(out.to_local(), (w, b), dy)
        rw, rb = torch.autograd.grad(want, (ref.weight, ref.bias), dy)
        torch.testing.assert_close(gw.full_tensor(), rw)
        torch.testing.assert_close(gb.full_tensor(), rb)
    torch.testing.assert_close(mine.running_mean, ref.running_mean)
    torch.testing.assert_close(mine.running_var, ref.running_var)
    assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_which_batch_norms_run_here(mesh):
    bn = nn.BatchNorm2d(4)
    x = distribute_tensor(torch.randn(2, 4, 3, 3), mesh, [Shard(0), Replicate()])
    assert sbn.applies(bn, x)
    assert not sbn.applies(bn, distribute_tensor(torch.randn(2, 4, 3, 3), mesh, [Shard(2), Replicate()]))
    assert not sbn.applies(bn.eval(), x)
    assert not sbn.applies(nn.LayerNorm(4).train(), x)
    rep = distribute_tensor(torch.ones(4), mesh, [Replicate(), Replicate()])
    chan = distribute_tensor(torch.ones(4), mesh, [Replicate(), Shard(0)])
    assert sbn.params_match(x, rep, None)
    assert not sbn.params_match(x, chan, rep)  # x's channels are whole on tp: so must the weight be
    xc = distribute_tensor(torch.randn(2, 4, 3, 3), mesh, [Shard(0), Shard(1)])
    assert sbn.params_match(xc, chan, chan) and not sbn.params_match(xc, rep, rep)
    assert not sbn.params_match(x, torch.ones(4))  # a plain tensor: not the runtime's parameter
