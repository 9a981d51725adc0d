"""Bytes of training state per parameter, and how ZeRO divides them.

Per parameter (Rajbhandari et al. 2020, "ZeRO", sec. 3.1: mixed-precision Adam keeps
fp16/bf16 params (2) and grads (2) plus fp32 master weights, momentum and variance
(K = 12) = 16 bytes/param):

    precision    params  grads  adam states            sgd states
    fp32           4       4    8  (m, v)              4  (momentum)
    bf16-mixed     2       2    12 (master, m, v)      8  (master, momentum)
    fp16-mixed     2       2    12 (master, m, v)      8  (master, momentum)

so Adam costs 16 bytes/param under every precision. (PyTorch autocast keeps fp32 params
and grads instead, 4 + 4 + 8: also 16 for Adam.) ``sgd`` means SGD with momentum; plain
SGD without momentum would hold no state.

ZeRO over a data-parallel group of ``dp`` ranks: stage 1 shards optimizer states, stage 2
also gradients, stage 3 also parameters. A sharded tensor costs ceil(numel / dp) elements
per rank (the padding FSDP/ZeRO use to split evenly).
"""
from __future__ import annotations

import math

PRECISIONS: tuple[str, ...] = ("fp32", "bf16-mixed", "fp16-mixed")
#: What a plan's ``training.optimizer`` names: ``torch.optim.Adam`` (or AdamW) / ``SGD`` with
#: momentum, in PyTorch's default implementation for the device (single-tensor for-loop on a
#: CPU, foreach on a GPU), or the same class built with ``fused=True`` (``*_fused``). The
#: implementation is part of the name because it changes what a step costs: on the 2-core dev
#: VM (torch 2.13 CPU, 2026-11-24) a fused Adam step over 8 x 256 K elements took 1.4 ms against
#: 8.1 for the for-loop, and the fused kernel allocates no temporaries.
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "adam_fused", "sgd_fused")

_PARAM = {"fp32": 4, "bf16-mixed": 2, "fp16-mixed": 2}
_GRAD = {"fp32": 4, "bf16-mixed": 2, "fp16-mixed": 2}
#: Optimizer bytes/param: its own states, plus fp32 master weights under mixed precision.
_OPT = {("adam", "fp32"): 8, ("adam", "bf16-mixed"): 12, ("adam", "fp16-mixed"): 12,
        ("sgd", "fp32"): 4, ("sgd", "bf16-mixed"): 8, ("sgd", "fp16-mixed"): 8}


def _check(precision: str, optimizer: str | None = None) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected one of {PRECISIONS}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: expected one of {OPTIMIZERS}")


def optimizer_kind(optimizer: str) -> str:
    """The update rule an optimizer name runs (``adam`` / ``sgd``), whatever its implementation."""
    _check("fp32", optimizer)
    return optimizer.split("_", 1)[0]


def is_fused(optimizer: str) -> bool:
    """Whether the name asks for the fused implementation (``torch.optim.X(fused=True)``)."""
    _check("fp32", optimizer)
    return optimizer.endswith("_fused")


def activation_bytes_per_element(precision: str) -> int:
    """Bytes of one saved activation element (compute dtype)."""
    _check(precision)
    return 4 if precision == "fp32" else 2


def param_bytes(numel: int, precision: str) -> int:
    _check(precision)
    return numel * _PARAM[precision]


def grad_bytes(numel: int, precision: str) -> int:
    _check(precision)
    return numel * _GRAD[precision]


def optimizer_state_bytes(numel: int, optimizer: str, precision: str) -> int:
    """Optimizer states, including fp32 master weights under mixed precision."""
    _check(precision, optimizer)
    return numel * _OPT[(optimizer_kind(optimizer), precision)]


def training_state_bytes(numel: int, optimizer: str, precision: str, zero_stage: int = 0,
                         dp: int = 1) -> int:
    """Per-rank bytes of params + grads + optimizer state for ``numel`` parameters
    replicated over ``dp`` data-parallel ranks with ZeRO stage ``zero_stage`` (0-3)."""
    _check(precision, optimizer)
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if not isinstance(dp, int) or dp < 1:
        raise ValueError(f"dp must be an int >= 1, got {dp!r}")
    shard = math.ceil(numel / dp)
    p = param_bytes(shard if zero_stage >= 3 else numel, precision)
    g = grad_bytes(shard if zero_stage >= 2 else numel, precision)
    o = optimizer_state_bytes(shard if zero_stage >= 1 else numel, optimizer, precision)
    return p + g + o


