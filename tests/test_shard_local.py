"""runtime/shard_local.py on one process: a convolution run on each rank's rows as one autograd
node gives nn.Conv's values and gradients, refuses what it cannot run, and reuses its specs.
The multi-rank cases (batch split on dp, a tp axis beside it) are in the exactness matrix."""
import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from autopar.runtime import shard_local as sl


@pytest.fixture(scope="module")
def mesh(one_rank_mesh):
    return one_rank_mesh


CONVS = [
    lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 6, 3, padding=(1, 2), dilation=2, groups=2, bias=False),
    lambda: nn.Conv3d(2, 3, (1, 3, 3), stride=(1, 2, 1)),
]


@pytest.mark.parametrize("make", CONVS, ids=["conv1d", "conv2d_groups", "conv3d"])
@pytest.mark.parametrize("placement", [Replicate(), Shard(0)])
def test_conv_matches_nn_conv(mesh, make, placement):
    torch.manual_seed(0)
    ref = make()
    x = torch.randn(4, ref.in_channels, *([9] * (ref.weight.dim() - 2)), requires_grad=True)
    rep = [Replicate(), Replicate()]
    w = distribute_tensor(ref.weight.detach().clone(), mesh, rep).requires_grad_()
    b = distribute_tensor(ref.bias.detach().clone(), mesh, rep).requires_grad_() if ref.bias is not None else None
    xd = distribute_tensor(x.detach().clone(), mesh, [placement, Replicate()]).requires_grad_()
    assert sl.conv_applies(ref, xd) and sl.conv_params_match(xd, w, b)
    out = sl.conv(ref, xd, w, b)
    want = ref(x)
    assert isinstance(out, DTensor) and out.placements == xd.placements and out.shape == want.shape
    torch.testing.assert_close(out.full_tensor(), want)
    dy = torch.randn_like(want)
    ins = [xd, w] + ([b] if b is not None else [])
    got = torch.autograd.grad(out, ins, distribute_tensor(dy, mesh, list(out.placements)))
    refs = torch.autograd.grad(want, [x, ref.weight] + ([ref.bias] if b is not None else []), dy)
    for g, r in zip(got, refs):
        assert isinstance(g, DTensor)
        torch.testing.assert_close(g.full_tensor(), r)


def test_conv_refuses_what_it_cannot_run(mesh):
    x = distribute_tensor(torch.randn(4, 4, 8, 8), mesh, [Shard(0), Replicate()])
    assert not sl.conv_applies(nn.Conv2d(4, 4, 3, padding="same"), x)  # padding given as a word
    assert not sl.conv_applies(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), x)
    assert not sl.conv_applies(nn.ConvTranspose2d(4, 4, 3), x)
    channels = distribute_tensor(torch.randn(4, 4, 8, 8), mesh, [Replicate(), Shard(1)])
    assert not sl.conv_applies(nn.Conv2d(4, 4, 3), channels)  # channel-split: DTensor's rule
    split_w = distribute_tensor(torch.randn(4, 4, 3, 3), mesh, [Replicate(), Shard(0)])
    assert not sl.conv_params_match(x, split_w, None)


def test_wrap_local_reuses_its_spec(mesh):
    t = torch.randn(3, 5)
    a = sl.wrap_local(t, mesh, (Shard(0), Replicate()))
    n = len(sl._SPECS)
    b = sl.wrap_local(torch.randn(3, 5), mesh, (Shard(0), Replicate()))
    assert len(sl._SPECS) == n  # built once for this layout
    assert a._spec is not b._spec and a._spec == b._spec  # handed out as copies
    assert a.shape == (3, 5) and a._local_tensor is t


def test_incoming_gradient_is_brought_to_the_input_placements(mesh):
    g = torch.randn(4, 6)
    same = DTensor.from_local(g, mesh, [Shard(0), Replicate()])
    assert sl.grad_local(same, (Shard(0), Replicate())) is same._local_tensor
    pending = DTensor.from_local(g, mesh, [Shard(0), Partial()])  # e.g. from a row-parallel consumer
    torch.testing.assert_close(sl.grad_local(pending, (Shard(0), Replicate())), g)
    assert sl.grad_local(g, (Shard(0), Replicate())) is g
