"""What one device can do: a frozen value the rest of the cost model is handed.

A :class:`DeviceSpec` is loaded from the catalog (datasheet figures) or from a profile
(``autopar profile``, measured on this machine); nothing in the cost formulas knows which
hardware it runs on. Every spec carries a :class:`Provenance` so a predicted figure can be
traced back to a datasheet URL or a measurement.

Units: FLOP/s, bytes, bytes/s, seconds. Bandwidths are per direction.

Matmul efficiency curve
-----------------------
Peak FLOP/s is never reached, and small matmuls are far from it (launch overhead, tile
quantisation, too little work per core). The model is

    achieved(F) = peak * eff_max * F / (F + flops_half)

for a matmul of F FLOPs. Equivalently ``time(F) = (F + flops_half) / (peak * eff_max)``: a
fixed per-kernel cost ``t0 = flops_half / (peak * eff_max)`` plus the work at the best
sustained rate. ``eff_max`` is the large-matmul fraction of peak (e.g. the "Maximum
Achievable Matmul FLOPS" of stas00/ml-engineering); ``flops_half`` is the matmul size that
reaches half of it. Both are per dtype, since a CPU may run bf16 far below fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

#: Dtype keys every DeviceSpec.peak_flops must have (dense figures, no 2:4 sparsity).
DTYPES: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")
KINDS: tuple[str, ...] = ("gpu", "cpu")
HOST_LINKS: tuple[str, ...] = ("pcie4", "pcie5", "nvlink-c2c", "none")

_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "tensorfloat32": "tf32",
}


def normalize_dtype(dtype: Any) -> str:
    """Map ``torch.bfloat16``, ``"bfloat16"``, ``"bf16"`` ... to the DTYPES key."""
    key = str(dtype).lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {DTYPES} (or a torch dtype)")
    return key


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where a figure came from: a datasheet URL or "measured on HOST", and when."""

    source: str
    date: str
    host: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError("Provenance.source must be a non-empty string (a URL or 'measured on HOST')")
        if not isinstance(self.date, str) or not self.date.strip():
            raise ValueError(f"Provenance.date must be a non-empty string, got {self.date!r}")

    def to_json(self) -> dict:
        return {"source": self.source, "date": self.date, "host": self.host, "notes": self.notes}

    @classmethod
    def from_json(cls, d: Mapping) -> "Provenance":
        return cls(source=d["source"], date=d["date"], host=d.get("host", ""), notes=d.get("notes", ""))


def _frozen_map(name: str, value: Any) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        raise TypeError(f"DeviceSpec.{name} must be a dict dtype->number, got {type(value).__name__}")
    return MappingProxyType({str(k): float(v) for k, v in value.items()})


