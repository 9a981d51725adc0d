"""BERT: a bidirectional transformer encoder with a masked-language-model head.

References:
  Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
    Understanding", Sec. 3 (BASE: L=12, H=768, A=12, 110M; LARGE: L=24, H=1024, A=16, 340M).
  google-research/bert modeling.py (post-LN blocks, GELU, the MLM transform + tied decoder).

Architecture: word + learned position + token-type embeddings, LayerNorm, `n_layer` post-LN
encoder blocks (full bidirectional attention), and the MLM head (dense + GELU + LayerNorm, then a
decoder tied to the word embedding plus an output bias). The forward takes token ids only: every
token has token type 0 and no padding mask (fixed-length batches), so the input is one tensor.
The next-sentence-prediction head and pooler are left out (not used by MLM training), which is
why the counts here (109.5M, 335.1M) sit just under the paper's rounded 110M / 340M.
No dropout, no parallelism knobs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.models import _common

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: positions that were not masked


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522       # WordPiece vocabulary of bert-base-uncased
    max_seq_len: int = 512
    type_vocab_size: int = 2
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    layer_norm_eps: float = 1e-12
    mask_prob: float = 0.15       # fraction of positions predicted by MLM (Devlin et al. 3.1)

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"BertConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def tiny(cls) -> "BertConfig":
        return cls(vocab_size=128, max_seq_len=16, n_layer=2, n_head=2, d_model=32, d_ff=64)

    @classmethod
    def base(cls) -> "BertConfig":
        return cls()

    @classmethod
    def large(cls) -> "BertConfig":
        return cls(n_layer=24, n_head=16, d_model=1024, d_ff=4096)


PRESETS: dict[str, tuple] = {
    "tiny": (BertConfig.tiny, None, None),
    "bert_base": (BertConfig.base, 110e6, "Devlin et al. 2019 Sec. 3"),
    "bert_large": (BertConfig.large, 340e6, "Devlin et al. 2019 Sec. 3"),
}


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):                                           # [B, T, d]
        q, k, v = self.qkv(x).chunk(3, dim=-1)                      # 3 x [B, T, d]
        q = q.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)  # [B, H, T, hd]
        k = k.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)                 # bidirectional, [B, H, T, hd]
        return self.proj(y.transpose(1, 2).flatten(2))              # [B, T, d]


class EncoderLayer(nn.Module):
    """Post-LN block, as in the original BERT: x = LN(x + f(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x):                                           # [B, T, d]
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.fc_out(F.gelu(self.fc_in(x))))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.word_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.emb_ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_layer)])
        # MLM head: transform, then a decoder tied to the word embedding, plus its own bias.
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.tie_weights()                                          # tied [V, d]
        self._init_params()

    def _init_params(self) -> None:
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Make self.decoder.weight the same Parameter as self.word_emb.weight.

        `to_empty()` gives each a fresh tensor, breaking the tie; init_weights() re-ties first.
        """
        self.decoder.weight = self.word_emb.weight

    def init_weights(self) -> None:
        """(Re)initialise every parameter in place, e.g. after `to_empty()` from meta."""
        self.tie_weights()
        _common.reset_submodules(self)
        self._init_params()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT init: truncated-normal-like N(0, 0.02) weights, zero biases (no-op on meta)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx):                                         # idx: [B, T] int64
        pos = torch.arange(idx.size(1), device=idx.device)          # [T]
        x = self.word_emb(idx) + self.pos_emb(pos) + self.type_emb.weight[0]  # [B, T, d]; type 0
        x = self.emb_ln(x)
        for layer in self.layers:
            x = layer(x)
        x = self.mlm_ln(F.gelu(self.mlm_dense(x)))                  # [B, T, d]
        return self.decoder(x)                                      # [B, T, V] logits


# --- zoo glue -----------------------------------------------------------------------------
def example_inputs(cfg: BertConfig, batch_size: int, device="cpu", seed: int = 0) -> tuple:
    return (_common.randint(cfg.vocab_size, (batch_size, cfg.max_seq_len), device, seed),)


def make_targets(model: Bert, inputs: tuple, seed: int = 1) -> torch.Tensor:
    """MLM targets [B, T]: a random token at a `mask_prob` fraction of positions, IGNORE_INDEX
    elsewhere. (The inputs are not actually masked; for planning and numerics that does not matter.)"""
    (idx,) = inputs
    cfg = model.config
    tokens = _common.randint(cfg.vocab_size, tuple(idx.shape), idx.device, seed)
    if idx.device.type == "meta":
        return tokens
    chosen = _common.rand(tuple(idx.shape), idx.device, seed + 1) < cfg.mask_prob
    chosen[..., 0] = True  # at least one predicted position per sequence, so the loss is finite
    return torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


def build(size: str = "tiny", batch_size: int | None = None, device="cpu"):
    """(Bert, (idx,)) with sequences of cfg.max_seq_len tokens."""
    if size not in PRESETS:
        raise KeyError(f"bert: unknown size {size!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[size][0]()
    model = _common.build_on(device, lambda: Bert(cfg))
    bs = batch_size if batch_size is not None else (4 if size == "tiny" else 32)
    return model, example_inputs(cfg, bs, device)


def tiny(batch_size: int = 4, device="cpu"):
    return build("tiny", batch_size, device)


def bert_base(batch_size: int = 32, device="meta"):
    return build("bert_base", batch_size, device)


def bert_large(batch_size: int = 32, device="meta"):
    return build("bert_large", batch_size, device)
