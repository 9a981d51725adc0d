"""``autopar profile``: measure this machine and write the cluster ``local:N`` stands for.

What is measured (all with torch, no ISA-specific code, so it runs on x86 and ARM alike):

1. ``nproc`` ranks started with ``torch.multiprocessing`` (spawn; fork where a new
   interpreter cannot be exec'd, e.g. under qemu-user) before this process runs any op,
   joined with gloo over 127.0.0.1 (NCCL for CUDA tensors when every rank has its own GPU).
   For each n = 2..nproc, the first n ranks, each with ``max(1, cores // n)`` threads, run
   the matmul sweep **at the same time** for a fixed wall-clock window per point: on a
   2-core host 4 processes each get about a quarter of the machine, and that per-process
   rate is what predicts a 4-process run. Then all_reduce, all_gather, reduce_scatter,
   all_to_all, broadcast (and send/recv between ranks 0 and 1) over a range of sizes, on CPU
   ranks each after ``IN_PLACE_BUSY_S`` of compute (a step's collectives sit between ops:
   waking the peers costs more than between idle ranks), and :func:`sync_costs` (skew,
   overlap). alpha (latency) and beta (bandwidth) are fitted jointly over all collectives with the
   ring formulas of :mod:`collectives` (the link-wide pair), and once per collective
   (``LinkSpec.collective_fits``: gloo's algorithms do not all follow the ring formulas);
   ``raw.fit_check`` records predicted vs measured for every sample.
2. In this process, with every core: matmul wall time per call over a window for square sizes in fp32, bf16, fp16,
   and fp32 GEMMs of :data:`GEMM_SHAPES` (skinny, transformer-sized; also per process count in
   the rank phase); the fit ``t = t0 + F / rate (+ operand bytes / stream)`` per dtype gives
   the DeviceSpec efficiency curve (``peak_flops = rate`` as the best sustained matmul rate,
   ``eff_max = 1``, ``flops_half = t0 * rate``; on CPUs fp32 is fitted jointly with the
   operands' streaming rate, :func:`fit_gemm`, ``matmul_stream_bandwidth``); streaming bandwidth (``out = x + y``); the dispatch cost of a
   one-element op. ``op_overhead_s`` is instead the per-op dispatch cost of DTensor training
   (:func:`dtensor_op_overhead`, measured by the ranks: alone with every core, and n at once
   for ``local:n``), because the runtime executes every node of a plan as DTensor ops: on a
   CPU that is tens of microseconds per op against a few for a plain op, and it dominates
   small models (where no ranks run, the plain op's cost is used; both are in ``raw``). With CUDA, the same on the GPU plus pinned
   host<->device copies (host link bandwidth).
3. What the node pricing uses on a measured CPU (:func:`autopar.cost_model.compute.node_time`):
   ``node_overhead_s``, autopar's runtime itself timed per graph node per training step
   (:class:`RuntimeProbe`: captured toy-width transformer blocks through ``apply_plan`` +
   ``train_step`` at two block counts, their parameters' cost taken out; 1 rank in this process, and 2 and ``nproc`` ranks (dp plans) in the
   rank phase, in blocks spread over it; other n scale the DTensor chain figure by the
   runtime/DTensor ratio measured at the nearest n, said in the provenance notes). It replaces
   the per-op DTensor tanh-chain estimate in node pricing because it is the runtime's own cost
   (fx interpretation, input/output placement checks, wrapping, autograd): 1.5-2x the DTensor
   chain's forward + backward figure on the 2-core development VM (56 vs 35 us, 1 process).
   Where the runtime cannot be imported or run (the profiler works standalone) it is 0 and
   ``op_overhead_s`` is charged per op as before. ``param_overhead_s``, the runtime's cost per
   parameter per step beyond its node (:class:`RuntimeProbe`), is measured alongside, and
   ``param_overhead_local_s``, the same without a gradient sync (one-rank meshes side by side).
   ``kernel_rates``: elements/s of gelu (erf and tanh forms), silu, tanh, exp, softmax,
   layer_norm, add, mul, batch_norm and max_pool forward and backward (:func:`kernel_rates`,
   per output element), so ELEMENTWISE / NORM / SOFTMAX / max POOL nodes are priced by
   measurement, not by stream bandwidth (transcendentals are compute-bound on a CPU), and
   the fused attention fits ``sdpa[_causal]_fp32_fwd`` / ``_bwd`` (:func:`attention_rates`
   over :data:`CPU_SDPA_SHAPES`). ``optimizer_tensor_overhead_s`` and ``optimizer_rates``: an Adam / SGD step's
   per-tensor and per-element cost, single-tensor and fused (:func:`optimizer_step_costs`). ``first_touch_bandwidth``:
   the page-fault cost of writing freshly mapped memory (:func:`first_touch_bandwidth`),
   charged on the tensors a node allocates that are large enough to be freshly mapped
   (:data:`autopar.cost_model.compute.FRESH_MAPPING_BYTES`). Each is measured per process count.

Limitations: timings are rank 0's. Each matmul point and each cheap rate (stream, kernels,
optimizer, first touch: :func:`host_rates`) is the median over a few rounds, so a burst of host
slowness that spoils one round is left out; a host that stays busy still gives slow figures
(run it on a quiet machine). With CUDA but fewer GPUs than
processes, collectives are measured with gloo on CPU tensors and every process is given the
whole measured GPU (a shared GPU is not modelled). The multi-process phase assumes the
runtime gives each of N processes ``max(1, cores // N)`` intra-op threads, as here.

The result is a Cluster JSON (``local:nproc``) with an extra ``"profile"`` section holding
one DeviceSpec and one LinkSpec per process count plus the raw samples;
:func:`autopar.cost_model.cluster.cluster_from_profile` reads it for any ``local:N``.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from autopar.atomic_io import write_text_atomic

from .cluster import Cluster, LinkSpec, cluster_from_profile, default_profile_path, host_memory_bytes
from .collectives import alpha_beta_factors
from .compute import HOST_RATE_PREFIX
from .device import DTYPES, DeviceSpec, Provenance

DEFAULT_MATMUL_SIZES: tuple[int, ...] = (128, 256, 512, 1024)
#: (rows, inner, cols) of fp32 GEMMs timed beside the square sweep on CPUs: skinny products
#: (few rows against a 4 MiB weight) and the shapes of small transformers' projections. With
#: the squares they separate a GEMM's arithmetic from the streaming of its operands
#: (:func:`fit_gemm`): fitted on squares alone, with the stream bandwidth of ``x + y`` taken
#: out, the 2-process rate on the 2-core VM came out 240 GFLOP/s where a 1024^3 product ran
#: at 171, and transformer-sized GEMMs were predicted 10-20 % fast.
GEMM_SHAPES: tuple[tuple[int, int, int], ...] = ((16, 1024, 1024), (64, 1024, 1024), (256, 1024, 1024),
                                                 (256, 256, 1024), (512, 256, 256), (64, 256, 2048))
DEFAULT_COLLECTIVE_BYTES: tuple[int, ...] = (1 << 12, 1 << 15, 1 << 18, 1 << 20, 1 << 22)
DEFAULT_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
COLLECTIVE_KINDS: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                                     "broadcast", "send_recv")
PROFILE_VERSION = 1

Progress = Optional[Callable[[str], None]]


# --------------------------------------------------------------------------- timing helpers

def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _median_time(fn: Callable[[], None], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    sync()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def _reps_for(seconds_estimate: float, budget: float = 0.15, lo: int = 3, hi: int = 20) -> int:
    return max(lo, min(hi, int(budget / max(seconds_estimate, 1e-6))))


def matmul_samples(sizes: Sequence[int], dtypes: Sequence[str], device: str = "cpu",
                   fixed_reps: Optional[int] = None) -> dict[str, list[tuple[float, float]]]:
    """``{dtype: [(flops, seconds), ...]}`` for square matmuls of each size."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out: dict[str, list[tuple[float, float]]] = {}
    for d in dtypes:
        prev_tf32 = torch.backends.cuda.matmul.allow_tf32
        if device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = (d == "tf32")
        try:
            rows = []
            for n in sizes:
                a = torch.randn(n, n, device=device).to(_torch_dtype(d))
                b = torch.randn(n, n, device=device).to(_torch_dtype(d))
                if fixed_reps is None:
                    probe = _median_time(lambda: torch.mm(a, b), 1, sync)
                    reps = _reps_for(probe)
                else:
                    reps = fixed_reps
                rows.append((2.0 * n ** 3, _median_time(lambda: torch.mm(a, b), reps, sync)))
            out[d] = rows
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return out


def windowed_matmul_times(ops: dict, window_s: float, barrier: Callable[[], None], rounds: int) -> dict:
    """``{key: seconds per call}`` of ``torch.mm(*ops[key])``: every key is run for ``window_s``
    of wall time after ``barrier``, ``rounds`` passes with the keys interleaved, and each
    figure is the median over its windows of the window's wall time per call."""
    import torch

    per_round: dict = {key: [] for key in ops}
    for _ in range(max(1, rounds)):
        for key, (a, b) in ops.items():
            barrier()
            calls, start = 0, time.perf_counter()
            while True:
                torch.mm(a, b)
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= window_s:
                    break
            # wall time per call over the whole window, NOT the median call: with more
            # processes than cores a process is descheduled for whole time slices, and a call
            # shorter than a slice usually runs uninterrupted, so the median call would show
            # a whole core's speed while the process gets only its share of the machine.
            per_round[key].append(elapsed / calls)
    return {key: statistics.median(v) for key, v in per_round.items()}


def concurrent_matmul_samples(sizes: Sequence[int], dtypes: Sequence[str], window_s: float,
                              barrier: Callable[[], None], rounds: Optional[dict] = None
                              ) -> dict[str, list[tuple[float, float]]]:
    """Like :func:`matmul_samples`, but every process starts each point after ``barrier`` and
    keeps multiplying for ``window_s`` seconds of wall time, so all processes overlap for the
    whole window (short fixed-repetition loops would drift apart and each run alone).

    A dtype in ``rounds`` (default: fp32, the dtype CPU training runs in, 3 rounds) is swept
    that many times, sizes interleaved, and each point is the median over its windows of the
    window's time per call: on a shared host the speed drops in bursts of a second or two
    (seen on the 2-core development VM: 165-350 GFLOP/s in 0.25 s windows of one 512^3 fp32
    matmul, slow windows in runs of 2-5), and the median keeps a burst that hit one window out
    of the figure, as the benchmarks keep it out of a median step time."""
    import torch

    rounds = {"fp32": 3} if rounds is None else rounds
    out: dict[str, list[tuple[float, float]]] = {}
    for d in dtypes:
        ops = {}
        for n in sizes:
            a = torch.randn(n, n).to(_torch_dtype(d))
            b = torch.randn(n, n).to(_torch_dtype(d))
            torch.mm(a, b)
            ops[n] = (a, b)
        t = windowed_matmul_times(ops, window_s, barrier, rounds.get(d, 1))
        out[d] = [(2.0 * n ** 3, t[n]) for n in sizes]
    return out


def gemm_samples(shapes: Sequence[tuple[int, int, int]], window_s: float, barrier: Callable[[], None],
                 rounds: int = 3) -> list[tuple[int, int, int, float]]:
    """``[(rows, inner, cols, seconds per call), ...]`` of fp32 ``(rows x inner) @ (inner x cols)``
    products, timed as :func:`concurrent_matmul_samples` times its squares."""
    import torch

    ops = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        ops[(m, k, n)] = (a, b)
    t = windowed_matmul_times(ops, window_s, barrier, rounds)
    return [(m, k, n, t[(m, k, n)]) for m, k, n in shapes]


