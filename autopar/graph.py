"""Capture: ``nn.Module`` + example inputs -> :class:`Graph`.

Why two IR levels. ``torch.fx.symbolic_trace`` keeps leaf modules (``nn.Linear``,
``nn.LayerNorm`` ...) as single ``call_module`` nodes: small graphs, fast (GPT-3 175B, 96
layers, traces in about a second) and each node maps to one sharding rule. It fails on
models that inspect their inputs in Python (Hugging Face transformers 5.x raise
"co_varnames is too small"), so capture falls back to ``torch.export.export(strict=False)``,
whose pre-dispatch training IR (``aten.linear``, ``aten.layer_norm``, ``aten.embedding`` ...)
is one level lower but still keeps the ops a sharding rule needs. Both are normalised into
the same :class:`NodeInfo` (an :class:`OpKind` per node), so everything downstream is
IR-agnostic.

Why meta tensors. Shapes and FLOPs are propagated with parameters swapped for meta tensors
(``torch.func.functional_call``), so a model built under ``torch.device("meta")``, or a real
model with meta example inputs, is captured without allocating a single weight.
"""
from __future__ import annotations

import enum
import hashlib
import inspect
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

META_KEY = "autopar"  # the one namespaced node.meta key capture writes


class CaptureError(RuntimeError):
    """A model construct autopar cannot capture, with where it is and what to do."""


class OpKind(str, enum.Enum):
    """What a node does, at the granularity sharding rules are written for."""

    INPUT = "input"
    PARAM = "param"  # get_attr of a parameter or buffer
    OUTPUT = "output"
    LINEAR = "linear"  # y = x W^T (+ b), W a parameter
    EMBEDDING = "embedding"
    MATMUL = "matmul"  # activation x activation (attention scores, bmm, einsum)
    ATTENTION = "attention"  # fused scaled-dot-product attention
    CONV = "conv"
    NORM = "norm"  # layer/rms/batch/group norm
    SOFTMAX = "softmax"
    ELEMENTWISE = "elementwise"
    REDUCTION = "reduction"
    VIEW = "view"  # reshapes, permutes, slices, getitem, cat: data layout only
    POOL = "pool"
    LOSS = "loss"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Shape and dtype of one tensor; bytes derived."""

    shape: tuple[int, ...]
    dtype: str  # "float32", "bfloat16", "int64" ...

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype), device="meta").element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @staticmethod
    def of(t: torch.Tensor) -> "TensorSpec":
        return TensorSpec(tuple(int(s) for s in t.shape), str(t.dtype).removeprefix("torch."))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Everything the cost model and solver need to know about one fx node."""

    name: str
    op: str  # fx opcode: placeholder, get_attr, call_module, call_function, call_method, output
    target: str  # printable target (module path, function or method name)
    kind: OpKind
    inputs: tuple[str, ...]  # names of tensor-producing input nodes, in argument order
    outputs: tuple[TensorSpec, ...]  # tensor outputs (one for most nodes)
    params: tuple[str, ...]  # fully qualified names of parameters this node reads
    block: str | None  # repeated block it belongs to, e.g. "transformer.h.3"
    flops: float  # forward FLOPs (torch.utils.flop_counter convention: 2 per multiply-add)
    module_path: str = ""  # innermost nn.Module that produced it ("" = top level)
    #: bytes the training backward keeps from this node, as a fraction of its output bytes
    #: (measured at capture, :class:`_SavedProp`): its outputs that some op saves for backward
    #: plus buffers it saves that no node outputs (dropout masks, normalization statistics).
    #: None: not measured (the cost model then assumes every costed op's output is kept).
    saved_fraction: float | None = None

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass(slots=True)
class Graph:
    """A captured model: the fx program plus per-node specs, parameters and repeated blocks."""

    module: nn.Module  # the user's module (weights may be meta)
    gm: fx.GraphModule  # executable program; parameters live as its attributes
    nodes: dict[str, NodeInfo]  # topological order
    params: dict[str, TensorSpec]  # unique parameters by fully qualified name
    buffers: dict[str, TensorSpec]
    inputs: tuple[TensorSpec, ...]  # example inputs (one global batch); dim 0 is the batch
    blocks: tuple[str, ...]  # repeated blocks in execution order
    ir: str  # "fx" (symbolic_trace) or "export" (torch.export training IR)
    param_aliases: dict[str, str] = field(default_factory=dict)  # tied name -> canonical name

    @property
    def num_params(self) -> int:
        return sum(s.numel for s in self.params.values())

    @property
    def batch_size(self) -> int:
        return self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else 1

    def block_nodes(self, block: str) -> list[NodeInfo]:
        return [n for n in self.nodes.values() if n.block == block]

    def block_params(self, block: str) -> list[str]:
        seen: dict[str, None] = {}
        for n in self.block_nodes(block):
            for p in n.params:
                seen.setdefault(p, None)
        return list(seen)

    def total_flops(self) -> float:
        return sum(n.flops for n in self.nodes.values())

    def fingerprint(self) -> str:
        """Stable hash of program, parameter shapes and input specs (plan cache key)."""
        h = hashlib.sha256()
        h.update(self.ir.encode())
        for n in self.nodes.values():
            h.update(f"{n.name}|{n.kind.value}|{n.target}|{n.inputs}|{n.params}|".encode())
            h.update(repr([t.shape for t in n.outputs]).encode())
        for k, v in self.params.items():
            h.update(f"{k}:{v.shape}:{v.dtype}".encode())
        for t in self.inputs:
            h.update(f"in:{t.shape}:{t.dtype}".encode())
        return h.hexdigest()[:16]

    def to_networkx(self):
        """The dataflow graph as a networkx DiGraph (node attrs: the NodeInfo under 'info')."""
        import networkx as nx

        g = nx.DiGraph()
        for n in self.nodes.values():
            g.add_node(n.name, info=n)
        for n in self.nodes.values():
            for src in n.inputs:
                g.add_edge(src, n.name)
        return g

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for n in self.nodes.values():
            kinds[n.kind.value] = kinds.get(n.kind.value, 0) + 1
        return (
            f"Graph(ir={self.ir}, nodes={len(self.nodes)}, params={self.num_params:,}, "
            f"blocks={len(self.blocks)}, flops/step fwd={self.total_flops():.3g}, kinds={kinds})"
        )


