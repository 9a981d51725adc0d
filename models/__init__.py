"""autopar.models: the model zoo used by tests, examples and benchmarks.

One model per file (mlp, gpt, llama, bert, vit, resnet, dlrm, moe), each with a frozen config
dataclass and presets, and the same zoo glue:

    build(size="tiny", batch_size=None, device="cpu") -> (model, example_inputs)
    make_targets(model, example_inputs, seed=1) -> targets
    loss_fn(output, targets) -> scalar loss
    PRESETS: {size: (config factory, published parameter count or None, source)}
    model.config (the frozen config) and model.init_weights(): re-initialise every parameter and
    buffer in place, re-tying shared weights, e.g. after `model.to_empty(device=...)` from meta

plus CLI targets that return `(model, example_inputs)`, full size on the meta device, e.g.
`autopar plan autopar.models.gpt:gpt3_175b --cluster h100x1024` or `autopar.models.gpt:tiny`.

Usage:
    entry = ZOO["gpt"]
    model, inputs = entry.build("tiny", batch_size=2)
    loss = entry.loss_fn(model(*inputs), entry.make_targets(model, inputs))
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from autopar.models import bert, dlrm, gpt, llama, mlp, moe, resnet, vit
from autopar.models._common import num_params

__all__ = ["ZOO", "ZooEntry", "num_params"]


@dataclass(frozen=True, slots=True)
class ZooEntry:
    """How to build, feed and train one zoo model; `presets` lists the sizes `build` accepts."""

    name: str
    build: Callable[..., tuple[torch.nn.Module, tuple]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    make_targets: Callable[..., torch.Tensor]
    presets: tuple[str, ...]
    published_params: dict  # size -> (published count, source) for sizes that have one

    @classmethod
    def from_module(cls, name: str, module: ModuleType) -> "ZooEntry":
        published = {size: (count, src) for size, (_, count, src) in module.PRESETS.items() if count}
        return cls(name, module.build, module.loss_fn, module.make_targets, tuple(module.PRESETS), published)


ZOO: dict[str, ZooEntry] = {
    name: ZooEntry.from_module(name, module)
    for name, module in [("mlp", mlp), ("gpt", gpt), ("llama", llama), ("bert", bert), ("vit", vit),
                         ("resnet", resnet), ("dlrm", dlrm), ("moe", moe)]
}
