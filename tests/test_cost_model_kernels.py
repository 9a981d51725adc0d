"""Measured non-matmul kernel rates, the runtime's per-node overhead and the optimizer's
per-tensor cost: how the DeviceSpec carries them, how a graph node is priced with them, and
that the profiler's measurements run (small sizes, a few seconds)."""
from __future__ import annotations

import json

import pytest
import torch

from autopar.cost_model import DeviceSpec
from autopar.cost_model.catalog import device as get_device
from autopar.cost_model.compute import (BACKWARD_FACTOR, backward_time, kernel_class, node_time, op_time,
                                        optimizer_step_overhead)
from autopar.graph import OpKind


def _cpu(**changes) -> DeviceSpec:
    return get_device("graviton4").replace(**changes)


def test_devicespec_new_fields_default_round_trip_and_old_json():
    d = _cpu(node_overhead_s=7e-5, kernel_rates={"gelu_fwd": 1e9, "gelu_bwd": 5e8},
             optimizer_tensor_overhead_s={"adam": 2e-5})
    back = DeviceSpec.from_json(json.loads(json.dumps(d.to_json())))
    assert back == d and back.kernel_rates["gelu_bwd"] == 5e8
    old = d.to_json()
    for k in ("node_overhead_s", "kernel_rates", "optimizer_tensor_overhead_s"):
        old.pop(k)
    legacy = DeviceSpec.from_json(old)  # a profile written before these fields still loads
    assert legacy.node_overhead_s == 0.0 and dict(legacy.kernel_rates) == {}
    with pytest.raises(ValueError, match="kernel_rates"):
        _cpu(kernel_rates={"gelu_fwd": -1.0})
    with pytest.raises(ValueError, match="node_overhead_s"):
        _cpu(node_overhead_s=-1e-6)
    with pytest.raises(TypeError):
        d.kernel_rates["gelu_fwd"] = 1.0  # read-only like the other tables


@pytest.mark.parametrize("kind,target,want", [
    (OpKind.ELEMENTWISE, "torch._C._nn.gelu", "gelu"),
    (OpKind.ELEMENTWISE, "torch.nn.functional.silu", "silu"),
    (OpKind.ELEMENTWISE, "torch.tanh", "tanh"),
    (OpKind.ELEMENTWISE, "torch.sigmoid", "exp"),
    (OpKind.ELEMENTWISE, "_operator.add", "add"),
    (OpKind.ELEMENTWISE, "_operator.mul", "mul"),
    (OpKind.NORM, "h.0.ln_1", "layer_norm"),
    (OpKind.SOFTMAX, "torch.softmax", "softmax"),
    (OpKind.CONV, "layer1.0.conv1", "conv"),
    (OpKind.NORM, "BatchNorm2d", "batch_norm"),
    (OpKind.NORM, "torch.nn.functional.batch_norm", "batch_norm"),
    (OpKind.POOL, "MaxPool2d", "max_pool"),
    (OpKind.POOL, "torch.nn.functional.adaptive_avg_pool2d", None),
    (OpKind.LINEAR, "h.0.mlp.c_fc", None),
    (OpKind.VIEW, "transpose", None),
])
def test_kernel_class(kind, target, want):
    assert kernel_class(kind, target) == want