# ----------------------------------------------------------------------------------------
# classification


_MODULE_KINDS: tuple[tuple[type, OpKind], ...] = (
    (nn.Linear, OpKind.LINEAR),
    (nn.Embedding, OpKind.EMBEDDING),
    (nn.EmbeddingBag, OpKind.EMBEDDING),
    (nn.LayerNorm, OpKind.NORM),
    (nn.GroupNorm, OpKind.NORM),
    (nn.modules.batchnorm._BatchNorm, OpKind.NORM),
    (nn.modules.conv._ConvNd, OpKind.CONV),
    (nn.MultiheadAttention, OpKind.ATTENTION),
    (nn.Softmax, OpKind.SOFTMAX),
    (nn.Dropout, OpKind.ELEMENTWISE),
    (nn.Identity, OpKind.VIEW),
    (nn.Flatten, OpKind.VIEW),
    (nn.Unflatten, OpKind.VIEW),
    (nn.modules.pooling._MaxPoolNd, OpKind.POOL),
    (nn.modules.pooling._AvgPoolNd, OpKind.POOL),
    (nn.modules.pooling._AdaptiveAvgPoolNd, OpKind.POOL),
    (nn.modules.loss._Loss, OpKind.LOSS),
)
if hasattr(nn, "RMSNorm"):
    _MODULE_KINDS = ((nn.RMSNorm, OpKind.NORM),) + _MODULE_KINDS