def _check_positive(owner: str, name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator or CPU socket (or, for ``local:N``, one process's share of this host).

    Fields:
      peak_flops: dtype -> dense peak FLOP/s, keys ``fp32``, ``tf32``, ``bf16``, ``fp16``.
      memory_bytes / memory_bandwidth: device memory (HBM, or DRAM for a CPU) and its B/s.
      host_link / host_link_bandwidth: the link to host memory used for offload (B/s per
        direction); ``"none"`` with bandwidth 0 for a CPU, whose memory *is* host memory.
      host_memory_bytes: host memory available to this device for offload (0 for a CPU).
      matmul_eff_max / matmul_flops_half: per-dtype efficiency curve (module docstring).
      memory_bw_efficiency: fraction of memory_bandwidth a streaming kernel achieves.
      op_overhead_s: fixed cost of launching one op (kernel launch + framework dispatch).
      node_overhead_s: fixed seconds autopar's runtime spends per graph node per training step
        (forward + backward: fx interpretation, DTensor wrapping/redistribution, autograd),
        measured on the runtime itself by the profiler; 0 = not measured, and then each op is
        charged ``op_overhead_s`` instead (:func:`autopar.cost_model.compute.node_time`).
      kernel_rates: measured elements/s of non-matmul kernels, keys ``NAME_fwd``/``NAME_bwd``
        for NAME in gelu, silu, tanh, exp, softmax, layer_norm, add, mul (fp32), and the
        convolution fit ``seconds = (flops + half) / rate`` per direction: ``conv_fwd`` /
        ``conv_bwd`` in FLOP/s, ``conv_fwd_half`` / ``conv_bwd_half`` in FLOPs (the backward's
        FLOPs are twice the forward's), and the fused attention's fits of the same form
        ``sdpa[_causal]_DTYPE_fwd`` / ``_bwd`` (``_half``); empty for catalog devices, which
        keep the roofline.
      optimizer_tensor_overhead_s: optimizer -> seconds per parameter tensor per step of a
        single-tensor (for-loop) optimizer (keys ``adam``, ``sgd``); empty = not measured.
      optimizer_rates: optimizer -> measured parameter elements/s of its step's arithmetic
        (same keys) on cache-sized tensors, and ``OPT_large`` on tensors that stream from
        memory (:func:`autopar.cost_model.compute.optimizer_step_time` interpolates).
      first_touch_bandwidth: B/s at which freshly mapped memory is first written (page faults
        alone), charged on the tensors a node allocates that are large enough to be freshly
        mapped (:data:`autopar.cost_model.compute.FRESH_MAPPING_BYTES`); 0 = not measured /
        not charged.
      matmul_stream_bandwidth: B/s at which a CPU GEMM streams (packs) its operands, fitted by
        the profiler jointly with the matmul rate over square and skinny shapes; a CPU
        matmul's time is compute + operands / this (:func:`autopar.cost_model.compute.op_time`).
        0 = not fitted: ``memory_bandwidth`` is used.
      shared_speedup: for one process's share of a host whose processes share cores (``local:N``
        with more processes than cores): entry k-1 is how much faster the process computes
        when only k of the N compute at once than when all N do (1.0 at k = N), from the
        profile's per-process matmul rates. A pipeline's fill and drain leave stages idle, and
        on such a host the busy ones run faster (:func:`autopar.cost_model.pipeline.shared_host_factor`).
        Empty: nothing is shared (GPUs, catalog devices).
      param_overhead_s: seconds autopar's runtime spends per parameter per microbatch beyond
        its node's and its optimizer step's (DTensor gradient accumulation and sync
        bookkeeping), measured by the profiler (:class:`autopar.cost_model.profiler.RuntimeProbe`);
        0 = not measured.
      param_overhead_local_s: the same for a parameter whose gradient no collective
        synchronises (dp = 1 and not replicated over tp: a pipeline stage's own), measured on
        one-rank meshes running side by side; 4 processes on the 2-core VM: 50-167 us against
        250-340 us with a dp sync. 0 = not measured: ``param_overhead_s`` is used.
    """

    name: str
    kind: str
    arch: str
    peak_flops: Mapping[str, float]
    memory_bytes: int
    memory_bandwidth: float
    host_link: str
    host_link_bandwidth: float
    host_memory_bytes: int
    matmul_eff_max: Mapping[str, float]
    matmul_flops_half: Mapping[str, float]
    memory_bw_efficiency: float
    op_overhead_s: float
    provenance: Provenance
    cores: int = 0  # CPU cores (or SMs for a GPU); informative, 0 when unknown
    node_overhead_s: float = 0.0
    kernel_rates: Mapping[str, float] = field(default_factory=dict)
    optimizer_tensor_overhead_s: Mapping[str, float] = field(default_factory=dict)
    optimizer_rates: Mapping[str, float] = field(default_factory=dict)
    first_touch_bandwidth: float = 0.0
    matmul_stream_bandwidth: float = 0.0
    shared_speedup: tuple[float, ...] = ()
    param_overhead_s: float = 0.0
    param_overhead_local_s: float = 0.0

    def __post_init__(self) -> None:
        owner = f"DeviceSpec({self.name!r})"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DeviceSpec.name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{owner}.kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.arch, str) or not self.arch:
            raise ValueError(f"{owner}.arch must be a non-empty string like 'sm90' or 'aarch64'")
        if self.host_link not in HOST_LINKS:
            raise ValueError(f"{owner}.host_link must be one of {HOST_LINKS}, got {self.host_link!r}")
        for name in ("peak_flops", "matmul_eff_max", "matmul_flops_half", "kernel_rates",
                     "optimizer_tensor_overhead_s", "optimizer_rates"):
            object.__setattr__(self, name, _frozen_map(name, getattr(self, name)))
        for k, v in self.kernel_rates.items():
            _check_positive(owner, f"kernel_rates[{k!r}]", v)
        for k, v in self.optimizer_rates.items():
            _check_positive(owner, f"optimizer_rates[{k!r}]", v)
        for k, v in self.optimizer_tensor_overhead_s.items():
            _check_positive(owner, f"optimizer_tensor_overhead_s[{k!r}]", v, allow_zero=True)
        _check_positive(owner, "node_overhead_s", self.node_overhead_s, allow_zero=True)
        _check_positive(owner, "first_touch_bandwidth", self.first_touch_bandwidth, allow_zero=True)
        _check_positive(owner, "matmul_stream_bandwidth", self.matmul_stream_bandwidth, allow_zero=True)
        _check_positive(owner, "param_overhead_s", self.param_overhead_s, allow_zero=True)
        _check_positive(owner, "param_overhead_local_s", self.param_overhead_local_s, allow_zero=True)
        object.__setattr__(self, "shared_speedup", tuple(float(x) for x in self.shared_speedup))
        for k, v in enumerate(self.shared_speedup, 1):
            if not (math.isfinite(v) and v >= 1.0):
                raise ValueError(f"{owner}.shared_speedup[{k - 1}] (speed with {k} processes computing) must be a "
                                 f"finite number >= 1, got {v!r}")
        for name in ("peak_flops", "matmul_eff_max", "matmul_flops_half"):
            table = getattr(self, name)
            missing = [d for d in DTYPES if d not in table]
            if missing:
                raise ValueError(f"{owner}.{name} lacks dtype(s) {missing}; needs all of {DTYPES}")
            extra = [d for d in table if d not in DTYPES]
            if extra:
                raise ValueError(f"{owner}.{name} has unknown dtype(s) {extra}; allowed {DTYPES}")
            for d, v in table.items():
                _check_positive(owner, f"{name}[{d!r}]", v, allow_zero=(name == "matmul_flops_half"))
        for d, v in self.matmul_eff_max.items():
            if v > 1.0:
                raise ValueError(f"{owner}.matmul_eff_max[{d!r}] must be <= 1 (a fraction of peak), got {v}")
        for name in ("memory_bytes", "memory_bandwidth"):
            _check_positive(owner, name, getattr(self, name))
        _check_positive(owner, "host_memory_bytes", self.host_memory_bytes, allow_zero=True)
        _check_positive(owner, "op_overhead_s", self.op_overhead_s, allow_zero=True)
        _check_positive(owner, "memory_bw_efficiency", self.memory_bw_efficiency)
        if self.memory_bw_efficiency > 1.0:
            raise ValueError(f"{owner}.memory_bw_efficiency must be <= 1, got {self.memory_bw_efficiency}")
        if self.host_link == "none":
            if self.host_link_bandwidth != 0:
                raise ValueError(f"{owner}.host_link_bandwidth must be 0 when host_link is 'none', "
                                 f"got {self.host_link_bandwidth}")
        else:
            _check_positive(owner, "host_link_bandwidth", self.host_link_bandwidth)
        if not isinstance(self.cores, int) or self.cores < 0:
            raise ValueError(f"{owner}.cores must be an int >= 0, got {self.cores!r}")
        if not isinstance(self.provenance, Provenance):
            raise TypeError(f"{owner}.provenance must be a Provenance, got {type(self.provenance).__name__}")

    def __hash__(self) -> int:  # the mapping fields are read-only proxies; hash their items
        return hash((self.name, self.kind, self.arch, tuple(sorted(self.peak_flops.items())),
                     self.memory_bytes, self.memory_bandwidth, self.provenance))

    def matmul_flops(self, dtype: Any, flops: float) -> float:
        """Achieved FLOP/s of one matmul of ``flops`` FLOPs (the efficiency curve)."""
        d = normalize_dtype(dtype)
        best = self.peak_flops[d] * self.matmul_eff_max[d]
        return best * flops / (flops + self.matmul_flops_half[d]) if flops > 0 else 0.0

    def replace(self, **changes: Any) -> "DeviceSpec":
        """A copy with some fields changed (validated again)."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d.update(changes)
        return DeviceSpec(**d)

    def to_json(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "arch": self.arch,
            "peak_flops": dict(self.peak_flops),
            "memory_bytes": int(self.memory_bytes), "memory_bandwidth": self.memory_bandwidth,
            "host_link": self.host_link, "host_link_bandwidth": self.host_link_bandwidth,
            "host_memory_bytes": int(self.host_memory_bytes),
            "matmul_eff_max": dict(self.matmul_eff_max),
            "matmul_flops_half": dict(self.matmul_flops_half),
            "memory_bw_efficiency": self.memory_bw_efficiency,
            "op_overhead_s": self.op_overhead_s, "cores": self.cores,
            "node_overhead_s": self.node_overhead_s, "kernel_rates": dict(self.kernel_rates),
            "optimizer_tensor_overhead_s": dict(self.optimizer_tensor_overhead_s),
            "optimizer_rates": dict(self.optimizer_rates), "first_touch_bandwidth": self.first_touch_bandwidth,
            "matmul_stream_bandwidth": self.matmul_stream_bandwidth, "shared_speedup": list(self.shared_speedup),
            "param_overhead_s": self.param_overhead_s, "param_overhead_local_s": self.param_overhead_local_s,
            "provenance": self.provenance.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "DeviceSpec":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"DeviceSpec JSON has unknown field(s) {sorted(unknown)}")
        optional = {"cores", "node_overhead_s", "kernel_rates", "optimizer_tensor_overhead_s", "optimizer_rates",
                    "first_touch_bandwidth", "matmul_stream_bandwidth", "shared_speedup",
                    "param_overhead_s", "param_overhead_local_s"}  # have defaults
        missing = [f for f in known if f not in d and f not in optional]
        if missing:
            raise ValueError(f"DeviceSpec JSON for {d.get('name', '?')!r} lacks field(s) {sorted(missing)}")
        args = dict(d)
        args["provenance"] = Provenance.from_json(d["provenance"])
        args["memory_bytes"] = int(d["memory_bytes"])
        args["host_memory_bytes"] = int(d["host_memory_bytes"])
        return cls(**args)
