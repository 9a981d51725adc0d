"""Unit tests of the cost model: catalog, clusters, collectives, resharding, compute,
memory, pipeline and FLOP formulas. Pure functions, no processes; fast."""
from __future__ import annotations

import json
import math

import pytest

from autopar.cost_model import (
    Cluster, DeviceSpec, LinkSpec, NodeGroup, Provenance, axis_groups, axis_link, backward_time,
    bubble_fraction, catalog, collective_time, gpt_forward_flops, gpt_params, gpt_train_flops,
    grad_bytes, inflight_microbatches, op_time, optimizer_state_bytes, param_bytes, pipeline_time,
    reshard_cost, reshard_cost_multi, training_state_bytes)
from autopar.cost_model.cluster import cluster_from_profile, local_cluster
from autopar.cost_model.collectives import COLLECTIVES
from autopar.cost_model.device import DTYPES
from autopar.placements import Partial, Replicate, Shard

LINK = LinkSpec("test", bandwidth=100e9, latency=5e-6, provenance=Provenance("unit test", "2026-11-22"))


# ----------------------------------------------------------------------------- catalog

@pytest.mark.parametrize("name", sorted(catalog.DEVICES))
def test_catalog_device_sane_and_sourced(name):
    d = catalog.device(name)
    assert set(d.peak_flops) == set(DTYPES)
    assert d.provenance.source and d.provenance.date
    assert d.provenance.source.startswith("http"), f"{name} cites no URL: {d.provenance.source}"
    if d.kind == "gpu":
        # tensor-core bf16 is 8-16x the fp32 vector rate on A100/H100 (datasheets)
        assert 8 <= d.peak_flops["bf16"] / d.peak_flops["fp32"] <= 16
        assert 40 * 2 ** 30 <= d.memory_bytes <= 200e9
        assert 1.5e12 <= d.memory_bandwidth <= 6e12
        assert d.host_link != "none" and d.host_link_bandwidth >= 25e9
        assert d.cores > 0
    else:
        assert d.host_link == "none" and d.host_memory_bytes == 0
        assert 1e12 <= d.peak_flops["fp32"] <= 2e13
        assert 100e9 <= d.memory_bandwidth <= 1e12
    for dt in DTYPES:
        assert 0.5 <= d.matmul_eff_max[dt] <= 1.0


def test_catalog_datasheet_figures():
    h100 = catalog.h100_sxm()
    assert h100.peak_flops["bf16"] == pytest.approx(989.4e12)
    assert h100.memory_bandwidth == pytest.approx(3.35e12)
    a100 = catalog.a100_80gb_sxm()
    assert a100.peak_flops["bf16"] == pytest.approx(312e12)
    assert a100.peak_flops["tf32"] == pytest.approx(156e12)
    assert catalog.h200().memory_bytes > h100.memory_bytes
    assert catalog.gh200().host_link == "nvlink-c2c"
    assert catalog.gh200().host_link_bandwidth == pytest.approx(450e9)
    assert catalog.nvlink4().bandwidth == pytest.approx(450e9)
    assert catalog.nvlink3().bandwidth == pytest.approx(300e9)
    assert catalog.ib_ndr().bandwidth == pytest.approx(50e9)
    assert catalog.ib_hdr().bandwidth == pytest.approx(25e9)
    assert catalog.pcie5().bandwidth == pytest.approx(2 * catalog.pcie4().bandwidth, rel=0.01)
    # graviton4: 96 cores x 2.8 GHz x 32 FLOP/cycle
    assert catalog.graviton4().peak_flops["fp32"] == pytest.approx(96 * 2.8e9 * 32)
    # grace with 480 GB LPDDR5X: NVIDIA rates the 960 GB superchip at 768 GB/s, 384 per Grace
    assert catalog.grace().memory_bandwidth == pytest.approx(384e9)
    assert catalog.grace().memory_bytes == 480e9


@pytest.mark.parametrize("name", sorted(catalog.LINKS))
def test_catalog_links_sourced(name):
    link = catalog.link(name)
    assert link.bandwidth > 1e9 and 0 < link.latency < 1e-3
    assert link.provenance.source


