"""Process groups for a plan's mesh: one DeviceMesh ("pp", "dp", "tp") in the project's layout.

Why one 3-D ``DeviceMesh``: ``init_device_mesh`` lays ranks out row-major, which is exactly
autopar's layout ``rank = (pp_i * dp + dp_i) * tp + tp_i`` (tp innermost, so tensor-parallel
peers share a node). Every rank then reads its pipeline group from ``mesh["pp"]`` and its stage's
(dp, tp) submesh from ``mesh["dp", "tp"]``; the plan's placements are given on that submesh.

Backends: gloo for CPU (x86 or ARM), NCCL for CUDA. Every process group gets a timeout
(``AUTOPAR_PG_TIMEOUT_S``, default 300 s) so a dead peer ends the job instead of hanging it.

A group this module creates is also torn down at interpreter exit (``_teardown_at_exit``): a
decorated user script ends without ``destroy_process_group``, and gloo's worker threads then die
with the interpreter, which aborts the process ("terminate called without an active exception",
SIGABRT) after a run that succeeded; pytorch/pytorch#190489 reports the same.
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from autopar.placements import check_mesh, coords_of

DEFAULT_TIMEOUT_S = 300.0


def default_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: torch.device | str | None = None, *, timeout_s: float | None = None) -> None:
    """Initialise the default process group once, from torchrun's env vars (or reuse it).

    Needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment (torchrun sets them)
    unless a group is already initialised. gloo on CPU, NCCL on CUDA.
    """
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed is not initialised and the environment lacks {missing}; launch "
            f"with `autopar run SCRIPT --nproc N` (torchrun) or call "
            f"torch.distributed.init_process_group first"
        )
    dev = torch.device(device) if device is not None else default_device()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    t = timeout_s if timeout_s is not None else float(os.environ.get("AUTOPAR_PG_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=t))
    destroy_at_exit()


def destroy_at_exit() -> None:
    """Have the default process group (and its subgroups) destroyed at interpreter exit, while
    the interpreter is still whole (see the module docstring); a no-op if the script did.

    No barrier first: a rank that reached exit has finished every collective it takes part
    in, and a rank that exits early (an exception, ``sys.exit(3)``) must not wait on peers that
    are blocked elsewhere; its peers' next collective then fails at once ("Connection closed by
    peer") instead of at the group timeout, and torchrun stops the job."""
    atexit.register(_teardown_at_exit)


def _teardown_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int = 0) -> NoReturn:
    """End a worker process that autopar itself launched, skipping interpreter finalization.

    ``destroy_process_group`` only drops ``torch.distributed``'s own references to the groups
    (pytorch/pytorch#96017): the DeviceMeshes, DTensor specs and FSDP states a plan built keep
    the C++ gloo groups alive until the interpreter tears down, and a rank that frees them there
    aborts ("terminate called without an active exception", SIGABRT) after a run that
    succeeded — seen in CI on ``autopar run mlp --cluster local:2`` with an explicit barrier and
    ``destroy_process_group`` before exit. Our workers have written and flushed everything by
    then, so they leave with ``os._exit``; a user's script (the decorator) keeps normal exit
    and gets ``destroy_at_exit``. Only call this from a ``__main__`` block: it ends the process.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to keep
            pass
    os._exit(code)


@dataclass(frozen=True)
class RankMesh:
    """This rank's view of the plan mesh.

    ``mesh`` is the full 3-D DeviceMesh; ``stage_mesh`` the 2-D (dp, tp) submesh of this rank's
    pipeline stage, on which all placements live; ``coords`` this rank's (pp, dp, tp) coordinate.
    """

    degrees: dict  # {"pp":, "dp":, "tp":}
    mesh: object  # torch.distributed.device_mesh.DeviceMesh, dims ("pp", "dp", "tp")
    stage_mesh: object  # DeviceMesh, dims ("dp", "tp")
    coords: dict  # {"pp": i, "dp": j, "tp": k}
    device: torch.device

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group()

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group()

    @property
    def tp_group(self):
        return self.mesh["tp"].get_group()

    @property
    def rank(self) -> int:
        return dist.get_rank()


def build_mesh(degrees: dict, device: torch.device | str | None = None, *,
               ranks: "list[int] | None" = None) -> "RankMesh | None":
    """Build the (pp, dp, tp) DeviceMesh for ``degrees`` on the initialised world.

    ``ranks``: run the plan on these world ranks only (in layout order); every world rank must
    still call this (making process groups is collective), and ranks outside get ``None``.
    The profiler uses it to time the runtime on 2 of 4 processes without a second launch.
    Raises if the degrees do not multiply to the number of ranks, naming both.
    """
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if not dist.is_initialized():
        init_distributed(device)
    world = dist.get_world_size()
    dev = torch.device(device) if device is not None else default_device()
    members = list(range(world)) if ranks is None else [int(r) for r in ranks]
    if any(not 0 <= r < world for r in members) or len(set(members)) != len(members):
        raise ValueError(f"build_mesh: ranks {members} must be distinct ranks of the {world}-rank world")
    degrees = check_mesh(dict(degrees), len(members))
    shape = (degrees["pp"], degrees["dp"], degrees["tp"])
    names = ("pp", "dp", "tp")
    mesh = (init_device_mesh(dev.type, shape, mesh_dim_names=names) if ranks is None
            else DeviceMesh(dev.type, torch.tensor(members).view(shape), mesh_dim_names=names))
    if dist.get_rank() not in members:
        return None
    rank = members.index(dist.get_rank())
    coords = coords_of(degrees, rank)
    # sanity: DeviceMesh's row-major layout must equal autopar's rank layout
    for axis in ("pp", "dp", "tp"):
        got = mesh.get_local_rank(axis)
        if got != coords[axis]:
            raise RuntimeError(
                f"DeviceMesh puts rank {rank} at {axis}={got}, autopar's layout says {coords[axis]}"
            )
    return RankMesh(degrees, mesh, mesh["dp", "tp"], coords, dev)
