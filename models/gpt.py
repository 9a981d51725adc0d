"""GPT: the GPT-2 / GPT-3 decoder-only transformer, written like nanoGPT's model.py.

References:
  Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
  Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1 (GPT-3 sizes).
  Karpathy, nanoGPT model.py (https://github.com/karpathy/nanoGPT), which this file follows.

Architecture: token + learned position embedding, `n_layer` pre-LayerNorm blocks of causal
self-attention and a 4x GELU MLP, a final LayerNorm and a linear LM head. The LM head is TIED to
the token embedding (`tie_embeddings=True`, as in GPT-2 and GPT-3), which is what makes the
published parameter counts (124M, 355M, 774M, 1558M; 175B) come out; set it False for an untied
head. There is no dropout (training here is for planning and numerical checks) and no
parallelism knob: autopar decides how to split the model from the outside.

GPT-3 uses alternating dense and locally banded sparse attention (Brown et al. 2020, Sec. 2.1);
this file uses dense causal attention in every layer, which has the same parameters and the
same dense-attention FLOPs upper bound.

Tracing: the forward reads sizes only through `idx.size(1)` (a proxy under fx, a symbolic int
under export) and reshapes through `unflatten`/`flatten` with config constants, so both
`torch.fx.symbolic_trace` and `torch.export.export(strict=False)` capture it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.models import _common


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257   # GPT-2 BPE vocabulary
    block_size: int = 1024    # max sequence length (learned position table size)
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 0             # MLP hidden size; 0 means 4 * d_model
    bias: bool = True         # GPT-2 has biases in Linear and LayerNorm
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    # --- presets -----------------------------------------------------------------------
    @classmethod
    def tiny(cls) -> "GPTConfig":
        return cls(vocab_size=128, block_size=16, n_layer=2, n_head=2, d_model=32)

    # GPT-2 (Radford et al. 2019; sizes as corrected in openai/gpt-2 download_model.py names).
    @classmethod
    def gpt2_small(cls) -> "GPTConfig":
        return cls(n_layer=12, n_head=12, d_model=768)

    @classmethod
    def gpt2_medium(cls) -> "GPTConfig":
        return cls(n_layer=24, n_head=16, d_model=1024)

    @classmethod
    def gpt2_large(cls) -> "GPTConfig":
        return cls(n_layer=36, n_head=20, d_model=1280)

    @classmethod
    def gpt2_xl(cls) -> "GPTConfig":
        return cls(n_layer=48, n_head=25, d_model=1600)

    # GPT-3 (Brown et al. 2020, Table 2.1): n_ctx = 2048 for every size.
    @classmethod
    def gpt3(cls, n_layer: int, d_model: int, n_head: int) -> "GPTConfig":
        return cls(block_size=2048, n_layer=n_layer, n_head=n_head, d_model=d_model)

    @classmethod
    def gpt3_small(cls) -> "GPTConfig":
        return cls.gpt3(12, 768, 12)

    @classmethod
    def gpt3_medium(cls) -> "GPTConfig":
        return cls.gpt3(24, 1024, 16)

    @classmethod
    def gpt3_large(cls) -> "GPTConfig":
        return cls.gpt3(24, 1536, 16)

    @classmethod
    def gpt3_xl(cls) -> "GPTConfig":
        # Table 2.1 prints 24 heads of d_head=128 (24 * 128 = 3072 != d_model=2048) while its
        # parameter count assumes attention width d_model; keep d_head=128 and d_model, i.e. 16 heads.
        return cls.gpt3(24, 2048, 16)

    @classmethod
    def gpt3_2_7b(cls) -> "GPTConfig":
        return cls.gpt3(32, 2560, 32)

    @classmethod
    def gpt3_6_7b(cls) -> "GPTConfig":
        return cls.gpt3(32, 4096, 32)

    @classmethod
    def gpt3_13b(cls) -> "GPTConfig":
        # Table 2.1 prints d_model=5140 with 40 heads of d_head=128; 40 * 128 = 5120, and 5140 is
        # not divisible by 40, so 5140 is read as a typo for 5120.
        return cls.gpt3(40, 5120, 40)

    @classmethod
    def gpt3_175b(cls) -> "GPTConfig":
        return cls.gpt3(96, 12288, 96)


# name -> (config factory, published parameter count, source). Counts include embeddings, with
# the tied LM head counted once.
PRESETS: dict[str, tuple] = {
    "tiny": (GPTConfig.tiny, None, None),
    "gpt2_small": (GPTConfig.gpt2_small, 124e6, "openai/gpt-2 model name 124M"),
    "gpt2_medium": (GPTConfig.gpt2_medium, 355e6, "openai/gpt-2 model name 355M"),
    "gpt2_large": (GPTConfig.gpt2_large, 774e6, "openai/gpt-2 model name 774M"),
    "gpt2_xl": (GPTConfig.gpt2_xl, 1558e6, "openai/gpt-2 model name 1558M"),
    "gpt3_small": (GPTConfig.gpt3_small, 125e6, "Brown et al. 2020 Table 2.1"),
    "gpt3_medium": (GPTConfig.gpt3_medium, 350e6, "Brown et al. 2020 Table 2.1"),
    "gpt3_large": (GPTConfig.gpt3_large, 760e6, "Brown et al. 2020 Table 2.1"),
    "gpt3_xl": (GPTConfig.gpt3_xl, 1.3e9, "Brown et al. 2020 Table 2.1"),
    "gpt3_2_7b": (GPTConfig.gpt3_2_7b, 2.7e9, "Brown et al. 2020 Table 2.1"),
    "gpt3_6_7b": (GPTConfig.gpt3_6_7b, 6.7e9, "Brown et al. 2020 Table 2.1"),
    "gpt3_13b": (GPTConfig.gpt3_13b, 13e9, "Brown et al. 2020 Table 2.1"),
    "gpt3_175b": (GPTConfig.gpt3_175b, 175e9, "Brown et al. 2020 Table 2.1"),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x):                                           # x: [B, T, d]
        q, k, v = self.c_attn(x).chunk(3, dim=-1)                   # 3 x [B, T, d]
        q = q.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)  # [B, H, T, hd]
        k = k.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
        y = y.transpose(1, 2).flatten(2)                            # [B, T, d]
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):                                           # [B, T, d]
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):                                           # [B, T, d]
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.tie_weights()  # one [V, d] parameter, used twice
        self._init_params()

    def _init_params(self) -> None:
        self.apply(self._init_weights)
        # GPT-2: residual projections get std 0.02 / sqrt(2 * n_layer) (as nanoGPT does).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def tie_weights(self) -> None:
        """Make self.lm_head.weight the same Parameter as self.wte.weight.

        `to_empty()` gives each a fresh tensor, breaking the tie; init_weights() re-ties first.
        """
        self.lm_head.weight = self.wte.weight

    def init_weights(self) -> None:
        """(Re)initialise every parameter in place, e.g. after `to_empty()` from meta."""
        if self.config.tie_embeddings:
            self.tie_weights()
        _common.reset_submodules(self)
        self._init_params()

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases.

        Runs on the meta device too, where normal_/zeros_ are free no-ops. The tied LM head is
        visited after the embedding and re-draws the same shared tensor, which is harmless.
        """
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx):                                         # idx: [B, T] int64
        pos = torch.arange(idx.size(1), device=idx.device)          # [T]
        x = self.wte(idx) + self.wpe(pos)                           # [B, T, d]
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return self.lm_head(x)                                      # [B, T, V] logits


