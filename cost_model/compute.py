"""Time of one op on one device: a roofline with a matmul efficiency curve.

    time = op_overhead + max(flops / achieved_flops, bytes_moved / achieved_bandwidth)

(on a CPU a matmul's two terms add: see :func:`op_time`)

* ``kind="matmul"`` (matmul, bmm, linear, conv, attention's two GEMMs): achieved FLOP/s
  follows the device's efficiency curve ``peak * eff_max * F / (F + flops_half)``, so small
  matmuls are not predicted at peak (see :mod:`autopar.cost_model.device`).
* ``kind="elementwise"`` / ``"reduction"`` / ``"other"``: vector units, not tensor cores:
  FLOP/s = the fp32 peak (bf16/fp16 vector math is not faster on the CPUs we model, and
  these ops are memory-bound on every GPU anyway); usually the memory term dominates.
* achieved bandwidth = ``memory_bandwidth * memory_bw_efficiency``.

Backward rule: a matmul-like op's backward is two matmuls of the forward's size (grad wrt
input and grad wrt weight), so ``backward = 2 x forward`` (Narayanan et al. 2021, sec. 5.1:
"backward pass is twice the forward"). Elementwise backward reads the saved input and the
incoming gradient and writes one gradient: also taken as 2x forward (2 reads + 1 write vs
1 read + 1 write, rounded), documented as an approximation.

Whole graph nodes (:func:`node_time`) on a device the profiler measured: ELEMENTWISE / NORM /
SOFTMAX nodes are priced at the measured elements/s of their kernel (``kernel_rates``; gelu's
erf, silu, tanh ... are compute-bound on a CPU, far below the stream-bandwidth roofline),
CONV nodes by the measured convolution fit (small convolutions run far below the matmul
fit on a CPU, and their backward at a third to a half of the forward's FLOP/s), and
every node the runtime executes (views included) pays the runtime's measured per-node
overhead (``node_overhead_s``) and, for tensors large enough to be freshly mapped
(:data:`FRESH_MAPPING_BYTES`), the measured page-fault cost (``first_touch_bandwidth``);
fused attention (``scaled_dot_product_attention``) is priced by the measured fit of the
kernel where the profile has one (GPUs, and CPUs since 2026-11-23). Catalog devices carry none of these and keep
the roofline above.
"""
from __future__ import annotations

import math

from .device import DeviceSpec, normalize_dtype

OP_KINDS: tuple[str, ...] = ("matmul", "elementwise", "reduction", "other")
BACKWARD_FACTOR = 2.0


def achieved_flops(flops: float, dtype, device: DeviceSpec, kind: str = "matmul") -> float:
    """FLOP/s an op of ``flops`` FLOPs reaches on ``device``."""
    if kind not in OP_KINDS:
        raise ValueError(f"unknown op kind {kind!r}: expected one of {OP_KINDS}")
    d = normalize_dtype(dtype)
    if kind == "matmul":
        return device.matmul_flops(d, flops)
    return device.peak_flops["fp32"] * device.matmul_eff_max["fp32"]


def op_time(flops: float, bytes_moved: float, dtype, device: DeviceSpec, kind: str = "matmul",
            include_overhead: bool = True) -> float:
    """Forward seconds of one op: roofline of compute and memory traffic, plus launch cost."""
    if flops < 0 or bytes_moved < 0:
        raise ValueError(f"op_time: flops ({flops}) and bytes_moved ({bytes_moved}) must be >= 0")
    t_compute = flops / achieved_flops(flops, dtype, device, kind) if flops > 0 else 0.0
    t_memory = bytes_moved / (device.memory_bandwidth * device.memory_bw_efficiency)
    overhead = device.op_overhead_s if include_overhead and (flops > 0 or bytes_moved > 0) else 0.0
    if kind == "matmul" and device.kind == "cpu":
        # a CPU GEMM streams (packs) its operands and then multiplies: the two add up, at the
        # streaming rate the profiler fitted jointly with the matmul rate over square and
        # skinny shapes. On the 2-core VM a (16 x 1024) @ (1024 x 1024) took 0.26 ms at 1
        # process and 0.80 ms at 4, against 0.16 / 0.58 for the larger of the two terms
        if device.matmul_stream_bandwidth > 0:
            t_memory = bytes_moved / device.matmul_stream_bandwidth
        return overhead + t_compute + t_memory
    return overhead + max(t_compute, t_memory)


