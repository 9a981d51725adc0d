"""The profiler measures this machine: a tiny smoke run with 2 processes (a few seconds),
and the full-size run kept under the `slow` marker."""
from __future__ import annotations

import json
import statistics
import time

import pytest

from autopar.cost_model import Cluster, DeviceSpec
from autopar.cost_model.profiler import (_device_from_samples, _median_of, fit_check, fit_gemm, fit_link,
                                         fit_overhead_rate, gemm_bytes, profile)
from autopar.cost_model.compute import op_time
from autopar.cost_model.device import Provenance


def test_fit_overhead_rate_recovers_parameters():
    t0, rate = 5e-5, 2e11
    samples = [(f, t0 + f / rate) for f in (1e6, 1e7, 1e8, 1e9)]
    got_t0, got_rate = fit_overhead_rate(samples)
    assert got_t0 == pytest.approx(t0, rel=1e-6)
    assert got_rate == pytest.approx(rate, rel=1e-6)
    # a noisy negative intercept falls back to a line through the origin
    t0_, rate_ = fit_overhead_rate([(1e6, 1e-6), (1e9, 2e-2)])
    assert t0_ == 0.0 and rate_ > 0


_SHAPES = [(n, n, n) for n in (128, 256, 512, 1024)] + [(16, 1024, 1024), (64, 1024, 1024), (512, 256, 256)]


def test_fit_gemm_separates_arithmetic_from_operand_streaming():
    t0, rate, stream = 2e-6, 2e11, 3e10
    pts = [(2.0 * m * k * n, gemm_bytes(m, k, n), t0 + 2.0 * m * k * n / rate + gemm_bytes(m, k, n) / stream)
           for m, k, n in _SHAPES]
    got = fit_gemm(pts)
    assert got == pytest.approx((t0, rate, stream), rel=1e-6)
    # time proportional to FLOPs alone: no streaming term (0), not a negative one
    t0_, rate_, stream_ = fit_gemm([(f, b, f / rate) for f, b, _ in pts])
    assert stream_ == 0.0 and t0_ == 0.0 and rate_ == pytest.approx(rate)
    with pytest.raises(ValueError, match="at least 2"):
        fit_gemm([(1e6, 1e4, 1e-5)])


def test_cpu_device_prices_gemms_with_the_joint_fit():
    rate, stream = 1.5e11, 2e10
    t = lambda m, k, n: 2.0 * m * k * n / rate + gemm_bytes(m, k, n) / stream  # noqa: E731
    squares = {"fp32": [(2.0 * n ** 3, t(n, n, n)) for n in (128, 256, 512, 1024)]}
    gemm = [(m, k, n, t(m, k, n)) for m, k, n in _SHAPES[4:]]
    prov = Provenance(source="measured on test at 2026-01-01", date="2026-01-01")
    dev = _device_from_samples("cpu-test", "cpu", "x86_64", squares, 1 << 30, 5e10, 0.0, "none", 0.0, 0, 1,
                               prov, gemm=gemm)
    assert dev.matmul_stream_bandwidth == pytest.approx(stream, rel=1e-6)
    assert dev.peak_flops["fp32"] == pytest.approx(rate, rel=1e-6)
    # a skinny product not in the samples: compute + operands at the fitted streaming rate
    assert op_time(2.0 * 32 * 2048 * 512, gemm_bytes(32, 2048, 512), "fp32", dev, include_overhead=False) \
        == pytest.approx(t(32, 2048, 512), rel=1e-6)
    assert DeviceSpec.from_json(dev.to_json()) == dev


def test_median_of_nested_rounds():
    rounds = [{"a": 1.0, "b": {"x": 5.0}}, {"a": 3.0, "b": {"x": 1.0}}, {"a": 2.0, "b": {"x": 100.0}}]
    assert _median_of(rounds) == {"a": 2.0, "b": {"x": 5.0}}


