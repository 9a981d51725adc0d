"""Checkpoints with torch.distributed.checkpoint: save under one plan, load under another.

What is saved: every parameter by its canonical fqn (``model/<fqn>``) as a DTensor with its
storage placements, and every optimizer state tensor (``optim/<fqn>/<key>``): state shaped
like the parameter is saved as a DTensor with the parameter's placements (also when the
optimizer runs on host copies), scalar state (Adam's ``step``) as a plain tensor. DCP stores
shards with their global offsets, so loading under another plan, mesh or world size reshards:
each rank reads exactly the pieces its new placements need. The optimizer's hyper-parameters
are not saved: build the optimizer as before, then load.

Atomicity: every rank writes into ``<path>.tmp``; after a barrier rank 0 writes the marker file
``AUTOPAR_COMPLETE`` (fsynced) and renames the directory to ``<path>``. A crash at any point
leaves either the previous checkpoint or a ``.tmp`` directory, and :func:`load_checkpoint`
refuses a directory without the marker.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

MARKER = "AUTOPAR_COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete or does not fit the model; says which and why."""


def _param_names(pm, optimizer) -> dict[int, str]:
    names = {id(p): fqn for fqn, p in pm.local_params.items()}
    names.update({id(h): fqn for fqn, h in pm._views.items()})
    if optimizer is not None:
        for g in optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in names:
                    raise CheckpointError("optimizer holds a parameter that is not this model's; build it over "
                                          "model.parameters() / model.optimizer_params()")
    return names


def _as_dtensor(pm, fqn: str, t: torch.Tensor):
    """Optimizer state shaped like the parameter's local shard -> DTensor like the parameter."""
    p = pm.local_params[fqn]
    if isinstance(t, DTensor):
        return t
    if t.dim() and tuple(t.shape) == tuple(p._local_tensor.shape):
        return DTensor.from_local(t.to(p._local_tensor.device), p.device_mesh, p.placements,
                                  run_check=False, shape=p.shape, stride=p.stride())
    return t


def state_dict(pm, optimizer=None) -> dict:
    """The flat state dict DCP saves (see module docstring)."""
    sd = {f"model/{fqn}": p.detach() for fqn, p in pm.local_params.items()}
    if optimizer is not None:
        names = _param_names(pm, optimizer)
        for p, st in optimizer.state.items():
            fqn = names[id(p)]
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    sd[f"optim/{fqn}/{k}"] = _as_dtensor(pm, fqn, v.detach())
    return sd


def save_checkpoint(pm, optimizer, path: str) -> None:
    """Save model (and optimizer state) atomically to the directory ``path`` (collective)."""
    import torch.distributed.checkpoint as dcp

    path = os.path.abspath(path)
    tmp = path + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(state_dict(pm, optimizer), storage_writer=dcp.FileSystemWriter(tmp))
    dist.barrier()
    if rank == 0:
        info = {"time": time.time(), "world_size": dist.get_world_size(), "mesh": dict(pm.plan.mesh),
                "model": pm.plan.model.name, "fingerprint": pm.plan.model.fingerprint}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if os.path.exists(path):
            old = f"{path}.old-{os.getpid()}"
            os.rename(path, old)
        os.rename(tmp, path)
        fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def load_checkpoint(pm, optimizer, path: str) -> None:
    """Load ``path`` into ``pm`` (resharding to its plan) and into ``optimizer``'s state (collective).

    ``optimizer`` must be built over ``pm.optimizer_params()`` (or be None to load weights only).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = os.path.abspath(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete autopar checkpoint (no {MARKER} marker: the save "
                              f"did not finish, or this is not a checkpoint directory)")
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    target: dict = {}
    for fqn, p in pm.local_params.items():
        key = f"model/{fqn}"
        if key not in meta:
            raise CheckpointError(f"checkpoint {path} has no parameter {fqn!r}")
        size = tuple(meta[key].size) if isinstance(meta[key], TensorStorageMetadata) else None
        if size != tuple(p.shape):
            raise CheckpointError(f"parameter {fqn!r}: checkpoint shape {size} != model shape {tuple(p.shape)}")
        target[key] = p.detach()
    opt_keys: dict[str, list[str]] = {}
    if optimizer is not None:
        for key, md in meta.items():
            if not key.startswith("optim/"):
                continue
            fqn, _, k = key[len("optim/"):].rpartition("/")
            if fqn not in pm.local_params or not isinstance(md, TensorStorageMetadata):
                continue
            p = pm.local_params[fqn]
            if tuple(md.size) == tuple(p.shape):
                target[key] = torch.zeros_like(p.detach())
            else:
                target[key] = torch.zeros(tuple(md.size), dtype=md.properties.dtype)
            opt_keys.setdefault(fqn, []).append(k)
    with torch.no_grad():
        dcp.load(target, storage_reader=dcp.FileSystemReader(path))
    if optimizer is None:
        return
    by_fqn = {}
    names = _param_names(pm, optimizer)
    for g in optimizer.param_groups:
        for q in g["params"]:
            by_fqn[names[id(q)]] = q
    for fqn, keys in opt_keys.items():
        q = by_fqn.get(fqn)
        if q is None:
            continue
        st = {}
        for k in keys:
            v = target[f"optim/{fqn}/{k}"]
            if isinstance(v, DTensor) and not isinstance(q, DTensor):
                v = v.to_local().to(q.device).clone()  # host (offloaded) optimizer: local shard
            st[k] = v
        optimizer.state[q] = st
    # offloaded optimizers step on host copies of the shards: refresh them from the loaded shards
    pm.optimizer_params()  # (creates the views if the optimizer was built over parameters())
    with torch.no_grad():
        for fqn, h in pm._views.items():
            loc = pm.local_params[fqn]._local_tensor
            if h.data_ptr() != loc.data_ptr():
                h.copy_(loc.to(h.device))