def test_small_matmul_is_not_at_peak():
    h100 = catalog.h100_sxm()
    small = h100.matmul_flops("bf16", 2 * 256 ** 3)
    big = h100.matmul_flops("bf16", 2 * 16384 ** 3)
    best = h100.peak_flops["bf16"] * h100.matmul_eff_max["bf16"]
    assert small < 0.2 * best
    assert big > 0.95 * best
    assert big <= best


def test_unknown_device_lists_known():
    with pytest.raises(ValueError, match="h100-sxm"):
        catalog.device("tpu-v9")


# ----------------------------------------------------------------------------- DeviceSpec

def test_devicespec_json_round_trip_and_hash():
    for name in catalog.DEVICES:
        d = catalog.device(name)
        back = DeviceSpec.from_json(json.loads(json.dumps(d.to_json())))
        assert back == d
        assert hash(back) == hash(d)


def test_devicespec_validation_names_the_field():
    good = catalog.h100_sxm().to_json()
    bad = dict(good, peak_flops={"fp32": 1e12, "bf16": 1e12})
    with pytest.raises(ValueError, match="peak_flops"):
        DeviceSpec.from_json(bad)
    with pytest.raises(ValueError, match="memory_bandwidth"):
        DeviceSpec.from_json(dict(good, memory_bandwidth=-1))
    with pytest.raises(ValueError, match="kind"):
        DeviceSpec.from_json(dict(good, kind="tpu"))
    with pytest.raises(ValueError, match="matmul_eff_max"):
        DeviceSpec.from_json(dict(good, matmul_eff_max={d: 1.5 for d in DTYPES}))
    with pytest.raises(ValueError, match="host_link_bandwidth"):
        DeviceSpec.from_json(dict(good, host_link="none"))
    with pytest.raises(ValueError, match="unknown field"):
        DeviceSpec.from_json(dict(good, color="green"))


def test_devicespec_is_read_only():
    d = catalog.h100_sxm()
    with pytest.raises(TypeError):
        d.peak_flops["bf16"] = 1.0  # type: ignore[index]


# ----------------------------------------------------------------------------- Cluster

@pytest.mark.parametrize("name,world,nodes", [
    ("h100x8", 8, 1), ("h100x1024", 1024, 128), ("a100x64", 64, 8), ("graviton4x4", 4, 4),
    ("h100x64+graviton4x16", 80, 24), ("h200x16", 16, 2), ("gh200x4", 4, 4), ("h100x4", 4, 1),
])
def test_parse_names(name, world, nodes):
    c = Cluster.parse(name)
    assert c.world_size == world
    assert c.num_nodes == nodes
    assert len(c.devices()) == world
    ranks = [r for r, _, _ in c.devices()]
    assert ranks == list(range(world))
    assert max(node for _, _, node in c.devices()) == nodes - 1


def test_parse_mixed_is_heterogeneous_and_ordered():
    c = Cluster.parse("h100x64+graviton4x16")
    assert not c.is_homogeneous
    assert c.device_of(0).name == "h100-sxm"
    assert c.device_of(63).name == "h100-sxm"
    assert c.device_of(64).name == "graviton4"
    assert c.locate(64) == (1, 8)  # second group, first CPU node after 8 GPU nodes
    assert Cluster.parse("h100x16").is_homogeneous
    # between GPU nodes and CPU nodes: the slower fabric
    assert c.inter_node_link.bandwidth <= catalog.ib_ndr().bandwidth


def test_parse_errors():
    with pytest.raises(ValueError, match="h100"):
        Cluster.parse("v100x8")
    with pytest.raises(ValueError, match="whole nodes"):
        Cluster.parse("h100x12")
    with pytest.raises(ValueError, match="local:N"):
        Cluster.parse("local:zero")


def test_cluster_json_round_trip(tmp_path):
    for name in ("h100x1024", "h100x64+graviton4x16", "local:3"):
        c = Cluster.parse(name)
        assert Cluster.from_json(json.dumps(c.to_json())) == c
        p = tmp_path / "c.json"
        c.save(p)
        assert Cluster.from_file(p) == c
        assert Cluster.parse(str(p)) == c