def test_tanh_gelu_is_its_own_kernel_in_both_forms():
    """GPT-2's gelu_new (approximate="tanh") runs a different, slower polynomial than the erf
    gelu on a CPU: it is priced by its own measured rate, written as F.gelu(..., approximate=)
    or as an nn.GELU module, and falls back to the erf rate on a profile that lacks it."""
    from autopar.graph import capture
    from autopar.solvers.costed import _kernel_of, analyze
    from autopar.solvers.strategies import default_registry

    assert kernel_class(OpKind.ELEMENTWISE, "torch._C._nn.gelu", {"approximate": "tanh"}) == "gelu_tanh"
    assert kernel_class(OpKind.ELEMENTWISE, "torch._C._nn.gelu", {"approximate": "none"}) == "gelu"

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act = torch.nn.GELU(approximate="tanh")
            self.erf = torch.nn.GELU()

        def forward(self, x):
            return self.erf(torch.nn.functional.gelu(self.act(x), approximate="tanh"))

    g = capture(Net(), (torch.randn(4, 8),))
    ctx = analyze(g, default_registry()).contexts
    got = sorted(_kernel_of(n, ctx[n.name]) for n in g.nodes.values() if n.op in ("call_module", "call_function"))
    assert got == ["gelu", "gelu_tanh", "gelu_tanh"]

    elems = 1 << 16
    both = _cpu(kernel_rates={"gelu_fwd": 4e9, "gelu_bwd": 2e9, "gelu_tanh_fwd": 1e9, "gelu_tanh_bwd": 5e8})
    old = _cpu(kernel_rates={"gelu_fwd": 4e9, "gelu_bwd": 2e9})
    moved = 8.0 * elems  # reads and writes fp32: far under the measured rates' time at stream speed
    f, b = node_time(0, moved, elems, "fp32", both, "elementwise", "gelu_tanh")
    ovh = both.op_overhead_s
    assert f == pytest.approx(elems / 1e9 + ovh) and b == pytest.approx(elems / 5e8 + BACKWARD_FACTOR * ovh)
    f0, _ = node_time(0, moved, elems, "fp32", old, "elementwise", "gelu_tanh")
    assert f0 == pytest.approx(elems / 4e9 + ovh)


def test_node_time_catalog_device_is_the_roofline():
    h100 = get_device("h100-sxm")  # no measured kernel rates / runtime overhead: unchanged pricing
    for kind, kernel in (("matmul", None), ("elementwise", "gelu")):
        f, b = node_time(1e9, 1e8, 1e6, "bf16", h100, kind, kernel)
        t = op_time(1e9, 1e8, "bf16", h100, kind=kind)
        assert (f, b) == pytest.approx((t, backward_time(t, kind)))
    assert node_time(0, 0, 0, "bf16", h100, None) == (0.0, 0.0)  # a view costs nothing there


def test_node_time_uses_measured_rates_and_runtime_overhead():
    elems = 1 << 19
    slow = {"gelu_fwd": 1e9, "gelu_bwd": 5e8}
    cpu = _cpu(kernel_rates=slow, node_overhead_s=9e-5)
    moved = 2 * 4 * elems
    f, b = node_time(8 * elems, moved, elems, "fp32", cpu, "elementwise", "gelu")
    share = 9e-5 / (1 + BACKWARD_FACTOR)
    roof = op_time(8 * elems, moved, "fp32", cpu, kind="elementwise", include_overhead=False)
    assert elems / 1e9 > roof  # the measured rate is the binding term here
    assert f == pytest.approx(elems / 1e9 + share)
    assert b == pytest.approx(elems / 5e8 + BACKWARD_FACTOR * share)
    # an unmeasured kernel keeps the roofline; a view pays the runtime's per-node overhead only
    f2, _ = node_time(8 * elems, moved, elems, "fp32", cpu, "elementwise", "silu")
    assert f2 == pytest.approx(roof + share)
    assert sum(node_time(0, 0, 0, "fp32", cpu, None)) == pytest.approx(9e-5)
    # without a measured node overhead, op_overhead_s per op (forward, 2x backward) as before
    plain = _cpu(kernel_rates=slow)
    f3, b3 = node_time(8 * elems, moved, elems, "fp32", plain, "elementwise", "gelu")
    assert f3 == pytest.approx(elems / 1e9 + plain.op_overhead_s)
    assert b3 == pytest.approx(elems / 5e8 + BACKWARD_FACTOR * plain.op_overhead_s)


def test_node_time_prices_a_convolution_by_its_measured_fit():
    fit = {"conv_fwd": 2e11, "conv_fwd_half": 2e7, "conv_bwd": 1e11, "conv_bwd_half": 5e7}
    cpu = _cpu(kernel_rates=fit)
    flops = 1e6  # a small 1x1 convolution: far below the matmul fit's rate on the measured device
    f, b = node_time(flops, 1e5, 1e4, "fp32", cpu, "matmul", "conv")
    roof = op_time(flops, 1e5, "fp32", cpu, kind="matmul", include_overhead=False)
    assert f == pytest.approx((flops + 2e7) / 2e11 + cpu.op_overhead_s)
    assert b == pytest.approx((2 * flops + 5e7) / 1e11 + BACKWARD_FACTOR * cpu.op_overhead_s)
    assert f - cpu.op_overhead_s > roof  # the fit binds here, not the roofline
    # a device without the fit (catalog) keeps the matmul roofline for a convolution
    f2, b2 = node_time(flops, 1e5, 1e4, "fp32", _cpu(), "matmul", "conv")
    assert f2 == pytest.approx(roof + _cpu().op_overhead_s)


