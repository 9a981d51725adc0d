"""MoE: a Switch-Transformer-style mixture-of-experts decoder.

References:
  Fedus et al. 2021, "Switch Transformers: Scaling to Trillion Parameter Models with Simple and
    Efficient Sparsity", Sec. 2.1-2.2: top-1 ("switch") routing, expert capacity
    C = ceil(capacity_factor * tokens_per_group / num_experts), tokens over capacity skip the
    expert (the residual carries them), the expert output is scaled by the router probability;
    MoE replaces every other FFN layer (Table 9: Switch-Base has 12 layers, d 768, d_ff 3072,
    12 heads, 128 experts).
  Lepikhin et al. 2020, "GShard", Algorithm 2: dispatch and combine written as one-hot masks and
    einsums over [group, token, expert, capacity], so every shape is static.

This is a decoder-only (GPT-style, pre-LN, causal) model, not Switch's T5 encoder-decoder, so the
preset counts are our own closed form, not the paper's. Each sequence is one routing group.
Experts are batched weight tensors w_in [E, d, d_ff] and w_out [E, d_ff, d] (no biases, as in
T5/Switch): an expert-parallel plan shards their leading dim.

Not modelled: the load-balancing auxiliary loss (Fedus eq. 4) - forward returns one tensor, the
logits, and the router still learns through the probability that scales each expert output;
router jitter noise and dropout (left out to keep the model deterministic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.models import _common
from autopar.models.gpt import Block, CausalSelfAttention, GPTConfig


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int = 32128       # T5 / Switch SentencePiece vocabulary
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    n_expert: int = 128
    moe_every: int = 2            # layers i with i % moe_every == moe_every - 1 are MoE layers
    capacity_factor: float = 1.25  # Fedus et al. train-time value

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"MoEConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.moe_every < 1 or self.n_layer % self.moe_every:
            raise ValueError(f"MoEConfig: n_layer={self.n_layer} must be a multiple of moe_every={self.moe_every}")

    @property
    def capacity(self) -> int:
        """Expert capacity per group (a sequence of block_size tokens)."""
        return max(1, math.ceil(self.capacity_factor * self.block_size / self.n_expert))

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (0-based) is an MoE layer: the last of each group of moe_every layers."""
        return i % self.moe_every == self.moe_every - 1

    def dense_config(self) -> GPTConfig:
        """The GPT config whose attention and dense blocks this model reuses."""
        return GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, d_model=self.d_model, d_ff=self.d_ff)

    @classmethod
    def tiny(cls) -> "MoEConfig":
        # capacity = ceil(1.25 * 16 / 4) = 5 slots per expert for 16 tokens: some tokens can drop.
        return cls(vocab_size=128, block_size=16, n_layer=4, n_head=2, d_model=32, d_ff=64, n_expert=4)

    @classmethod
    def switch_base_128(cls) -> "MoEConfig":
        return cls()


def closed_form_params(cfg: MoEConfig) -> int:
    """Parameter count from the config alone (tied LM head counted once)."""
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layer
    attn = d * 3 * d + 3 * d + d * d + d
    norms = 2 * 2 * d
    dense_ffn = d * f + f + f * d + d
    moe_ffn = d * cfg.n_expert + 2 * cfg.n_expert * d * f   # router + experts
    n_moe = sum(cfg.is_moe_layer(i) for i in range(L))
    layers = L * (attn + norms) + n_moe * moe_ffn + (L - n_moe) * dense_ffn
    return cfg.vocab_size * d + cfg.block_size * d + layers + 2 * d


PRESETS: dict[str, tuple] = {
    "tiny": (MoEConfig.tiny, None, None),
    "switch_base_128": (MoEConfig.switch_base_128, closed_form_params(MoEConfig.switch_base_128()),
                        "closed form (decoder-only Switch-Base shape)"),
}