def test_cluster_json_rejects_other_version():
    d = Cluster.parse("h100x8").to_json()
    d["schema_version"] = 99
    with pytest.raises(ValueError, match="schema_version"):
        Cluster.from_json(d)


def test_axis_link_tp_in_node_dp_across_nodes():
    c = Cluster.parse("h100x1024")
    mesh = {"pp": 4, "dp": 32, "tp": 8}
    assert axis_link(c, mesh, "tp").name == "nvlink4"
    assert axis_link(c, mesh, "dp").name == "ib-ndr"
    assert axis_link(c, mesh, "pp").name == "ib-ndr"
    # tp=16 no longer fits a node of 8
    tp16 = axis_link(c, {"pp": 1, "dp": 64, "tp": 16}, "tp")
    assert tp16.name == "ib-ndrx8" and tp16.bandwidth < catalog.nvlink4().bandwidth
    # dp of 8 inside one node when tp = 1 and the rest is pp
    assert axis_link(c, {"pp": 128, "dp": 8, "tp": 1}, "dp").name == "nvlink4"


def test_axis_link_multi_nic_rings():
    c = Cluster.parse("h100x16")
    ib, nv = catalog.ib_ndr(), catalog.nvlink4()
    # pure dp over two full nodes: 8 NICs per node carry 8 ring channels
    link = axis_link(c, {"dp": 16}, "dp")
    assert link.name == "ib-ndrx8"
    assert link.bandwidth == pytest.approx(min(nv.bandwidth, 8 * ib.bandwidth))
    # 16 ranks on 2 nodes: 14 ring steps inside a node, 1 across, of 15
    assert link.latency == pytest.approx((14 * nv.latency + 1 * ib.latency) / 15)
    # tp = 2: each dp group has 4 ranks (4 NICs) per node
    assert axis_link(c, {"dp": 8, "tp": 2}, "dp").bandwidth == pytest.approx(4 * ib.bandwidth)
    # tp = 8: one rank per node, one NIC
    assert axis_link(c, {"dp": 2, "tp": 8}, "dp") == ib
    # more NICs than NVLink can feed: capped by the intra-node link
    a = Cluster.parse("a100x16")
    assert axis_link(a, {"dp": 16}, "dp").bandwidth == pytest.approx(min(catalog.nvlink3().bandwidth,
                                                                         8 * catalog.ib_hdr().bandwidth))


def test_axis_link_pp_consecutive_stages_in_node():
    c = Cluster.parse("h100x8")
    assert axis_link(c, {"pp": 4, "dp": 1, "tp": 2}, "pp").name == "nvlink4"
    c = Cluster.parse("a100x16")
    assert axis_link(c, {"pp": 2, "dp": 1, "tp": 8}, "pp").name == "ib-hdr"
    assert axis_link(c, {"pp": 2, "dp": 1, "tp": 8}, "tp").name == "nvlink3"


def test_axis_groups_layout():
    c = Cluster.parse("h100x16")
    mesh = {"pp": 2, "dp": 2, "tp": 4}
    assert axis_groups(c, mesh, "tp")[0] == [0, 1, 2, 3]
    assert axis_groups(c, mesh, "dp")[0] == [0, 4]
    assert axis_groups(c, mesh, "pp")[0] == [0, 8]
    assert len(axis_groups(c, mesh, "dp")) == 8


def test_axis_link_mixed_cluster_crosses_groups():
    c = Cluster.parse("h100x8+graviton4x8")
    mesh = {"pp": 2, "tp": 8}
    # the GPU stage's tp group is one NVLink node; the CPU stage's spans 8 CPU nodes
    assert axis_link(c, mesh, "tp", pp_stage=0).name == "nvlink4"
    assert axis_link(c, mesh, "tp", pp_stage=1).name == "ethernet-efa-200g"
    assert axis_link(c, mesh, "tp").name == "ethernet-efa-200g"  # slowest group overall
    assert axis_link(c, mesh, "pp").name == c.inter_node_link.name
    assert axis_link(c, {"dp": 2, "tp": 8}, "dp").name == c.inter_node_link.name