def backward_time(forward_s: float, kind: str = "matmul") -> float:
    """Backward seconds from forward seconds (2x; see module docstring)."""
    if kind not in OP_KINDS:
        raise ValueError(f"unknown op kind {kind!r}: expected one of {OP_KINDS}")
    return BACKWARD_FACTOR * forward_s


def matmul_flops(m: int, k: int, n: int, batch: int = 1) -> int:
    """FLOPs of a (batch of) [m,k] @ [k,n]: one multiply and one add per MAC."""
    return 2 * batch * m * k * n


def host_transfer_time(nbytes: float, device: DeviceSpec) -> float:
    """Seconds to move ``nbytes`` between device and host memory one way (offload)."""
    if device.host_link == "none":
        return 0.0  # a CPU's memory is host memory
    return nbytes / device.host_link_bandwidth


# --------------------------------------------------------------------------- whole graph nodes

#: Graph-node kinds (``OpKind`` values) priced by a measured kernel rate where the device has one.
_KERNEL_KINDS = ("elementwise", "norm", "softmax")
#: target-name fragment -> measured kernel (first match wins; matched on the lower-cased target).
_KERNEL_BY_NAME: tuple[tuple[str, str], ...] = (
    ("gelu", "gelu"), ("erf", "gelu"), ("silu", "silu"), ("swish", "silu"), ("mish", "silu"),
    ("softmax", "softmax"), ("tanh", "tanh"), ("sigmoid", "exp"), ("exp", "exp"), ("log", "exp"),
    ("sqrt", "exp"), ("pow", "exp"), ("sin", "exp"), ("cos", "exp"),
    ("norm", "layer_norm"),
    ("mul", "mul"), ("div", "mul"), ("dropout", "mul"), ("where", "mul"),
)


#: kernel -> the measured kernel that stands in for it on a profile taken before it was measured
_KERNEL_FALLBACK = {"gelu_tanh": "gelu"}
#: attention dtypes the profiler does not time -> the one that stands in (same tensor-core rate)
_SDPA_FALLBACK = {"fp16": "bf16", "tf32": "fp32"}


def kernel_class(node_kind: str, target: str, kwargs: "dict | None" = None) -> "str | None":
    """Which measured kernel prices a graph node: ``node_kind`` is the NodeInfo's ``OpKind``
    value, ``target`` its target name (``"torch.nn.functional.gelu"``; for a module node its
    class name, ``"BatchNorm2d"``, or else its path). NORM nodes are ``batch_norm`` (the name
    says batch norm) or ``layer_norm``, SOFTMAX ``softmax``, POOL ``max_pool`` for max
    pooling; ELEMENTWISE nodes by name (transcendental ops by their function, ``mul``-like,
    else ``add``; a gelu with ``approximate="tanh"`` in ``kwargs`` is ``gelu_tanh``, whose
    tanh polynomial ran 4x slower than the erf form on the 2-core VM); CONV ``conv`` (priced by
    FLOPs on the measured convolution fit); ATTENTION ``sdpa`` or, with ``is_causal``,
    ``sdpa_causal`` for ``scaled_dot_product_attention`` (priced on the fused kernel's fit
    where a GPU profile has one); other kinds None (the roofline)."""
    k = str(getattr(node_kind, "value", node_kind)).lower()
    name = str(target).lower()
    if k == "attention":  # the fused function only (nn.MultiheadAttention holds projections too)
        if "scaled_dot_product" not in name:
            return None
        return "sdpa_causal" if (kwargs or {}).get("is_causal") else "sdpa"
    if k == "conv":
        return "conv"
    if k == "pool":  # max pooling (indices kept) is far below stream speed; average pooling is not
        return "max_pool" if "max" in name else None
    if k not in _KERNEL_KINDS:
        return None
    if k == "norm":
        return "batch_norm" if "batch" in name else "layer_norm"
    if k == "softmax":
        return "softmax"
    for frag, kernel in _KERNEL_BY_NAME:
        if frag in name and not (frag == "norm" and k == "elementwise" and "normal" in name):
            if kernel == "gelu" and (kwargs or {}).get("approximate") == "tanh":
                return "gelu_tanh"
            return kernel
    return "add"


