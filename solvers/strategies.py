"""Per-op sharding rules: which placements a node's tensors may take on one mesh axis.

A rule looks at one :class:`~autopar.graph.NodeInfo` (plus its fx node for arguments such as
a transpose's dims) and lists :class:`AxisOption` s for ONE mesh axis of ``degree`` ranks.
Most rules are einsum equations, as in ``torch/distributed/tensor/_ops/_einsum_strategy.py``:

    linear      "...k,nk,n->...n"   (x, weight, bias)
    embedding   "...,vd->...d"      (indices, weight)
    matmul      "...mk,...kn->...mn"
    attention   "bhtd,bhsd,bhse->bhte"  (q, k, v; heads or batch only)

and an einsum option shards ONE index letter on every operand that has it: the output is
``Shard`` on that letter, or ``Partial`` when the letter is contracted (rowwise linear,
vocab-parallel embedding). The gradient of an operand is ``Shard`` on the letter when the
operand has it and ``Partial`` otherwise (its gradient sums over the sharded letter), which
is where the backward collectives of Megatron's f/g operators come from.

Elementwise ops are broadcasting einsums; norms and softmax may not shard the dims they
reduce over; views map a shard dim through the reshape/transpose/split, or fall back to
Replicate; convolution is data-parallel only. Every option is one ``torch.distributed.tensor``
can run with those placements.

Two axes: :func:`node_strategies` takes the dp axis's option (batch sharded, found by
propagating the inputs' batch dim) and crosses it with every tp option that does not shard
the same tensor dim, giving the 2-D :class:`Strategy` s the ILP chooses among.

The :class:`StrategyRegistry` is a value passed to the planner: ``registry.register(kind,
rule)`` overrides or extends it, nothing is process-wide.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from autopar.graph import NodeInfo, OpKind, TensorSpec
from autopar.placements import Partial, Placement, Replicate, Shard

R = Replicate()
P = Partial()


@dataclass(frozen=True, slots=True)
class AxisOption:
    """Placements of one node's tensors on one mesh axis.

    inputs: one per ``NodeInfo.inputs`` entry (Replicate for non-tensor producers).
    outputs: one per ``NodeInfo.outputs``. params: one per ``NodeInfo.params`` (compute
    placement). input_grads / param_grads: the placement the backward produces for each.
    """

    name: str
    inputs: tuple[Placement, ...]
    outputs: tuple[Placement, ...]
    params: tuple[Placement, ...] = ()
    input_grads: tuple[Placement, ...] = ()
    param_grads: tuple[Placement, ...] = ()


@dataclass(frozen=True, slots=True)
class Strategy:
    """A 2-D choice for one node: placements per (dp, tp) for every tensor."""

    name: str
    inputs: tuple[tuple[Placement, Placement], ...]
    outputs: tuple[tuple[Placement, Placement], ...]
    params: tuple[tuple[Placement, Placement], ...]
    input_grads: tuple[tuple[Placement, Placement], ...]
    param_grads: tuple[tuple[Placement, Placement], ...]


@dataclass(frozen=True)
class OpContext:
    """What a rule may read besides the NodeInfo."""

    input_specs: tuple[Optional[TensorSpec], ...]  # per NodeInfo.inputs; None = not a tensor
    param_specs: tuple[TensorSpec, ...]  # per NodeInfo.params
    args: tuple = ()  # fx node args with fx.Node replaced by their names
    kwargs: dict = field(default_factory=dict)
    module_type: str = ""  # class name for call_module nodes

    @property
    def batch_norm_module(self) -> bool:
        """A BatchNorm module: with its batch sharded, the runtime all-reduces its statistic
        sums (autopar.runtime.sync_batch_norm), which the cost model prices."""
        return "batchnorm" in self.module_type.lower()


Rule = Callable[[NodeInfo, OpContext, int], list[AxisOption]]


# ---------------------------------------------------------------------------------------
# helpers


def _divides(size: int, degree: int) -> bool:
    """Shard only evenly; degree 0 means "any degree" (used to track the batch dim)."""
    return degree <= 1 or (size >= degree and size % degree == 0)


def replicate_option(node: NodeInfo, ctx: OpContext) -> AxisOption:
    n_in, n_out, n_p = len(node.inputs), len(node.outputs), len(node.params)
    return AxisOption("replicate", (R,) * n_in, (R,) * n_out, (R,) * n_p, (R,) * n_in, (R,) * n_p)


def _grad_of(p: Placement) -> Placement:
    """Placement of the gradient a consumer receives for an output placed ``p``."""
    return R if isinstance(p, Partial) else p


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# ---------------------------------------------------------------------------------------
# einsum engine


def einsum_options(
    operands: Sequence[Optional[str]],
    output: str,
    shapes: Sequence[Optional[tuple[int, ...]]],
    out_shape: tuple[int, ...],
    degree: int,
    *,
    forbid: str = "",
    roles: Sequence[str] = (),
) -> list[tuple[str, tuple[Placement, ...], Placement, tuple[Placement, ...]]]:
    """Options of an einsum ``operands -> output`` on one axis of ``degree`` ranks.

    ``operands[i]`` is operand i's letters (None: not a tensor, stays Replicate). Returns
    ``(letter, operand placements, output placement, operand gradient placements)``,
    the all-Replicate option first. ``forbid``: letters never sharded (reduced dims).
    Every sharded dim must divide by ``degree``.
    """
    n = len(operands)
    out = [("", tuple(R for _ in operands), R, tuple(R for _ in operands))]
    letters: list[str] = []
    for eq in [*operands, output]:
        for ch in eq or "":
            if ch not in letters:
                letters.append(ch)
    for ch in letters:
        if ch in forbid:
            continue
        ok = True
        pls: list[Placement] = []
        grads: list[Placement] = []
        for i in range(n):
            eq = operands[i]
            if eq is None:
                pls.append(R)
                grads.append(R)
                continue
            if ch in eq:
                d = eq.index(ch)
                if shapes[i] is None or not _divides(shapes[i][d], degree):
                    ok = False
                    break
                pls.append(Shard(d))
                grads.append(Shard(d))
            else:
                pls.append(R)
                grads.append(P)
        if not ok:
            continue
        if ch in output:
            d = output.index(ch)
            if not _divides(out_shape[d], degree):
                continue
            op = Shard(d)
        else:
            op = P
        out.append((ch, tuple(pls), op, tuple(grads)))
    return out


def _letters(k: int, skip: str = "") -> str:
    return "".join(c for c in string.ascii_lowercase if c not in skip)[:k]


def _tensor_inputs(node: NodeInfo, ctx: OpContext) -> list[int]:
    return [i for i, s in enumerate(ctx.input_specs) if s is not None]


def _is_int(spec: Optional[TensorSpec]) -> bool:
    return spec is not None and not spec.dtype.startswith(("float", "bfloat", "complex"))


def _from_einsum(node: NodeInfo, ctx: OpContext, degree: int, in_eqs: dict[int, str],
                 param_eqs: dict[int, str], out_eq: str, *, forbid: str = "",
                 allow_partial_out: bool = True, name_of: Optional[dict[str, str]] = None) -> list[AxisOption]:
    """Build AxisOptions from an einsum over some inputs and params (others Replicate)."""
    keys = [("in", i) for i in sorted(in_eqs)] + [("param", j) for j in sorted(param_eqs)]
    operands = [in_eqs[i] if w == "in" else param_eqs[i] for w, i in keys]
    shapes = [ctx.input_specs[i].shape if w == "in" else ctx.param_specs[i].shape for w, i in keys]
    out_shape = node.outputs[0].shape
    opts = []
    for ch, pls, op, grads in einsum_options(operands, out_eq, shapes, out_shape, degree, forbid=forbid):
        if isinstance(op, Partial) and not allow_partial_out:
            continue
        ins = [R] * len(node.inputs)
        igr = [R] * len(node.inputs)
        prm = [R] * len(node.params)
        pgr = [R] * len(node.params)
        for (w, i), pl, g in zip(keys, pls, grads):
            if w == "in":
                ins[i], igr[i] = pl, g
            else:
                prm[i], pgr[i] = pl, g
        # params outside the equation (none normally) stay R with R grads
        if not ch:
            name = "replicate"
        elif name_of and ch in name_of:
            name = name_of[ch]
        else:
            name = f"shard_dim{out_eq.index(ch)}" if ch in out_eq else "partial"
        opts.append(AxisOption(name, tuple(ins), (op,) * len(node.outputs), tuple(prm), tuple(igr), tuple(pgr)))
    return opts


# ---------------------------------------------------------------------------------------
# rules


def linear_rule(node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
    """y = x W^T + b: "...k,nk,n->...n" (colwise shards n, rowwise shards k)."""
    ti = _tensor_inputs(node, ctx)
    if not ti or not ctx.param_specs:
        return [replicate_option(node, ctx)]
    x = ctx.input_specs[ti[0]]
    lead = _letters(len(x.shape) - 1, skip="kn")
    param_eqs = {0: "nk"}
    if len(ctx.param_specs) > 1 and len(ctx.param_specs[1].shape) == 1:
        param_eqs[1] = "n"
    names = {"n": "colwise", "k": "rowwise"}
    names.update({c: f"shard_dim{i}" for i, c in enumerate(lead)})
    opts = _from_einsum(node, ctx, degree, {ti[0]: lead + "k"}, param_eqs, lead + "n", name_of=names)
    # rowwise with a bias: the bias is added once, so it is Partial-safe only if kept R and
    # DTensor adds it on one rank; DTensor's addmm does this (bias R -> P), grad of bias R.
    fixed = []
    for o in opts:
        if o.name == "rowwise" and len(o.params) > 1:
            o = AxisOption(o.name, o.inputs, o.outputs, (o.params[0], R) + o.params[2:], o.input_grads,
                           (o.param_grads[0], R) + o.param_grads[2:])
        fixed.append(o)
    return fixed


def embedding_rule(node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
    """out = W[idx]: "...,vd->...d" (vocab-parallel shards v -> Partial, or d)."""
    ti = _tensor_inputs(node, ctx)
    if not ti or not ctx.param_specs or len(ctx.param_specs[0].shape) != 2:
        return [replicate_option(node, ctx)]
    idx = ctx.input_specs[ti[0]]
    lead = _letters(len(idx.shape), skip="vd")
    names = {"v": "vocab_parallel", "d": "dim_parallel"}
    names.update({c: f"shard_dim{i}" for i, c in enumerate(lead)})
    opts = _from_einsum(node, ctx, degree, {ti[0]: lead}, {0: "vd"}, lead + "d", name_of=names)
    # integer indices carry no gradient
    return [AxisOption(o.name, o.inputs, o.outputs, o.params, tuple(R for _ in o.input_grads), o.param_grads)
            for o in opts]


def matmul_rule(node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
    """Activation x activation: "...mk,...kn->...mn" with broadcast batch dims."""
    ti = _tensor_inputs(node, ctx)
    if len(ti) != 2:
        return [replicate_option(node, ctx)]
    a, b = (ctx.input_specs[i].shape for i in ti)
    if len(a) < 2 or len(b) < 2:
        return [replicate_option(node, ctx)]
    out = node.outputs[0].shape
    nb = len(out) - 2
    batch = _letters(nb, skip="mkn")
    ea = batch[nb - (len(a) - 2):] + "mk"
    eb = batch[nb - (len(b) - 2):] + "kn"
    # broadcast (size-1) batch dims are not sharded on that operand
    ea = "".join(c if (c in "mk" or a[i] != 1 or out[batch.index(c)] == 1) else "1" for i, c in enumerate(ea))
    eb = "".join(c if (c in "kn" or b[i] != 1 or out[batch.index(c)] == 1) else "2" for i, c in enumerate(eb))
    return _from_einsum(node, ctx, degree, {ti[0]: ea, ti[1]: eb}, {}, batch + "mn", forbid="12")


def attention_rule(node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
    """SDPA on (B, H, T, D): shard batch or heads (head-parallel), never T or D."""
    ti = _tensor_inputs(node, ctx)
    qkv = [a for a in ctx.args[:3] if isinstance(a, str) and a in node.inputs] if ctx.args else []
    used = sorted({node.inputs.index(a) for a in qkv}) if len(qkv) == 3 else ti[:3]
    if not used or any(len(ctx.input_specs[i].shape) != 4 for i in used):
        return [replicate_option(node, ctx)]
    # q, k, v share b and h; T and D (and k/v's S, E) are never sharded, so one equation
    # per distinct input serves even when q, k, v are the same tensor
    eqs = {i: "bhtd" for i in used}
    opts = _from_einsum(node, ctx, degree, eqs, {}, "bhtd", forbid="td",
                        name_of={"h": "head_parallel", "b": "batch"})
    # an attention mask input (4th tensor) stays Replicate; only non-partial outputs
    return [o for o in opts if not isinstance(o.outputs[0], Partial)]


def _reduce_dims_norm(node: NodeInfo, ctx: OpContext, ndim: int) -> set[int]:
    target = node.target.lower()
    if ctx.batch_norm_module:
        # a BatchNorm module: the batch may shard, the runtime all-reduces the per-channel
        # statistic sums (runtime/sync_batch_norm.py: one device's numbers, C floats a
        # collective); space may not
        return {d for d in range(ndim) if d not in (0, 1)}
    if "batch" in target:
        # functional batch_norm: statistics are per channel over batch and space, so only
        # channels shard. Per-shard statistics (DDP without SyncBatchNorm) would not give one
        # device's numbers, and DTensor's batch_norm all-gathers a batch-sharded input anyway
        # (41 all-gathers per step in a small ResNet at dp=2), so the plan states that reshard
        return {d for d in range(ndim) if d != 1}
    if "group" in target or "groupnorm" in ctx.module_type.lower():
        return set(range(1, ndim))
    k = len(ctx.param_specs[0].shape) if ctx.param_specs else 1
    if ctx.args and len(ctx.args) > 1 and isinstance(ctx.args[1], (tuple, list)):
        k = len(ctx.args[1])  # functional layer_norm(x, normalized_shape)
    return set(range(ndim - k, ndim))


def norm_rule(node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
    """Layer/RMS/batch/group norm: shard only dims the statistics are not taken over."""
    ti = _tensor_inputs(node, ctx)
    if not ti:
        return [replicate_option(node, ctx)]
    shape = ctx.input_specs[ti[0]].shape
    nd = len(shape)
    reduced = _reduce_dims_norm(node, ctx, nd)
    eq = _letters(nd)
    param_eqs = {}
    for j, ps in enumerate(ctx.param_specs):
        k = len(ps.shape)
        if "batch" in node.target.lower() or ctx.batch_norm_module:
            param_eqs[j] = eq[1] if nd > 1 and k == 1 else None
        else:
            param_eqs[j] = eq[nd - k:] if k <= nd else None
    param_eqs = {j: e for j, e in param_eqs.items() if e is not None and ps_shape_ok(ctx.param_specs[j].shape, e)}
    forbid = "".join(eq[d] for d in reduced)
    return _from_einsum(node, ctx, degree, {ti[0]: eq}, param_eqs, eq, forbid=forbid, allow_partial_out=False)


def ps_shape_ok(shape: tuple[int, ...], eq: str) -> bool:
    return len(shape) == len(eq)


def _dim_arg(ctx: OpContext, pos: int, key: str, default=None):
    if key in ctx.kwargs:
        return ctx.kwargs[key]
    if len(ctx.args) > pos:
        return ctx.args[pos]
    return default


def softmax_rule(node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
    """Softmax over ``dim``: shard any other dim."""
    ti = _tensor_inputs(node, ctx)
    if not ti:
        return [replicate_option(node, ctx)]
    nd = len(ctx.input_specs[ti[0]].shape)
    dim = _dim_arg(ctx, 1, "dim", -1)
    if not isinstance(dim, int):
        return [replicate_option(node, ctx)]
    eq = _letters(nd)
    return _from_einsum(node, ctx, degree, {ti[0]: eq}, {}, eq, forbid=eq[_norm_dim(dim, nd)],
                        allow_partial_out=False)


_LINEAR_BINARY = {"add", "sub", "__add__", "__sub__", "__radd__", "__rsub__", "iadd", "isub", "add_", "sub_"}
_SCALE_UNARY = {"mul", "div", "truediv", "__mul__", "__truediv__", "__rmul__", "neg", "mul_", "imul"}


def _short_target(node: NodeInfo) -> str:
    return node.target.rsplit(".", 1)[-1].split("::")[-1].split(".")[0]


def _op_name(node: NodeInfo, ctx: OpContext) -> str:
    """The op's name: the module's class for a ``call_module`` node (its target is the
    module's path, e.g. ``stages.0.0.shortcut`` for an ``nn.Identity``), else the target's."""
    if node.op == "call_module" and ctx.module_type:
        return ctx.module_type
    return _short_target(node)


def elementwise_rule(node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
    """Broadcasting pointwise op: shard any output dim (broadcast operands stay R); sums of
    Partials stay Partial (add/sub), as does scaling a Partial by a constant."""
    ti = _tensor_inputs(node, ctx)
    if not node.outputs or not ti:
        return [replicate_option(node, ctx)]
    out = node.outputs[0].shape
    nd = len(out)
    eq = _letters(nd)
    in_eqs = {}
    for i in ti:
        s = ctx.input_specs[i].shape
        if len(s) > nd:
            return [replicate_option(node, ctx)]
        off = nd - len(s)
        in_eqs[i] = "".join(eq[off + d] if s[d] == out[off + d] else "_" for d in range(len(s)))
    opts = _from_einsum(node, ctx, degree, in_eqs, {}, eq, forbid="_", allow_partial_out=False)
    name = _op_name(node, ctx)
    same = all(ctx.input_specs[i].shape == out for i in ti)
    if (name in _LINEAR_BINARY and same) or (name in _SCALE_UNARY and len(ti) == 1):
        ins = tuple(P if ctx.input_specs[i] is not None else R for i in range(len(node.inputs)))
        opts.append(AxisOption("partial", ins, (P,) * len(node.outputs), (R,) * len(node.params),
                               tuple(R for _ in node.inputs), (R,) * len(node.params)))
    # integer tensors (masks, indices) carry no gradient
    return [AxisOption(o.name, o.inputs, o.outputs, o.params,
                       tuple(R if _is_int(ctx.input_specs[i]) else g for i, g in enumerate(o.input_grads)),
                       o.param_grads) for o in opts]


def reduction_rule(node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
    """sum/mean over ``dim`` keeping dims: shard the dims not reduced."""
    ti = _tensor_inputs(node, ctx)
    if not ti or not node.outputs:
        return [replicate_option(node, ctx)]
    ins = ctx.input_specs[ti[0]].shape
    out = node.outputs[0].shape
    if len(ins) != len(out):
        return [replicate_option(node, ctx)]
    eq = _letters(len(ins))
    forbid = "".join(eq[d] for d in range(len(ins)) if ins[d] != out[d])
    return _from_einsum(node, ctx, degree, {ti[0]: eq}, {}, eq, forbid=forbid, allow_partial_out=False)


def data_parallel_rule(node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
    """Conv and pooling: shard the batch dim only (conv is data-parallel only)."""
    ti = _tensor_inputs(node, ctx)
    if not ti or not node.outputs or not ctx.input_specs[ti[0]].shape:
        return [replicate_option(node, ctx)]
    nd_in = len(ctx.input_specs[ti[0]].shape)
    nd_out = len(node.outputs[0].shape)
    other = "ACDEFGHIJKLMNOPQRSTUVWXYZ"
    eq_in, eq_out = "b" + other[:nd_in - 1], "b" + other[:nd_out - 1]
    param_eqs = {j: other[-len(ps.shape):] if ps.shape else None for j, ps in enumerate(ctx.param_specs)}
    param_eqs = {j: e for j, e in param_eqs.items() if e}
    opts = _from_einsum(node, ctx, degree, {ti[0]: eq_in}, param_eqs, eq_out,
                        forbid=other, allow_partial_out=False, name_of={"b": "batch"})
    return opts


def replicate_rule(node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
    return [replicate_option(node, ctx)]


# --------------------------------------------------------------------------- views


def reshape_map(in_shape: Sequence[int], out_shape: Sequence[int]) -> dict[int, int]:
    """Input dim -> output dim that a Shard may move to through a reshape.

    Dims are grouped where the running products of sizes agree; inside a group only the
    first non-1 input dim may be sharded, and it lands on the first non-1 output dim (the
    rule DTensor's view ops use: flatten keeps a shard on the leading dim, unflatten splits
    it onto the leading new dim).
    """
    out: dict[int, int] = {}
    i = j = 0
    ni, no = len(in_shape), len(out_shape)
    while i < ni or j < no:
        gi, gj = [], []
        pi = pj = 1
        # take at least one dim from each side, then grow the smaller product
        while True:
            if (not gi or pi < pj) and i < ni:
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            elif (not gj or pj < pi) and j < no:
                gj.append(j)
                pj *= out_shape[j]
                j += 1
            else:
                break
            if gi and gj and pi == pj:
                # absorb trailing size-1 dims on either side into this group
                while i < ni and in_shape[i] == 1 and not (j < no and out_shape[j] == 1):
                    gi.append(i)
                    i += 1
                while j < no and out_shape[j] == 1 and not (i < ni and in_shape[i] == 1):
                    gj.append(j)
                    j += 1
                break
        if pi != pj:
            return out
        first_in = next((d for d in gi if in_shape[d] != 1), None)
        first_out = next((d for d in gj if out_shape[d] != 1), None)
        if first_in is not None and first_out is not None:
            out[first_in] = first_out
        if not gi and not gj:
            break
    return out


def _view_dim_map(node: NodeInfo, ctx: OpContext, in_shape: tuple[int, ...]) -> Optional[Callable[[int], Optional[int]]]:
    """A function input dim -> output dim (None: cannot stay sharded), or None if unknown."""
    name = _op_name(node, ctx)
    nd = len(in_shape)
    out_shape = node.outputs[0].shape if node.outputs else ()
    args = ctx.args[1:] if ctx.args else ()
    if name == "getitem" and len(ctx.args) > 1:
        return _index_map(ctx.args[1], nd)
    if name in ("transpose", "swapaxes", "swapdims"):
        a0 = _dim_arg(ctx, 1, "dim0")
        a1 = _dim_arg(ctx, 2, "dim1")
        if not isinstance(a0, int) or not isinstance(a1, int):
            return None
        a, b = _norm_dim(a0, nd), _norm_dim(a1, nd)
        return lambda d: b if d == a else a if d == b else d
    if name == "t":
        return lambda d: (nd - 1 - d) if nd == 2 else d
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        dims = ctx.kwargs.get("dims", dims)
        if not dims or not all(isinstance(x, int) for x in dims):
            return None
        perm = [_norm_dim(x, nd) for x in dims]
        return lambda d: perm.index(d) if d in perm else None
    if name == "movedim":
        src, dst = _dim_arg(ctx, 1, "source"), _dim_arg(ctx, 2, "destination")
        if not isinstance(src, int) or not isinstance(dst, int):
            return None
        order = [x for x in range(nd) if x != _norm_dim(src, nd)]
        order.insert(_norm_dim(dst, nd), _norm_dim(src, nd))
        return lambda d: order.index(d)
    if name in ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
                "contiguous", "clone", "detach", "alias", "Flatten", "Unflatten", "Identity", "view_as",
                "reshape_as", "lift_fresh_copy", "_assert_tensor_metadata"):
        if not out_shape and name not in ("_assert_tensor_metadata",):
            return None
        if tuple(out_shape) == tuple(in_shape):
            return lambda d: d
        m = reshape_map(in_shape, out_shape)
        return lambda d: m.get(d)
    # ops that cut along one dim (position of the dim argument, whether the dim is removed):
    # every other dim maps through, shifted down past a removed one
    cut = {"chunk": (2, False), "split": (2, False), "tensor_split": (2, False), "split_with_sizes": (2, False),
           "narrow": (1, False), "slice": (1, False), "unbind": (1, True), "select": (1, True)}.get(name)
    if cut is not None:
        dim = _dim_arg(ctx, cut[0], "dim", 0)
        if not isinstance(dim, int):
            return None
        c, removed = _norm_dim(dim, nd), cut[1]
        return lambda d: None if d == c else (d - 1 if removed and d > c else d)
    if name in ("expand", "expand_as"):
        off = len(out_shape) - nd
        return lambda d: (d + off) if in_shape[d] == out_shape[d + off] else None
    if name in ("repeat_interleave",):
        dim = _dim_arg(ctx, 2, "dim")
        if not isinstance(dim, int):
            return None
        c = _norm_dim(dim, nd)
        return lambda d: None if d == c else d
    return None


def _index_map(index, nd: int) -> Optional[Callable[[int], Optional[int]]]:
    """Basic indexing ``x[..., 0]``, ``x[:, None, :]``, ``x[:, 1:3]``: full slices keep a
    dim (shardable), an int drops it, a partial slice keeps it unshardable, None adds one."""
    items = index if isinstance(index, tuple) else (index,)
    if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) or isinstance(i, bool) for i in items):
        return None
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if consumed > nd or sum(1 for i in items if i is Ellipsis) > 1:
        return None
    expanded: list = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (nd - consumed))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (nd - sum(1 for i in expanded if i is not None)))
    mapping: dict[int, Optional[int]] = {}
    d_in = d_out = 0
    for i in expanded:
        if i is None:
            d_out += 1
            continue
        if isinstance(i, int):
            mapping[d_in] = None
            d_in += 1
            continue
        full = i == slice(None) or (i.start in (None, 0) and i.stop is None and i.step in (None, 1))
        mapping[d_in] = d_out if full else None
        d_in += 1
        d_out += 1
    return lambda d: mapping.get(d)


def view_rule(node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
    """Views follow their input: a Shard moves through the view (or forces Replicate),
    Partial stays Partial (views are linear). getitem of a multi-output node passes through.
    """
    if not node.outputs:
        return [replicate_option(node, ctx)]
    ti = _tensor_inputs(node, ctx)
    name = _op_name(node, ctx)
    if name in ("cat", "concat", "stack"):
        return _cat_options(node, ctx, degree, stack=(name == "stack"))
    if len(ti) != 1:
        return [replicate_option(node, ctx)]
    i0 = ti[0]
    in_shape = ctx.input_specs[i0].shape
    if name == "getitem" and ctx.kwargs.get("_multi_output"):
        fn: Optional[Callable[[int], Optional[int]]] = lambda d: d  # element of a tuple
    else:
        fn = _view_dim_map(node, ctx, in_shape)
    opts = [replicate_option(node, ctx)]
    if fn is None:
        return opts
    float_in = not _is_int(ctx.input_specs[i0])

    def make(name_: str, pin: Placement, pout: Placement) -> AxisOption:
        ins = tuple(pin if k == i0 else R for k in range(len(node.inputs)))
        grads = tuple((_grad_of(pin) if float_in else R) if k == i0 else R for k in range(len(node.inputs)))
        return AxisOption(name_, ins, (pout,) * len(node.outputs), (R,) * len(node.params), grads,
                          (R,) * len(node.params))

    if float_in:
        opts.append(make("partial", P, P))
    for d in range(len(in_shape)):
        if not _divides(in_shape[d], degree):
            continue
        e = fn(d)
        if e is None:
            continue
        if not all(e < len(o.shape) and _divides(o.shape[e], degree) for o in node.outputs):
            continue
        opts.append(make(f"shard_dim{d}", Shard(d), Shard(e)))
    return opts


def _cat_options(node: NodeInfo, ctx: OpContext, degree: int, stack: bool) -> list[AxisOption]:
    ti = _tensor_inputs(node, ctx)
    if not ti:
        return [replicate_option(node, ctx)]
    nd = len(ctx.input_specs[ti[0]].shape)
    dim = _dim_arg(ctx, 1, "dim", 0)
    if not isinstance(dim, int) or any(len(ctx.input_specs[i].shape) != nd for i in ti):
        return [replicate_option(node, ctx)]
    c = _norm_dim(dim, nd + (1 if stack else 0))
    opts = [replicate_option(node, ctx)]
    for d in range(nd):
        if not stack and d == c:
            continue
        if not all(_divides(ctx.input_specs[i].shape[d], degree) for i in ti):
            continue
        e = d if (not stack or d < c) else d + 1
        ins = tuple(Shard(d) if i in ti else R for i in range(len(node.inputs)))
        opts.append(AxisOption(f"shard_dim{d}", ins, (Shard(e),), (R,) * len(node.params), ins,
                               (R,) * len(node.params)))
    return opts


# ---------------------------------------------------------------------------------------
# registry


class StrategyRegistry:
    """OpKind -> rule. A value handed to the planner (``default_registry()`` builds one)."""

    def __init__(self, rules: Optional[dict[OpKind, Rule]] = None):
        self._rules: dict[OpKind, Rule] = dict(rules or {})

    def register(self, kind: OpKind, rule: Rule) -> "StrategyRegistry":
        self._rules[kind] = rule
        return self

    def rule_for(self, kind: OpKind) -> Rule:
        return self._rules.get(kind, replicate_rule)

    def options(self, node: NodeInfo, ctx: OpContext, degree: int) -> list[AxisOption]:
        """Options for ``node`` on an axis of ``degree`` ranks (Replicate only when degree 1;
        degree 0 lists every option regardless of divisibility)."""
        if degree == 1 or not node.outputs:
            return [replicate_option(node, ctx)]
        try:
            opts = self.rule_for(node.kind)(node, ctx, degree)
        except Exception as e:  # a rule bug must name the node, not vanish
            raise RuntimeError(f"sharding rule for node {node.name!r} ({node.kind.value}, {node.target}) "
                               f"failed: {type(e).__name__}: {e}") from e
        seen, out = set(), []
        for o in opts:
            key = (o.inputs, o.outputs, o.params)
            if key not in seen:
                seen.add(key)
                out.append(o)
        return out


def default_registry() -> StrategyRegistry:
    return StrategyRegistry({
        OpKind.LINEAR: linear_rule,
        OpKind.EMBEDDING: embedding_rule,
        OpKind.MATMUL: matmul_rule,
        OpKind.ATTENTION: attention_rule,
        OpKind.NORM: norm_rule,
        OpKind.SOFTMAX: softmax_rule,
        OpKind.ELEMENTWISE: elementwise_rule,
        OpKind.REDUCTION: reduction_rule,
        OpKind.VIEW: view_rule,
        OpKind.CONV: data_parallel_rule,
        OpKind.POOL: data_parallel_rule,
        OpKind.LOSS: replicate_rule,
        OpKind.OTHER: replicate_rule,
    })


# ---------------------------------------------------------------------------------------
# two axes


def _conflict(dp: AxisOption, tp: AxisOption) -> bool:
    """True when tp shards the same dim of some tensor that dp shards."""
    for a, b in ((dp.inputs, tp.inputs), (dp.outputs, tp.outputs), (dp.params, tp.params)):
        for x, y in zip(a, b):
            if isinstance(x, Shard) and isinstance(y, Shard) and x.dim == y.dim:
                return True
    return False


def combine(dp: AxisOption, tp: AxisOption) -> Strategy:
    name = tp.name if dp.name in ("replicate",) else (dp.name if tp.name == "replicate" else f"{dp.name}+{tp.name}")
    if dp.name != "replicate" and tp.name == "replicate":
        name = "dp"
    elif dp.name != "replicate":
        name = f"dp+{tp.name}"
    z = lambda a, b: tuple(zip(a, b))  # noqa: E731
    return Strategy(name, z(dp.inputs, tp.inputs), z(dp.outputs, tp.outputs), z(dp.params, tp.params),
                    z(dp.input_grads, tp.input_grads), z(dp.param_grads, tp.param_grads))


def choose_dp_option(options: Sequence[AxisOption], producer_dp: Sequence[Optional[Placement]]) -> AxisOption:
    """The dp-axis option that keeps the batch sharding of the inputs (data parallelism).

    Exact match of every tensor input wins (preferring a Shard output); otherwise the option
    agreeing on most Shard inputs without a Partial output; otherwise Replicate (gather).
    """
    def score(o: AxisOption) -> tuple:
        match = sum(1 for have, want in zip(producer_dp, o.inputs) if have is not None and have == want)
        full = all(have is None or have == want for have, want in zip(producer_dp, o.inputs))
        shard_out = any(isinstance(p, Shard) for p in o.outputs)
        partial = any(isinstance(p, Partial) for p in o.outputs)
        return (full and not partial, not partial and match > 0, match, shard_out)

    best = max(options, key=score)
    if not any(isinstance(p, Shard) for p in producer_dp if p is not None):
        # nothing batch-sharded comes in: stay replicated on dp (no reshard)
        return next((o for o in options if o.name == "replicate"), best)
    s = score(best)
    if not s[1] and not s[0]:
        return next((o for o in options if o.name == "replicate"), best)
    return best
