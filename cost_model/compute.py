"""Time of one op on one device: a roofline with a matmul efficiency curve.

    time = op_overhead + max(flops / achieved_flops, bytes_moved / achieved_bandwidth)

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
"""
from __future__ import annotations

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