#: Allocations from this size up are always freshly mapped pages with glibc's malloc: the
#: runtime fixes its mmap threshold here (:mod:`autopar.runtime.host_memory`), the largest
#: glibc takes, DEFAULT_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * sizeof(long) = 32 MiB on 64-bit
#: Linux (glibc malloc/malloc.c; mallopt(3)), and keeps freed heap memory mapped, so smaller
#: tensors come back from the heap, already mapped.
FRESH_MAPPING_BYTES = 32 << 20


def node_time(flops: float, bytes_moved: float, elements: float, dtype, device: DeviceSpec,
              kind: "str | None", kernel: "str | None" = None, out_bytes: float = 0.0) -> tuple[float, float]:
    """``(forward_s, backward_s)`` of one graph node per microbatch, overheads included.

    * ``kind`` is the :func:`op_time` kind, or None for a node that does no arithmetic (a view)
      but which the runtime still executes.
    * work: :func:`op_time` without its overhead; for ``kernel`` (:func:`kernel_class`) on a
      device with measured ``kernel_rates``, each direction is at least ``elements`` (output
      elements) over the measured rate of that kernel and direction (a measured rate already
      includes the memory traffic; the max keeps a larger-than-measured roofline term).
    * overhead: a device with a measured ``node_overhead_s`` (autopar's runtime, per node per
      step, forward + backward) is charged that for every node, split forward : backward as
      1 : BACKWARD_FACTOR; otherwise ``op_overhead_s`` forward and BACKWARD_FACTOR x that backward
      for nodes that do work (the op_time convention).
    * fresh memory: on a device with a measured ``first_touch_bandwidth``, the bytes a node
      allocates that come from freshly mapped pages are charged at that rate (page faults; the
      matmul fit and the kernel rates are timed on memory the allocator reuses): the forward's
      ``out_bytes`` and the backward's ``bytes_moved - out_bytes`` (input and parameter
      gradients, the sizes of what it read), each where it reaches :data:`FRESH_MAPPING_BYTES`.
      Smaller tensors reuse heap memory under the runtime's allocator settings
      (:mod:`autopar.runtime.host_memory`; without them a GPT step on the 2-core VM faulted
      9-20 MiB, a DLRM step 43 MiB, ``getrusage`` minor faults, 2026-11-24; with them none).
      Until 2026-11-23 every byte written was charged here, standing in for costs the other
      figures missed; that added 50-75 % to the one-process transformer steps (GPT small: 76
      of 221 ms) whose kernels, run eagerly, measured -15..+2 % off the rest of the
      prediction (seven zoo models, one process, 2-core VM), and it charged the kernel-rate
      nodes a second time, their rates already holding their writes. What it stood in for
      is the runtime's cost per node of real transformer code, now measured on such blocks
      (``node_overhead_s``; see the README, "What changed in the model")."""
    if kind is None:
        fwd = bwd = 0.0
    else:
        fwd = op_time(flops, bytes_moved, dtype, device, kind=kind, include_overhead=False)
        bwd = backward_time(fwd, kind=kind)
        rates = device.kernel_rates
        if kernel in _KERNEL_FALLBACK and not rates.get(f"{kernel}_fwd"):
            kernel = _KERNEL_FALLBACK[kernel]
        if kernel in ("sdpa", "sdpa_causal"):
            # FLOP-priced on the measured fit of the fused kernel, per dtype (profiled GPUs):
            # replaces the matmul roofline, which prices a causal mask's skipped half
            d = normalize_dtype(dtype)
            key = f"{kernel}_{d}" if rates.get(f"{kernel}_{d}_fwd") else f"{kernel}_{_SDPA_FALLBACK.get(d, d)}"
            if rates.get(f"{key}_fwd") and flops > 0:
                fwd = (flops + rates.get(f"{key}_fwd_half", 0.0)) / rates[f"{key}_fwd"]
            if rates.get(f"{key}_bwd") and flops > 0:
                bwd = (BACKWARD_FACTOR * flops + rates.get(f"{key}_bwd_half", 0.0)) / rates[f"{key}_bwd"]
        elif kernel == "conv":  # FLOP-priced: the measured fit (seconds = (flops + half) / rate)
            if rates.get("conv_fwd") and flops > 0:
                fwd = max(fwd, (flops + rates.get("conv_fwd_half", 0.0)) / rates["conv_fwd"])
            if rates.get("conv_bwd") and flops > 0:
                bwd = max(bwd, (BACKWARD_FACTOR * flops + rates.get("conv_bwd_half", 0.0)) / rates["conv_bwd"])
        elif kernel is not None and elements > 0:
            # rates are measured in fp32; a GPU's kernels stream memory, so 2-byte elements
            # go twice as fast (a CPU's are bound by arithmetic and are taken as measured)
            speed = 2.0 if device.kind == "gpu" and normalize_dtype(dtype) in ("bf16", "fp16") else 1.0
            if rates.get(f"{kernel}_fwd"):
                fwd = max(fwd, elements / (speed * rates[f"{kernel}_fwd"]))
            if rates.get(f"{kernel}_bwd"):
                bwd = max(bwd, elements / (speed * rates[f"{kernel}_bwd"]))
    if device.first_touch_bandwidth > 0 and kind is not None:
        grads = max(0.0, bytes_moved - out_bytes)
        fwd += (out_bytes if out_bytes >= FRESH_MAPPING_BYTES else 0.0) / device.first_touch_bandwidth
        bwd += (grads if grads >= FRESH_MAPPING_BYTES else 0.0) / device.first_touch_bandwidth
    if device.node_overhead_s > 0:
        share = device.node_overhead_s / (1.0 + BACKWARD_FACTOR)
        return fwd + share, bwd + BACKWARD_FACTOR * share
    if kind is not None and (flops > 0 or bytes_moved > 0):
        fwd += device.op_overhead_s
        bwd += BACKWARD_FACTOR * device.op_overhead_s
    return fwd, bwd