# Names (function __name__, method name or aten overload packet name) by kind.
_NAME_KINDS: dict[str, OpKind] = {}
for _kind, _names in {
    OpKind.LINEAR: "linear addmm",
    OpKind.EMBEDDING: "embedding embedding_bag _embedding_bag",
    OpKind.MATMUL: "matmul mm bmm einsum baddbmm __matmul__ mv dot",
    OpKind.ATTENTION: "scaled_dot_product_attention _scaled_dot_product_flash_attention "
    "_scaled_dot_product_efficient_attention",
    OpKind.CONV: "conv1d conv2d conv3d convolution _convolution",
    OpKind.NORM: "layer_norm rms_norm batch_norm group_norm native_layer_norm "
    "_native_batch_norm_legit_functional _native_batch_norm_legit_no_training instance_norm",
    OpKind.SOFTMAX: "softmax log_softmax _softmax _log_softmax",
    OpKind.ELEMENTWISE: "add sub mul div truediv floordiv neg pow rsqrt sqrt exp log tanh sigmoid "
    "relu gelu silu dropout native_dropout where masked_fill masked_fill_ clamp abs sin cos "
    "erf mish leaky_relu hardtanh add_ mul_ iadd imul isub __add__ __mul__ __sub__ __truediv__ "
    "__radd__ __rmul__ __rsub__ __rtruediv__ float type_as to _to_copy alias lift_fresh_copy "
    "ones_like zeros_like full_like triu tril scalar_tensor gt lt ge le eq ne logical_not "
    "bitwise_not rsub reciprocal square minimum maximum and or bitwise_and bitwise_or diff",
    OpKind.REDUCTION: "sum mean amax amin max min var std norm logsumexp argmax cumsum topk",
    OpKind.VIEW: "view reshape _unsafe_view transpose permute t contiguous expand expand_as "
    "unsqueeze squeeze flatten unflatten split chunk getitem size narrow slice select cat "
    "concat stack repeat repeat_interleave unbind clone detach index_select gather index "
    "arange zeros ones full new_zeros new_ones new_empty empty sym_size roll flip one_hot "
    "_assert_tensor_metadata scatter movedim getattr",
    OpKind.POOL: "max_pool2d avg_pool2d adaptive_avg_pool2d max_pool2d_with_indices "
    "adaptive_avg_pool1d avg_pool1d",
    OpKind.LOSS: "cross_entropy nll_loss mse_loss binary_cross_entropy_with_logits "
    "binary_cross_entropy",
}.items():
    for _n in _names.split():
        _NAME_KINDS[_n] = _kind


def _target_name(target: Any) -> str:
    """Short name of a call target: aten overload packet, function or method name."""
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or str(target)
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name.split("::")[-1]
    return name


def _printable_target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    mod = getattr(t, "__module__", "") or ""
    return f"{mod}.{getattr(t, '__name__', str(t))}".lstrip(".")


def classify(node: fx.Node, root: nn.Module) -> OpKind:
    if node.op == "placeholder":
        return OpKind.INPUT
    if node.op == "output":
        return OpKind.OUTPUT
    if node.op == "get_attr":
        return OpKind.PARAM
    if node.op == "call_module":
        if str(node.target).startswith("_guards"):
            return OpKind.VIEW  # torch.export's input guard, no work
        mod = root.get_submodule(node.target)
        for cls, kind in _MODULE_KINDS:
            if isinstance(mod, cls):
                return kind
        name = type(mod).__name__.lower()
        if any(a in name for a in ("gelu", "relu", "silu", "tanh", "sigmoid", "dropout", "act")):
            return OpKind.ELEMENTWISE
        if "norm" in name:
            return OpKind.NORM
        return OpKind.OTHER
    name = _target_name(node.target).rstrip("_") if node.op == "call_function" else str(node.target)
    name = name.removeprefix("_") if name not in _NAME_KINDS and name.startswith("_") else name
    return _NAME_KINDS.get(name, _NAME_KINDS.get(name + "_", OpKind.OTHER))


# ----------------------------------------------------------------------------------------
# repeated blocks


