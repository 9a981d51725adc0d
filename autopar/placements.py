"""One vocabulary for meshes and placements, shared by solver, plan and runtime.

Rule: an *axis* belongs to the device mesh (``pp``, ``dp``, ``tp``), a *dim* to a tensor.
The three placements are the ones ``torch.distributed.tensor`` uses, so the runtime can hand
them over unchanged (:func:`to_dtensor_placement`). They print short (``S(0)``, ``R``, ``P``)
because plans list thousands of them, and :func:`parse_placement` reads that form back.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Union


class MeshAxis(str, enum.Enum):
    """Named axes of the device mesh, outermost first (rank layout: tp innermost)."""

    PP = "pp"
    DP = "dp"
    TP = "tp"

    def __str__(self) -> str:  # "dp", not "MeshAxis.DP"
        return self.value


#: Mesh axes in rank-layout order: rank = (pp_i * dp + dp_i) * tp + tp_i.
MESH_AXES: tuple[str, ...] = ("pp", "dp", "tp")
#: Axes on which a tensor can be placed; pp splits the graph, not tensors.
PLACEMENT_AXES: tuple[str, ...] = ("dp", "tp")


@dataclass(frozen=True, slots=True)
class Shard:
    """The tensor is split evenly along ``dim`` across the axis."""

    dim: int

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool):
            raise TypeError(f"Shard.dim must be an int, got {self.dim!r}")

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True, slots=True)
class Replicate:
    """Every device on the axis holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True, slots=True)
class Partial:
    """Every device holds a partial sum; the true value is the sum over the axis."""

    def __str__(self) -> str:
        return "P"


Placement = Union[Shard, Replicate, Partial]

_SHARD_RE = re.compile(r"^S\((-?\d+)\)$")


def parse_placement(text: str) -> Placement:
    """Read ``S(0)``, ``R`` or ``P`` (the form ``str()`` prints) back into a placement."""
    if not isinstance(text, str):
        raise TypeError(f"placement must be a string like 'S(0)', 'R' or 'P', got {text!r}")
    t = text.strip()
    if t == "R":
        return Replicate()
    if t == "P":
        return Partial()
    m = _SHARD_RE.match(t)
    if m:
        return Shard(int(m.group(1)))
    raise ValueError(f"unknown placement {text!r}: expected 'S(<dim>)', 'R' or 'P'")


def to_dtensor_placement(p: Placement):
    """The matching ``torch.distributed.tensor`` placement object."""
    from torch.distributed.tensor import Partial as DPartial
    from torch.distributed.tensor import Replicate as DReplicate
    from torch.distributed.tensor import Shard as DShard

    if isinstance(p, Shard):
        return DShard(p.dim)
    if isinstance(p, Replicate):
        return DReplicate()
    if isinstance(p, Partial):
        return DPartial()
    raise TypeError(f"not a placement: {p!r}")


def check_mesh(mesh: dict[str, int], world_size: int | None = None) -> dict[str, int]:
    """Validate a mesh {axis: degree}; return it with all three axes present, in layout order."""
    unknown = set(mesh) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axis {sorted(unknown)}: axes are {list(MESH_AXES)}")
    out = {}
    for axis in MESH_AXES:
        deg = mesh.get(axis, 1)
        if not isinstance(deg, int) or isinstance(deg, bool) or deg < 1:
            raise ValueError(f"mesh axis {axis!r} must have a positive integer degree, got {deg!r}")
        out[axis] = deg
    if world_size is not None:
        prod = out["pp"] * out["dp"] * out["tp"]
        if prod != world_size:
            raise ValueError(
                f"mesh degrees pp={out['pp']} x dp={out['dp']} x tp={out['tp']} = {prod} "
                f"do not multiply to the world size {world_size}"
            )
    return out


def rank_of(mesh: dict[str, int], pp: int, dp: int, tp: int) -> int:
    """Global rank of mesh coordinate (pp, dp, tp); tp is innermost so it stays inside a node."""
    return (pp * mesh["dp"] + dp) * mesh["tp"] + tp


def coords_of(mesh: dict[str, int], rank: int) -> dict[str, int]:
    """Inverse of :func:`rank_of`."""
    tp = rank % mesh["tp"]
    dp = (rank // mesh["tp"]) % mesh["dp"]
    pp = rank // (mesh["tp"] * mesh["dp"])
    if pp >= mesh["pp"]:
        raise ValueError(f"rank {rank} is outside mesh {mesh}")
    return {"pp": pp, "dp": dp, "tp": tp}