def test_fit_link_recovers_alpha_beta():
    alpha, bw, n = 3e-5, 2e9, 4
    samples = {
        "all_reduce": [(b, 2 * (n - 1) * alpha + 2 * (n - 1) / n * b / bw) for b in (1e3, 1e5, 1e7)],
        "all_gather": [(b, (n - 1) * alpha + (n - 1) / n * b / bw) for b in (1e3, 1e5, 1e7)],
    }
    a, b = fit_link(samples, n)
    assert a == pytest.approx(alpha, rel=1e-6)
    assert b == pytest.approx(bw, rel=1e-6)



def test_zero_second_samples_are_left_out_of_fit_and_check():
    # an in-place sample can come out as 0 s (a tiny collective lost in the compute's noise);
    # it must neither bend the fit nor divide the fit check by zero
    alpha, bw, n = 3e-5, 2e9, 2
    good = [(b, (n - 1) * alpha + (n - 1) / n * b / bw) for b in (1e5, 1e7)]
    samples = {"all_gather": [(1e3, 0.0)] + good}
    a, b = fit_link(samples, n)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(bw, rel=1e-6)
    check = fit_check(samples, n, lambda k: (a, b))["all_gather"]
    assert len(check["points"]) == 3 and check["max_rel_err"] == pytest.approx(0.0, abs=1e-9)
    assert fit_check({"all_gather": [(1e3, 0.0)]}, n, lambda k: (a, b))["all_gather"]["max_rel_err"] is None


def _check_profile(cluster: Cluster, path, nproc: int) -> None:
    assert cluster.world_size == nproc
    dev = cluster.groups[0].device
    assert dev.provenance.source.startswith("measured on ")
    assert dev.peak_flops["fp32"] > 1e8
    link = cluster.groups[0].intra_node_link
    assert link.provenance.source.startswith("measured on ")
    assert link.bandwidth > 1e6 and link.latency >= 0
    doc = json.loads(path.read_text())
    assert Cluster.from_json(doc) == cluster
    assert str(nproc) in doc["profile"]["device_by_nproc"]
    assert DeviceSpec.from_json(doc["profile"]["device_by_nproc"]["1"]).kind in ("cpu", "gpu")


def test_profile_smoke_two_processes(tmp_path, monkeypatch):
    out = tmp_path / "profile.json"
    messages: list[str] = []
    cluster = profile(2, out, messages.append, matmul_sizes=(32, 64), collective_bytes=(1 << 14, 1 << 18),
                      dtypes=("fp32",), stream_numel=1 << 16, window_s=0.02)
    _check_profile(cluster, out, 2)
    assert any("2 processes" in m for m in messages)
    raw = json.loads(out.read_text())["profile"]["raw"]
    assert set(raw["collectives"]["2"]) >= {"all_reduce", "all_gather", "send_recv"}
    # skinny GEMMs timed beside the squares, alone and with 2 processes, and fitted with them
    assert len(raw["gemm"]["1"]) == len(raw["gemm"]["2"]) > 0
    assert cluster.groups[0].device.matmul_stream_bandwidth >= 0
    # the runtime's own per-node and per-parameter costs, alone and on the 2 ranks
    why = [m for m in messages if "runtime per-node" in m]
    assert set(raw["runtime_param_overhead"]) == set(raw["runtime_node_overhead"]) == {"1", "2"}, why
    assert cluster.groups[0].device.param_overhead_s == raw["runtime_param_overhead"]["2"] >= 0
    # and without a gradient sync (2 one-rank meshes side by side), as a dp = 1 stage's params
    assert set(raw["runtime_param_overhead_local"]) == {"1", "2"}, why
    assert cluster.groups[0].device.param_overhead_local_s == raw["runtime_param_overhead_local"]["2"] >= 0
    # the link carries one measured (alpha, beta) per collective, and the fit is checked
    link = cluster.groups[0].intra_node_link
    assert link.has_fit("all_reduce") and link.has_fit("all_gather")
    check = raw["fit_check"]["2"]["per_collective"]
    assert len(check["all_reduce"]["points"]) == 2
    # a sample lost in the in-place compute noise is 0 s and carries no relative error
    errs = [c["max_rel_err"] for c in check.values()]
    assert all(e is None or e >= 0 for e in errs) and any(e is not None for e in errs)
    # what ranks that also compute see, measured in place: in range, and from samples of both ranks
    assert 0 <= link.overlap_efficiency <= 1 and link.skew_fraction >= 0 and link.sync_s >= 0
    sync = raw["sync"]["2"]
    assert len(sync["samples"]) == 2 and [len(r) for r in sync["samples"][0]["rounds"]] == [2, 2, 2]
    # three rounds spread over the phase (a host slowdown moves one), their median kept
    assert len(sync["skew_rounds"]) == 3 and sync["skew_fraction"] == statistics.median(sync["skew_rounds"])
    assert sync["skew_fraction"] == link.skew_fraction and "in place" in link.provenance.notes
    # a step pays its collectives' mean: what a small all-reduce adds beyond its median, pooled
    assert link.stall_s == sync["stall_s"] >= 0
    # sync_s: a DTensor redistribute over the bare collective it issues, the mean over ranks
    extra = [r["t_dtensor"] for r in sync["samples"]]
    assert all(x is not None and x >= 0 for x in extra)
    assert link.sync_s == pytest.approx(sum(extra) / len(extra))
    # the per-op cost is the runtime's DTensor dispatch, measured alone and with 2 ranks at once
    assert set(raw["dtensor_op_overhead"]) == {"1", "2"}
    assert cluster.groups[0].device.op_overhead_s == max(raw["op_overhead"]["1"], raw["dtensor_op_overhead"]["2"])
    # local:N reads the profile back; an unmeasured count is rescaled from the largest one
    monkeypatch.setenv("AUTOPAR_PROFILE", str(out))
    assert Cluster.parse("local:2") == cluster
    c4 = Cluster.parse("local:4")
    assert c4.groups[0].device.peak_flops["fp32"] == pytest.approx(cluster.groups[0].device.peak_flops["fp32"] / 2)