# --- zoo glue: inputs, targets, loss, builders ------------------------------------------
def example_inputs(cfg: GPTConfig, batch_size: int, device="cpu", seed: int = 0) -> tuple:
    return (_common.randint(cfg.vocab_size, (batch_size, cfg.block_size), device, seed),)


def make_targets(model: GPT, inputs: tuple, seed: int = 1) -> torch.Tensor:
    """Next-token targets, [B, T] int64 (random tokens: the data does not matter here)."""
    (idx,) = inputs
    return _common.randint(model.config.vocab_size, tuple(idx.shape), idx.device, seed)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())  # [B*T, V] vs [B*T]


def build(size: str = "tiny", batch_size: int | None = None, device="cpu"):
    """(GPT, (idx,)) for a preset name in PRESETS; the model is built directly on `device`."""
    if size not in PRESETS:
        raise KeyError(f"gpt: unknown size {size!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[size][0]()
    model = _common.build_on(device, lambda: GPT(cfg))
    bs = batch_size if batch_size is not None else (4 if size == "tiny" else 8)
    return model, example_inputs(cfg, bs, device)


# CLI targets (`autopar plan autopar.models.gpt:gpt3_175b ...`): full size on meta.
def tiny(batch_size: int = 4, device="cpu"):
    return build("tiny", batch_size, device)


def gpt2_small(batch_size: int = 8, device="meta"):
    return build("gpt2_small", batch_size, device)


def gpt2_medium(batch_size: int = 8, device="meta"):
    return build("gpt2_medium", batch_size, device)


def gpt2_large(batch_size: int = 8, device="meta"):
    return build("gpt2_large", batch_size, device)


def gpt2_xl(batch_size: int = 8, device="meta"):
    return build("gpt2_xl", batch_size, device)


def gpt3_6_7b(batch_size: int = 64, device="meta"):
    return build("gpt3_6_7b", batch_size, device)


def gpt3_13b(batch_size: int = 128, device="meta"):
    return build("gpt3_13b", batch_size, device)


def gpt3_175b(batch_size: int = 512, device="meta"):
    """GPT-3 175B with one global batch of 512 x 2048 tokens (DESIGN.md's planning example)."""
    return build("gpt3_175b", batch_size, device)
