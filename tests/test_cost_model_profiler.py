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
from autopar.cost_model.collectives import alpha_beta_factors
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



def test_fit_link_without_size_dependence_stays_finite():
    # every size took the same time (latency and noise swamp the bytes): the least-squares
    # bandwidth is unbounded; the fit keeps the best throughput a sample achieved instead
    n = 3
    samples = {"all_reduce": [(1e3, 2e-3), (1e5, 2e-3), (1e6, 1.9e-3)],
               "all_gather": [(1e3, 1e-3), (1e6, 0.95e-3)]}
    a, b = fit_link(samples, n)
    best = max(f * x / t for kind, pts in samples.items() for x, t in pts
               for f in [alpha_beta_factors(kind, n)[1]])
    assert b == pytest.approx(best) and b < 1e10
    assert 0 <= a < 2e-3


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
    # a step pays its collectives' mean: what a small all-reduce adds beyond its median, per
    # round over both ranks, the median of the three rounds (a burst of the host moves one)
    assert link.stall_s == sync["stall_s"] >= 0
    assert len(sync["stall_rounds"]) == 3 and sync["stall_s"] == statistics.median(sync["stall_rounds"])
    assert all(len(r["stall_rounds"]) == 3 for r in sync["samples"])
    assert sync["stall_rounds"][0] == pytest.approx(sum(r["stall_rounds"][0] for r in sync["samples"]) / 2)
    # sync_s: a DTensor redistribute over the bare collective it issues, the mean over ranks
    extra = [r["t_dtensor"] for r in sync["samples"]]
    assert all(x is not None and x >= 0 for x in extra)
    assert link.sync_s == pytest.approx(sum(extra) / len(extra))
    # the per-op cost is the runtime's DTensor dispatch, measured alone and with 2 ranks at once
    assert set(raw["dtensor_op_overhead"]) == {"1", "2"}
    assert cluster.groups[0].device.op_overhead_s == max(raw["op_overhead"]["1"], raw["dtensor_op_overhead"]["2"])
    # measured under the allocator settings the runtime applies, and says so
    from autopar.runtime.host_memory import host_allocator
    assert json.loads(out.read_text())["profile"]["host_allocator"] == host_allocator() != "not configured"
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


# --------------------------------------------------------------------------- repeated profiles

def _profile_section(host: str, date: str, fp32: float, latency: float, cores: int = 2) -> dict:
    """A two-process profile section as :func:`profile` writes it, with chosen figures."""
    from autopar.cost_model import catalog

    prov = Provenance(source=f"measured on {host} at {date}", date=date, host=host, notes="test")
    dev = catalog.x86_server().replace(name="local-cpu/2", cores=cores, provenance=prov,
                                       peak_flops={d: fp32 for d in ("fp32", "tf32", "bf16", "fp16")},
                                       shared_speedup=(1.0, 1.0))
    link = catalog.local_shm().__class__(name="local-gloo", bandwidth=2e9, latency=latency, provenance=prov,
                                         collective_fits=(("all_reduce", latency, 1e9),), skew_fraction=0.25)
    return {"version": 1, "host": host, "date": date, "arch": "x86_64", "cpu_count": 2, "nproc": 2,
            "torch": "2.13.0+cpu", "gpu_count": 0, "device_by_nproc": {"2": dev.to_json()},
            "link_by_nproc": {"2": link.to_json()},
            "raw": {"matmul": {"2": {"fp32": [[1e6, 1e-5 * fp32 / 1e11], [8e6, 8e-5]]}}, "threads": {"2": 1}},
            "wall_s": 100.0}


def test_merge_profiles_takes_each_figure_s_median():
    from autopar.cost_model.cluster import cluster_from_profile
    from autopar.cost_model.profile_merge import median_figures, merge_profiles, profile_parts

    parts = [_profile_section("vm", f"2026-11-23T0{i}:00:00Z", fp32, lat)
             for i, (fp32, lat) in enumerate([(1e11, 2e-4), (3e11, 1.3e-3), (2e11, 9e-4)])]
    merged = merge_profiles(parts)
    dev = DeviceSpec.from_json(merged["device_by_nproc"]["2"])
    assert dev.peak_flops["fp32"] == 2e11 and dev.cores == 2  # ints stay ints
    cluster = cluster_from_profile({"profile": merged}, 2)
    link = cluster.groups[0].intra_node_link
    # a fitted pair is merged figure by figure: here each from the middle profile of its own
    assert link.latency == pytest.approx(9e-4) and link.alpha_beta("all_reduce") == pytest.approx((9e-4, 1e9))
    assert merged["raw"]["matmul"]["2"]["fp32"][0][1] == pytest.approx(2e-5)
    # what was merged is on record, and in every spec's provenance
    assert merged["merged"]["count"] == 3 and merged["wall_s"] == 300.0
    assert merged["date"] == parts[-1]["date"]
    assert "median of 3 profiles" in dev.provenance.notes and "median of 3" in link.provenance.notes
    assert parts[0]["device_by_nproc"]["2"]["provenance"]["notes"] == "test"  # the inputs are not changed
    # an even count: the mean of the middle two; an int, the lower of them; a lone profile, itself
    assert median_figures([1.0, 4.0]) == 2.5 and median_figures([1, 4]) == 1
    assert merge_profiles(parts[:1]) == parts[0]
    # the parts stay readable one by one: what each profile alone would have predicted
    alone = [cluster_from_profile({"profile": p}, 2).groups[0].device.peak_flops["fp32"]
             for p in profile_parts(merged)]
    assert alone == [1e11, 3e11, 2e11] and profile_parts(parts[0]) == [parts[0]]
    # lists of different lengths or keys missing somewhere: the first document's
    assert median_figures([{"a": [1.0, 2.0], "b": 1.0}, {"a": [3.0], "c": 2.0}]) == {"a": [1.0, 2.0], "b": 1.0}


def test_merge_profiles_refuses_profiles_of_different_machines():
    from autopar.cost_model.profile_merge import merge_profiles

    a = _profile_section("vm", "2026-11-23T01:00:00Z", 1e11, 2e-4)
    with pytest.raises(ValueError, match="host='other'"):
        merge_profiles([a, _profile_section("other", "2026-11-23T02:00:00Z", 1e11, 2e-4)])
    b = dict(a, device_by_nproc={**a["device_by_nproc"], "1": a["device_by_nproc"]["2"]})
    with pytest.raises(ValueError, match="device_by_nproc for process counts"):
        merge_profiles([a, b])
    with pytest.raises(ValueError, match="no profiles"):
        merge_profiles([])


def test_profile_repeat_writes_one_merged_profile(tmp_path):
    out = tmp_path / "profile.json"
    messages: list[str] = []
    cluster = profile(1, out, messages.append, repeat=2, matmul_sizes=(32, 64), dtypes=("fp32",),
                      stream_numel=1 << 16, window_s=0.02)
    prof = json.loads(out.read_text())["profile"]
    assert Cluster.from_json(json.loads(out.read_text())) == cluster
    assert cluster.groups[0].device == DeviceSpec.from_json(prof["device_by_nproc"]["1"])
    assert prof["merged"]["count"] == 2 and len(prof["merged"]["dates"]) == 2
    assert any(m.startswith("[2/2] ") for m in messages) and "median of 2 profiles" in messages[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="repeat must be an int >= 1"):
        profile(1, out, repeat=0)
    with pytest.raises(ValueError, match="start_method='spawn'"):
        profile(2, out, repeat=2, start_method="fork")
