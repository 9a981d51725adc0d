"""ViT: the Vision Transformer image classifier.

References:
  Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Table 1 (ViT-Base: 12 layers,
    hidden 768, MLP 3072, 12 heads, 86M) and Eq. 1-4 (cls token, learned 1-D position
    embedding, pre-LN encoder, classifier on the cls token).
  timm vision_transformer.py `vit_base_patch16_224` (86,567,656 parameters with a 1000-class head).

Patches are embedded with a Conv2d whose kernel and stride equal the patch size (the same linear
map as unfold + Linear). No dropout, no parallelism knobs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.models import _common


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.d_model % self.n_head:
            raise ValueError(f"ViTConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def tiny(cls) -> "ViTConfig":
        return cls(image_size=16, patch_size=4, num_classes=10, n_layer=2, n_head=2, d_model=32, d_ff=64)

    @classmethod
    def vit_b16(cls) -> "ViTConfig":
        return cls()

    @classmethod
    def vit_l16(cls) -> "ViTConfig":
        return cls(n_layer=24, n_head=16, d_model=1024, d_ff=4096)


PRESETS: dict[str, tuple] = {
    "tiny": (ViTConfig.tiny, None, None),
    "vit_b16": (ViTConfig.vit_b16, 86.6e6, "timm vit_base_patch16_224: 86,567,656; paper Table 1: 86M"),
    "vit_l16": (ViTConfig.vit_l16, 304.3e6, "timm vit_large_patch16_224: 304,326,632; paper Table 1: 307M"),
}


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):                                           # [B, N, d]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)  # [B, H, N, hd]
        k = k.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)                 # [B, H, N, hd]
        return self.proj(y.transpose(1, 2).flatten(2))              # [B, N, d]


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):                                           # [B, N, d]
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.d_model, kernel_size=cfg.patch_size,
                                     stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.d_model))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        self._init_params()

    def init_weights(self) -> None:
        """(Re)initialise every parameter in place, e.g. after `to_empty()` from meta."""
        _common.reset_submodules(self)
        self._init_params()

    def _init_params(self) -> None:
        """timm-style init: N(0, 0.02) position embedding and cls token, Linear weights, zero biases."""
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images):                                      # images: [B, C, H, W]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)     # [B, N, d], N = (H/p)(W/p)
        cls = self.cls_token.expand(images.size(0), -1, -1)         # [B, 1, d]
        x = torch.cat((cls, x), dim=1) + self.pos_embed             # [B, N + 1, d]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))                        # [B, num_classes] logits


# --- zoo glue -----------------------------------------------------------------------------
def example_inputs(cfg: ViTConfig, batch_size: int, device="cpu", seed: int = 0) -> tuple:
    return (_common.randn((batch_size, cfg.in_channels, cfg.image_size, cfg.image_size), device, seed),)


def make_targets(model: ViT, inputs: tuple, seed: int = 1) -> torch.Tensor:
    (images,) = inputs
    return _common.randint(model.config.num_classes, (images.shape[0],), images.device, seed)  # [B]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def build(size: str = "tiny", batch_size: int | None = None, device="cpu"):
    if size not in PRESETS:
        raise KeyError(f"vit: unknown size {size!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[size][0]()
    model = _common.build_on(device, lambda: ViT(cfg))
    bs = batch_size if batch_size is not None else (4 if size == "tiny" else 256)
    return model, example_inputs(cfg, bs, device)


def tiny(batch_size: int = 4, device="cpu"):
    return build("tiny", batch_size, device)


def vit_b16(batch_size: int = 256, device="meta"):
    return build("vit_b16", batch_size, device)


def vit_l16(batch_size: int = 256, device="meta"):
    return build("vit_l16", batch_size, device)
