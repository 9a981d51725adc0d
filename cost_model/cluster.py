"""The machines a plan runs on: devices grouped into nodes, and the links between them.

A :class:`Cluster` is a value: built from a short name (:meth:`Cluster.parse`), a JSON file
(:meth:`Cluster.from_file`, e.g. the profile ``autopar profile`` writes) or by hand. It never
looks at the machine it is planned on, except ``local:N``, which by definition means "N
processes on this host" and reads the profile.

Rank layout (the whole project uses it): ranks are numbered group by group, node by node,
and a mesh ``{"pp": p, "dp": d, "tp": t}`` maps to ranks as

    rank = (pp_i * d + dp_i) * t + tp_i

so tp is innermost and lands inside a node when it fits. :func:`axis_link` answers "which
link does a collective along this mesh axis use?".
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

from .device import DeviceSpec, Provenance, _check_positive

SCHEMA_VERSION = 1
MESH_AXES: tuple[str, ...] = ("pp", "dp", "tp")


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """A point-to-point link as the alpha-beta model sees it.

    bandwidth: bytes/s per direction per device; latency: seconds per message (per ring step).
    collective_fits: optional measured ``(kind, latency, bandwidth)`` triples that replace the
    link-wide pair for that collective. A profiled gloo link needs them: gloo's
    reduce_scatter, for one, costs about as much as its all_reduce, which no single
    alpha-beta pair with ring factors can express. Catalog links leave it empty.

    What ranks that also compute see (measured by ``autopar profile`` on local processes, where
    ranks share cores and time slices; catalog links keep the defaults, i.e. these effects are
    not modelled for them):

    - skew_fraction: ranks that run the same work between two synchronising collectives do not
      arrive together; the wait for the last one, per second of work between collectives, is
      this fraction (measured: the time of compute + a small all-reduce, minus each alone, at
      two compute lengths; the slope). The cost model stretches a multi-rank step's compute by
      ``1 + skew_fraction``. Default 0.
    - sync_s: a fixed cost added to every collective the runtime issues through DTensor
      (``redistribute`` between ops); the profiler measures it as a redistribute's time over
      the bare collective it issues, both after a burst of compute. Default 0.
    - stall_s: the expected extra time of one collective call beyond its typical (median)
      time: on shared cores a blocking call now and then waits for a descheduled peer or
      communication thread (2 ranks on the 2-core VM: a 256 B all-reduce took 0.26 ms at the
      median, 3.5 ms at the 90th percentile, 0.81 ms on average). The alpha-beta fits are
      taken over medians, which a step's sum of collectives does not see; every collective
      call is charged this on top. Measured as mean minus median of a small all-reduce after a
      burst of compute. Default 0.
    - overlap_efficiency: the fraction of an asynchronous collective that hides behind compute
      running at the same time (1 = fully hidden, as DDP's gradient all-reduce behind the
      backward on GPUs with NCCL; 0 = none, as on CPU ranks that already use every core).
      Default 1.
    """

    name: str
    bandwidth: float
    latency: float
    provenance: Provenance
    collective_fits: tuple[tuple[str, float, float], ...] = ()
    skew_fraction: float = 0.0
    sync_s: float = 0.0
    overlap_efficiency: float = 1.0
    stall_s: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"LinkSpec.name must be a non-empty string, got {self.name!r}")
        owner = f"LinkSpec({self.name!r})"
        _check_positive(owner, "bandwidth", self.bandwidth)
        _check_positive(owner, "latency", self.latency, allow_zero=True)
        if not isinstance(self.provenance, Provenance):
            raise TypeError(f"{owner}.provenance must be a Provenance")
        fits = tuple((str(k), float(a), float(b)) for k, a, b in self.collective_fits)
        object.__setattr__(self, "collective_fits", fits)
        for k, a, b in fits:
            _check_positive(owner, f"collective_fits[{k!r}].latency", a, allow_zero=True)
            _check_positive(owner, f"collective_fits[{k!r}].bandwidth", b)
        _check_positive(owner, "skew_fraction", self.skew_fraction, allow_zero=True)
        _check_positive(owner, "sync_s", self.sync_s, allow_zero=True)
        _check_positive(owner, "stall_s", self.stall_s, allow_zero=True)
        if not (isinstance(self.overlap_efficiency, (int, float)) and 0.0 <= self.overlap_efficiency <= 1.0):
            raise ValueError(f"{owner}.overlap_efficiency must be in [0, 1], got {self.overlap_efficiency!r}")

    def alpha_beta(self, kind: str) -> tuple[float, float]:
        """(latency, bandwidth) to use for collective ``kind``."""
        for k, a, b in self.collective_fits:
            if k == kind:
                return a, b
        return self.latency, self.bandwidth

    def has_fit(self, kind: str) -> bool:
        return any(k == kind for k, _, _ in self.collective_fits)

    def to_json(self) -> dict:
        d = {"name": self.name, "bandwidth": self.bandwidth, "latency": self.latency,
             "provenance": self.provenance.to_json()}
        if self.collective_fits:
            d["collective_fits"] = {k: {"latency": a, "bandwidth": b} for k, a, b in self.collective_fits}
        if self.skew_fraction or self.sync_s or self.overlap_efficiency != 1.0 or self.stall_s:
            d.update(skew_fraction=self.skew_fraction, sync_s=self.sync_s,
                     overlap_efficiency=self.overlap_efficiency, stall_s=self.stall_s)
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "LinkSpec":
        fits = tuple((k, float(v["latency"]), float(v["bandwidth"]))
                     for k, v in d.get("collective_fits", {}).items())
        return cls(name=d["name"], bandwidth=float(d["bandwidth"]), latency=float(d["latency"]),
                   provenance=Provenance.from_json(d["provenance"]), collective_fits=fits,
                   skew_fraction=float(d.get("skew_fraction", 0.0)), sync_s=float(d.get("sync_s", 0.0)),
                   overlap_efficiency=float(d.get("overlap_efficiency", 1.0)),
                   stall_s=float(d.get("stall_s", 0.0)))


@dataclass(frozen=True, slots=True)
class NodeGroup:
    """``num_nodes`` identical nodes of ``devices_per_node`` devices each.

    intra_node_link joins devices of one node; inter_node_link (optional) joins nodes of
    this group; when None the cluster's inter_node_link is used.
    """

    device: DeviceSpec
    devices_per_node: int
    num_nodes: int
    intra_node_link: LinkSpec
    inter_node_link: Optional[LinkSpec] = None

    def __post_init__(self) -> None:
        for name in ("devices_per_node", "num_nodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"NodeGroup({self.device.name!r}).{name} must be an int >= 1, got {v!r}")

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.num_nodes

    def to_json(self) -> dict:
        return {"device": self.device.to_json(), "devices_per_node": self.devices_per_node,
                "num_nodes": self.num_nodes, "intra_node_link": self.intra_node_link.to_json(),
                "inter_node_link": None if self.inter_node_link is None else self.inter_node_link.to_json()}

    @classmethod
    def from_json(cls, d: Mapping) -> "NodeGroup":
        inter = d.get("inter_node_link")
        return cls(device=DeviceSpec.from_json(d["device"]), devices_per_node=int(d["devices_per_node"]),
                   num_nodes=int(d["num_nodes"]), intra_node_link=LinkSpec.from_json(d["intra_node_link"]),
                   inter_node_link=None if inter is None else LinkSpec.from_json(inter))


@dataclass(frozen=True, slots=True)
class Cluster:
    """Groups of nodes, ranked in order, and the link between nodes (and between groups)."""

    name: str
    groups: tuple[NodeGroup, ...]
    inter_node_link: Optional[LinkSpec]

    def __post_init__(self) -> None:
        if not isinstance(self.groups, tuple):
            object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups:
            raise ValueError(f"Cluster {self.name!r} has no node groups")
        for i, g in enumerate(self.groups):
            if not isinstance(g, NodeGroup):
                raise TypeError(f"Cluster {self.name!r}: groups[{i}] is {type(g).__name__}, not NodeGroup")
        if self.inter_node_link is None and self.num_nodes > 1:
            raise ValueError(f"Cluster {self.name!r} has {self.num_nodes} nodes but no inter_node_link")

    # ------------------------------------------------------------------ shape
    @property
    def world_size(self) -> int:
        return sum(g.world_size for g in self.groups)

    @property
    def num_nodes(self) -> int:
        return sum(g.num_nodes for g in self.groups)

    @property
    def is_homogeneous(self) -> bool:
        return len({g.device for g in self.groups}) == 1

    def devices(self) -> list[tuple[int, DeviceSpec, int]]:
        """``(rank, device, node_index)`` for every rank, ranks in order."""
        out, rank, node = [], 0, 0
        for g in self.groups:
            for _ in range(g.num_nodes):
                for _ in range(g.devices_per_node):
                    out.append((rank, g.device, node))
                    rank += 1
                node += 1
        return out

    def locate(self, rank: int) -> tuple[int, int]:
        """``(group_index, node_index)`` of a rank, without building the whole list."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range for cluster {self.name!r} of {self.world_size}")
        base_rank, base_node = 0, 0
        for gi, g in enumerate(self.groups):
            if rank < base_rank + g.world_size:
                return gi, base_node + (rank - base_rank) // g.devices_per_node
            base_rank += g.world_size
            base_node += g.num_nodes
        raise AssertionError("unreachable")

    def device_of(self, rank: int) -> DeviceSpec:
        return self.groups[self.locate(rank)[0]].device

    def slowest_device(self, dtype: str = "bf16") -> DeviceSpec:
        """The device with the lowest peak for ``dtype`` (the one a synchronous step waits on)."""
        return min((g.device for g in self.groups), key=lambda d: d.peak_flops[dtype])

    def min_memory_bytes(self) -> int:
        return min(g.device.memory_bytes for g in self.groups)

    def summary(self) -> str:
        """One line per node group, e.g. ``128 nodes x 8 h100-sxm (nvlink4 450 GB/s inside,
        ib-ndr 50 GB/s between)``."""
        lines = []
        for g in self.groups:
            inter = g.inter_node_link or self.inter_node_link
            between = f", {inter.name} {inter.bandwidth / 1e9:g} GB/s between" if g.num_nodes > 1 and inter else ""
            inside = (f"{g.intra_node_link.name} {g.intra_node_link.bandwidth / 1e9:.3g} GB/s inside"
                      if g.devices_per_node > 1 else "")
            links = ", ".join(x for x in (inside, between.lstrip(", ")) if x)
            lines.append(f"{g.num_nodes} node{'s' if g.num_nodes > 1 else ''} x {g.devices_per_node} "
                         f"{g.device.name}" + (f" ({links})" if links else ""))
        if len(self.groups) > 1 and self.inter_node_link is not None:
            lines.append(f"between groups: {self.inter_node_link.name} {self.inter_node_link.bandwidth / 1e9:g} GB/s")
        return "\n".join(lines)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "autopar.cluster", "name": self.name,
                "groups": [g.to_json() for g in self.groups],
                "inter_node_link": None if self.inter_node_link is None else self.inter_node_link.to_json()}

    @classmethod
    def from_json(cls, d: Union[Mapping, str]) -> "Cluster":
        """From a dict or a JSON string. Extra top-level keys (a profile's raw data) are ignored."""
        if isinstance(d, str):
            d = json.loads(d)
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"cluster JSON schema_version is {version!r}; this autopar reads {SCHEMA_VERSION}")
        inter = d.get("inter_node_link")
        return cls(name=d["name"], groups=tuple(NodeGroup.from_json(g) for g in d["groups"]),
                   inter_node_link=None if inter is None else LinkSpec.from_json(inter))

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "Cluster":
        with open(path) as f:
            return cls.from_json(json.load(f))

    def save(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    # ------------------------------------------------------------------ names
    @classmethod
    def parse(cls, text: str) -> "Cluster":
        """``"h100x8"``, ``"h100x1024"``, ``"a100x64"``, ``"graviton4x4"``,
        ``"h100x64+graviton4x16"``, ``"local:4"``, or a path to a cluster JSON file."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"cluster name must be a non-empty string, got {text!r}")
        t = text.strip()
        if t.endswith(".json") or os.path.sep in t:
            return cls.from_file(t)
        if t.startswith("local:"):
            n = t[len("local:"):]
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"cluster {text!r}: 'local:N' needs a process count N >= 1")
            return local_cluster(int(n))
        return _parse_catalog(t)


_TERM_RE = re.compile(r"^([a-z][a-z0-9]*?)x(\d+)$")


def _parse_catalog(text: str) -> Cluster:
    from . import catalog

    groups: list[NodeGroup] = []
    inter_links: list[LinkSpec] = []
    for term in text.lower().split("+"):
        m = _TERM_RE.match(term.strip())
        if not m or m.group(1) not in catalog.KINDS:
            raise ValueError(f"unknown cluster term {term!r} in {text!r}: expected <kind>x<N> with kind "
                             f"one of {sorted(catalog.KINDS)}, or 'local:N'")
        kind, n = m.group(1), int(m.group(2))
        make_dev, per_node, intra, inter = catalog.KINDS[kind]
        if n < 1:
            raise ValueError(f"cluster term {term!r}: device count must be >= 1")
        if n <= per_node:
            per_node, nodes = n, 1
        elif n % per_node:
            raise ValueError(f"cluster term {term!r}: {n} {kind} devices do not fill whole nodes of "
                             f"{per_node}; use a multiple of {per_node} or at most {per_node}")
        else:
            nodes = n // per_node
        link = inter()
        inter_links.append(link)
        groups.append(NodeGroup(device=make_dev(), devices_per_node=per_node, num_nodes=nodes,
                                intra_node_link=intra(), inter_node_link=link))
    # Between groups (and as the cluster default): the slowest of the groups' own fabrics.
    between = min(inter_links, key=lambda l: (l.bandwidth, -l.latency))
    return Cluster(name=text, groups=tuple(groups), inter_node_link=between)


# ---------------------------------------------------------------------------- local:N

def default_profile_path() -> Path:
    """``$AUTOPAR_PROFILE`` or ``~/.cache/autopar/profile.json``."""
    env = os.environ.get("AUTOPAR_PROFILE")
    return Path(env) if env else Path.home() / ".cache" / "autopar" / "profile.json"


def local_cluster(nproc: int, profile_path: Union[str, os.PathLike, None] = None) -> Cluster:
    """N processes on this host, from the profile when there is one, else the catalog's
    generic x86 socket scaled to this host's core count and split over N processes."""
    path = Path(profile_path) if profile_path is not None else default_profile_path()
    if path.is_file():
        with open(path) as f:
            data = json.load(f)
        return cluster_from_profile(data, nproc)
    return _fallback_local(nproc)


def cluster_from_profile(data: Mapping, nproc: int) -> Cluster:
    """A ``local:nproc`` cluster from a profile dict written by ``autopar profile``.

    The profile holds one per-process DeviceSpec and one LinkSpec for each process count
    it measured. For an unmeasured count the largest measured one is rescaled: the host's
    total throughput at that count is shared by ``nproc`` processes (compute and memory
    bandwidth divided accordingly), unless each process has a GPU of its own; the link is
    taken as measured at the largest count.
    """
    prof = data.get("profile")
    if not prof:
        cluster = Cluster.from_json(data)
        if cluster.world_size != nproc:
            raise ValueError(f"the cluster file for local:{nproc} describes {cluster.world_size} devices "
                             f"({cluster.name!r}); re-run `autopar profile --nproc {nproc}`")
        return cluster
    devices = {int(k): DeviceSpec.from_json(v) for k, v in prof["device_by_nproc"].items()}
    links = {int(k): LinkSpec.from_json(v) for k, v in prof["link_by_nproc"].items()}
    if nproc in devices:
        dev = devices[nproc]
    elif devices[max(devices)].kind == "gpu" and int(prof.get("gpu_count", 0)) >= nproc:
        dev = devices[max(devices)]  # one whole GPU per process: nothing is shared
    else:
        ref = max(devices)
        base = devices[ref]
        share = ref / nproc
        dev = base.replace(
            name=f"{base.name.split('/')[0]}/{nproc}",
            peak_flops={k: v * share for k, v in base.peak_flops.items()},
            matmul_flops_half={k: v * share for k, v in base.matmul_flops_half.items()},
            memory_bytes=max(1, int(base.memory_bytes * share)),
            memory_bandwidth=base.memory_bandwidth * share,
            kernel_rates={k: v * share for k, v in base.kernel_rates.items()},
            optimizer_rates={k: v * share for k, v in base.optimizer_rates.items()},
            first_touch_bandwidth=base.first_touch_bandwidth * share,
            provenance=Provenance(source=base.provenance.source, date=base.provenance.date,
                                  host=base.provenance.host,
                                  notes=f"rescaled from the {ref}-process measurement to {nproc} processes"))
    speedup = _shared_speedup(prof, devices, nproc)
    if speedup:
        dev = dev.replace(shared_speedup=speedup)
    if nproc == 1:
        link = links[min(links)] if links else None
    else:
        link = links.get(nproc) or links[max(links)]
    if link is None:
        from . import catalog
        link = catalog.local_shm()
    return Cluster(name=f"local:{nproc}",
                   groups=(NodeGroup(device=dev, devices_per_node=nproc, num_nodes=1, intra_node_link=link),),
                   inter_node_link=None)


def _shared_speedup(prof: Mapping, devices: Mapping[int, DeviceSpec], nproc: int) -> tuple[float, ...]:
    """DeviceSpec.shared_speedup for ``local:nproc`` from the profile: when only k processes
    compute, each gets what one of max(k, cores // threads) processes measured (fewer than that
    leave cores idle, which a process's own threads cannot use), over what one of nproc did.
    Empty when the processes do not share cores, or the counts needed were not measured."""
    cores = int(prof.get("cpu_count", 0) or 0)
    threads = int((prof.get("raw", {}).get("threads", {}) or {}).get(str(nproc), 0) or 0)
    dev = devices.get(nproc)
    if dev is None or dev.kind != "cpu" or cores < 1 or threads < 1 or nproc * threads <= cores:
        return ()
    base = dev.peak_flops["fp32"]
    out = []
    for k in range(1, nproc + 1):
        ref = devices.get(max(k, cores // threads))
        if ref is None or ref.kind != "cpu":
            return ()
        out.append(max(1.0, ref.peak_flops["fp32"] / base))
    out[-1] = 1.0
    return tuple(out)


def host_memory_bytes() -> int:
    """Physical memory of this host (POSIX sysconf), 0 when unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _fallback_local(nproc: int) -> Cluster:
    from . import catalog

    ref = catalog.x86_server()
    cores = os.cpu_count() or 1
    frac = min(1.0, cores / ref.cores) / nproc  # this host's share of the reference socket, per process
    mem = host_memory_bytes() or ref.memory_bytes
    dev = ref.replace(
        name=f"local-cpu/{nproc}",
        peak_flops={k: v * frac for k, v in ref.peak_flops.items()},
        matmul_flops_half={k: v * frac for k, v in ref.matmul_flops_half.items()},
        memory_bytes=max(1, mem // nproc),
        memory_bandwidth=ref.memory_bandwidth * frac,
        cores=max(1, cores // nproc),
        provenance=Provenance(source="catalog fallback; run `autopar profile`", date=ref.provenance.date,
                              host=os.uname().nodename if hasattr(os, "uname") else "",
                              notes=f"x86-server catalog entry x {cores}/{ref.cores} cores, split over "
                                    f"{nproc} processes; {ref.provenance.source}"))
    return Cluster(name=f"local:{nproc}",
                   groups=(NodeGroup(device=dev, devices_per_node=nproc, num_nodes=1,
                                     intra_node_link=catalog.local_shm()),),
                   inter_node_link=None)


# ---------------------------------------------------------------------------- mesh axes

def _mesh_sizes(cluster: Cluster, mesh: Mapping[str, int]) -> dict[str, int]:
    sizes = {}
    for k, v in mesh.items():
        key = str(getattr(k, "value", k))
        if key not in MESH_AXES:
            raise ValueError(f"mesh axis {key!r} is not one of {MESH_AXES}")
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"mesh axis {key!r} has size {v!r}; expected an int >= 1")
        sizes[key] = v
    for a in MESH_AXES:
        sizes.setdefault(a, 1)
    total = math.prod(sizes.values())
    if total != cluster.world_size:
        raise ValueError(f"mesh {sizes} has {total} ranks but cluster {cluster.name!r} has "
                         f"{cluster.world_size} devices")
    return sizes


def axis_groups(cluster: Cluster, mesh: Mapping[str, int], axis: str) -> list[list[int]]:
    """The rank groups along ``axis`` under the (pp, dp, tp) layout, tp innermost."""
    sizes = _mesh_sizes(cluster, mesh)
    axis = str(getattr(axis, "value", axis))
    if axis not in MESH_AXES:
        raise ValueError(f"mesh axis {axis!r} is not one of {MESH_AXES}")
    i = MESH_AXES.index(axis)
    stride = math.prod(sizes[a] for a in MESH_AXES[i + 1:])
    n = sizes[axis]
    return [[r + k * stride for k in range(n)]
            for r in range(cluster.world_size) if (r // stride) % n == 0]


def axis_link(cluster: Cluster, mesh: Mapping[str, int], axis: str,
              pp_stage: Optional[int] = None) -> LinkSpec:
    """The effective link of collectives along ``axis`` of ``mesh`` on ``cluster``.

    ``pp_stage`` restricts the answer to the groups inside that pipeline stage (for
    heterogeneous pipelines, where each stage runs on different hardware); it makes no
    sense for ``axis="pp"``.

    For every rank group along the axis: all in one node -> that node's intra-node link;
    spanning nodes of one group -> the group's inter-node link (see below); spanning node
    groups -> the cluster's inter-node link. For ``pp`` only consecutive stages talk, so
    pairs (stage s, stage s+1) are examined. The slowest link over all groups is returned,
    since a synchronous step waits for the slowest group.

    A group with r > 1 ranks in every node it spans (e.g. dp over whole nodes when tp = 1)
    does better than one NIC: inter-node links are per device (one NIC per GPU), and NCCL
    runs one ring channel per NIC, so the node boundary is crossed through r NICs at once
    (NCCL's model, ``busBw = nChannels * speedInter`` in src/graph/tuning.cc). Such a group
    gets a derived link ``"<inter>x<r>"`` with bandwidth ``min(intra, r * inter)`` and the
    ring's mixed latency ``((n - k) * intra + (k - 1) * inter) / (n - 1)`` for n ranks on k
    nodes (NCCL charges inter-node latency only for the k - 1 steps that cross nodes).
    """
    groups = axis_groups(cluster, mesh, axis)
    if str(getattr(axis, "value", axis)) == "pp":
        if pp_stage is not None:
            raise ValueError("axis_link: pp_stage selects groups of dp/tp, not of pp itself")
        groups = [g[k:k + 2] for g in groups for k in range(len(g) - 1)] or groups
    elif pp_stage is not None:
        sizes = _mesh_sizes(cluster, mesh)
        if not 0 <= pp_stage < sizes["pp"]:
            raise ValueError(f"axis_link: pp_stage {pp_stage} out of range for pp={sizes['pp']}")
        per_stage = sizes["dp"] * sizes["tp"]
        groups = [g for g in groups if g[0] // per_stage == pp_stage]
    located = {}
    worst: Optional[LinkSpec] = None
    for g in groups:
        locs = [located.setdefault(r, cluster.locate(r)) for r in g]
        group_ids = {gi for gi, _ in locs}
        nodes = {node for _, node in locs}
        if len(nodes) == 1:
            link = cluster.groups[locs[0][0]].intra_node_link
        elif len(group_ids) == 1:
            ng = cluster.groups[locs[0][0]]
            link = _multi_node_link(ng.intra_node_link, ng.inter_node_link or cluster.inter_node_link,
                                    [node for _, node in locs])
        else:
            link = cluster.inter_node_link
        assert link is not None, "multi-node clusters always have an inter-node link"
        if worst is None or (link.bandwidth, -link.latency) < (worst.bandwidth, -worst.latency):
            worst = link
    assert worst is not None
    return worst


def _multi_node_link(intra: LinkSpec, inter: Optional[LinkSpec], nodes: list[int]) -> LinkSpec:
    """The link of one ring over ``nodes`` (one entry per rank) inside a node group."""
    assert inter is not None, "multi-node clusters always have an inter-node link"
    per_node: dict[int, int] = {}
    for node in nodes:
        per_node[node] = per_node.get(node, 0) + 1
    r, n, k = min(per_node.values()), len(nodes), len(per_node)
    if r == 1:
        return inter
    latency = ((n - k) * intra.latency + (k - 1) * inter.latency) / (n - 1)
    return LinkSpec(name=f"{inter.name}x{r}", bandwidth=min(intra.bandwidth, r * inter.bandwidth),
                    latency=latency,
                    provenance=Provenance(source=inter.provenance.source, date=inter.provenance.date,
                                          notes=f"{r} ranks per node cross nodes through {r} NICs "
                                                f"(one NCCL channel each), capped by {intra.name}; "
                                                f"{k - 1} of {n - 1} ring steps cross nodes"))


def axis_collective_time(cluster: Cluster, mesh: Mapping[str, int], axis: str, kind: str,
                         nbytes: float) -> float:
    """Seconds for one collective of ``kind`` over ``nbytes`` (full tensor) along ``axis``."""
    from .collectives import collective_time

    sizes = _mesh_sizes(cluster, mesh)
    return collective_time(kind, nbytes, sizes[str(getattr(axis, "value", axis))],
                           axis_link(cluster, mesh, axis))
