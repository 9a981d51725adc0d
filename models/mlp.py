"""MLP: a plain stack of Linear + GELU layers, the simplest model the planner must split.

A 1B-parameter MLP is the textbook tensor-parallel case (Shoeybi et al. 2019, "Megatron-LM",
Sec. 3: column-parallel then row-parallel Linear pairs), so it is the first thing to check a
plan against. Regression output, MSE loss. No dropout, no parallelism knobs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.models import _common


@dataclass(frozen=True)
class MLPConfig:
    d_in: int = 8192
    d_hidden: int = 8192
    d_out: int = 8192
    n_layer: int = 16          # number of Linear layers; GELU between them, none after the last
    bias: bool = True

    def __post_init__(self):
        if self.n_layer < 1:
            raise ValueError(f"MLPConfig: n_layer={self.n_layer} must be at least 1")

    @classmethod
    def tiny(cls) -> "MLPConfig":
        return cls(d_in=16, d_hidden=32, d_out=8, n_layer=3)

    @classmethod
    def mlp_1b(cls) -> "MLPConfig":
        # 16 x (8192^2 + 8192) = 1,073,872,896 parameters.
        return cls()


PRESETS: dict[str, tuple] = {
    "tiny": (MLPConfig.tiny, None, None),
    "mlp_1b": (MLPConfig.mlp_1b, 16 * (8192 * 8192 + 8192), "closed form 16 * (8192^2 + 8192)"),
}


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.config = cfg
        dims = [cfg.d_in] + [cfg.d_hidden] * (cfg.n_layer - 1) + [cfg.d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=cfg.bias) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):                                           # x: [B, d_in]
        for layer in self.layers[:-1]:
            x = F.gelu(layer(x))                                    # [B, d_hidden]
        return self.layers[-1](x)                                   # [B, d_out]


# --- zoo glue -----------------------------------------------------------------------------
def example_inputs(cfg: MLPConfig, batch_size: int, device="cpu", seed: int = 0) -> tuple:
    return (_common.randn((batch_size, cfg.d_in), device, seed),)


def make_targets(model: MLP, inputs: tuple, seed: int = 1) -> torch.Tensor:
    (x,) = inputs
    return _common.randn((x.shape[0], model.config.d_out), x.device, seed)  # [B, d_out]


def loss_fn(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, targets)


def build(size: str = "tiny", batch_size: int | None = None, device="cpu"):
    if size not in PRESETS:
        raise KeyError(f"mlp: unknown size {size!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[size][0]()
    model = _common.build_on(device, lambda: MLP(cfg))
    bs = batch_size if batch_size is not None else (4 if size == "tiny" else 1024)
    return model, example_inputs(cfg, bs, device)


def tiny(batch_size: int = 4, device="cpu"):
    return build("tiny", batch_size, device)


def mlp_1b(batch_size: int = 1024, device="meta"):
    return build("mlp_1b", batch_size, device)
