"""Small helpers shared by the zoo: seeded example inputs that also work on the meta device.

Example inputs and targets are drawn from a private `torch.Generator` seeded with `seed`, so
they do not depend on (or disturb) the global RNG state. On the meta device there is no data,
so the helpers return correctly shaped meta tensors without drawing anything.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randint(high: int, shape: Sequence[int], device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
    """int64 tensor of `shape` with values in [0, high), reproducible for a given seed."""
    device = torch.device(device)
    if device.type == "meta":
        return torch.zeros(tuple(shape), dtype=torch.long, device=device)
    return torch.randint(0, high, tuple(shape), generator=_generator(seed)).to(device)


def randn(shape: Sequence[int], device: str | torch.device = "cpu", seed: int = 0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal tensor of `shape`, reproducible for a given seed."""
    device = torch.device(device)
    if device.type == "meta":
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return torch.randn(tuple(shape), generator=_generator(seed), dtype=dtype).to(device)


def rand(shape: Sequence[int], device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
    """Uniform [0, 1) float32 tensor of `shape`, reproducible for a given seed."""
    device = torch.device(device)
    if device.type == "meta":
        return torch.empty(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=_generator(seed)).to(device)


def build_on(device: str | torch.device, ctor):
    """Run `ctor()` with `device` as the default device (parameters are created there).

    On "meta" this costs no memory, so a 175B-parameter model builds in seconds.
    """
    with torch.device(device):
        return ctor()


def num_params(model: torch.nn.Module) -> int:
    """Parameter count with tied (shared) parameters counted once, as papers count them."""
    return sum(p.numel() for p in model.parameters())


def reset_submodules(model: torch.nn.Module) -> None:
    """Call `reset_parameters()` on every submodule that has one (Linear, Embedding, LayerNorm,
    BatchNorm incl. running stats, Conv2d, the zoo's own norms and experts), root excluded.

    Models' `init_weights()` start with this so that, after `to_empty()` from the meta device,
    no parameter or buffer keeps uninitialised memory; the model's own init then follows.
    """
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