def test_axis_link_mesh_must_match_world():
    c = Cluster.parse("h100x8")
    with pytest.raises(ValueError, match="16 ranks"):
        axis_link(c, {"dp": 2, "tp": 8}, "dp")
    with pytest.raises(ValueError, match="'ep'"):
        axis_link(c, {"ep": 8}, "ep")


def test_local_fallback_without_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_PROFILE", str(tmp_path / "missing.json"))
    c = Cluster.parse("local:4")
    assert c.world_size == 4 and c.num_nodes == 1
    dev = c.groups[0].device
    assert "autopar profile" in dev.provenance.source
    assert "autopar profile" in c.groups[0].intra_node_link.provenance.source
    one = Cluster.parse("local:1").groups[0].device
    assert dev.peak_flops["fp32"] == pytest.approx(one.peak_flops["fp32"] / 4)


def test_local_from_profile_file_rescales_unmeasured(tmp_path, monkeypatch):
    base = catalog.x86_server()
    link = catalog.local_shm()
    prof = {"profile": {"device_by_nproc": {"1": base.to_json(), "2": base.replace(name="p2").to_json()},
                        "link_by_nproc": {"2": link.to_json()}}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof))
    monkeypatch.setenv("AUTOPAR_PROFILE", str(path))
    assert Cluster.parse("local:2").groups[0].device.name == "p2"
    c4 = Cluster.parse("local:4")
    assert c4.groups[0].device.peak_flops["bf16"] == pytest.approx(base.peak_flops["bf16"] / 2)
    assert c4.groups[0].intra_node_link == link
    assert cluster_from_profile(prof, 1).groups[0].device == base
    assert local_cluster(2, path).groups[0].device.name == "p2"


# ----------------------------------------------------------------------------- collectives

def test_ring_all_reduce_formula():
    n, b = 8, 1 << 30
    expect = 2 * (n - 1) / n * b / LINK.bandwidth + 2 * (n - 1) * LINK.latency
    assert collective_time("all_reduce", b, n, LINK, algorithm="ring") == pytest.approx(expect)
    assert collective_time("all_reduce", b, n, LINK) == pytest.approx(expect)  # ring wins when big


def test_tree_all_reduce_wins_small_messages_many_ranks():
    n, b = 1024, 1 << 12
    ring = collective_time("all_reduce", b, n, LINK, algorithm="ring")
    tree = collective_time("all_reduce", b, n, LINK, algorithm="tree")
    assert tree < ring
    assert tree == pytest.approx(2 * b / LINK.bandwidth + 2 * 10 * LINK.latency)
    assert collective_time("all_reduce", b, n, LINK) == pytest.approx(tree)


def test_gather_scatter_all_to_all_formulas():
    n, b = 4, 1 << 20
    ag = (n - 1) / n * b / LINK.bandwidth + (n - 1) * LINK.latency
    assert collective_time("all_gather", b, n, LINK) == pytest.approx(ag)
    assert collective_time("reduce_scatter", b, n, LINK) == pytest.approx(ag)
    assert collective_time("all_to_all", b, n, LINK) == pytest.approx((n - 1) * (LINK.latency + b / (n * n * LINK.bandwidth)))
    assert collective_time("send_recv", b, 2, LINK) == pytest.approx(LINK.latency + b / LINK.bandwidth)
    # all-reduce = reduce-scatter + all-gather
    assert collective_time("all_reduce", b, n, LINK, "ring") == pytest.approx(2 * ag)


@pytest.mark.parametrize("kind", COLLECTIVES)
def test_single_rank_is_free(kind):
    assert collective_time(kind, 1 << 20, 1, LINK) == 0.0


def test_collective_errors():
    with pytest.raises(ValueError, match="all_gatherr"):
        collective_time("all_gatherr", 10, 2, LINK)
    with pytest.raises(ValueError, match="group size"):
        collective_time("all_reduce", 10, 0, LINK)


# ----------------------------------------------------------------------------- reshard