@pytest.mark.slow
def test_profile_full_size_four_processes_under_two_minutes(tmp_path):
    out = tmp_path / "profile.json"
    start = time.perf_counter()
    cluster = profile(4, out)
    assert time.perf_counter() - start < 120
    _check_profile(cluster, out, 4)
    # the runtime timed alone, at 2 processes (a sub-mesh of the 4) and at all 4
    raw = json.loads(out.read_text())["profile"]["raw"]
    assert set(raw["runtime_node_overhead"]) == set(raw["runtime_param_overhead"]) == {"1", "2", "4"}



_ARM_SCRIPT = """
import importlib.util, sys
from pathlib import Path
repo = Path(sys.argv[1])
spec = importlib.util.spec_from_file_location("arm_check", repo / "tools" / "arm_check.py")
m = importlib.util.module_from_spec(spec); sys.modules["arm_check"] = m; spec.loader.exec_module(m)
m.import_autopar(repo)
from autopar.cost_model import Cluster
from autopar.cost_model.profiler import profile
c = profile(2, sys.argv[2], print, matmul_sizes=(32, 64), collective_bytes=(1 << 14, 1 << 18),
            dtypes=("fp32",), stream_numel=1 << 14, window_s=0.05, start_method="fork")
assert c.groups[0].device.arch == "aarch64", c.groups[0].device.arch
assert Cluster.from_file(sys.argv[2]) == c
print("ARM PROFILE OK")
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_profile_on_aarch64_under_qemu(tmp_path):
    """The profiler on an emulated aarch64 Python (tools/arm_emulation.sh builds the root)."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    root = Path(os.environ.get("AUTOPAR_ARM_ROOT", repo / ".arm")) / "rootfs"
    site = root / "opt" / "site-packages"
    if shutil.which("qemu-aarch64-static") is None or not (site / ".autopar-site-ok").exists():
        pytest.skip("no emulated aarch64 root: run tools/arm_emulation.sh first")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    cmd = ["qemu-aarch64-static", "-cpu", "neoverse-n1", "-L", str(root), str(root / "usr/bin/python3.11"),
           "-c", _ARM_SCRIPT, str(repo), str(tmp_path / "profile.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=tmp_path)
    assert res.returncode == 0 and "ARM PROFILE OK" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
