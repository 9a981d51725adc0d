"""LLaMA: the LLaMA-3 decoder-only transformer.

References:
  Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" (pre-RMSNorm,
    SwiGLU, rotary embeddings).
  Grattafiori et al. 2024, "The Llama 3 Herd of Models", Table 3 (8B: 32 layers, d 4096,
    FFN 14336, 32 heads, 8 KV heads, vocab 128256, RoPE theta 500000).
  Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020, "GLU Variants Improve Transformer" (SwiGLU);
  Su et al. 2021, "RoFormer" (rotary embeddings); Ainslie et al. 2023 (grouped-query attention).

The LM head is UNTIED from the token embedding (as in LLaMA-3-8B), no biases anywhere, no
dropout, no parallelism knobs. Rotary embeddings are applied in real arithmetic on (even, odd)
pairs of each head (no complex tensors) from cos/sin tables kept as non-persistent buffers, so
the graph is plain elementwise ops that every tracer and the meta device handle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.models import _common


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 128256
    max_seq_len: int = 8192
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 8
    d_model: int = 4096
    d_ff: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"LlamaConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"LlamaConfig: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def tiny(cls) -> "LlamaConfig":
        return cls(vocab_size=128, max_seq_len=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                   rope_theta=10000.0)

    @classmethod
    def llama3_8b(cls) -> "LlamaConfig":
        return cls()


PRESETS: dict[str, tuple] = {
    "tiny": (LlamaConfig.tiny, None, None),
    # 8.03B: Meta's model card for Meta-Llama-3-8B (8,030,261,248 parameters in the checkpoint).
    "llama3_8b": (LlamaConfig.llama3_8b, 8.03e9, "Grattafiori et al. 2024 / Meta-Llama-3-8B card"),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x):                                           # [..., d]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(cfg: LlamaConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables, each [max_seq_len, head_dim / 2] (RoFormer eq. 34 frequencies)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate (even, odd) pairs of x [B, T, H, hd] by per-position angles; cos/sin: [T, hd/2]."""
    x = x.unflatten(-1, (-1, 2))                                    # [B, T, H, hd/2, 2]
    x1, x2 = x[..., 0], x[..., 1]                                   # [B, T, H, hd/2]
    cos, sin = cos[:, None, :], sin[:, None, :]                     # [T, 1, hd/2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal grouped-query attention: n_kv_head K/V heads shared by n_head / n_kv_head queries."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):                                 # x: [B, T, d]
        q = self.wq(x).unflatten(-1, (self.n_head, self.head_dim))      # [B, T, H, hd]
        k = self.wk(x).unflatten(-1, (self.n_kv_head, self.head_dim))   # [B, T, Hkv, hd]
        v = self.wv(x).unflatten(-1, (self.n_kv_head, self.head_dim))   # [B, T, Hkv, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        rep = self.n_head // self.n_kv_head
        k = k.repeat_interleave(rep, dim=1)                         # [B, H, T, hd]
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
        return self.wo(y.transpose(1, 2).flatten(2))                # [B, T, d]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):                                           # [B, T, d]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin):                                 # [B, T, d]
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)    # [max_seq_len, hd/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_params()

    def _init_params(self) -> None:
        self.apply(self._init_weights)

    def init_weights(self) -> None:
        """(Re)initialise parameters and RoPE tables in place, e.g. after `to_empty()` from meta."""
        _common.reset_submodules(self)
        self._init_params()
        self.reset_buffers()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """N(0, 0.02) for Linear/Embedding (a no-op on meta)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def reset_buffers(self) -> None:
        """Recompute the RoPE tables in place, e.g. after `to_empty()` from the meta device."""
        cos, sin = rope_tables(self.config, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, idx):                                         # idx: [B, T] int64
        T = idx.size(1)  # narrow, not [:T]: fx cannot put a traced size in a Python slice
        cos, sin = self.rope_cos.narrow(0, 0, T), self.rope_sin.narrow(0, 0, T)  # [T, hd/2]
        x = self.tok_embeddings(idx)                                # [B, T, d]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))                            # [B, T, V] logits


# --- zoo glue -----------------------------------------------------------------------------
def example_inputs(cfg: LlamaConfig, batch_size: int, seq_len: int, device="cpu", seed: int = 0) -> tuple:
    return (_common.randint(cfg.vocab_size, (batch_size, seq_len), device, seed),)


def make_targets(model: Llama, inputs: tuple, seed: int = 1) -> torch.Tensor:
    (idx,) = inputs
    return _common.randint(model.config.vocab_size, tuple(idx.shape), idx.device, seed)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def build(size: str = "tiny", batch_size: int | None = None, device="cpu", seq_len: int | None = None):
    """(Llama, (idx,)); full size trains at seq_len 8192 (LLaMA-3 pre-training context)."""
    if size not in PRESETS:
        raise KeyError(f"llama: unknown size {size!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[size][0]()
    model = _common.build_on(device, lambda: Llama(cfg))
    bs = batch_size if batch_size is not None else (4 if size == "tiny" else 8)
    return model, example_inputs(cfg, bs, seq_len or cfg.max_seq_len, device)


def tiny(batch_size: int = 4, device="cpu"):
    return build("tiny", batch_size, device)


def llama3_8b(batch_size: int = 8, device="meta"):
    return build("llama3_8b", batch_size, device)