def test_attention_is_priced_on_its_measured_fit_per_dtype_and_mask():
    """A profiled GPU carries fits of the fused attention kernel (causal and full, per dtype);
    they replace the matmul roofline, which prices a causal mask's skipped half. Devices
    without them (catalog, CPU profiles) keep the roofline."""
    assert kernel_class(OpKind.ATTENTION, "torch._C._nn.scaled_dot_product_attention",
                        {"is_causal": True}) == "sdpa_causal"
    assert kernel_class(OpKind.ATTENTION, "torch._C._nn.scaled_dot_product_attention") == "sdpa"
    assert kernel_class(OpKind.ATTENTION, "MultiheadAttention") is None  # projections inside
    h100 = get_device("h100-sxm")
    fits = {"sdpa_causal_fp32_fwd": 8e13, "sdpa_causal_fp32_fwd_half": 1e9,
            "sdpa_causal_fp32_bwd": 4e13, "sdpa_causal_fp32_bwd_half": 2e9,
            "sdpa_causal_bf16_fwd": 6e14, "sdpa_causal_bf16_bwd": 3e14}
    gpu = h100.replace(kernel_rates=fits)
    flops = 1e12
    f, b = node_time(flops, 1e8, 1e7, "fp32", gpu, "matmul", "sdpa_causal")
    assert f == pytest.approx((flops + 1e9) / 8e13 + gpu.op_overhead_s)
    assert b == pytest.approx((2 * flops + 2e9) / 4e13 + BACKWARD_FACTOR * gpu.op_overhead_s)
    f16, _ = node_time(flops, 1e8, 1e7, "fp16", gpu, "matmul", "sdpa_causal")  # fp16 takes bf16's fit
    assert f16 == pytest.approx(flops / 6e14 + gpu.op_overhead_s)
    roof = node_time(flops, 1e8, 1e7, "fp32", h100, "matmul", "sdpa_causal")
    assert roof == node_time(flops, 1e8, 1e7, "fp32", h100, "matmul", None)
    assert node_time(flops, 1e8, 1e7, "fp32", gpu, "matmul", "sdpa") == roof  # full mask not measured


def test_optimizer_step_overhead():
    cpu = _cpu(optimizer_tensor_overhead_s={"adam": 2e-5, "sgd": 5e-6})
    assert optimizer_step_overhead(50, "adam", cpu) == pytest.approx(1e-3)
    assert optimizer_step_overhead(50, "adamw", cpu) == pytest.approx(1e-3)  # AdamW = Adam's kernels
    assert optimizer_step_overhead(50, "adam", get_device("h100-sxm")) == 0.0


def test_profiler_kernel_and_optimizer_measurements_run():
    from autopar.cost_model.profiler import KERNELS, kernel_rates, optimizer_step_costs
    rates = kernel_rates(shape=(64, 256), reps=2, chain=2)
    conv = {"conv_fwd", "conv_bwd", "conv_fwd_half", "conv_bwd_half"}
    # on a CPU the fused attention's fits come along (GPT's causal attention is priced by them)
    sdpa = {f"sdpa{c}_fp32_{d}{h}" for c in ("", "_causal") for d in ("fwd", "bwd") for h in ("", "_half")}
    assert set(rates) == {f"{k}_{d}" for k in KERNELS for d in ("fwd", "bwd")} | conv | sdpa
    assert all(v > 1e5 for k, v in rates.items() if k not in conv | sdpa), rates
    assert all(rates[k] > 1e6 for k in sdpa if not k.endswith("_half")), rates
    assert rates["conv_fwd"] > 1e8 and rates["conv_bwd"] > 1e8 and rates["conv_fwd_half"] >= 1
    opt = optimizer_step_costs(total_numel=1 << 14, counts=(2, 32), rounds=2)
    names = {"adam", "sgd", "adam_fused", "sgd_fused"}  # torch 2.13's CPU build has the fused kernels
    assert set(opt["elements_per_s"]) == names | {f"{n}_large" for n in names}
    assert set(opt["per_tensor_s"]) == names and all(v >= 0 for v in opt["per_tensor_s"].values())
    assert all(v > 0 for v in opt["elements_per_s"].values())


