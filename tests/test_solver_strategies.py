"""Per-op sharding rules: the placements each rule offers are the ones DTensor runs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from autopar.graph import capture
from autopar.placements import Partial, Replicate, Shard
from autopar.solvers.costed import analyze, strategies_for
from autopar.solvers.strategies import _index_map, default_registry, einsum_options, reshape_map

R, P = Replicate(), Partial()


def _opts(model, x, kind_name):
    g = capture(model, (x,))
    reg = default_registry()
    st = analyze(g, reg)
    name = next(n for n, i in g.nodes.items() if i.kind.value == kind_name)
    return g, st, reg, name


def test_linear_colwise_rowwise():
    g, st, reg, name = _opts(nn.Linear(8, 16), torch.randn(4, 8), "linear")
    opts = {o.name: o for o in reg.options(g.nodes[name], st.contexts[name], 2)}
    col, row = opts["colwise"], opts["rowwise"]
    assert col.params[0] == Shard(0) and col.inputs[0] == R and col.outputs[0] == Shard(1)
    assert col.input_grads[0] == P  # Megatron's f: all-reduce of the input gradient
    assert row.params[0] == Shard(1) and row.inputs[0] == Shard(1) and row.outputs[0] == P
    assert row.params[1] == R  # bias added once (DTensor adds a Replicate bias to a Partial)


def test_embedding_vocab_parallel_gives_partial():
    g, st, reg, name = _opts(nn.Embedding(32, 8), torch.randint(0, 32, (4, 6)), "embedding")
    opts = {o.name: o for o in reg.options(g.nodes[name], st.contexts[name], 4)}
    assert opts["vocab_parallel"].params[0] == Shard(0) and opts["vocab_parallel"].outputs[0] == P
    assert opts["dim_parallel"].outputs[0] == Shard(2)
    assert all(isinstance(p, Replicate) for o in opts.values() for p in o.input_grads)  # int input


def test_divisibility_is_respected():
    g, st, reg, name = _opts(nn.Linear(8, 6), torch.randn(4, 8), "linear")
    names = {o.name for o in reg.options(g.nodes[name], st.contexts[name], 4)}
    assert "colwise" not in names  # 6 output features do not split 4 ways
    assert "rowwise" in names


def test_attention_head_parallel_only():
    class A(nn.Module):
        def forward(self, q):
            return nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    g, st, reg, name = _opts(A(), torch.randn(2, 4, 6, 8), "attention")
    opts = reg.options(g.nodes[name], st.contexts[name], 2)
    sharded = {o.outputs[0] for o in opts if o.name != "replicate"}
    assert sharded == {Shard(0), Shard(1)}  # batch or heads, never T or D


def test_batch_norm_shards_batch_only_where_the_runtime_syncs_statistics():
    # a BatchNorm module: the batch may shard (the runtime all-reduces the per-channel sums,
    # runtime/sync_batch_norm.py); space never (statistics are over batch and space)
    g, st, reg, name = _opts(nn.Sequential(nn.BatchNorm2d(4)), torch.randn(8, 4, 6, 6), "norm")
    assert st.contexts[name].module_type == "BatchNorm2d"
    opts = reg.options(g.nodes[name], st.contexts[name], 2)
    assert {o.outputs[0] for o in opts} == {R, Shard(0), Shard(1)}
    chan = next(o for o in opts if o.outputs[0] == Shard(1))
    assert chan.inputs[0] == Shard(1) and all(p == Shard(0) for p in chan.params[:2])
    # the functional op (here from torch.export): one device's statistics need the whole batch
    g, st, reg, name = _opts(nn.BatchNorm2d(4), torch.randn(8, 4, 6, 6), "norm")
    assert "batch_norm" in g.nodes[name].target
    assert {o.outputs[0] for o in reg.options(g.nodes[name], st.contexts[name], 2)} == {R, Shard(1)}


def test_reshape_map():
    assert reshape_map((2, 3, 8), (6, 8)) == {0: 0, 2: 1}  # flatten keeps a shard on the leading dim
    assert reshape_map((2, 3, 12), (2, 3, 4, 3)) == {0: 0, 1: 1, 2: 2}  # unflatten: onto the leading new dim
    assert 1 not in reshape_map((2, 3, 8), (6, 8))  # an inner dim of a flatten cannot stay sharded


def test_index_map():
    f = _index_map((Ellipsis, 0), 5)
    assert [f(d) for d in range(5)] == [0, 1, 2, 3, None]
    f = _index_map((slice(None), None, slice(None)), 2)
    assert [f(0), f(1)] == [0, 2]
    f = _index_map((slice(None), slice(1, 3)), 2)
    assert [f(0), f(1)] == [0, None]


def test_einsum_contracted_letter_gives_partial():
    opts = einsum_options(["mk", "kn"], "mn", [(4, 6), (6, 8)], (4, 8), 2)
    by_letter = {o[0]: o for o in opts}
    assert by_letter["k"][2] == P
    assert by_letter["m"][2] == Shard(0) and by_letter["m"][3] == (Shard(0), P)


def test_views_follow_chunk_and_transpose():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.l(x).chunk(3, dim=-1)
            return q.unflatten(-1, (2, 4)).transpose(1, 2)

    g = capture(M(), (torch.randn(2, 6, 8),))
    reg = default_registry()
    st = analyze(g, reg)
    chunk = next(n for n, i in g.nodes.items() if i.target.endswith("chunk"))
    outs = {o.inputs[0]: o.outputs[0] for o in reg.options(g.nodes[chunk], st.contexts[chunk], 2)}
    assert Shard(2) not in outs  # chunk along the sharded dim needs Replicate first
    assert outs[Shard(0)] == Shard(0)
    tr = next(n for n, i in g.nodes.items() if i.target.endswith("transpose"))
    outs = {o.inputs[0]: o.outputs[0] for o in reg.options(g.nodes[tr], st.contexts[tr], 2)}
    assert outs[Shard(2)] == Shard(1) and outs[Shard(1)] == Shard(2) and outs[P] == P


def test_identity_module_passes_shards_through():
    # a call_module node's target is the module's path ("shortcut"), not its class: the view
    # rule must read the class, or a ResNet's identity shortcut can only gather the batch
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.shortcut = nn.Identity()

        def forward(self, x):
            return self.body(x) + self.shortcut(x)

    g, st, reg, name = _opts(Block(), torch.randn(4, 8), "view")
    assert g.nodes[name].target == "shortcut"
    outs = {o.inputs[0]: o.outputs[0] for o in reg.options(g.nodes[name], st.contexts[name], 2)}
    assert outs[Shard(0)] == Shard(0) and outs[Shard(1)] == Shard(1) and outs[P] == P


def test_two_axis_strategies_keep_batch_on_dp():
    g = capture(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), (torch.randn(4, 8),))
    reg = default_registry()
    st = analyze(g, reg)
    lin = next(n for n, i in g.nodes.items() if i.kind.value == "linear")
    strategies = strategies_for(st, reg, lin, dp=2, tp=2)
    assert all(s.outputs[0][0] == Shard(0) for s in strategies)  # batch sharded on dp
    assert {str(s.outputs[0][1]) for s in strategies} >= {"R", "S(1)"}


def test_registry_is_a_value():
    from autopar.graph import OpKind
    from autopar.solvers.strategies import replicate_rule

    a, b = default_registry(), default_registry()
    a.register(OpKind.LINEAR, replicate_rule)
    g, st, _, name = _opts(nn.Linear(8, 16), torch.randn(4, 8), "linear")
    assert len(a.options(g.nodes[name], st.contexts[name], 2)) == 1
    assert len(b.options(g.nodes[name], st.contexts[name], 2)) > 1


def test_values_no_gradient_reaches_have_no_backward_reshard():
    """A table computed from data alone (RoPE-style: positions, buffers) and scaled into the
    activations: the gradient flows through the linear, never into the table."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, pos):
            t = torch.cos(pos)
            return self.lin(x) * t

    g = capture(M(), (torch.randn(4, 8), torch.randn(4, 8)))
    st = analyze(g, default_registry())
    table = [n for n, info in g.nodes.items() if "cos" in str(info.target)]
    lin = [n for n, info in g.nodes.items() if any(p in g.params for p in info.params)]
    assert table and lin
    assert not st.needs_grad[table[0]] and st.needs_grad[lin[0]]
    assert not st.has_grad(table[0], g.nodes[table[0]].outputs[0])
    assert st.has_grad(lin[0], g.nodes[lin[0]].outputs[0])