def square_side(flops: float) -> int:
    """n of the square ``(n x n) @ (n x n)`` product of ``flops`` FLOPs (2 n^3)."""
    return round((flops / 2) ** (1 / 3))


def gemm_bytes(m: int, k: int, n: int, itemsize: int = 4) -> int:
    """Bytes of a ``(m x k) @ (k x n)`` product's operands and result."""
    return itemsize * (m * k + k * n + m * n)


def fit_gemm(samples: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Fit ``t = t0 + flops / rate + bytes / stream`` over ``(flops, bytes, seconds)`` samples,
    minimising relative error with every term >= 0; returns ``(t0, rate, stream)`` (``stream``
    0 when the fit needs no streaming term, ``t0`` 0 when it needs no fixed cost).

    Why jointly: square products alone cannot tell arithmetic from operand streaming (both
    grow with size), and taking ``x + y``'s DRAM bandwidth out of them over-corrects where the
    operands sit in cache; skinny products, whose time is mostly streaming a large weight,
    pin the second term."""
    import numpy as np

    pts = [(f, b, t) for f, b, t in samples if f > 0 and t > 0]
    if len(pts) < 2:
        raise ValueError(f"fit_gemm needs at least 2 samples with time > 0, got {list(samples)}")
    a = np.array([[1.0 / t, f / t, b / t] for f, b, t in pts])
    y = np.ones(len(pts))
    best = None
    # non-negative least squares over 3 terms by enumerating which are free (rate always is)
    for cols in ((0, 1, 2), (1, 2), (0, 1), (1,)):
        coef, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if np.any(coef < 0) or coef[cols.index(1)] <= 0:
            continue
        resid = float(np.sum((a[:, cols] @ coef - y) ** 2))
        if best is None or resid < best[0]:
            full = np.zeros(3)
            full[list(cols)] = coef
            best = (resid, full)
    if best is None:
        raise ValueError(f"fit_gemm found no positive rate in samples {pts}")
    t0, c, s = best[1]
    return float(t0), float(1.0 / c), float(1.0 / s) if s > 0 else 0.0


def stream_bandwidth(numel: int = 1 << 24, device: str = "cpu", reps: int = 5) -> float:
    """Bytes/s of ``out = x + y`` in fp32 (2 reads + 1 write per element)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    x = torch.rand(numel, device=device)
    y = torch.rand(numel, device=device)
    z = torch.empty_like(x)
    t = _median_time(lambda: torch.add(x, y, out=z), reps, sync)
    return 3 * 4 * numel / t


def op_overhead(device: str = "cpu", reps: int = 200, rounds: int = 5) -> float:
    """Seconds of a one-element add: framework dispatch (+ kernel launch on a GPU). The
    fastest of ``rounds`` rounds: a fixed cost is best seen when nothing else interferes."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    x = torch.ones(1, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(rounds + 1):  # the first round warms up
        start = time.perf_counter()
        for _ in range(reps):
            torch.add(x, 1.0, out=y)
        sync()
        best = min(best, time.perf_counter() - start)
    return best / reps


def dtensor_op_overhead(group, device: str = "cpu", chain: tuple[int, int] = (4, 24), reps: int = 10,
                        rounds: int = 7, shared: bool = False) -> float:
    """Per-op dispatch seconds of DTensor training, as the cost model charges it.

    The runtime executes every node of a plan as DTensor ops, forward and backward. This times
    the forward and backward of a chain of ``tanh`` on a tiny replicated DTensor over ``group``
    at two chain lengths; the slope is one node's forward + backward dispatch (sharding
    propagation, wrapping, autograd), nearly all overhead. The cost model charges an op
    ``op_overhead_s`` forward and ``BACKWARD_FACTOR`` times that backward
    (:mod:`autopar.cost_model.compute`), so the slope is divided by ``1 + BACKWARD_FACTOR``.
    Fastest of ``rounds`` rounds (a fixed cost is best seen when nothing else interferes),
    or, with ``shared`` (processes running at once on shared cores), the mean over all rounds,
    which counts the time slices this process waits for the others, as a training step does."""
    import torch
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate

    from .compute import BACKWARD_FACTOR

    mesh = DeviceMesh.from_group(group, "cuda" if device.startswith("cuda") else "cpu")
    x = DTensor.from_local(torch.ones(4, 8, device=device), mesh, [Replicate()], run_check=False)
    x.requires_grad_(True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(k: int) -> None:
        y = x
        for _ in range(k):
            y = torch.tanh(y)
        y.sum().backward()

    best = {}
    for k in chain:
        run(k)  # warm-up: fills DTensor's sharding-propagation cache
        per_round = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(reps):
                run(k)
            sync()
            per_round.append((time.perf_counter() - start) / reps)
        best[k] = statistics.fmean(per_round) if shared else min(per_round)
    short, long = chain
    per_node = max(0.0, (best[long] - best[short]) / (long - short))
    return per_node / (1.0 + BACKWARD_FACTOR)


def host_copy_bandwidth(numel: int = 1 << 24) -> float:
    """Bytes/s of pinned host->device and device->host copies (the slower of the two)."""
    import torch

    host = torch.empty(numel, pin_memory=True)
    dev = torch.empty(numel, device="cuda")
    h2d = _median_time(lambda: dev.copy_(host, non_blocking=True), 5, torch.cuda.synchronize)
    d2h = _median_time(lambda: host.copy_(dev, non_blocking=True), 5, torch.cuda.synchronize)
    return 4 * numel / max(h2d, d2h)


# --------------------------------------------------------------------------- non-matmul kernels

#: Kernels whose throughput the profiler measures (elements/s, fwd and bwd), as the cost model
#: prices ELEMENTWISE / NORM / SOFTMAX nodes on a measured device (see compute.kernel_class).
KERNELS: tuple[str, ...] = ("gelu", "gelu_tanh", "silu", "tanh", "exp", "softmax", "layer_norm", "add", "mul",
                            "batch_norm", "max_pool")
KERNEL_SHAPE: tuple[int, int] = (512, 1024)  # 2 MiB fp32: a GPT MLP activation of the small models
#: On a GPU: 256 MiB fp32, so the rate is the kernel's streaming rate (a small tensor's time is
#: the launch cost, priced separately as op_overhead_s) and the autograd engine's fixed start
#: per backward call (~50-100 us) is a few percent of the backward's time
GPU_KERNEL_SHAPE: tuple[int, int] = (16384, 4096)
#: (batch, channels in, channels out, height = width, kernel, stride) of the measured
#: convolutions: a strided 1x1 shortcut, a 3x3 of the small ResNet the benchmarks run, and a
#: larger 3x3, spanning 1-300 MFLOP. On the 2-core VM (oneDNN) the 1x1 ran at 13 GFLOP/s
#: forward and the 3x3s at 110-150, and the backward of the small ones at a third to a half of
#: their forward's FLOP/s, where a matmul's "backward = 2x forward" assumes the same.
CONV_SHAPES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (16, 32, 64, 8, 1, 2), (16, 32, 32, 8, 3, 1), (16, 64, 64, 16, 3, 1))


def _kernel_fn(name: str, width: int, device: str = "cpu"):
    import torch
    import torch.nn.functional as F

    if name == "layer_norm":  # with an affine weight and bias, as nn.LayerNorm
        w = torch.ones(width, device=device, requires_grad=True)
        b = torch.zeros(width, device=device, requires_grad=True)
        return lambda x: F.layer_norm(x, (width,), w, b)
    if name == "softmax":
        return lambda x: torch.softmax(x, dim=-1)
    if name in ("batch_norm", "max_pool"):  # on 32 channels of 32 x 32 images (ResNet-like)
        def image(x):
            hw = 32 if x.numel() >= 32 ** 3 else max(1, math.isqrt(x.numel() // 32))
            return x.reshape(-1)[: x.numel() // (32 * hw * hw) * 32 * hw * hw].view(-1, 32, hw, hw)
        if name == "max_pool":  # the torchvision ResNet stem's window; keeps indices for backward
            return lambda x: F.max_pool2d(image(x), 3, 2, 1)
        w = torch.ones(32, device=device, requires_grad=True)
        b = torch.zeros(32, device=device, requires_grad=True)
        mean, var = torch.zeros(32, device=device), torch.ones(32, device=device)
        return lambda x: F.batch_norm(image(x), mean, var, w, b, training=True)
    if name == "gelu_tanh":  # GPT-2's gelu_new: 4x slower than the erf gelu on the 2-core VM
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "add":
        return lambda x: x + x
    if name == "mul":
        return lambda x: x * x
    return {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "exp": torch.exp}[name]


def kernel_rates(shape: tuple[int, int] = KERNEL_SHAPE, device: str = "cpu", reps: int = 7, chain: int = 16,
                 kernels: Sequence[str] = KERNELS, shared: bool = False, conv: bool = True,
                 attention: Optional[bool] = None) -> dict[str, float]:
    """Elements/s of each kernel's forward (``NAME_fwd``) and backward (``NAME_bwd``) on an
    fp32 tensor of ``shape``, with ``conv`` the ``conv2d`` fit of :func:`_conv_rates`, and
    with ``attention`` (default: on a CPU) the fp32 fused-attention fits of
    :func:`attention_rates` over :data:`CPU_SDPA_SHAPES`,
    allocating as a training step does: one repetition runs the op
    ``chain`` times keeping every output alive (like saved activations: forward with autograd
    recording; backward as ``autograd.grad`` of one recorded forward, a fresh gradient each
    call), then frees them all, so outputs land in freshly mapped memory whose first touch is
    part of the cost, as in a step. Per call = the mean over ``reps`` repetitions (a step pays
    the slow ones too; ``shared`` is kept for callers and no longer changes the statistic).

    Why: these ops are not stream-bound on a CPU (``erf`` in gelu runs at a few GB/s against
    tens for a stream), so the stream-bandwidth roofline under-prices them several-fold."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out: dict[str, float] = {}

    def per_call(fn, chain: int = chain, reps: int = reps) -> float:
        fn()
        sync()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            kept = [fn() for _ in range(chain)]
            sync()
            samples.append((time.perf_counter() - start) / chain)
            del kept
        # the mean, shared cores or not: a step pays the slow repetitions too (on the shared
        # 2-core VM medians made single-process steps come out 5-20 % fast)
        return statistics.fmean(samples)

    for name in kernels:
        f = _kernel_fn(name, shape[1], device)
        x = torch.randn(*shape, device=device, requires_grad=True)
        y = f(x)
        n_out = y.numel()  # rates per output element, as node_time prices them
        out[f"{name}_fwd"] = n_out / per_call(lambda: f(x))
        gy = torch.randn_like(y)
        out[f"{name}_bwd"] = n_out / per_call(lambda: torch.autograd.grad(y, x, gy, retain_graph=True))
    if conv:
        out.update(_conv_rates(device, per_call))
    if attention is None:
        attention = not device.startswith("cuda")
    if attention:
        out.update(attention_rates(device, ("fp32",), CPU_SDPA_SHAPES, reps=max(3, reps), copies=2))
    return out