def test_reshard_single_axis():
    n, b = 8, 1 << 24
    ag = collective_time("all_gather", b, n, LINK)
    assert reshard_cost(Shard(0), Replicate(), b, n, LINK) == (pytest.approx(ag), "all_gather")
    assert reshard_cost(Partial(), Replicate(), b, n, LINK)[1] == "all_reduce"
    assert reshard_cost(Partial(), Replicate(), b, n, LINK)[0] == pytest.approx(collective_time("all_reduce", b, n, LINK))
    assert reshard_cost(Partial(), Shard(1), b, n, LINK)[1] == "reduce_scatter"
    assert reshard_cost(Shard(0), Shard(1), b, n, LINK)[1] == "all_to_all"
    assert reshard_cost(Replicate(), Shard(0), b, n, LINK) == (0.0, None)
    assert reshard_cost(Shard(1), Shard(1), b, n, LINK) == (0.0, None)
    assert reshard_cost(Replicate(), Partial(), b, n, LINK)[0] == math.inf
    assert reshard_cost(Shard(0), Replicate(), b, 1, LINK) == (0.0, None)


def test_reshard_multi_axis_counts_local_bytes():
    mesh = {"dp": 4, "tp": 8}
    links = {"dp": LINK, "tp": LINK}
    b = 1 << 26
    # gather over tp while dp stays sharded: the tp group sees b / 4 bytes
    t, steps = reshard_cost_multi({"dp": Shard(0), "tp": Shard(1)}, {"dp": Shard(0), "tp": Replicate()}, b, mesh, links)
    assert steps == [("tp", "all_gather")]
    assert t == pytest.approx(collective_time("all_gather", b / 4, 8, LINK))
    # free shard on dp first, then all-reduce over tp on the dp-sharded piece
    t, steps = reshard_cost_multi({"dp": Replicate(), "tp": Partial()}, {"dp": Shard(0), "tp": Replicate()}, b, mesh, links)
    assert steps == [("tp", "all_reduce")]
    assert t == pytest.approx(collective_time("all_reduce", b / 4, 8, LINK))
    t, _ = reshard_cost_multi({"dp": Replicate(), "tp": Replicate()}, {"dp": Partial(), "tp": Replicate()}, b, mesh, links)
    assert t == math.inf


# ----------------------------------------------------------------------------- compute

def test_op_time_roofline():
    d = catalog.h100_sxm()
    big = 2 * 8192 ** 3
    t = op_time(big, 3 * 8192 * 8192 * 2, "bf16", d, "matmul")
    assert t == pytest.approx(d.op_overhead_s + big / d.matmul_flops("bf16", big))
    # elementwise on 1 GB is memory-bound
    nbytes = 1 << 30
    t_e = op_time(nbytes / 2, nbytes, "bf16", d, "elementwise")
    assert t_e == pytest.approx(d.op_overhead_s + nbytes / (d.memory_bandwidth * d.memory_bw_efficiency))
    assert backward_time(t, "matmul") == pytest.approx(2 * t)
    assert op_time(0, 0, "fp32", d) == 0.0
    with pytest.raises(ValueError, match="conv3"):
        op_time(1, 1, "fp32", d, kind="conv3")


def test_fp32_matmul_slower_than_bf16_on_gpu():
    d = catalog.a100_80gb_sxm()
    f = 2 * 4096 ** 3
    assert op_time(f, 0, "fp32", d) > 10 * op_time(f, 0, "bf16", d)


# ----------------------------------------------------------------------------- memory

def test_memory_bytes_per_param():
    n = 1_000_000
    assert param_bytes(n, "fp32") == 4 * n
    assert param_bytes(n, "bf16-mixed") == 2 * n
    assert grad_bytes(n, "fp16-mixed") == 2 * n
    assert optimizer_state_bytes(n, "adam", "bf16-mixed") == 12 * n
    assert optimizer_state_bytes(n, "sgd", "fp32") == 4 * n
    # ZeRO paper: mixed-precision Adam = 2 + 2 + 12 = 16 bytes/param
    assert training_state_bytes(n, "adam", "bf16-mixed") == 16 * n
    assert training_state_bytes(n, "adam", "fp32") == 16 * n
    assert training_state_bytes(n, "sgd", "bf16-mixed") == 12 * n