def test_profiler_attention_fits_run():
    from autopar.cost_model.profiler import attention_rates
    rates = attention_rates("cpu", ("fp32",), shapes=((1, 2, 32, 8), (2, 2, 64, 8)), reps=2)
    names = {f"sdpa{c}_fp32_{d}" for c in ("", "_causal") for d in ("fwd", "bwd")}
    assert set(rates) == names | {f"{n}_half" for n in names}
    assert all(rates[n] > 1e6 and rates[f"{n}_half"] >= 1 for n in names), rates


def test_runtime_node_overhead_measured_on_the_runtime():
    from autopar.cost_model.profiler import _runtime_overhead_solo
    per_node, per_param, why, tanh = _runtime_overhead_solo()
    assert per_node is not None and per_param is not None, why
    # a DTensor node's forward+backward in the runtime costs microseconds, not nanoseconds or seconds
    assert 1e-6 < per_node < 1e-2, per_node
    assert 1e-6 < tanh < 1e-2, tanh
    assert 0.0 <= per_param < 1e-2, per_param


def test_runtime_probe_blocks_are_transformer_code():
    """The per-node figure comes from blocks written as transformer code is: each block adds
    the 22 graph nodes and 12 parameters of a GPT-2 block (qkv split by chunk, heads by
    unflatten / transpose, fused causal attention, two residual adds)."""
    from autopar.cost_model.profiler import _block_chain_model
    from autopar.graph import capture
    x = torch.randn(2, 4, 8)
    one, three = capture(_block_chain_model(1), (x,)), capture(_block_chain_model(3), (x,))
    assert (len(three.nodes) - len(one.nodes)) == 2 * 22
    assert (len(three.params) - len(one.params)) == 2 * 12
    kinds = [n.kind for n in one.nodes.values()]
    assert kinds.count(OpKind.ATTENTION) == 1 and kinds.count(OpKind.NORM) == 2


def test_optimizer_step_time_from_measured_rates():
    from autopar.cost_model.compute import optimizer_step_time
    cpu = _cpu(optimizer_tensor_overhead_s={"adam": 2e-5}, optimizer_rates={"adam": 4e8})
    assert optimizer_step_time(4e6, 50, "adam", cpu) == pytest.approx(4e6 / 4e8 + 50 * 2e-5)
    assert optimizer_step_time(4e6, 50, "adamw", cpu) == pytest.approx(4e6 / 4e8 + 50 * 2e-5)
    assert optimizer_step_time(4e6, 50, "sgd", cpu) is None  # not measured: caller keeps the roofline
    assert optimizer_step_time(4e6, 50, "adam", get_device("h100-sxm")) is None
    # the fused implementation is priced by its own measurement, or (older profiles) not at all
    assert optimizer_step_time(4e6, 50, "adam_fused", cpu) is None
    fused = _cpu(optimizer_tensor_overhead_s={"adam": 2e-5, "adam_fused": 1e-6},
                 optimizer_rates={"adam": 4e8, "adam_fused": 2e9})
    assert optimizer_step_time(4e6, 50, "adam_fused", fused) == pytest.approx(4e6 / 2e9 + 50 * 1e-6)
    with pytest.raises(ValueError, match="optimizer_rates"):
        _cpu(optimizer_rates={"adam": 0.0})


def test_optimizer_rate_falls_to_the_streaming_rate_for_large_tensors():
    from autopar.cost_model.compute import OPT_LARGE_TENSOR, OPT_SMALL_TENSOR, optimizer_step_time
    cpu = _cpu(optimizer_rates={"adam": 9e8, "adam_large": 3e8})
    small, large = OPT_SMALL_TENSOR, OPT_LARGE_TENSOR
    assert optimizer_step_time(4 * small, 4, "adam", cpu) == pytest.approx(4 * small / 9e8)  # cache-sized
    assert optimizer_step_time(2 * large, 2, "adam", cpu) == pytest.approx(2 * large / 3e8)  # streaming
    assert optimizer_step_time(8 * large, 2, "adam", cpu) == pytest.approx(8 * large / 3e8)  # beyond: large
    mid = (small * large) ** 0.5  # halfway in log(size): the geometric mean of the rates
    assert optimizer_step_time(mid, 1, "adam", cpu) == pytest.approx(mid / (9e8 * 3e8) ** 0.5)