def find_repeated_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the children of ModuleList/Sequential containers that repeat.

    A container whose children (at least two) share one class is a stack of repeated blocks
    (transformer layers, ResNet stages' blocks); only the outermost such stacks count.
    """
    found: list[str] = []

    def visit(mod: nn.Module, prefix: str) -> None:
        if isinstance(mod, (nn.ModuleList, nn.Sequential)):
            children = list(mod.named_children())
            types = {type(c) for _, c in children}
            if len(children) >= 2 and len(types) == 1 and next(iter(types)) not in (
                nn.Linear,
                nn.ReLU,
                nn.GELU,
            ) and any(True for _ in children[0][1].parameters()):
                found.extend(f"{prefix}{n}" for n, _ in children)
                return
        for n, c in mod.named_children():
            visit(c, f"{prefix}{n}.")

    visit(model, "")
    return found


def _normalise_fqn(path: str) -> str:
    """'L['self'].h[0].attn' / 'h.0.attn' / "L__self___h_0" -> 'h.0.attn' (best effort)."""
    p = path
    for prefix in ("L['self'].", "L['self']", "self."):
        if p.startswith(prefix):
            p = p[len(prefix):]
    p = p.replace("[", ".").replace("]", "").replace("'", "")
    p = p.replace("._modules.", ".").removeprefix("_modules.")
    return p.strip(".")


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    last = list(stack.values())[-1]
    path = last[0] if isinstance(last, tuple) else str(last)
    return _normalise_fqn(path)


def _block_of(path: str, blocks: Sequence[str]) -> str | None:
    for b in blocks:
        if path == b or path.startswith(b + "."):
            return b
    return None


# ----------------------------------------------------------------------------------------
# tracing


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame in user code (not torch, not autopar, not stdlib)."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.abspath(__file__))
    stdlib = os.path.dirname(inspect.__file__)
    best = None
    for fr in traceback.extract_tb(exc.__traceback__):
        f = os.path.abspath(fr.filename)
        if f.startswith((torch_dir, here, stdlib)) or "site-packages/torch" in f or "<" in f:
            continue
        best = fr
    return best


def _explain(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = str(exc).lower()
    if "control flow" in low or "data-dependent" in low or "guardondatadependent" in low or (
        "bool" in low and "proxy" in low
    ):
        hint = (
            "data-dependent Python control flow (an `if`/`while`/`range` on a tensor value or "
            "traced size). Rewrite it with tensor ops (torch.where, masking), read sizes from "
            "the config, or move the branch out of forward()."
        )
    elif "co_varnames" in low or "signature" in low:
        hint = "a forward() signature the tracer cannot read (use ir='export')."
    else:
        hint = "a construct the tracers do not support; see the message above."
    return f"{type(exc).__name__}: {msg}\n  cause: {hint}"


def _trace(model: nn.Module, example_inputs: tuple, ir: str) -> tuple[fx.GraphModule, str]:
    errors: list[tuple[str, BaseException]] = []
    if ir in ("auto", "fx"):
        try:
            return fx.symbolic_trace(model), "fx"
        except Exception as e:  # noqa: BLE001 -- reported below with the user's line
            errors.append(("torch.fx.symbolic_trace", e))
            if ir == "fx":
                raise _capture_error(model, errors) from e
    import logging

    torch_log = logging.getLogger("torch")
    old_level = torch_log.level
    torch_log.setLevel(logging.ERROR)  # export logs whole graphs on failure; we explain instead
    try:
        ep = torch.export.export(model, tuple(example_inputs), {}, strict=False)
        return ep.module(), "export"
    except Exception as e:  # noqa: BLE001
        errors.append(("torch.export.export(strict=False)", e))
        raise _capture_error(model, errors) from e
    finally:
        torch_log.setLevel(old_level)


def _capture_error(model: nn.Module, errors: list[tuple[str, BaseException]]) -> CaptureError:
    lines = [f"cannot capture {type(model).__qualname__}:"]
    for how, e in errors:
        fr = _user_frame(e)
        where = f" at {fr.filename}:{fr.lineno}: `{(fr.line or '').strip()}`" if fr else ""
        lines.append(f"- {how} failed{where}\n  {_explain(e)}")
    return CaptureError("\n".join(lines))


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty_like(x, device="meta")
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    return x


def run_on_fake(gm: fx.GraphModule, interp: fx.Interpreter,
                inputs: Callable[[Callable[..., torch.Tensor]], tuple], *, grad: bool = False) -> None:
    """Run ``interp`` (an interpreter over ``gm``) with ``gm``'s parameters, buffers and inputs
    as fake CPU tensors: shapes, dtypes and FLOPs without storage. ``inputs(fake)`` builds
    the inputs, where ``fake(shape, dtype)`` makes one fake tensor. ``grad``: floating-point
    parameters require grad and autograd records the forward (what a training step saves).

    Fake CPU tensors rather than meta ones: some meta kernels (SDPA) return strides the CPU
    kernels do not, which breaks view() in export graphs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    mode = FakeTensorMode(allow_non_fake_inputs=False)

    def fake(shape, dtype) -> torch.Tensor:
        with mode:
            return torch.empty(tuple(shape), dtype=dtype, device="cpu", requires_grad=False)

    state = {f"inner.{k}": fake(v.shape, v.dtype) for k, v in [*gm.named_parameters(), *gm.named_buffers()]}
    if grad:
        for k, _ in gm.named_parameters():
            if state[f"inner.{k}"].is_floating_point():
                state[f"inner.{k}"].requires_grad_(True)
    args = inputs(fake)

    class _Runner(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a):
            return interp.run(*a)

    with (torch.enable_grad() if grad else torch.no_grad()), mode:
        functional_call(_Runner(gm), state, args)


class _SpecProp(fx.Interpreter):
    """Runs the program on meta tensors, recording output specs and FLOPs per node."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.specs: dict[str, tuple[TensorSpec, ...]] = {}
        self.flops: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        from torch.utils.flop_counter import FlopCounterMode

        try:
            if n.op in ("call_function", "call_method", "call_module"):
                with FlopCounterMode(display=False) as fc:
                    out = super().run_node(n)
                self.flops[n.name] = float(fc.get_total_flops())
            else:
                out = super().run_node(n)
        except Exception as e:
            raise CaptureError(
                f"shape propagation failed at node {n.format_node()}\n"
                f"  {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            ) from e
        self.specs[n.name] = tuple(TensorSpec.of(t) for t in _flatten_tensors(out))
        return out


class _SavedProp(_SpecProp):
    """:class:`_SpecProp` run with autograd on, also recording, per node, the bytes autograd
    saves for the backward that belong to it (one forward gives specs, FLOPs and saves).

    Why measured: which tensors a backward keeps is each op's derivative formula (a linear
    keeps its input, GELU its input, softmax its output, an add nothing, dropout a byte mask),
    and over a transformer block counting every op's output was 25-35 % over what the live
    tensors held at the loss's backward (GPT / LLaMA small, 2026-11-23). A storage saved
    through a view (attention's transposed heads) counts once, for the node that made it."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.owner: dict[int, str] = {}  # storage -> the node whose output it first was
        self.packed: dict[str, dict[int, int]] = {}  # node -> storages saved while it ran: bytes
        self.out_bytes: dict[str, int] = {}
        self._hold: list = []  # every storage seen, kept so no address is reused for another

    def _key(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(storage identity, bytes), or None for a tensor without storage (sparse, nested)."""
        from torch.multiprocessing.reductions import StorageWeakRef

        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        self._hold.append(st)
        return StorageWeakRef(st).cdata, st.nbytes()

    def run_node(self, n: fx.Node) -> Any:
        packed: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            base = t if t._base is None else t._base
            if not (base.is_leaf and base.requires_grad):  # parameters (and views of them) are training state
                key = self._key(t)
                if key is not None:
                    packed[key[0]] = key[1]
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = super().run_node(n)
        self.packed[n.name] = packed
        outs = _flatten_tensors(out)
        self.out_bytes[n.name] = sum(t.numel() * t.element_size() for t in outs)
        for t in outs:
            key = self._key(t)
            if key is not None:
                self.owner.setdefault(key[0], n.name)
        return out

    def fractions(self) -> dict[str, float]:
        """node -> saved bytes / output bytes (nodes without outputs but with saves: absent)."""
        saved = {k: b for p in self.packed.values() for k, b in p.items()}
        kept: dict[str, float] = {}
        for k, b in saved.items():
            who = self.owner.get(k)
            if who is not None:
                kept[who] = kept.get(who, 0.0) + b
        for name, p in self.packed.items():  # saved buffers no node outputs: the saver's own
            kept[name] = kept.get(name, 0.0) + sum(b for k, b in p.items() if k not in self.owner)
        return {name: kept.get(name, 0.0) / ob for name, ob in self.out_bytes.items() if ob > 0}


def _propagate(gm: fx.GraphModule, fake_inputs: Callable) -> tuple[_SpecProp, dict[str, float]]:
    """Specs, FLOPs and saved-activation fractions of ``gm`` from one forward on fake tensors
    with autograd on (:class:`_SavedProp`). A program that does not run under autograd there
    is propagated again without it (which raises CaptureError if it fails for real); its
    fractions are then {} and the cost model counts every op's output as saved."""
    prop = _SavedProp(gm)
    try:
        run_on_fake(gm, prop, fake_inputs, grad=True)
        return prop, prop.fractions()
    except Exception as e:  # noqa: BLE001 - retried below without autograd, where real errors surface
        first = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    plain = _SpecProp(gm)
    run_on_fake(gm, plain, fake_inputs)
    import warnings

    warnings.warn(f"capture: the forward did not run under autograd on fake tensors ({first}); saved "
                  f"activations are estimated as every op's output", stacklevel=3)
    return plain, {}


def _flatten_tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flatten_tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _flatten_tensors(v)]
    return []


def _node_inputs(n: fx.Node) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for a in n.all_input_nodes:
        if a.op != "get_attr":
            seen.setdefault(a.name, None)
    return tuple(seen)


def _node_params(n: fx.Node, gm: fx.GraphModule, canon: dict[str, str]) -> tuple[str, ...]:
    names: list[str] = [str(n.target)] if n.op == "get_attr" else []
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        names = [f"{n.target}.{p}" for p, _ in mod.named_parameters(remove_duplicate=False)]
    for a in n.all_input_nodes:
        if a.op == "get_attr":
            names.append(str(a.target))
    out: dict[str, None] = {}
    for name in names:
        if name in canon:
            out.setdefault(canon[name], None)
    return tuple(out)


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any] | Any,
    *,
    ir: str = "auto",
) -> Graph:
    """Capture ``model`` called on ``example_inputs`` (one global batch) as a :class:`Graph`.

    ``ir``: ``"auto"`` (symbolic_trace, falling back to torch.export), ``"fx"`` or ``"export"``.
    Inputs and weights may be real, fake or meta tensors; nothing is allocated either way.
    Raises :class:`CaptureError` naming the construct and source line a tracer stopped at.
    """
    if ir not in ("auto", "fx", "export"):
        raise ValueError(f"ir must be 'auto', 'fx' or 'export', got {ir!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() needs an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not example_inputs:
        raise ValueError("capture() needs at least one example input (one global batch)")

    meta_inputs = _to_meta(example_inputs)
    gm, used_ir = _trace(model, meta_inputs if _is_meta_model(model) else example_inputs, ir)

    # canonical (first-seen) name per parameter object, so tied weights count once
    canon: dict[str, str] = {}
    by_id: dict[int, str] = {}
    params: dict[str, TensorSpec] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        first = by_id.setdefault(id(p), name)
        canon[name] = first
        if first == name:
            params[name] = TensorSpec.of(p)
    buffers = {name: TensorSpec.of(b) for name, b in gm.named_buffers()}
    for name in buffers:
        canon.setdefault(name, name)
    aliases = {k: v for k, v in canon.items() if k != v}

    prop, saved = _propagate(gm, lambda fake: tuple(fake(t.shape, t.dtype) if isinstance(t, torch.Tensor) else t
                                                    for t in meta_inputs))

    blocks = find_repeated_blocks(model)
    nodes: dict[str, NodeInfo] = {}
    used_blocks: dict[str, None] = {}
    for n in gm.graph.nodes:
        kind = classify(n, gm)
        flops = prop.flops.get(n.name, 0.0)
        if kind is OpKind.ATTENTION and flops == 0.0:
            flops = _attention_flops(n, prop.specs)
        path = _module_path(n)
        block = _block_of(path, blocks)
        if block is not None:
            used_blocks.setdefault(block, None)
        info = NodeInfo(
            name=n.name,
            op=n.op,
            target=_printable_target(n),
            kind=kind,
            inputs=_node_inputs(n),
            outputs=prop.specs.get(n.name, ()),
            params=_node_params(n, gm, canon),
            block=block,
            flops=flops,
            module_path=path,
            saved_fraction=(saved.get(n.name, 0.0) if saved else None),
        )
        n.meta[META_KEY] = info
        nodes[n.name] = info

    return Graph(
        module=model,
        gm=gm,
        nodes=nodes,
        params=params,
        buffers=buffers,
        inputs=tuple(TensorSpec.of(t) for t in _flatten_tensors(meta_inputs)),
        blocks=tuple(used_blocks),
        ir=used_ir,
        param_aliases=aliases,
    )


def _attention_flops(n: fx.Node, specs: dict[str, tuple[TensorSpec, ...]]) -> float:
    """QK^T plus AV, 2 FLOPs per multiply-add, as torch.utils.flop_counter.sdpa_flop_count.

    The CPU kernel behind fake SDPA has no registered FLOP formula, so it is computed here.
    """
    args = [a for a in n.args if isinstance(a, fx.Node)]
    if len(args) < 3 or not specs.get(args[0].name) or not specs.get(args[1].name):
        return 0.0
    q, k = specs[args[0].name][0].shape, specs[args[1].name][0].shape
    if len(q) < 2 or len(k) < 2:
        return 0.0
    batch = 1
    for d in q[:-2]:
        batch *= d
    s_q, d_qk, s_k = q[-2], q[-1], k[-2]
    d_v = specs[args[2].name][0].shape[-1]
    return float(2 * batch * s_q * s_k * d_qk + 2 * batch * s_q * s_k * d_v)


def _is_meta_model(model: nn.Module) -> bool:
    for p in model.parameters():
        return p.is_meta
    return False


def iter_compute_nodes(graph: Graph) -> Iterable[NodeInfo]:
    """Nodes that do work (not inputs, parameter reads or the output)."""
    for n in graph.nodes.values():
        if n.kind not in (OpKind.INPUT, OpKind.PARAM, OpKind.OUTPUT):
            yield n