#: prefix of a GPU DeviceSpec's optimizer rates that were measured on its host's CPU, where an
#: offloaded optimizer steps (ZeRO-Offload)
HOST_RATE_PREFIX = "host_"
#: Tensor sizes (elements) the profiler times the optimizer on: its default 2^21 elements over
#: 8 tensors (``optimizer_rates[OPT]``) and 2 tensors of 2^22 (``optimizer_rates[OPT_large]``,
#: streaming from memory; :data:`autopar.cost_model.profiler.LARGE_OPT_TENSOR`).
OPT_SMALL_TENSOR = (1 << 21) // 8
OPT_LARGE_TENSOR = 1 << 22


def _opt_key(optimizer: str, table, prefix: str = "") -> str:
    o = str(optimizer).lower()
    # AdamW runs Adam's kernels
    return prefix + ("adam" if o == "adamw" and prefix + "adamw" not in table else o)


def optimizer_step_overhead(num_tensors: int, optimizer: str, device: DeviceSpec, prefix: str = "") -> float:
    """Fixed seconds of one optimizer step over ``num_tensors`` parameter tensors (the
    per-tensor kernel series of a single-tensor optimizer), from the device's measured
    ``optimizer_tensor_overhead_s``; 0 where not measured (catalog devices). ``prefix``
    :data:`HOST_RATE_PREFIX` reads the host CPU's figure that a profiled GPU carries."""
    table = device.optimizer_tensor_overhead_s
    return num_tensors * table.get(_opt_key(optimizer, table, prefix), 0.0)


def optimizer_step_time(numel: float, num_tensors: int, optimizer: str, device: DeviceSpec,
                        on_host: bool = False) -> "float | None":
    """Seconds of one optimizer step over ``num_tensors`` tensors holding ``numel`` elements
    (this device's shard) from the profiler's measurements: per-element rate plus per-tensor
    cost. None where the device has no measured rate for this optimizer (catalog devices:
    price the step on the memory roofline as before).

    ``on_host``: the step of offloaded optimizer state, which runs on the host's CPU: a
    profiled GPU carries its host's measured rates as ``host_*`` entries. torch.optim.Adam on
    the 16-core host of the lent H100 ran at 0.85-0.98 G elements/s on 4 M-element tensors,
    where the DRAM roofline of the catalog socket (24 bytes an element) says 15."""
    prefix = HOST_RATE_PREFIX if on_host else ""
    key = _opt_key(optimizer, device.optimizer_rates, prefix)
    rate = device.optimizer_rates.get(key)
    if not rate:
        return None
    large = device.optimizer_rates.get(f"{key}_large")
    per = numel / max(1, num_tensors)
    if large and per > OPT_SMALL_TENSOR:
        # between the two measured tensor sizes, the rate moves with log(size); beyond, large
        f = min(1.0, math.log(per / OPT_SMALL_TENSOR) / math.log(OPT_LARGE_TENSOR / OPT_SMALL_TENSOR))
        rate = rate * (large / rate) ** f
    return numel / rate + optimizer_step_overhead(num_tensors, optimizer, device, prefix)