def training_state_breakdown(numel: int, optimizer: str, precision: str, zero_stage: int = 0,
                             dp: int = 1) -> dict[str, int]:
    """Same as :func:`training_state_bytes`, split into params / grads / optimizer."""
    shard = math.ceil(numel / dp)
    return {"params": param_bytes(shard if zero_stage >= 3 else numel, precision),
            "grads": grad_bytes(shard if zero_stage >= 2 else numel, precision),
            "optimizer": optimizer_state_bytes(shard if zero_stage >= 1 else numel, optimizer, precision)}


#: Bytes per element of the temporaries an optimizer's step allocates (Adam's moments are fp32).
#: torch.optim.Adam, torch 2.13: the single-tensor path makes ``denom = (exp_avg_sq.sqrt() /
#: bias_correction2_sqrt).add_(eps)``, two parameter-sized temporaries alive together, one
#: parameter at a time; the foreach path makes ``exp_avg_sq_sqrt = torch._foreach_sqrt(...)``,
#: one temporary per parameter for all of them at once, then works in place. PyTorch defaults
#: to foreach only for tensors on CUDA-like devices (``_default_to_fused_or_foreach``); DTensor
#: parameters qualify. SGD with momentum updates in place. On the 2-core dev VM, an MLP's
#: first step peaked at exactly its parameters, gradients and Adam state plus two of its
#: largest weight (56.1 MiB, 2026-11-23). The fused kernels (``fused=True``) update every
#: element in place: a fused Adam step over 4 x 1 M elements created no tensor storage under
#: ``runtime.live_memory.LiveTensorBytes`` (2026-11-24), so the ``*_fused`` names hold none.
_STEP_TEMPS = {("adam", False): 2, ("adam", True): 1, ("sgd", False): 0, ("sgd", True): 0}


def optimizer_step_temp_bytes(numel: int, optimizer: str, foreach: bool) -> int:
    """Bytes of the temporaries the optimizer's step allocates for one tensor of ``numel``
    elements: single-tensor (``foreach=False``) holds them for one tensor at a time, the
    foreach path for every tensor of the step at once, a fused optimizer none."""
    if is_fused(optimizer):
        return 0
    return numel * 4 * _STEP_TEMPS[(optimizer_kind(optimizer), bool(foreach))]


#: Model outputs alive at the loss's backward besides the saved activations: the output (the
#: runtime holds it through the backward), cross-entropy's log-softmax kept for its backward,
#: the gradient arriving from the NLL and the one leaving for the logits. Measured: the live
#: tensors at ``_log_softmax_backward_data`` in GPT, LLaMA and BERT small steps held four
#: logits-sized tensors (2026-11-23, ``autopar.runtime.live_memory``). A loss that keeps less
#: (MSE) makes this an over-estimate of two or three output sizes.
LOSS_BACKWARD_OUTPUTS = 4


RECOMPUTE: tuple[str, ...] = ("none", "selective", "full")


def gpt_activation_bytes_per_layer(seq: int, batch: int, hidden: int, heads: int, tp: int = 1,
                                   sequence_parallel: bool = False, recompute: str = "none") -> float:
    """Saved activation bytes of one transformer layer in 16-bit training, per device.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    Table 2 (s = seq, b = batch, h = hidden, a = heads, t = tp):

        no parallelism              s b h (34 + 5 a s / h)
        tensor parallel             s b h (10 + 24/t + 5 a s / (h t))
        tensor + sequence parallel  s b h (34/t + 5 a s / (h t))
        + selective recompute       s b h (34/t)  (with sequence parallel; 10 + 24/t without)
        full recompute              2 s b h       (only the layer input is kept; /t with SP)

    For checking the graph-derived activation sizes, the way :mod:`flops` checks FLOPs.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"unknown recompute {recompute!r}: expected one of {RECOMPUTE}")
    for name, v in (("seq", seq), ("batch", batch), ("hidden", hidden), ("heads", heads), ("tp", tp)):
        if v < 1:
            raise ValueError(f"gpt_activation_bytes_per_layer: {name} must be >= 1, got {v}")
    s, b, h, a, t = seq, batch, hidden, heads, tp
    sbh = s * b * h
    if recompute == "full":
        return 2.0 * sbh / (t if sequence_parallel else 1)
    attn = 0.0 if recompute == "selective" else 5.0 * a * s / (h * t)
    if sequence_parallel:
        return sbh * (34.0 / t + attn)
    return sbh * (10.0 + 24.0 / t + attn)