class SwitchFFN(nn.Module):
    """Top-1 routed experts with capacity, GShard-style one-hot dispatch/combine."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.n_expert, self.capacity = cfg.n_expert, cfg.capacity
        self.router = nn.Linear(cfg.d_model, cfg.n_expert, bias=False)
        self.w_in = nn.Parameter(torch.empty(cfg.n_expert, cfg.d_model, cfg.d_ff))   # [E, d, f]
        self.w_out = nn.Parameter(torch.empty(cfg.n_expert, cfg.d_ff, cfg.d_model))  # [E, f, d]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)

    def forward(self, x):                                           # x: [G, S, d]; G groups (sequences)
        probs = F.softmax(self.router(x), dim=-1)                   # [G, S, E]
        gate = probs.amax(dim=-1)                                   # [G, S] prob of the chosen expert
        choice = probs.argmax(dim=-1)                               # [G, S] expert index
        experts = torch.arange(self.n_expert, device=x.device)
        mask = (choice[..., None] == experts).to(x.dtype)           # [G, S, E] one-hot
        position = torch.cumsum(mask, dim=1) * mask                 # [G, S, E] 1-based slot in its expert
        keep = mask * (position <= self.capacity).to(x.dtype)       # [G, S, E] drop over-capacity tokens
        slots = torch.arange(self.capacity, device=x.device)
        slot_onehot = ((position - 1)[..., None] == slots).to(x.dtype)  # [G, S, E, C]
        dispatch = keep[..., None] * slot_onehot                    # [G, S, E, C] 0/1
        combine = gate[..., None, None] * dispatch                  # [G, S, E, C]
        expert_in = torch.einsum("gsec,gsd->egcd", dispatch, x)     # [E, G, C, d]
        h = F.gelu(torch.einsum("egcd,edf->egcf", expert_in, self.w_in))   # [E, G, C, f]
        expert_out = torch.einsum("egcf,efd->egcd", h, self.w_out)  # [E, G, C, d]
        return torch.einsum("gsec,egcd->gsd", combine, expert_out)  # [G, S, d]; dropped tokens -> 0


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        dense = cfg.dense_config()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(dense)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.moe = SwitchFFN(cfg)

    def forward(self, x):                                           # [B, T, d]
        x = x + self.attn(self.ln_1(x))
        return x + self.moe(self.ln_2(x))


class SwitchGroup(nn.Module):
    """moe_every - 1 dense blocks then one MoE block: n_layer / moe_every identical groups, so the
    model is a stack of repeated blocks (for pipeline stages and block deduplication)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.dense = nn.Sequential(*[Block(cfg.dense_config()) for _ in range(cfg.moe_every - 1)])
        self.moe = MoEBlock(cfg)

    def forward(self, x):                                           # [B, T, d]
        return self.moe(self.dense(x))


class MoETransformer(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.h = nn.ModuleList(SwitchGroup(cfg) for _ in range(cfg.n_layer // cfg.moe_every))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()                                          # tied, as in GPT-2
        self._init_params()

    def _init_params(self) -> None:
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Make self.lm_head.weight the same Parameter as self.wte.weight.

        `to_empty()` gives each a fresh tensor, breaking the tie; init_weights() re-ties first.
        """
        self.lm_head.weight = self.wte.weight

    def init_weights(self) -> None:
        """(Re)initialise every parameter in place, e.g. after `to_empty()` from meta."""
        self.tie_weights()
        _common.reset_submodules(self)
        self._init_params()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """N(0, 0.02) weights, zero biases (no-op cost on meta); experts init themselves."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx):                                         # idx: [B, T] int64
        pos = torch.arange(idx.size(1), device=idx.device)          # [T]
        x = self.wte(idx) + self.wpe(pos)                           # [B, T, d]
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))                           # [B, T, V] logits


# --- zoo glue -----------------------------------------------------------------------------
def example_inputs(cfg: MoEConfig, batch_size: int, device="cpu", seed: int = 0) -> tuple:
    return (_common.randint(cfg.vocab_size, (batch_size, cfg.block_size), device, seed),)


def make_targets(model: MoETransformer, inputs: tuple, seed: int = 1) -> torch.Tensor:
    (idx,) = inputs
    return _common.randint(model.config.vocab_size, tuple(idx.shape), idx.device, seed)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def build(size: str = "tiny", batch_size: int | None = None, device="cpu"):
    if size not in PRESETS:
        raise KeyError(f"moe: unknown size {size!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[size][0]()
    model = _common.build_on(device, lambda: MoETransformer(cfg))
    bs = batch_size if batch_size is not None else (4 if size == "tiny" else 256)
    return model, example_inputs(cfg, bs, device)


def tiny(batch_size: int = 4, device="cpu"):
    return build("tiny", batch_size, device)


def switch_base_128(batch_size: int = 256, device="meta"):
    return build("switch_base_128", batch_size, device)