def test_node_time_charges_fresh_memory_at_first_touch_rate():
    """Only tensors large enough to be freshly mapped pay page faults: smaller ones come back
    from the heap (and the kernel rates already hold their writes)."""
    from autopar.cost_model.compute import FRESH_MAPPING_BYTES
    cpu = _cpu(first_touch_bandwidth=4e9)
    big = float(FRESH_MAPPING_BYTES)
    out, moved = big, 2.5 * big  # writes 32 MiB; reads 48 MiB of inputs and params (their grads)
    f, b = node_time(1e9, moved, out / 4, "fp32", cpu, "matmul", None, out_bytes=out)
    base = op_time(1e9, moved, "fp32", cpu, kind="matmul")
    assert f == pytest.approx(base + out / 4e9)
    assert b == pytest.approx(backward_time(base, "matmul") + (moved - out) / 4e9)
    small_out, small_moved = 2e6, 5e6  # heap-sized: no fault charge either way
    f, b = node_time(1e9, small_moved, small_out / 4, "fp32", cpu, "matmul", None, out_bytes=small_out)
    base = op_time(1e9, small_moved, "fp32", cpu, kind="matmul")
    assert (f, b) == pytest.approx((base, backward_time(base, "matmul")))
    # a forward output of 32 MiB with heap-sized gradients: only the forward pays
    f, b = node_time(1e9, big + 1e6, big / 4, "fp32", cpu, "matmul", None, out_bytes=big)
    base = op_time(1e9, big + 1e6, "fp32", cpu, kind="matmul")
    assert (f, b) == pytest.approx((base + big / 4e9, backward_time(base, "matmul")))
    assert node_time(0, 0, 0, "fp32", cpu, None, out_bytes=1e6) == (0.0, 0.0)  # a view allocates nothing
    assert DeviceSpec.from_json(cpu.to_json()).first_touch_bandwidth == 4e9


def test_profiler_first_touch_bandwidth_is_a_rate():
    from autopar.cost_model.profiler import first_touch_bandwidth
    bw = first_touch_bandwidth(nbytes=1 << 22, reps=2)
    assert 1e7 < bw < 1e13, bw  # MB/s to TB/s: a rate, not a time


def test_unmeasured_process_count_shares_the_measured_rates():
    from autopar.cost_model.catalog import local_shm
    from autopar.cost_model.cluster import cluster_from_profile
    dev2 = _cpu(kernel_rates={"gelu_fwd": 2e9}, optimizer_rates={"adam": 8e8}, first_touch_bandwidth=4e9,
                node_overhead_s=6e-5)
    data = {"profile": {"device_by_nproc": {"2": dev2.to_json()}, "link_by_nproc": {"2": local_shm().to_json()}}}
    dev4 = cluster_from_profile(data, 4).groups[0].device  # 4 processes share what 2 measured
    assert dev4.kernel_rates["gelu_fwd"] == pytest.approx(1e9)
    assert dev4.optimizer_rates["adam"] == pytest.approx(4e8)
    assert dev4.first_touch_bandwidth == pytest.approx(2e9)
    assert dev4.node_overhead_s == pytest.approx(6e-5)


def test_module_nodes_are_priced_by_their_class():
    """A module node's target is its path ("pool", "stem.1"): the solver finds the measured
    kernel by the module's class, so ResNet's max pool and batch norms get their own rates."""
    from autopar.graph import capture
    from autopar.solvers.costed import _kernel_of, analyze
    from autopar.solvers.strategies import default_registry

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
            self.pool = torch.nn.MaxPool2d(3, 2, 1)
            self.ln = torch.nn.LayerNorm(8)

        def forward(self, x):
            y = torch.nn.functional.adaptive_avg_pool2d(self.pool(self.stem(x)), 1).flatten(1)
            return self.ln(y)

    g = capture(Net(), (torch.randn(2, 3, 8, 8),))
    ctx = analyze(g, default_registry()).contexts
    got = {n.target: _kernel_of(n, ctx[n.name]) for n in g.nodes.values() if n.op == "call_module"}
    assert got == {"stem.0": "conv", "stem.1": "batch_norm", "pool": "max_pool", "ln": "layer_norm"}
    avg = [n for n in g.nodes.values() if "adaptive_avg_pool2d" in n.target]
    assert len(avg) == 1 and _kernel_of(avg[0], ctx[avg[0].name]) is None
