"""autopar.cost_model: what devices and links can do, and what an op, a collective, a
resharding, a pipeline schedule or a training state costs on them.

Everything here is a pure function of values (DeviceSpec, LinkSpec, Cluster) that carry
their provenance; nothing reads the machine except :func:`profile` and ``Cluster.parse("local:N")``.
"""
from .device import DTYPES, DeviceSpec, Provenance, normalize_dtype
from .cluster import Cluster, LinkSpec, NodeGroup, axis_collective_time, axis_groups, axis_link
from .collectives import COLLECTIVES, collective_time
from .reshard import reshard_cost, reshard_cost_multi, reshard_kind
from .compute import backward_time, host_transfer_time, matmul_flops, op_time
from .memory import (gpt_activation_bytes_per_layer, grad_bytes, optimizer_state_bytes, param_bytes,
                     training_state_breakdown, training_state_bytes)
from .pipeline import bubble_fraction, inflight_microbatches, pipeline_time
from .flops import gpt_forward_flops, gpt_params, gpt_train_flops
from . import catalog


def profile(*args, **kwargs):
    """Measure this machine (see :func:`autopar.cost_model.profiler.profile`)."""
    from .profiler import profile as _profile
    return _profile(*args, **kwargs)


__all__ = [
    "DTYPES", "DeviceSpec", "Provenance", "normalize_dtype",
    "Cluster", "LinkSpec", "NodeGroup", "axis_link", "axis_groups", "axis_collective_time",
    "COLLECTIVES", "collective_time", "reshard_cost", "reshard_cost_multi", "reshard_kind",
    "op_time", "backward_time", "matmul_flops", "host_transfer_time",
    "param_bytes", "grad_bytes", "optimizer_state_bytes", "training_state_bytes",
    "training_state_breakdown", "gpt_activation_bytes_per_layer", "bubble_fraction", "pipeline_time", "inflight_microbatches",
    "gpt_train_flops", "gpt_forward_flops", "gpt_params", "catalog", "profile",
]
