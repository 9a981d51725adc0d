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
    n_layer: int = 16          # number of Linear layers; GELU after each but the last
    bias: bool = True

    def __post_init__(self):
        if self.n_layer < 2:
            raise ValueError(f"MLPConfig: n_layer={self.n_layer} must be at least 2 (input and output layers)")

    @classmethod
    def tiny(cls) -> "MLPConfig":
        return cls(d_in=16, d_hidden=32, d_out=8, n_layer=4)

    @classmethod
    def mlp_1b(cls) -> "MLPConfig":
        # 16 x (8192^2 + 8192) = 1,073,872,896 parameters.
        return cls()


PRESETS: dict[str, tuple] = {
    "tiny": (MLPConfig.tiny, None, None),
    "mlp_1b": (MLPConfig.mlp_1b, 16 * (8192 * 8192 + 8192), "closed form 16 * (8192^2 + 8192)"),
}


class LinearGELU(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):                                           # [B, d_in]
        return F.gelu(self.fc(x))                                   # [B, d_out]


class MLP(nn.Module):
    """fc_in, then n_layer - 2 identical hidden blocks (a repeated stack the planner can split
    into pipeline stages), then fc_out."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.config = cfg
        self.fc_in = LinearGELU(cfg.d_in, cfg.d_hidden, cfg.bias)
        self.blocks = nn.ModuleList(LinearGELU(cfg.d_hidden, cfg.d_hidden, cfg.bias) for _ in range(cfg.n_layer - 2))
        self.fc_out = nn.Linear(cfg.d_hidden, cfg.d_out, bias=cfg.bias)

    def init_weights(self) -> None:
        """(Re)initialise every parameter in place (PyTorch's Linear init), e.g. after `to_empty()`."""
        _common.reset_submodules(self)

    def forward(self, x):                                           # x: [B, d_in]
        x = self.fc_in(x)                                           # [B, d_hidden]
        for block in self.blocks:
            x = block(x)                                            # [B, d_hidden]
        return self.fc_out(x)                                       # [B, d_out]


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