def test_zero_stages_divide_by_dp():
    n, dp = 7_500_000_000 // 1000 * 8, 8  # divisible by dp
    full = training_state_bytes(n, "adam", "bf16-mixed", 0, dp)
    assert full == 16 * n
    assert training_state_bytes(n, "adam", "bf16-mixed", 1, dp) == 2 * n + 2 * n + 12 * n // dp
    assert training_state_bytes(n, "adam", "bf16-mixed", 2, dp) == 2 * n + (2 + 12) * n // dp
    assert training_state_bytes(n, "adam", "bf16-mixed", 3, dp) == 16 * n // dp
    # padding when numel does not divide
    assert training_state_bytes(10, "adam", "fp32", 3, 4) == 16 * 3
    with pytest.raises(ValueError, match="zero_stage"):
        training_state_bytes(n, "adam", "fp32", 4, dp)
    with pytest.raises(ValueError, match="precision"):
        param_bytes(n, "int8")


# ----------------------------------------------------------------------------- pipeline

def test_bubble_fractions():
    assert bubble_fraction("gpipe", 4, 8) == pytest.approx(3 / 8)
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 8)
    assert bubble_fraction("interleaved_1f1b", 4, 8, virtual_stages=2) == pytest.approx(3 / 16)
    assert bubble_fraction("1f1b", 1, 8) == 0.0
    with pytest.raises(ValueError, match="virtual_stages"):
        bubble_fraction("1f1b", 4, 8, virtual_stages=2)
    with pytest.raises(ValueError, match="zb"):
        bubble_fraction("zb", 4, 8)