def _conv_rates(device: str, per_call: Callable) -> dict[str, float]:
    """``conv_fwd`` / ``conv_bwd`` (FLOP/s) and ``conv_fwd_half`` / ``conv_bwd_half`` (FLOPs):
    the fit ``seconds = (flops + half) / rate`` over :data:`CONV_SHAPES`, forward and backward
    (input and weight gradients, twice the forward's FLOPs), timed by ``per_call``."""
    import torch
    import torch.nn.functional as F

    fwd, bwd = [], []
    for n, cin, cout, hw, k, stride in CONV_SHAPES:
        x = torch.randn(n, cin, hw, hw, device=device, requires_grad=True)
        w = torch.randn(cout, cin, k, k, device=device, requires_grad=True)
        conv = lambda: F.conv2d(x, w, stride=stride, padding=k // 2)  # noqa: E731
        y = conv()
        flops = 2 * y.numel() * cin * k * k
        fwd.append((flops, per_call(conv, 4, 5)))  # up to milliseconds a call: fewer of them
        gy = torch.randn_like(y)
        bwd.append((2 * flops, per_call(lambda: torch.autograd.grad(y, (x, w), gy, retain_graph=True), 4, 5)))
    out = {}
    for key, pts in (("conv_fwd", fwd), ("conv_bwd", bwd)):
        t0, rate = fit_overhead_rate(pts)
        out[key] = rate
        out[f"{key}_half"] = max(1.0, t0 * rate)
    return out


#: fused attention timed on a GPU, (batch, heads, sequence, head dim): a small and a large
#: case, for the fit ``seconds = (flops + half) / rate`` per dtype and mask
GPU_SDPA_SHAPES: tuple[tuple[int, int, int, int], ...] = ((4, 16, 512, 64), (8, 16, 2048, 64))
#: the same on a CPU, at the sizes a CPU trains: the small transformers' (8, 4, 64, 64) and
#: twice its sequence. On the 2-core VM the causal forward at the first ran 0.85 ms in a GPT
#: step, 2.6x the 0.33 ms the matmul fit gives its FLOPs (the fused CPU kernel works in
#: small blocks, and its backward recomputes the softmax)
CPU_SDPA_SHAPES: tuple[tuple[int, int, int, int], ...] = ((8, 4, 64, 64), (8, 4, 128, 64))


def attention_rates(device: str = "cuda", dtypes: Sequence[str] = ("fp32", "bf16"),
                    shapes: Sequence[tuple[int, int, int, int]] = GPU_SDPA_SHAPES, reps: int = 7,
                    copies: int = 4) -> dict[str, float]:
    """``sdpa[_causal]_DTYPE_fwd`` / ``_bwd`` (FLOP/s) and their ``_half`` (FLOPs): fits of
    ``F.scaled_dot_product_attention`` over ``shapes``. FLOPs are counted in full, as the graph
    counts them (QK^T and AV, ``autopar.graph._attention_flops``); backward as twice that.
    Each timing runs ``copies`` independent attentions per synchronisation, and their
    backward in one ``autograd.grad`` call, as a model's step does: timed one call at a time,
    the sync and the backward call's start (~50 us) made a 50 us bf16 kernel look 1.8x slower.

    Why: on the lent H100 the fused kernels ran causal attention in 0.57-0.72x the time the
    matmul fit gives its full FLOPs (they skip the masked half), and attention's backward took
    2.6-4.1x its forward, where matmuls take 2x."""
    import torch
    import torch.nn.functional as F

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out: dict[str, float] = {}
    for d in dtypes:
        for causal in (False, True):
            fwd, bwd = [], []
            for b, h, n, hd in shapes:
                qkv = [[torch.randn(b, h, n, hd, device=device, dtype=_torch_dtype(d), requires_grad=True)
                        for _ in range(3)] for _ in range(copies)]
                run = lambda: [F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                               for q, k, v in qkv]
                flops = 4.0 * b * h * n * n * hd
                fwd.append((flops, _median_time(run, reps, sync) / copies))
                ys = run()
                gys = [torch.randn_like(y) for y in ys]
                leaves = [t for group in qkv for t in group]
                bwd.append((2 * flops, _median_time(
                    lambda: torch.autograd.grad(ys, leaves, gys, retain_graph=True), reps, sync) / copies))
            name = f"sdpa{'_causal' if causal else ''}_{d}"
            for key, pts in ((f"{name}_fwd", fwd), (f"{name}_bwd", bwd)):
                t0, rate = fit_overhead_rate(pts)
                out[key] = rate
                out[f"{key}_half"] = max(1.0, t0 * rate)
    return out


#: elements of the large tensors an optimizer step is also timed on (16 MiB in fp32, four times
#: the 2-core VM's L2): Adam ran at 326 M elements/s over 5 MiB embedding tables there and at
#: 893 M over 1 MiB tensors; ``autopar.cost_model.compute.optimizer_step_time`` interpolates.
LARGE_OPT_TENSOR = 1 << 22


def _mean_step_s(opt, rounds: int) -> float:
    """Mean seconds of ``rounds`` optimizer steps after one warm-up step (the mean: a training
    step pays the slow ones too)."""
    opt.step()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        opt.step()
        samples.append(time.perf_counter() - start)
    return statistics.fmean(samples)


def optimizer_step_costs(total_numel: int = 1 << 21, counts: tuple[int, int] = (8, 128), rounds: int = 5,
                         shared: bool = False) -> dict[str, dict[str, float]]:
    """What one optimizer step costs on CPU, for ``adam`` and ``sgd`` (momentum) in PyTorch's
    default CPU implementation (single-tensor for-loop) and built with ``fused=True``
    (``adam_fused``, ``sgd_fused``; skipped where this torch cannot build them):
    ``{"per_tensor_s": {opt: s}, "elements_per_s": {opt: numel/s}}``.

    Step time at two tensor counts with the same total numel: the slope over the count is the
    per-tensor cost (a series of small kernels per tensor: the runtime steps each local shard
    as a plain tensor), the rest of the step at the low count is the per-element work (Adam's
    div/sqrt are not stream-bound on a CPU, and run on this process's threads only, so a
    bandwidth roofline under-prices them). The mean of ``rounds`` (a step pays the slow ones too)."""
    import torch

    per_tensor, rate = {}, {}
    makers = {"adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
              "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=False),
              "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
              "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True)}
    for opt_name, make in makers.items():
        try:
            make([torch.nn.Parameter(torch.zeros(1))])
        except (RuntimeError, ValueError):  # fused kernels this build or device does not have
            continue
        t = {}
        for n in counts:
            ps = [torch.nn.Parameter(torch.randn(max(1, total_numel // n))) for _ in range(n)]
            for p in ps:
                p.grad = torch.randn_like(p)
            t[n] = _mean_step_s(make(ps), rounds)
        lo, hi = counts
        per_tensor[opt_name] = max(0.0, (t[hi] - t[lo]) / (hi - lo))
        work = max(t[lo] - lo * per_tensor[opt_name], 0.5 * t[lo])  # noise cannot leave < half the step
        rate[opt_name] = total_numel / work
        # tensors far larger than the caches stream from memory: two of LARGE_OPT_TENSOR
        ps = [torch.nn.Parameter(torch.randn(LARGE_OPT_TENSOR)) for _ in range(2)]
        for p in ps:
            p.grad = torch.randn_like(p)
        big = max(_mean_step_s(make(ps), max(2, rounds // 2)) - 2 * per_tensor[opt_name], 1e-9)
        rate[f"{opt_name}_large"] = 2 * LARGE_OPT_TENSOR / big
    return {"per_tensor_s": per_tensor, "elements_per_s": rate}


def first_touch_bandwidth(nbytes: int = 1 << 23, reps: int = 5, shared: bool = False) -> float:
    """Bytes/s at which fresh memory is mapped, used and given back: the page-fault (map +
    zero) cost of the first write to newly mapped pages plus the unmap when it is freed, without
    the write itself. A region is mapped anonymously (as glibc does for every tensor above its
    mmap threshold, which the runtime fixes at 32 MiB: smaller tensors reuse heap memory, see
    ``runtime.host_memory`` and ``compute.node_time``), filled
    once (faults + writes), again (writes only), and unmapped: (first - second) + unmap.
    Median of ``reps``, or with ``shared`` the mean.

    Why: a tensor of 32 MiB or more is written to fresh pages every time it is created; at a
    few GB/s that costs as much as a memory-bound kernel over it, and neither the matmul fit
    nor the kernel rates (measured on reused memory) contain it."""
    import mmap

    import torch

    costs = []
    for _ in range(reps):
        region = mmap.mmap(-1, nbytes)
        t = torch.frombuffer(region, dtype=torch.float32)
        start = time.perf_counter()
        t.fill_(1.0)
        fresh = time.perf_counter() - start
        start = time.perf_counter()
        t.fill_(2.0)
        warm = time.perf_counter() - start
        del t
        start = time.perf_counter()
        region.close()
        unmap = time.perf_counter() - start
        costs.append(max(fresh - warm + unmap, 1e-9))
    per = statistics.fmean(costs) if shared else statistics.median(costs)
    return nbytes / per


#: rounds of the cheap per-process measurements (stream, kernels, optimizer, first touch):
#: each figure is the median over the rounds, which run one after another so that a burst of
#: host slowness (a second or two on a shared VM) spoils at most one of them. Three rounds of
#: fewer repetitions cost about what one round of the earlier repetition counts did.
HOST_RATE_ROUNDS = 3


def _median_of(results: Sequence):
    """Per-key median of equally shaped results (floats or nested dicts of floats)."""
    first = results[0]
    if isinstance(first, dict):
        return {k: _median_of([r[k] for r in results]) for k in first}
    return statistics.median(results)


def host_rates(device: str = "cpu", stream_numel: int = 1 << 24, shared: bool = False,
               rounds: int = HOST_RATE_ROUNDS) -> dict:
    """``{"stream", "kernels", "optimizer", "first_touch"}`` for this process, each the median
    over ``rounds`` interleaved rounds (see :data:`HOST_RATE_ROUNDS`).

    Why: measured once each, these figures varied 1.3-4x between profiles taken minutes apart
    on the 2-core development VM (six profiles: layer_norm forward 1.75-5.81 G elements/s at
    1 process), and every prediction made from a profile carried that draw."""
    samples = []
    for _ in range(max(1, rounds)):
        samples.append({"stream": stream_bandwidth(stream_numel, device, reps=3),
                        "kernels": kernel_rates(device=device, reps=3, shared=shared),
                        "optimizer": optimizer_step_costs(rounds=3, shared=shared),
                        "first_touch": first_touch_bandwidth(reps=3, shared=shared)})
    return _median_of(samples)


# --------------------------------------------------------------------------- runtime per-node overhead

def _chain_model(k: int):
    import torch
    from torch import nn

    class Chain(nn.Module):
        """One Linear then ``k`` tanh nodes on a tiny tensor: nearly all overhead."""

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            y = self.lin(x)
            for _ in range(k):
                y = torch.tanh(y)
            return y

    torch.manual_seed(0)
    return Chain()


def _block_chain_model(k: int, width: int = 8, heads: int = 2):
    """``k`` pre-norm transformer blocks at toy width, written as transformer code is (GPT-2,
    nanoGPT, the zoo's GPT): layer norm, a fused qkv Linear split by ``chunk``, heads by
    ``unflatten`` / ``transpose``, causal ``scaled_dot_product_attention``, the output
    projection, a residual add, then layer norm, Linear, GELU, Linear and a residual add: 22
    graph nodes and 12 parameters a block. The work is negligible at width 8; what a block
    costs is the runtime's per node. Why not the tanh chain alone: on the 2-core VM a real
    transformer's node cost the runtime 1.4-2.6x a tanh node measured beside it (parameters
    included: tiny GPT 430-480 us against 185-240, BERT 373 against 177; parameters taken out:
    these blocks 1.4-1.8x). A tanh node is one elementwise op each way, a Linear on a 3-D
    activation several DTensor ops, and a view's sharding propagation costs more than its
    kernel."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, x):
            q, k, v = self.qkv(self.ln_1(x)).chunk(3, dim=-1)
            q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).flatten(2))
            return x + self.down(F.gelu(self.up(self.ln_2(x))))

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(k))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    return Blocks()


def _param_chain_model(k: int):
    import torch
    from torch import nn

    class ParamChain(nn.Module):
        """The tanh chain's shape with a parameter in each node: one Linear then ``k`` nodes
        ``y * w_i`` (``w_i`` of 8 elements), so each node adds one parameter and little work."""

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.w = nn.ParameterList([nn.Parameter(torch.ones(8)) for _ in range(k)])

        def forward(self, x):
            y = self.lin(x)
            for w in self.w:
                y = y * w
            return y

    torch.manual_seed(0)
    return ParamChain()


def _alternating_step_s(models: dict, data: dict, loss_fn, factory, reps: int, rounds: int,
                        barrier: Callable[[], None]) -> dict:
    """Seconds per ``train_step`` of each model: the median over ``rounds`` rounds of the mean
    over ``reps`` steps, rounds alternating between the models so a host that slows down or
    speeds up moves them all (one after the other gave 161-265 us per node at 4 ranks on the
    2-core VM in three profiles of one afternoon). A round's mean holds the time slices a
    process waits for the others, as a training step does; the median over rounds leaves out
    a burst of host slowness. (The fastest round, which this once used without shared cores,
    gave a 2-rank slope of 37-120 us per node in four back-to-back measurements; the median
    of 9 rounds over a 64-node chain 90-124.) ``data``: model key -> its ``(inputs, targets)``."""
    import warnings

    from autopar.runtime.optimizers import PlanOptimizerMismatch

    with warnings.catch_warnings():
        # the probe steps plain SGD on plans priced for Adam on purpose: it times the runtime
        warnings.simplefilter("ignore", PlanOptimizerMismatch)
        for k, pm in models.items():
            for _ in range(2):
                pm.train_step(*data[k], loss_fn, factory)
    per_round: dict = {k: [] for k in models}
    for _ in range(rounds):
        for k, pm in models.items():
            barrier()
            start = time.perf_counter()
            for _ in range(reps):
                pm.train_step(*data[k], loss_fn, factory)
            per_round[k].append((time.perf_counter() - start) / reps)
    return {k: statistics.median(v) for k, v in per_round.items()}


class RuntimeProbe:
    """autopar's runtime timed on tiny data-parallel plans, built once and timed in blocks.

    * per node: toy-width transformer blocks (:func:`_block_chain_model`) at two block
      counts; the slope of ``train_step`` over the node count, less the per-parameter figure
      below for the parameters the added blocks bring, is what one more node of a
      transformer costs the real runtime (fx interpretation, DTensor wrapping and sharding
      propagation, input and output placement checks, autograd), the arithmetic negligible at
      width 8. The tanh chain's slope (:func:`_chain_model`, K tanh nodes at two K: one
      DTensor op a node) is returned beside it (:meth:`block`), and stands in where the
      block slope comes out at 0 or below (noise);
    * per parameter: the :func:`_param_chain_model` chain (one parameter per node) against the
      tanh chain of the same length, per parameter. In a DTensor plan each parameter's
      gradient is accumulated through DTensor dispatch (AccumulateGrad) and tracked for its
      sync; the torch profiler showed 117-155 us of it per parameter per step on GPT dp2/dp4
      on the 2-core VM, which no other figure holds;
    * the same per parameter on ``own_mesh``, a one-rank mesh per process (no gradient sync),
      when given.

    ``mesh``: a ``RankMesh`` of ``world`` ranks (``build_mesh(..., ranks=...)``), or None for
    the initialised default process group, which must then have ``world`` ranks. Raises
    ImportError when the runtime is not importable (the profiler then falls back)."""

    def __init__(self, world: int, mesh=None, own_mesh=None, chain: tuple[int, int] = (4, 64),
                 blocks: tuple[int, int] = (1, 4)) -> None:
        import torch

        from autopar.graph import capture
        from autopar.runtime.apply import apply_plan
        from autopar.runtime.testing import make_plan

        self.chain = chain
        self.x = torch.randn(4 * world, 8)
        self.target = torch.randn(4 * world, 8)

        def build(make, k: int, n: int, on):
            g = capture(make(k), (self.x[: 4 * n],))
            return apply_plan(g, make_plan(g, "dp", n), mesh=on), len(g.nodes)

        short, long = chain
        self.models, self.nodes = {}, {}
        for key, make, k in (("short", _chain_model, short), ("long", _chain_model, long),
                             ("param", _param_chain_model, long)):
            self.models[key], self.nodes[key] = build(make, k, world, mesh)
        self.data = {key: (self.x, self.target) for key in self.models}
        # transformer blocks on [2 per rank, 4, 8] activations, batch split over the ranks
        bx, bt = torch.randn(2 * world, 4, 8), torch.randn(2 * world, 4, 8)
        self.block_params = {}
        for key, k in zip(("blocks_short", "blocks_long"), blocks):
            g = capture(_block_chain_model(k), (bx,))
            self.models[key] = apply_plan(g, make_plan(g, "dp", world), mesh=mesh)
            self.nodes[key], self.block_params[key] = len(g.nodes), len(g.params)
            self.data[key] = (bx, bt)
        self.own = {}
        if own_mesh is not None:
            self.own = {key: build(make, long, 1, own_mesh)[0]
                        for key, make in (("long", _chain_model), ("param", _param_chain_model))}

    def block(self, reps: int = 4, rounds: int = 9, barrier: Callable[[], None] = lambda: None
              ) -> tuple[float, float, Optional[float], float]:
        """``(per node, per parameter, per parameter without a sync or None, per tanh node)``
        seconds per step, each at least 0; the optimizer's per-tensor cost is still in the two
        per-parameter figures (the caller takes it out). Median of ``rounds`` rounds
        (:func:`_alternating_step_s`)."""
        import torch

        loss_fn = lambda out, t: ((out - t) ** 2).mean()  # noqa: E731
        factory = lambda ps: torch.optim.SGD(ps, lr=1e-3)  # noqa: E731
        t = _alternating_step_s(self.models, self.data, loss_fn, factory, reps, rounds, barrier)
        short, long = self.chain
        tanh = max(0.0, (t["long"] - t["short"]) / (self.nodes["long"] - self.nodes["short"]))
        param = max(0.0, (t["param"] - t["long"]) / long)
        # the blocks' slope holds their parameters' cost (and the SGD step's per tensor), which
        # the cost model charges per parameter: taken out at the per-parameter figure
        added = self.block_params["blocks_long"] - self.block_params["blocks_short"]
        node = ((t["blocks_long"] - t["blocks_short"] - added * param)
                / (self.nodes["blocks_long"] - self.nodes["blocks_short"]))
        local = None
        if self.own:
            own_data = {key: (self.x[:4], self.target[:4]) for key in self.own}
            o = _alternating_step_s(self.own, own_data, loss_fn, factory, reps, rounds, barrier)
            local = max(0.0, (o["param"] - o["long"]) / long)
        return (node if node > 0 else tanh), param, local, tanh


def _runtime_overhead_solo(optimizer_per_tensor_s: float = 0.0
                           ) -> tuple[Optional[float], Optional[float], str, Optional[float]]:
    """The :class:`RuntimeProbe` per-node and per-parameter figures for one rank in this
    process (a 1-rank gloo world made here and torn down), and the tanh chain's per-node figure
    beside them, or ``(None, None, why, None)`` when they cannot be measured."""
    try:
        import torch.distributed as dist
        import autopar.runtime.apply  # noqa: F401  (importable standalone?)
    except Exception as e:  # the cost model must work without the runtime
        return None, None, f"runtime not importable ({type(e).__name__}: {e})", None
    made = False
    try:
        if dist.is_initialized():
            if dist.get_world_size() != 1:
                return None, None, f"a {dist.get_world_size()}-rank process group is already initialised here", None
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            made = True
        node, par, _, tanh = RuntimeProbe(1).block()
        return node, max(0.0, par - optimizer_per_tensor_s), "", tanh
    except Exception as e:
        return None, None, f"runtime measurement failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})", None
    finally:
        if made:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- fits

def fit_overhead_rate(samples: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Fit ``t = t0 + work / rate`` minimising relative error; returns ``(t0, rate)``.

    Falls back to a line through the origin (t0 = 0) when the intercept comes out negative
    (noise), and raises if the data cannot give a positive rate."""
    pts = [(x, t) for x, t in samples if x > 0 and t > 0]
    if not pts:
        raise ValueError(f"cannot fit a rate from samples {list(samples)}")
    # weighted least squares of (t0 + c x - t)/t: normal equations in (t0, c)
    s11 = sum(1 / t ** 2 for x, t in pts)
    s12 = sum(x / t ** 2 for x, t in pts)
    s22 = sum(x * x / t ** 2 for x, t in pts)
    b1 = sum(1 / t for x, t in pts)
    b2 = sum(x / t for x, t in pts)
    det = s11 * s22 - s12 * s12
    t0, c = ((s22 * b1 - s12 * b2) / det, (s11 * b2 - s12 * b1) / det) if len(pts) > 1 and det > 0 else (-1.0, 0.0)
    if t0 < 0 or c <= 0:
        t0, c = 0.0, b2 / s22
    if c <= 0:
        raise ValueError(f"fitted a non-positive rate from samples {pts}")
    return t0, 1.0 / c


def fit_link(samples: dict[str, list[tuple[float, float]]], n: int) -> tuple[float, float]:
    """Joint fit of (latency, bandwidth) for ``n`` ranks over all collectives' samples
    ``{kind: [(nbytes, seconds)]}``, with ``t = steps*alpha + factor*nbytes/bw``."""
    rows = []
    for kind, pts in samples.items():
        steps, factor = alpha_beta_factors(kind, n if kind != "send_recv" else 2)
        rows += [(steps, factor * b, t) for b, t in pts if t > 0]
    if not rows:
        raise ValueError(f"no collective samples to fit for n={n}")
    # weighted least squares in (alpha, 1/bw), relative error
    s11 = sum((a / t) ** 2 for a, x, t in rows)
    s12 = sum(a * x / t ** 2 for a, x, t in rows)
    s22 = sum((x / t) ** 2 for a, x, t in rows)
    b1 = sum(a / t for a, x, t in rows)
    b2 = sum(x / t for a, x, t in rows)
    det = s11 * s22 - s12 * s12
    alpha, inv_bw = ((s22 * b1 - s12 * b2) / det, (s11 * b2 - s12 * b1) / det) if det > 0 else (-1.0, 0.0)
    if alpha < 0:  # noise: keep the bandwidth term, bound alpha below by 0
        alpha = 0.0
        inv_bw = (b2 - alpha * s12) / s22
    if inv_bw <= 0:
        # the times do not grow with size (latency and noise swamp the bytes): no bandwidth
        # can be fitted, and the fit's answer is an unbounded one (a 3-rank link read
        # 1,000,000 GB/s on the 2-core VM). Take the best throughput any sample achieved, a
        # lower bound on the link's, and the latency that leaves
        inv_bw = min(t / x for a, x, t in rows if x > 0) if any(x > 0 for a, x, t in rows) else 1e-15
        alpha = max(0.0, sum((t - x * inv_bw) / t * (a / t) for a, x, t in rows) / s11)
    return alpha, 1.0 / inv_bw


def fit_check(samples: dict[str, list], n: int, params: Callable[[str], tuple[float, float]]
              ) -> dict[str, dict]:
    """Predicted vs measured for every collective sample under the fitted ``params(kind) ->
    (alpha, bw)``, so the profile shows how well the fit explains each collective (the cost
    model is checkable): ``{kind: {"max_rel_err": ..., "points": [[nbytes, measured_s, predicted_s]]}}``."""
    out = {}
    for kind, pts in samples.items():
        alpha, bw = params(kind)
        steps, factor = alpha_beta_factors(kind, n if kind != "send_recv" else 2)
        rows = [[b, t, steps * alpha + factor * b / bw] for b, t in pts]
        # a sample of 0 s (the collective hid inside the measured compute noise) is left out of
        # the fit too; it is listed but has no relative error
        errs = [abs(p - t) / t for _, t, p in rows if t > 0]
        out[kind] = {"max_rel_err": max(errs) if errs else None, "points": rows}
    return out


# --------------------------------------------------------------------------- worker

#: passes over the collective sizes (:func:`_collective_samples`); each sample is the median
#: over the passes. One pass's 4 KiB all-reduce after compute came out anywhere from 0.25 to
#: 1.9 ms in six 2-process profiles on the 2-core VM, and a plan with many small
#: collectives (sync batch norm: three per layer) was priced on whichever it drew.
COLLECTIVE_ROUNDS = 3


def _collective_fn(kind: str, rank: int, n: int, group, nbytes: int, device: str):
    """(bytes moved, the call) for one ``kind`` collective of about ``nbytes`` over ``group``."""
    import torch
    import torch.distributed as dist

    numel = max(n * n, nbytes // 4 // (n * n) * n * n)  # shards divisible by n (all_to_all)
    full = torch.ones(numel, device=device)
    part = torch.ones(numel // n, device=device)
    if kind == "all_reduce":
        fn = lambda: dist.all_reduce(full, group=group)  # noqa: E731
    elif kind == "all_gather":  # all_gather_single replaces all_gather_into_tensor in torch>=2.13
        ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn = lambda: ag(full, part, group=group)  # noqa: E731
    elif kind == "reduce_scatter":
        rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        fn = lambda: rs(part, full, group=group)  # noqa: E731
    elif kind == "all_to_all":
        a2a_out = torch.empty_like(part)
        fn = lambda: dist.all_to_all_single(a2a_out, part, group=group)  # noqa: E731
    elif kind == "broadcast":
        fn = lambda: dist.broadcast(full, src=0, group=group)  # noqa: E731
    else:  # send_recv: ping-pong between ranks 0 and 1, one way = half the round trip
        def fn() -> None:
            if rank == 0:
                dist.send(full, dst=1, group=group)
                dist.recv(full, src=1, group=group)
            else:
                dist.recv(full, src=0, group=group)
                dist.send(full, dst=0, group=group)
    return numel * 4, fn


def _collective_samples(rank: int, n: int, group, sizes: Sequence[int], device: str, busy_s: float = 0.0,
                        rounds: int = COLLECTIVE_ROUNDS) -> dict:
    """``{kind: [(bytes, seconds), ...]}`` per collective over ``group``, each the median over
    ``rounds`` passes over every kind and size (:data:`COLLECTIVE_ROUNDS`).

    With ``busy_s`` > 0 (CPU ranks) every call is preceded by about ``busy_s`` of compute
    (:func:`_work_segment`) on every rank and the sample is the time of compute + collective
    minus the compute alone: what a collective costs between two ops of a training step,
    where the peers' communication threads must be woken and scheduled on cores that are
    computing. On the 2-core VM with 4 ranks a 512 KiB all-gather took ~1.4 ms between idle
    ranks and 5-6 ms this way, and a step's collectives pay the latter."""
    import torch
    import torch.distributed as dist

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    k_busy = 0
    if busy_s > 0:
        dist.barrier(group=group)
        k_busy = _segment_calls(busy_s, _segment_call_s())
    kinds = [k for k in COLLECTIVE_KINDS if not (k == "send_recv" and n != 2)]
    calls = {(k, b): _collective_fn(k, rank, n, group, b, device) for k in kinds for b in sizes}
    times: dict[tuple, list[float]] = {key: [] for key in calls}
    unsupported: dict[str, str] = {}
    for _ in range(max(1, rounds)):
        for kind in kinds:
            if kind in unsupported:
                continue
            for nbytes in sizes:
                _, fn = calls[(kind, nbytes)]
                reps = 1 if nbytes >= (1 << 20) else 3  # 3 passes: about the single pass of old
                try:
                    dist.barrier(group=group)
                    t = (_after_compute_time(fn, k_busy, 2 * reps + 1, sync) if k_busy
                         else _median_time(fn, 2 * reps + 1, sync))
                except (RuntimeError, NotImplementedError) as e:  # backend lacks this collective
                    unsupported[kind] = str(e).splitlines()[0][:200]
                    break
                times[(kind, nbytes)].append(t / 2 if kind == "send_recv" else t)
    out: dict[str, list] = {k: {"unsupported": why} for k, why in unsupported.items()}
    for kind in kinds:
        if kind not in unsupported:
            out[kind] = [(calls[(kind, b)][0], statistics.median(times[(kind, b)])) for b in sizes]
    return out


def _after_compute_time(fn: Callable[[], None], k_busy: int, reps: int, sync: Callable[[], None]) -> float:
    """Seconds ``fn`` adds after ``k_busy`` work-segment calls: the median of compute + ``fn``
    minus the median of the compute alone, the two timed alternately in one window so a slow
    minute of a shared host moves both (one reference taken before all samples turned small
    collectives into 0 s when the host slowed later). At least 0."""
    _work_segment(k_busy)
    fn()
    sync()
    alone, both = _alternate_work(fn, k_busy, reps, sync)
    return max(0.0, statistics.median(both) - statistics.median(alone))


def _alternate_work(fn: Callable[[], None], k: int, reps: int, sync: Callable[[], None] = lambda: None
                    ) -> tuple[list[float], list[float]]:
    """``reps`` times, alternately: ``k`` work-segment calls alone, then the same and ``fn``;
    the seconds of each, as ``(alone, both)``."""
    alone, both = [], []
    for _ in range(reps):
        t = time.perf_counter()
        _work_segment(k)
        alone.append(time.perf_counter() - t)
        t = time.perf_counter()
        _work_segment(k)
        fn()
        sync()
        both.append(time.perf_counter() - t)
    return alone, both


#: Compute before each collective sample on CPU ranks (:func:`_collective_samples`): about the
#: gap between two tensor-parallel collectives in the small zoo models the benchmarks run.
IN_PLACE_BUSY_S = 0.001


def _segment_call_s(calls: int = 50) -> float:
    """Seconds of one :func:`_work_segment` call, measured here after a warm-up (call it with
    every rank computing, as in the measurement that uses it)."""
    _work_segment(20)
    t0 = time.perf_counter()
    _work_segment(calls)
    return (time.perf_counter() - t0) / calls


def _segment_calls(seconds: float, call_s: float) -> int:
    """:func:`_work_segment` calls that take about ``seconds`` (at least one)."""
    return max(1, round(seconds / call_s))


def _work_segment(k: int) -> None:
    """``k`` small matmuls: the stand-in for a rank's compute between two collectives."""
    import torch

    a = _SEGMENT_OPERANDS.get("a")
    if a is None:
        a = _SEGMENT_OPERANDS["a"] = torch.randn(128, 128)
    for _ in range(k):
        torch.mm(a, a)


_SEGMENT_OPERANDS: dict = {}


def _med_time(fn: Callable[[], None], reps: int, barrier: Callable[[], None], each_barrier: bool = False) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after one warm-up and a barrier (medians: on
    the 2-core VM means of 21 calls gave skew 0.60 and 1.03 in two profiles of 4 ranks a minute
    apart, medians of 15 gave 0.30 and 0.25)."""
    samples = []
    fn()
    barrier()
    for _ in range(reps):
        if each_barrier:
            barrier()
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def skew_points(group, segments_s: tuple[float, ...] = (0.002, 0.012), reps: int = 15,
                small_bytes: int = 1 << 12) -> list[tuple[float, float]]:
    """One round of the in-place skew measurement of :func:`sync_costs` on this rank: per
    compute length S, ``(T_work, extra wait)`` with the wait ``T_both - T_work - T_idle``
    (see there). Every rank of ``group`` calls it at once."""
    import torch
    import torch.distributed as dist

    def barrier() -> None:
        dist.barrier(group=group)

    barrier()  # calibrate the matmul rate with every rank computing, as in the measurement
    per_call = _segment_call_s(100)
    small = torch.ones(max(1, small_bytes // 4))
    # the reference: the same all-reduce after IN_PLACE_BUSY_S of compute, as the link's fits
    # are measured (_collective_samples), so only the wait beyond what the fits hold counts
    k_ref = _segment_calls(IN_PLACE_BUSY_S, per_call)
    t_idle = max(0.0, _med_time(lambda: (_work_segment(k_ref), dist.all_reduce(small, group=group)), reps, barrier)
                 - _med_time(lambda: _work_segment(k_ref), reps, barrier))
    points = []
    for seg in segments_s:
        k = _segment_calls(seg, per_call)
        t_work = _med_time(lambda: _work_segment(k), reps, barrier)
        t_both = _med_time(lambda: (_work_segment(k), dist.all_reduce(small, group=group)), reps, barrier)
        points.append((t_work, max(0.0, t_both - t_work - t_idle)))
    return points


def stall_samples(group, reps: int = 60, busy_s: float = IN_PLACE_BUSY_S / 2,
                  small_bytes: int = 256) -> tuple[list[float], list[float]]:
    """One round of a small all-reduce's time after compute, every call timed: ``(alone,
    both)``, seconds of ``busy_s`` of compute alone and of the same compute then the
    all-reduce, alternating. Every rank of ``group`` calls it at once. :func:`sync_costs`
    pools the rounds into ``stall_s``: mean minus median of what the all-reduce adds."""
    import torch
    import torch.distributed as dist

    k = _segment_calls(busy_s, _segment_call_s())
    small = torch.ones(max(1, small_bytes // 4))
    dist.all_reduce(small, group=group)
    dist.barrier(group=group)
    return _alternate_work(lambda: dist.all_reduce(small, group=group), k, reps)


def _stall_s(alone: Sequence[float], both: Sequence[float]) -> float:
    """What a collective adds on average beyond what it adds typically (at least 0)."""
    if not alone or not both:
        return 0.0
    mean = statistics.fmean(both) - statistics.fmean(alone)
    typical = statistics.median(both) - statistics.median(alone)
    return max(0.0, mean - typical)


def sync_costs(group, n: int, reps: int = 15, big_bytes: int = 1 << 22,
               earlier_skew: Sequence[list] = (), earlier_stall: Sequence[tuple] = ()) -> dict:
    """What a collective costs ranks that also compute, measured in place (CPU ranks).

    Idle ranks (:func:`_collective_samples`) see the link alone. In a training step every rank
    computes between collectives; ranks that share cores and time slices (or are just noisy)
    then arrive apart, and the early ones wait. Per compute length S, all ranks at once
    (:func:`skew_points`): ``T_both(S)`` = median of (S of small matmuls + a small
    all-reduce), ``T_work(S)`` = median of the matmuls alone, ``T_idle`` = the all-reduce's
    cost after ``IN_PLACE_BUSY_S`` of compute (how the link's fits are measured); the extra
    wait is ``T_both - T_work - T_idle``; summed over the lengths and the ranks, over the
    work summed likewise, it gives one round's wait per second of work. ``skew_fraction`` is
    the median over this call's round and the ``earlier_skew`` rounds (this rank's
    :func:`skew_points` taken earlier in the profile: a round lasts under a second, and on
    the 2-core VM single rounds at 4 ranks read 0.14-2.22 over fifteen profiles, as host
    slowdowns came and went). The constant part of the wait is already in the link's fits
    (measured after the same kind of compute); ``sync_s`` is instead what the runtime adds to
    every reshard collective: a DTensor ``redistribute`` over the bare collective it issues
    (:func:`_redistribute_overhead`). ``overlap_efficiency``: a ``big_bytes`` all-reduce
    started async, then about as much compute, then the wait:
    ``(T_work + T_coll - T_both) / min(T_work, T_coll)``, clipped to [0, 1] (1 = the
    collective hid behind the compute). ``stall_s``: a step sums its collectives, so it pays
    their mean, where every figure above is a median: the mean minus the median of what a
    small all-reduce adds after compute (:func:`stall_samples`; on the 2-core VM 10-15 % of
    such calls at 2 ranks took 3.5-4 ms against a 0.26 ms median), per round (this call's and
    the ``earlier_stall`` ones) averaged over the ranks, the median over rounds kept. Every
    figure pools all ranks' samples (gathered), so one rank's luck does not decide it.
    Returns the figures and the raw samples."""
    import torch
    import torch.distributed as dist

    def barrier() -> None:
        dist.barrier(group=group)

    def med(fn: Callable[[], None], each_barrier: bool = False) -> float:
        return _med_time(fn, reps, barrier, each_barrier)

    rounds = [list(r) for r in earlier_skew] + [skew_points(group, reps=reps)]
    stalls = [tuple(r) for r in earlier_stall] + [stall_samples(group)]
    alone = [x for a, _ in stalls for x in a]
    both = [x for _, b in stalls for x in b]
    stall_rounds = [_stall_s(a, b) for a, b in stalls]
    per_call = _segment_call_s(100)
    big = torch.ones(max(1, big_bytes // 4))
    t_coll = med(lambda: dist.all_reduce(big, group=group), each_barrier=True)
    k = _segment_calls(t_coll, per_call)
    t_work = med(lambda: _work_segment(k))

    def overlapped() -> None:
        w = dist.all_reduce(big, group=group, async_op=True)
        _work_segment(k)
        w.wait()
    t_ovl = med(overlapped)
    t_dtensor = _redistribute_overhead(group, _segment_calls(IN_PLACE_BUSY_S, per_call), med)
    mine = {"rounds": rounds, "t_coll": t_coll, "t_work": t_work, "t_overlap": t_ovl, "t_dtensor": t_dtensor,
            "stall_s": _stall_s(alone, both), "stall_rounds": stall_rounds,
            "stall_typical_s": statistics.median(both) - statistics.median(alone)}
    every: list = [None] * n
    dist.all_gather_object(every, mine, group=group)
    # per round one ratio over every rank's points: the wait per second of work. A line (slope
    # and intercept) through the points traded one against the other from profile to profile
    # on the 2-core VM (4 ranks: 0.02 + 4.7 ms, then 0.19 + 0.3 ms); the constant part of a
    # collective's cost is already in the link's fits, measured after the same kind of compute.
    fracs = [sum(y for r in every for _, y in r["rounds"][i])
             / max(1e-12, sum(x for r in every for x, _ in r["rounds"][i])) for i in range(len(rounds))]
    effs = []
    for r in every:
        hidden = r["t_work"] + r["t_coll"] - r["t_overlap"]
        effs.append(min(1.0, max(0.0, hidden / max(1e-12, min(r["t_work"], r["t_coll"])))))
    dtensor = [r["t_dtensor"] for r in every if r["t_dtensor"] is not None]
    # stall: per round the mean over ranks, then the median over rounds (as for the skew). A
    # mean is what a step pays, but a round that meets a burst of the host is not the plan's.
    # Pooled, the 2-rank figure read 6.1 and 11.3 ms a call in two of three profiles of one
    # run (0.17 in the third), and every collective of every 2-process plan was charged it
    # (ResNet dp2 predicted 227 ms, measured 75); the rounds were not kept then, so whether
    # one burst round did it is not known: they are now (``stall_rounds``)
    per_round = [statistics.fmean(r["stall_rounds"][i] for r in every) for i in range(len(stall_rounds))]
    return {"skew_fraction": statistics.median(fracs), "skew_rounds": fracs,
            "stall_s": statistics.median(per_round), "stall_rounds": per_round,
            "sync_s": statistics.fmean(dtensor) if dtensor else 0.0, "overlap_efficiency": statistics.fmean(effs),
            "samples": every}


def _redistribute_overhead(group, k: int, med: Callable) -> Optional[float]:
    """Seconds a DTensor ``redistribute`` (how the runtime reshards between ops) costs on top
    of the bare collective it issues, both after ``k`` compute calls: Shard(0) -> Replicate of
    a 64 KiB tensor vs a bare all-gather of the same. None when DTensor is missing."""
    import torch
    import torch.distributed as dist

    try:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:
        return None
    n = dist.get_world_size(group)
    mesh = DeviceMesh.from_group(group, "cpu")
    local = torch.ones(16 * 1024 // n)
    x = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    out = torch.empty(local.numel() * n)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    t_redist = med(lambda: (_work_segment(k), x.redistribute(mesh, [Replicate()]).to_local().sum()))
    t_plain = med(lambda: (_work_segment(k), gather(out, local, group=group), out.sum()))
    return max(0.0, t_redist - t_plain)


def _runtime_meshes(n: int, device: str) -> tuple:
    """autopar ``RankMesh``es on ranks 0..n-1: a dp plan's over all n, and this rank's own
    one-rank mesh (``(None, None)`` on the other ranks, or on every rank when the runtime is
    not importable: the cost model must work without it). Every rank makes every mesh
    (making process groups is collective)."""
    try:
        from autopar.runtime.mesh import build_mesh
    except Exception:  # noqa: BLE001 - the same outcome on every rank, so no rank waits alone
        return None, None
    whole = build_mesh({"dp": n}, device, ranks=list(range(n)))
    own = None
    for q in range(n):
        m = build_mesh({"dp": 1}, device, ranks=[q])
        own = m if m is not None else own
    return whole, own


#: Rounds of each runtime measurement per block (:class:`RuntimeProbe`); a profile takes
#: three blocks per process count, spread over its phase, and keeps the median of each figure.
#: Why blocks: one measurement of the 2-rank per-node figure read 44-161 us over six profiles
#: of one evening on the 2-core VM, as the host's speed came and went over tens of seconds.
RUNTIME_BLOCK_ROUNDS = 5


def _worker(rank: int, world: int, port: int, cfg: dict, result_path: str) -> None:
    import torch
    import torch.distributed as dist

    from autopar.runtime.host_memory import configure_host_allocator

    configure_host_allocator()  # as the runtime runs: the same heap reuse (see that module)

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    use_cuda = cfg["cuda"]
    if use_cuda:
        torch.cuda.set_device(rank)
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=cfg["timeout_s"]))
    device = f"cuda:{rank}" if use_cuda else "cpu"
    cores = os.cpu_count() or 1
    result: dict = {"matmul": {}, "gemm": {}, "stream": {}, "collectives": {}, "threads": {}, "dtensor_overhead": {},
                    "kernels": {}, "optimizer": {}, "first_touch": {}, "runtime_overhead": {}, "param_overhead": {},
                    "param_overhead_local": {}, "phase_s": {}, "runtime_blocks": {},
                    "runtime_overhead_error": "", "sync": {}}
    try:
        solo = dist.new_group([0])  # one process with every core: the 1-process runtime's dispatch
        torch.set_num_threads(cores)
        if rank == 0:
            result["dtensor_overhead"][1] = dtensor_op_overhead(solo, device)
        dist.barrier()
        for n in range(2, world + 1):
            phase_start = time.perf_counter()
            group = dist.new_group(list(range(n)))
            # the runtime is timed at 2 and at the whole world (other counts scale from the
            # nearest); its mesh on ranks 0..n-1 is made by every rank (making groups is collective)
            # between 2 and the whole world (local:3 of 4) CPU ranks also fit their squares alone and
            # take one round of host rates: what keeps the profile inside its 2 minutes
            full = n in (2, world)
            rmesh, own_mesh = _runtime_meshes(n, device) if full and not use_cuda else (None, None)
            threads = max(1, cores // n)
            torch.set_num_threads(threads)
            parts: dict = {}
            mark = [time.perf_counter()]

            def lap(name: str) -> None:  # where a phase's time goes, kept in the profile's raw data
                now = time.perf_counter()
                parts[name] = parts.get(name, 0.0) + now - mark[0]
                mark[0] = now
            lap("meshes")
            if rank < n:
                # the runtime's costs, in blocks spread over this phase (RUNTIME_BLOCK_ROUNDS)
                runtime: list = []
                runtime_error: list = []
                probe: list = []

                def runtime_block() -> None:
                    if rmesh is None or runtime_error:
                        return
                    try:
                        if not probe:  # the models are built once and timed in every block
                            probe.append(RuntimeProbe(n, rmesh, own_mesh))
                        runtime.append(probe[0].block(rounds=RUNTIME_BLOCK_ROUNDS,
                                                      barrier=lambda: dist.barrier(group=group)))
                    except Exception as e:  # noqa: BLE001 - recorded; the profile falls back
                        runtime_error.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    lap("runtime")
                runtime_block()
                # CPU ranks: the in-place skew is taken in rounds spread over this phase
                skew = [skew_points(group)] if not use_cuda else []
                stall = [stall_samples(group)] if not use_cuda else []
                lap("skew_stall")
                if not use_cuda:  # concurrent compute only matters when processes share cores
                    result["matmul"][n] = concurrent_matmul_samples(
                        cfg["sizes"], cfg["dtypes"], cfg["window_s"], lambda: dist.barrier(group=group))
                    result["gemm"][n] = gemm_samples(cfg["gemm_shapes"], cfg["window_s"],
                                                     lambda: dist.barrier(group=group)) if full else []
                    lap("matmul")
                    dist.barrier(group=group)
                    rates = host_rates("cpu", cfg["stream_numel"], shared=n > cores,
                                       rounds=HOST_RATE_ROUNDS if full else 1)
                    for key in ("stream", "kernels", "optimizer", "first_touch"):
                        result[key][n] = rates[key]
                    lap("host_rates")
                dist.barrier(group=group)  # all n dispatch at once: they share the cores as in a run
                result["dtensor_overhead"][n] = dtensor_op_overhead(group, device, shared=n > cores)
                lap("dtensor")
                runtime_block()
                if not use_cuda:
                    skew.append(skew_points(group))
                    stall.append(stall_samples(group))
                lap("skew_stall")
                # CPU ranks: collectives measured between bursts of compute, as a step issues them
                result["collectives"][n] = _collective_samples(rank, n, group, cfg["coll_bytes"], device,
                                                               busy_s=0.0 if use_cuda else IN_PLACE_BUSY_S)
                lap("collectives")
                if not use_cuda:
                    result["sync"][n] = sync_costs(group, n, earlier_skew=skew, earlier_stall=stall)
                lap("sync")
                runtime_block()
                if runtime:
                    sgd_tensor = (result["optimizer"].get(n) or {}).get("per_tensor_s", {}).get("sgd", 0.0)
                    node, par, local = (statistics.median(b[i] for b in runtime) for i in range(3))
                    result["runtime_overhead"][n] = node
                    result["param_overhead"][n] = max(0.0, par - sgd_tensor)
                    result["param_overhead_local"][n] = max(0.0, local - sgd_tensor)
                    result["runtime_blocks"][n] = runtime
                if runtime_error:
                    result["runtime_overhead_error"] += f"{n} ranks: {runtime_error[0]}; "
                result["threads"][n] = threads
            dist.barrier()
            lap("wait")
            result["phase_s"][n] = {"total": time.perf_counter() - phase_start, **parts}
        if rank == 0:
            Path(result_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- specs

def _device_from_samples(name: str, kind: str, arch: str, samples: dict, memory_bytes: int,
                         bandwidth: float, overhead: float, host_link: str, host_bw: float,
                         host_mem: int, cores: int, prov: Provenance, *, node_overhead: float = 0.0,
                         kernels: Optional[dict] = None, optimizer: Optional[dict] = None,
                         first_touch: float = 0.0, gemm: Optional[Sequence] = None,
                         param_overhead: float = 0.0, param_overhead_local: float = 0.0) -> DeviceSpec:
    peak, half, eff = {}, {}, {}
    stream = 0.0
    if kind == "cpu" and gemm and "fp32" in samples:
        # fp32: arithmetic and operand streaming fitted jointly over squares and GEMM_SHAPES
        pts = [(f, gemm_bytes(*[square_side(f)] * 3), t) for f, t in samples["fp32"]]
        pts += [(2.0 * m * k * n, gemm_bytes(m, k, n), t) for m, k, n, t in gemm]
        t0, rate, stream = fit_gemm(pts)
        peak["fp32"], half["fp32"], eff["fp32"] = rate, t0 * rate, 1.0
    for d, rows in samples.items():
        if d in peak:
            continue
        if kind == "cpu":  # the operand streaming is priced apart on a CPU (compute.op_time)
            size = _torch_dtype(d).itemsize
            bw = stream or bandwidth
            rows = [(f, max(0.5 * t, t - gemm_bytes(*[square_side(f)] * 3, size) / bw)) for f, t in rows]
        t0, rate = fit_overhead_rate(rows)
        peak[d], half[d], eff[d] = rate, t0 * rate, 1.0
    # tf32 is fp32 on CPUs; dtypes not measured fall back to fp32 (stated in provenance notes)
    for d in DTYPES:
        if d not in peak:
            src = "fp32" if "fp32" in peak else next(iter(peak))
            peak[d], half[d], eff[d] = peak[src], half[src], eff[src]
    return DeviceSpec(name=name, kind=kind, arch=arch, peak_flops=peak, memory_bytes=memory_bytes,
                      memory_bandwidth=bandwidth, host_link=host_link, host_link_bandwidth=host_bw,
                      host_memory_bytes=host_mem, matmul_eff_max=eff, matmul_flops_half=half,
                      memory_bw_efficiency=1.0, op_overhead_s=overhead, cores=cores, provenance=prov,
                      node_overhead_s=node_overhead, kernel_rates=dict(kernels or {}),
                      optimizer_tensor_overhead_s=dict((optimizer or {}).get("per_tensor_s", {})),
                      optimizer_rates=dict((optimizer or {}).get("elements_per_s", {})),
                      first_touch_bandwidth=first_touch, matmul_stream_bandwidth=stream,
                      param_overhead_s=param_overhead, param_overhead_local_s=param_overhead_local)


def _gemm_fit_note(dev: DeviceSpec) -> str:
    if not dev.matmul_stream_bandwidth:
        return ""
    return (f"; fp32 GEMM fit {dev.peak_flops['fp32'] / 1e9:.1f} GFLOP/s + operands at "
            f"{dev.matmul_stream_bandwidth / 1e9:.1f} GB/s")


_KERNEL_NOTE = ("fp32 peak_flops / matmul_flops_half / matmul_stream_bandwidth: fit_gemm over square sizes and "
                "GEMM_SHAPES; kernel_rates: fp32 elements/s on a 512x1024 tensor, conv_fwd / conv_bwd: FLOP/s "
                "and half-rate FLOPs of conv2d fitted over CONV_SHAPES (kernel_rates()), used for every dtype; "
                "sdpa[_causal]_fp32_*: fused attention fitted over CPU_SDPA_SHAPES (attention_rates()); optimizer_tensor_overhead_s / optimizer_rates: single-tensor and fused (*_fused) optimizer "
                "step, slope over tensor count and per-element rate (optimizer_step_costs()); first_touch_bandwidth: page "
                "faults + unmap of fresh anonymous memory (first_touch_bandwidth()), charged from FRESH_MAPPING_BYTES up")


def _arch() -> str:
    import platform
    m = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(m, m or "unknown")


def profile(nproc: int = 2, out: Union[str, os.PathLike, None] = None, progress: Progress = None, *,
            repeat: int = 1, matmul_sizes: Sequence[int] = DEFAULT_MATMUL_SIZES,
            collective_bytes: Sequence[int] = DEFAULT_COLLECTIVE_BYTES,
            dtypes: Sequence[str] = DEFAULT_DTYPES, stream_numel: int = 1 << 24,
            window_s: float = 0.2, timeout_s: float = 300.0, start_method: str = "spawn") -> Cluster:
    """Measure this machine and return (and write to ``out``, default
    :func:`default_profile_path`) the ``local:nproc`` cluster. ``progress`` gets one-line
    strings as phases finish. ``start_method`` ("spawn", or "fork" where exec of a new
    interpreter is impossible, e.g. under qemu-user) starts the ranks; they are started
    before this process runs any torch op, so a forked rank inherits no thread pool.

    ``repeat`` > 1 measures the machine that many times back to back and writes the
    figure-by-figure median (:mod:`autopar.cost_model.profile_merge`: on a shared host one
    profile is one noisy draw). The file is written once, at the end, through a temporary
    file, so an interrupted profile leaves the previous one in place."""
    import torch

    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"profile: nproc must be an int >= 1, got {nproc!r}")
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"profile: repeat must be an int >= 1, got {repeat!r}")
    if repeat > 1 and nproc >= 2 and start_method == "fork":
        raise ValueError("profile: repeat > 1 needs start_method='spawn': the ranks of the second "
                         "round would be forked from a process that has run torch ops (its thread pool)")
    say = progress or (lambda s: None)
    started = time.perf_counter()
    prev_threads = torch.get_num_threads()
    parts = []
    try:
        for r in range(repeat):
            host = _Host.here()
            torch.set_num_threads(host.cores)
            part_say = say if repeat == 1 else (lambda s, r=r: say(f"[{r + 1}/{repeat}] {s}"))
            parts.append(_profile(nproc, part_say, host, matmul_sizes, collective_bytes, dtypes,
                                  stream_numel, window_s, timeout_s, start_method))
    finally:
        torch.set_num_threads(prev_threads)
    from .profile_merge import merge_profiles

    path = Path(out) if out is not None else default_profile_path()
    cluster = write_profile({"profile": merge_profiles(parts)}, nproc, path)
    say(f"wrote {path} in {time.perf_counter() - started:.1f} s"
        + (f" (the median of {repeat} profiles)" if repeat > 1 else ""))
    return cluster


def write_profile(data: dict, nproc: int, path: Union[str, os.PathLike]) -> Cluster:
    """Write ``data`` (``{"profile": ...}``) as a profile file: the ``local:nproc`` cluster it
    gives, with the raw profile beside it, written atomically. Returns that cluster."""
    cluster = cluster_from_profile(data, nproc)
    doc = cluster.to_json()
    doc["profile"] = data["profile"]
    write_text_atomic(Path(path), json.dumps(doc, indent=1), prefix=".profile-", suffix=".json")
    return cluster


@dataclass(frozen=True)
class _Host:
    """This machine, as the profile records it."""

    name: str
    date: str
    cores: int
    memory_bytes: int
    arch: str
    cuda: bool

    @classmethod
    def here(cls) -> "_Host":
        import torch
        return cls(name=socket.gethostname(),
                   date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   cores=os.cpu_count() or 1, memory_bytes=host_memory_bytes() or (16 << 30),
                   arch=_arch(), cuda=torch.cuda.is_available())

    def provenance(self, notes: str) -> Provenance:
        return Provenance(source=f"measured on {self.name} at {self.date}", date=self.date,
                          host=self.name, notes=notes)


def _run_ranks(nproc: int, cfg: dict, start_method: str) -> dict:
    """Start ``nproc`` ranks of :func:`_worker` and return rank 0's measurements."""
    import torch.multiprocessing as mp

    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"profile: start_method must be 'spawn', 'fork' or 'forkserver', got {start_method!r}")
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(nproc, _free_port(), cfg, result_path), nprocs=nproc, join=True,
                           start_method=start_method)
        return json.loads(Path(result_path).read_text())


def _profile(nproc: int, say: Callable[[str], None], h: _Host, matmul_sizes, collective_bytes,
             dtypes, stream_numel: int, window_s: float, timeout_s: float, start_method: str) -> dict:
    """One measurement of this machine: the ``"profile"`` section of a profile document."""
    import torch

    from autopar.runtime.host_memory import configure_host_allocator

    # measured under the allocator settings the runtime applies (apply_plan), so that the
    # kernel, optimizer and per-node figures see the same page faults a training step does
    allocator = configure_host_allocator()
    host, date, cores, mem, arch, cuda, prov = h.name, h.date, h.cores, h.memory_bytes, h.arch, h.cuda, h.provenance
    started = time.perf_counter()
    say(f"profiling {host} ({arch}, {cores} cores, torch {torch.__version__}, cuda={cuda})")
    result = None
    use_cuda = cuda and torch.cuda.device_count() >= nproc
    if nproc >= 2:  # first, before this process runs any op (see start_method)
        cfg = {"sizes": list(matmul_sizes), "gemm_shapes": [list(x) for x in GEMM_SHAPES],
               "dtypes": list(dtypes), "coll_bytes": list(collective_bytes),
               "stream_numel": stream_numel, "cuda": use_cuda, "timeout_s": timeout_s,
               "window_s": window_s}
        say(f"starting {nproc} processes ({start_method}; gloo{'+nccl' if use_cuda else ''} on 127.0.0.1)")
        result = _run_ranks(nproc, cfg, start_method)
    raw: dict = {"matmul": {}, "stream": {}, "collectives": {}, "threads": {"1": cores}, "op_overhead": {},
                 "dtensor_op_overhead": dict(result.get("dtensor_overhead", {})) if result else {},
                 "phase_s": dict(result.get("phase_s", {})) if result else {},
                 "runtime_blocks": dict(result.get("runtime_blocks", {})) if result else {}}
    solo_start = time.perf_counter()
    # wall time per call over a window (as for the concurrent ranks), so one process is
    # measured the way a training step experiences the cores, including waits for them
    cpu_mm = concurrent_matmul_samples(matmul_sizes, dtypes, window_s, lambda: None)
    raw["matmul"]["1"] = cpu_mm
    cpu_gemm = gemm_samples(GEMM_SHAPES, window_s, lambda: None)
    raw["gemm"] = {"1": cpu_gemm}
    say("matmul: " + ", ".join(f"{d} {max(f / t for f, t in rows) / 1e9:.1f} GFLOP/s" for d, rows in cpu_mm.items()))
    rates = host_rates("cpu", stream_numel)
    cpu_bw = rates["stream"]
    cpu_ovh = op_overhead("cpu")
    raw["op_overhead"]["1"] = cpu_ovh
    raw["stream"]["1"] = cpu_bw
    dt_ovh = raw["dtensor_op_overhead"]
    cpu_kernels = rates["kernels"]
    raw["kernels"] = {"1": cpu_kernels}
    opt_costs = rates["optimizer"]
    opt_ovh = opt_costs["per_tensor_s"]
    raw["optimizer"] = {"1": opt_costs}
    cpu_ft = rates["first_touch"]
    raw["first_touch"] = {"1": cpu_ft}
    rt_ovh: dict[str, float] = {}
    par_ovh: dict[str, float] = {}
    par_local: dict[str, float] = {}  # no gradient sync; one process alone has none to make
    rt_solo, par_solo, rt_why, tanh_solo = _runtime_overhead_solo(opt_ovh.get("sgd", 0.0))
    if rt_solo is not None:
        rt_ovh["1"] = rt_solo
        raw["runtime_node_overhead_tanh"] = {"1": tanh_solo}
        par_ovh["1"] = par_local["1"] = par_solo
    if result is not None:
        rt_ovh.update({str(k): v for k, v in result.get("runtime_overhead", {}).items()})
        par_ovh.update({str(k): v for k, v in result.get("param_overhead", {}).items()})
        par_local.update({str(k): v for k, v in result.get("param_overhead_local", {}).items()})
        if result.get("runtime_overhead_error"):
            rt_why = (rt_why + "; " if rt_why else "") + result["runtime_overhead_error"].rstrip("; ")
    raw["phase_s"]["1"] = {"total": time.perf_counter() - solo_start}
    raw["runtime_node_overhead"] = rt_ovh
    raw["runtime_param_overhead"] = par_ovh
    raw["runtime_param_overhead_local"] = par_local
    say("kernels (Melem/s fwd/bwd): " + ", ".join(
        f"{k} {cpu_kernels[k + '_fwd'] / 1e6:.0f}/{cpu_kernels[k + '_bwd'] / 1e6:.0f}" for k in KERNELS)
        + f"; conv2d 3x3 GFLOP/s fwd/bwd {cpu_kernels['conv_fwd'] / 1e9:.1f}/{cpu_kernels['conv_bwd'] / 1e9:.1f}"
        + "; optimizer per tensor " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in opt_ovh.items())
        + ", per element " + ", ".join(f"{k} {v / 1e6:.0f} Melem/s" for k, v in opt_costs["elements_per_s"].items())
        + f"; first touch {cpu_ft / 1e9:.2f} GB/s")
    say("runtime per-node overhead: " + (", ".join(f"{k} proc {v * 1e6:.0f} us" for k, v in sorted(rt_ovh.items()))
                                         or "not measured") + (f" ({rt_why})" if rt_why else "")
        + ("; per parameter: " + ", ".join(f"{k} proc {v * 1e6:.0f} us" for k, v in sorted(par_ovh.items()))
           if par_ovh else "")
        + ("; without a gradient sync: " + ", ".join(f"{k} proc {v * 1e6:.0f} us" for k, v in sorted(par_local.items()))
           if par_local else ""))

    def node_ovh(n: int) -> tuple[float, str]:
        """Runtime per-node per-step seconds for n processes, and how it was obtained."""
        if str(n) in rt_ovh:
            return rt_ovh[str(n)], ("measured on autopar's runtime (toy transformer blocks, train_step slope "
                                    "less their parameters' cost)")
        # not measured at this n (the runtime's mesh needs the whole world): scale the DTensor
        # chain's figure at n by the runtime/DTensor ratio measured at the nearest n
        have = [int(k) for k in rt_ovh if dt_ovh.get(k, 0) > 0]
        if have and dt_ovh.get(str(n), 0) > 0:
            m = min(have, key=lambda k: (abs(k - n), -k))  # a tie: the larger count shares cores more alike
            ratio = rt_ovh[str(m)] / dt_ovh[str(m)]
            return ratio * dt_ovh[str(n)], (f"DTensor tanh-chain figure x runtime/DTensor ratio {ratio:.2f} "
                                            f"measured at {m} process(es)")
        return 0.0, "not measured" + (f" ({rt_why})" if rt_why else "") + ": op_overhead_s per op is used"

    def param_ovh(n: int, table: Optional[dict] = None) -> float:
        """Runtime per-parameter seconds per step for n processes (``table``: with a gradient
        sync, the default, or ``par_local`` without): measured, or the nearest measured count's
        figure scaled as the per-node figure scales between the two."""
        table = par_ovh if table is None else table
        if str(n) in table:
            return table[str(n)]
        if not table:
            return 0.0
        m = min((int(k) for k in table), key=lambda k: (abs(k - n), -k))
        node_n, node_m = node_ovh(n)[0], rt_ovh.get(str(m), 0.0)
        return table[str(m)] * (node_n / node_m if node_m > 0 and node_n > 0 else 1.0)

    def ovh(n: int) -> float:
        """Per-op cost for n processes: the DTensor dispatch the runtime pays, where measured."""
        return max(cpu_ovh, dt_ovh.get(str(n), 0.0))
    say(f"stream bandwidth {cpu_bw / 1e9:.2f} GB/s, op overhead {cpu_ovh * 1e6:.1f} us"
        + (", DTensor op overhead " + ", ".join(f"{k} proc {v * 1e6:.1f} us" for k, v in sorted(dt_ovh.items()))
           if dt_ovh else ""))
    notes = (f"per-process share with {{n}} concurrent processes x {{threads}} threads; tf32 = fp32"
             + ("" if set(dtypes) >= {"fp32", "bf16", "fp16"} else "; unmeasured dtypes copy fp32"))

    devices: dict[int, DeviceSpec] = {}
    if cuda:
        gpu_mm = matmul_samples(tuple(s * 2 for s in matmul_sizes) + (4096,), ("fp32", "tf32", "bf16", "fp16"), "cuda")
        gpu_bw = stream_bandwidth(1 << 26, "cuda")
        host_bw = host_copy_bandwidth()
        # layer norm, softmax, gelu ... at their streaming rates: a layer norm's backward (two
        # reductions) is not the roofline's 2x its forward
        gpu_kernels = kernel_rates(GPU_KERNEL_SHAPE, device="cuda", reps=5, chain=4, conv=False)
        gpu_kernels.update(attention_rates("cuda"))
        props = torch.cuda.get_device_properties(0)
        link_name = "nvlink-c2c" if arch == "aarch64" else ("pcie5" if host_bw > 32e9 else "pcie4")
        raw["gpu"] = {"matmul": gpu_mm, "stream": gpu_bw, "host_copy": host_bw, "name": props.name,
                      "kernels": gpu_kernels}
        gpu = _device_from_samples(
            f"local-gpu:{props.name}", "gpu", f"sm{props.major}{props.minor}", gpu_mm, props.total_memory,
            gpu_bw, op_overhead("cuda"), link_name, host_bw, mem // max(1, torch.cuda.device_count()),
            props.multi_processor_count,
            prov(f"{props.name}; host link kind guessed from measured copy bandwidth; kernel rates "
                 f"fp32 on {GPU_KERNEL_SHAPE[0]}x{GPU_KERNEL_SHAPE[1]}; host_* optimizer rates: this "
                 f"host's CPU, where an offloaded optimizer steps"), kernels=gpu_kernels,
            optimizer={k: {f"{HOST_RATE_PREFIX}{o}": v for o, v in opt_costs[k].items()}
                       for k in ("per_tensor_s", "elements_per_s")})
        say(f"gpu {props.name}: bf16 {gpu.peak_flops['bf16'] / 1e12:.1f} TFLOP/s, host link {host_bw / 1e9:.1f} GB/s")
        devices = {n: gpu for n in range(1, nproc + 1)}
    else:
        nv, how = node_ovh(1)
        devices[1] = _device_from_samples(
            "local-cpu/1", "cpu", arch, cpu_mm, mem, cpu_bw, ovh(1), "none", 0.0, 0, cores,
            prov(notes.format(n=1, threads=cores) + f"; node_overhead_s {how}; " + _KERNEL_NOTE),
            node_overhead=nv, kernels=cpu_kernels, optimizer=opt_costs, first_touch=cpu_ft, gemm=cpu_gemm,
            param_overhead=param_ovh(1), param_overhead_local=param_ovh(1, par_local))
        say("1 process:" + _gemm_fit_note(devices[1]).lstrip(";"))

    links: dict[int, LinkSpec] = {}
    if result is not None:
        for n in range(2, nproc + 1):
            key = str(n)
            coll = result["collectives"][key]
            raw["collectives"][key] = coll
            raw["threads"][key] = result["threads"][key]
            # a 0 s sample is a collective lost in the noise of the compute it was measured
            # after (tiny sizes); the fits use the samples that resolved a time
            usable = {k: v for k, v in coll.items() if isinstance(v, list) and any(t > 0 for _, t in v)}
            alpha, bw = fit_link(usable, n)
            per_kind = {k: fit_link({k: v}, n) for k, v in usable.items() if sum(t > 0 for _, t in v) >= 2}
            raw.setdefault("fit_check", {})[key] = {
                "joint": fit_check(usable, n, lambda k: (alpha, bw)),
                "per_collective": fit_check(usable, n, lambda k: per_kind.get(k, (alpha, bw)))}
            skipped = sorted(k for k, v in coll.items() if not isinstance(v, list))
            sync = result.get("sync", {}).get(key)
            if sync:
                raw.setdefault("sync", {})[key] = sync
                in_place = dict(skew_fraction=sync["skew_fraction"], sync_s=sync["sync_s"],
                                overlap_efficiency=sync["overlap_efficiency"], stall_s=sync.get("stall_s", 0.0))
                in_place_note = ("; skew_fraction, overlap_efficiency, stall_s measured in place, sync_s = "
                                 "DTensor redistribute over the bare collective (sync_costs)")
            else:  # GPUs: not measured, the catalog's defaults (no skew, full overlap)
                in_place, in_place_note = {}, "; skew and overlap not measured (defaults)"
            links[n] = LinkSpec(
                name="local-nccl" if use_cuda else "local-gloo", bandwidth=bw, latency=alpha,
                provenance=prov(f"{n} processes; joint alpha-beta fit over {sorted(usable)}, "
                                f"plus one fit per collective" + (f"; unsupported: {skipped}" if skipped else "")
                                + in_place_note),
                collective_fits=tuple((k, a, b) for k, (a, b) in sorted(per_kind.items())), **in_place)
            say(f"{n} processes: link {bw / 1e9:.2f} GB/s, {alpha * 1e6:.1f} us"
                + (f" (unsupported: {', '.join(skipped)})" if skipped else "")
                + (f"; ranks that compute: skew {in_place['skew_fraction']:.2f} of the work between "
                   f"collectives + {in_place['sync_s'] * 1e3:.2f} ms each, overlap "
                   f"{in_place['overlap_efficiency']:.2f}, stall {in_place['stall_s'] * 1e3:.2f} ms a call"
                   if in_place else ""))
            if not cuda:
                mm = result["matmul"][key]
                raw["matmul"][key] = mm
                raw["stream"][key] = result["stream"][key]
                nv, how = node_ovh(n)
                kern = result.get("kernels", {}).get(key) or cpu_kernels
                raw["kernels"][key] = kern
                opt_n = result.get("optimizer", {}).get(key) or opt_costs
                raw["optimizer"][key] = opt_n
                ft_n = result.get("first_touch", {}).get(key) or cpu_ft
                raw["first_touch"][key] = ft_n
                gemm_n = result.get("gemm", {}).get(key) or None
                raw["gemm"][key] = gemm_n
                devices[n] = _device_from_samples(
                    f"local-cpu/{n}", "cpu", arch, mm, mem // n, result["stream"][key], ovh(n), "none",
                    0.0, 0, result["threads"][key],
                    prov(notes.format(n=n, threads=result["threads"][key]) + f"; node_overhead_s {how}; "
                         + _KERNEL_NOTE),
                    node_overhead=nv, kernels=kern, optimizer=opt_n, first_touch=ft_n, gemm=gemm_n,
                    param_overhead=param_ovh(n), param_overhead_local=param_ovh(n, par_local))
                say(f"{n} processes: per-process matmul " + ", ".join(  # measured, as for 1 process
                    f"{d} {max(f / t for f, t in rows) / 1e9:.1f} GFLOP/s" for d, rows in mm.items())
                    + _gemm_fit_note(devices[n]))

    return {"version": PROFILE_VERSION, "host": host, "date": date, "arch": arch,
            "cpu_count": cores, "nproc": nproc, "torch": torch.__version__,
            "host_allocator": allocator, "gpu_count": torch.cuda.device_count() if cuda else 0,
            "device_by_nproc": {str(k): v.to_json() for k, v in devices.items()},
            "link_by_nproc": {str(k): v.to_json() for k, v in links.items()},
            "raw": raw, "wall_s": time.perf_counter() - started}