def test_pipeline_time_matches_bubble():
    t, p, m = 0.1, 4, 8
    for sched, v in (("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2)):
        total = pipeline_time([t] * p, m, sched, v)
        assert total == pytest.approx(m * t * (1 + bubble_fraction(sched, p, m, v)))
    # the slowest stage sets the steady state
    assert pipeline_time([0.1, 0.3, (0.05, 0.05)], 10, "1f1b") == pytest.approx(10 * 0.3 + 0.2)
    # p2p on fill and drain
    assert pipeline_time([t] * p, m, "1f1b", p2p_time=0.01) == pytest.approx((m + p - 1) * t + 2 * 3 * 0.01)


def test_shared_host_factor_gives_idle_stages_cores_to_busy_ones():
    from autopar.cost_model.pipeline import shared_host_factor

    two_cores = (2.0, 2.0, 4 / 3, 1.0)  # 4 one-thread processes on 2 cores: speed with k busy
    # pp4, 4 microbatches: slots have 1,2,3,4,3,2,1 stages busy, forward and backward alike
    # (without dp peers the early stages have only their optimizer step left, priced after
    # the pipeline)
    slots = 0.5 + 0.5 + 0.75 + 1 + 0.75 + 0.5 + 0.5
    assert shared_host_factor(4, 4, 1, two_cores) == pytest.approx(slots / 7)
    # with dp peers the backward's drain (3 slots) is priced all-busy: the early stages
    # all-reduce their gradients meanwhile
    bwd = 0.5 + 0.5 + 0.75 + 1 + 3
    assert shared_host_factor(4, 4, 1, two_cores, drain_syncs=True) == pytest.approx((slots + 2 * bwd) / (3 * 7))
    # two ranks per stage: one busy stage is already 2 processes
    assert shared_host_factor(2, 2, 2, two_cores) == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert shared_host_factor(2, 2, 2, two_cores, drain_syncs=True) == pytest.approx(
        (0.5 + 1 + 0.5 + 2 * (0.5 + 1 + 1)) / 9)
    # nothing shared, or no pipeline: no change
    assert shared_host_factor(4, 4, 1, ()) == 1.0 and shared_host_factor(1, 4, 4, two_cores) == 1.0
    # many microbatches: the fill and drain matter less
    assert shared_host_factor(4, 4, 1, two_cores) < shared_host_factor(4, 32, 1, two_cores) < 1.0


def test_shared_speedup_comes_from_the_profile_when_processes_share_cores():
    def dev(n, gflops):
        return DeviceSpec(f"local-cpu/{n}", "cpu", "x86_64", {d: gflops * 1e9 for d in DTYPES}, 1 << 30, 1e10,
                          "none", 0.0, 0, {d: 1.0 for d in DTYPES}, {d: 0.0 for d in DTYPES}, 1.0, 1e-5,
                          Provenance("measured on test", "2026-11-22")).to_json()
    prof = {"profile": {"cpu_count": 2, "raw": {"threads": {"1": 2, "2": 1, "3": 1, "4": 1}},
                        "device_by_nproc": {"1": dev(1, 300), "2": dev(2, 160), "3": dev(3, 100), "4": dev(4, 80)},
                        "link_by_nproc": {"2": LINK.to_json(), "4": LINK.to_json()}}}
    # one busy process with one thread still uses one core: the 2-process rate
    assert cluster_from_profile(prof, 4).groups[0].device.shared_speedup == pytest.approx((2.0, 2.0, 1.25, 1.0))
    assert cluster_from_profile(prof, 2).groups[0].device.shared_speedup == ()  # one core each: nothing shared
    with pytest.raises(ValueError, match="shared_speedup"):
        DeviceSpec.from_json(dict(dev(4, 80), shared_speedup=[0.5, 1.0]))


def test_inflight_microbatches():
    assert inflight_microbatches("gpipe", 0, 4, 16) == 16
    assert [inflight_microbatches("1f1b", i, 4, 16) for i in range(4)] == [4, 3, 2, 1]
    assert inflight_microbatches("1f1b", 0, 4, 2) == 2
    # interleaved, v=2, p=4: first stage warms up 3*2 + 4 = 10 chunks, holds 11 halves
    assert inflight_microbatches("interleaved_1f1b", 0, 4, 16, virtual_stages=2) == pytest.approx(11 / 2)
    with pytest.raises(ValueError, match="stage_index 4"):
        inflight_microbatches("1f1b", 4, 4, 16)


# ----------------------------------------------------------------------------- flops

def test_gpt_flops_against_hand_computation():
    # GPT-3 175B, Narayanan et al. Table 1 setting: B=1536, s=2048, l=96, h=12288, V=51200
    B, s, l, h, V = 1536, 2048, 96, 12288, 51200
    by_hand = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    assert gpt_train_flops(B, s, l, h, V, recompute=True) == pytest.approx(by_hand, rel=1e-12)
    # the same from the per-layer forward count: 4 forwards of layers, 3 of the logit layer
    layer_fwd = 24 * B * s * h * h + 4 * B * s * s * h
    logit_fwd = 2 * B * s * h * V
    assert gpt_train_flops(B, s, l, h, V, recompute=True) == pytest.approx(4 * l * layer_fwd + 3 * logit_fwd)
    assert gpt_train_flops(B, s, l, h, V, recompute=False) == pytest.approx(3 * l * layer_fwd + 3 * logit_fwd)
    assert gpt_forward_flops(B, s, l, h, V) == pytest.approx(l * layer_fwd + logit_fwd)
    # ~ 175e9 parameters
    assert gpt_params(l, h, V, s) == pytest.approx(175e9, rel=0.01)


def test_link_collective_fits_override_and_round_trip():
    fitted = LinkSpec("gloo", bandwidth=1e9, latency=1e-4, provenance=Provenance("measured on x", "2026-11-22"),
                      collective_fits=(("reduce_scatter", 2e-4, 5e8),))
    n, b = 4, 1 << 22
    assert collective_time("reduce_scatter", b, n, fitted) == pytest.approx(3 * 2e-4 + 0.75 * b / 5e8)
    assert collective_time("all_gather", b, n, fitted) == pytest.approx(3 * 1e-4 + 0.75 * b / 1e9)
    back = LinkSpec.from_json(json.loads(json.dumps(fitted.to_json())))
    assert back == fitted and hash(back) == hash(fitted)
    with pytest.raises(ValueError, match="collective_fits"):
        LinkSpec("bad", 1e9, 1e-5, Provenance("x", "y"), collective_fits=(("all_reduce", 1e-5, -1.0),))


def test_link_in_place_terms_add_and_round_trip():
    """sync_s and stall_s are paid by every collective call; the in-place figures survive JSON
    and are checked."""
    plain = LinkSpec("gloo", bandwidth=1e9, latency=1e-4, provenance=Provenance("measured on x", "2026-11-22"))
    busy = LinkSpec("gloo", bandwidth=1e9, latency=1e-4, provenance=plain.provenance, skew_fraction=0.3,
                    sync_s=2e-3, overlap_efficiency=0.1, stall_s=5e-4)
    for kind in ("all_reduce", "all_gather", "send_recv"):
        assert collective_time(kind, 1 << 20, 4, busy) == pytest.approx(
            collective_time(kind, 1 << 20, 4, plain) + 2e-3 + 5e-4)
    assert collective_time("all_reduce", 1 << 20, 1, busy) == 0.0  # one rank: nothing to wait for
    back = LinkSpec.from_json(json.loads(json.dumps(busy.to_json())))
    assert back == busy
    assert "skew_fraction" not in plain.to_json()  # catalog links keep the defaults implicit
    with pytest.raises(ValueError, match="overlap_efficiency"):
        LinkSpec("bad", 1e9, 1e-5, Provenance("x", "y"), overlap_efficiency=1.5)
    with pytest.raises(ValueError, match="skew_fraction"):
        LinkSpec("bad", 1e9, 1e-5, Provenance("x", "y"), skew_fraction=-0.1)
    with pytest.raises(ValueError, match="stall_s"):
        LinkSpec("bad", 1e9, 1e-5, Provenance("x", "y"), stall_s=-1e-3)


def test_hand_built_cluster_validation():
    h100, nv = catalog.h100_sxm(), catalog.nvlink4()
    with pytest.raises(ValueError, match="devices_per_node"):
        NodeGroup(h100, 0, 1, nv)
    with pytest.raises(ValueError, match="no inter_node_link"):
        Cluster("two-nodes", (NodeGroup(h100, 8, 2, nv),), None)
    one = Cluster("one-node", [NodeGroup(h100, 8, 1, nv)], None)  # a list is accepted, stored as tuple
    assert one.groups[0].world_size == 8 and isinstance(one.groups, tuple)
    assert axis_link(one, {"tp": 8}, "tp") == nv
    with pytest.raises(ValueError, match="rank 8"):
        one.locate(8)


def test_gpt_activation_bytes_korthikanti():
    from autopar.cost_model import gpt_activation_bytes_per_layer as act

    s, b, h, a = 2048, 1, 12288, 96  # GPT-3 175B layer
    sbh = s * b * h
    assert act(s, b, h, a) == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert act(s, b, h, a, tp=8) == pytest.approx(sbh * (10 + 24 / 8 + 5 * a * s / (h * 8)))
    assert act(s, b, h, a, tp=8, sequence_parallel=True) == pytest.approx(sbh * (34 / 8 + 5 * a * s / (h * 8)))
    assert act(s, b, h, a, tp=8, sequence_parallel=True, recompute="selective") == pytest.approx(sbh * 34 / 8)
    assert act(s, b, h, a, recompute="full") == pytest.approx(2 * sbh)
    # the paper's point: selective recompute + SP saves most of the memory
    assert act(s, b, h, a, tp=8, sequence_parallel=True, recompute="selective") < 0.2 * act(s, b, h, a, tp=8)
    with pytest.raises(ValueError, match="recompute"):
        act(s, b, h, a, recompute="some")


def test_cluster_summary_names_links():
    text = Cluster.parse("h100x64+graviton4x16").summary()
    assert "8 nodes x 8 h100-sxm (nvlink4 450 GB/s inside, ib-ndr 50 GB/s between)" in text
    assert "16 nodes x 1 graviton4" in text and "between groups" in text
