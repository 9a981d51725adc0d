"""DLRM: the Deep Learning Recommendation Model.

References:
  Naumov et al. 2019, "Deep Learning Recommendation Model for Personalization and
    Recommendation Systems", Sec. 2-3 and Fig. 1: embedding tables for categorical features,
    a bottom MLP for dense features, pairwise dot-product interaction, a top MLP to a logit.
  facebookresearch/dlrm dlrm_s_pytorch.py (interaction "dot" without self-interaction: the
    strict lower triangle of Z = T T^T, concatenated with the bottom MLP output).
  pytorch/torchrec examples/dlrm (MLPerf Criteo 1TB configuration: 26 tables with the row counts
    below, dim 128, bottom MLP 13-512-256-128, top MLP 1024-1024-512-256-1).

Inputs: `dense` [B, num_dense] float and `sparse` [B, num_tables, lookups] int64: a fixed
number of row indices per table and sample, pooled by sum (what nn.EmbeddingBag(mode="sum")
does, written as nn.Embedding + sum so each table is one plain gather the planner can shard by
rows or columns). The output is one logit per sample, [B]. No parallelism knobs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.models import _common

# Row counts of the 26 Criteo 1TB categorical features, as in torchrec's DLRM example
# (examples/dlrm: TERABYTE_NUM_EMBEDDINGS_PER_FEATURE); 187.8M rows in all.
CRITEO_1TB_TABLE_ROWS = (
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
    2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
)


@dataclass(frozen=True)
class DLRMConfig:
    num_dense: int = 13                               # Criteo's 13 integer features
    table_rows: tuple[int, ...] = (10_000_000,) * 8
    embedding_dim: int = 128
    lookups_per_table: int = 1                        # indices pooled per table and sample
    bottom_mlp: tuple[int, ...] = (512, 256, 128)     # last entry must equal embedding_dim
    top_mlp: tuple[int, ...] = (1024, 1024, 512, 256, 1)

    def __post_init__(self):
        if self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(f"DLRMConfig: bottom_mlp ends in {self.bottom_mlp[-1]} but the dot "
                             f"interaction needs it to equal embedding_dim={self.embedding_dim}")
        if self.top_mlp[-1] != 1:
            raise ValueError(f"DLRMConfig: top_mlp must end in 1 (one logit), got {self.top_mlp}")
        if not self.table_rows:
            raise ValueError("DLRMConfig: needs at least one embedding table")

    @property
    def num_tables(self) -> int:
        return len(self.table_rows)

    @property
    def num_interactions(self) -> int:
        f = self.num_tables + 1                       # tables + the bottom-MLP vector
        return f * (f - 1) // 2

    @classmethod
    def tiny(cls) -> "DLRMConfig":
        return cls(num_dense=4, table_rows=(50, 30, 20), embedding_dim=8, lookups_per_table=2,
                   bottom_mlp=(16, 8), top_mlp=(16, 1))

    @classmethod
    def large(cls) -> "DLRMConfig":
        """8 tables of 10M rows x 128 (10.24B embedding parameters), MLPerf-sized MLPs."""
        return cls(lookups_per_table=4)

    @classmethod
    def criteo_1tb(cls) -> "DLRMConfig":
        return cls(table_rows=CRITEO_1TB_TABLE_ROWS)


def closed_form_params(cfg: DLRMConfig) -> int:
    """Parameter count from the config alone (used by tests to check the module)."""
    emb = sum(cfg.table_rows) * cfg.embedding_dim
    dims = (cfg.num_dense,) + cfg.bottom_mlp
    bottom = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    dims = (cfg.embedding_dim + cfg.num_interactions,) + cfg.top_mlp
    top = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    return emb + bottom + top


PRESETS: dict[str, tuple] = {
    "tiny": (DLRMConfig.tiny, None, None),
    "dlrm_large": (DLRMConfig.large, closed_form_params(DLRMConfig.large()), "closed form"),
    "dlrm_criteo_1tb": (DLRMConfig.criteo_1tb, closed_form_params(DLRMConfig.criteo_1tb()), "closed form"),
}


def mlp(dims: tuple[int, ...], final_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if final_relu or i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(self, cfg: DLRMConfig):
        super().__init__()
        self.config = cfg
        self.bottom = mlp((cfg.num_dense,) + cfg.bottom_mlp, final_relu=True)
        self.tables = nn.ModuleList(nn.Embedding(rows, cfg.embedding_dim) for rows in cfg.table_rows)
        self.top = mlp((cfg.embedding_dim + cfg.num_interactions,) + cfg.top_mlp, final_relu=False)
        f = cfg.num_tables + 1
        li, lj = torch.tril_indices(f, f, offset=-1)               # strict lower triangle
        self.register_buffer("tri_i", li, persistent=False)         # [F(F-1)/2]
        self.register_buffer("tri_j", lj, persistent=False)
        self._init_params()

    def init_weights(self) -> None:
        """(Re)initialise parameters and interaction indices in place, e.g. after `to_empty()`."""
        _common.reset_submodules(self)
        self._init_params()
        self.reset_buffers()

    def _init_params(self) -> None:
        """Tables ~ U(-1/sqrt(rows), 1/sqrt(rows)) as in the DLRM reference; no-op cost on meta."""
        for table in self.tables:
            bound = table.num_embeddings ** -0.5
            nn.init.uniform_(table.weight, -bound, bound)

    def reset_buffers(self) -> None:
        """Recompute the interaction indices, e.g. after `to_empty()` from the meta device."""
        f = self.config.num_tables + 1
        li, lj = torch.tril_indices(f, f, offset=-1, device=self.tri_i.device)
        self.tri_i.copy_(li)
        self.tri_j.copy_(lj)

    def forward(self, dense, sparse):              # dense: [B, num_dense]; sparse: [B, n_tables, L]
        x = self.bottom(dense)                                      # [B, D]
        pooled = [table(sparse[:, i]).sum(1) for i, table in enumerate(self.tables)]  # n x [B, D]
        feats = torch.stack([x] + pooled, dim=1)                    # [B, F, D], F = n_tables + 1
        z = torch.bmm(feats, feats.transpose(1, 2))                 # [B, F, F] pairwise dots
        inter = z[:, self.tri_i, self.tri_j]                        # [B, F(F-1)/2]
        return self.top(torch.cat([x, inter], dim=1)).squeeze(-1)   # [B] logits


# --- zoo glue -----------------------------------------------------------------------------
def example_inputs(cfg: DLRMConfig, batch_size: int, device="cpu", seed: int = 0) -> tuple:
    dense = _common.randn((batch_size, cfg.num_dense), device, seed)
    shape = (batch_size, cfg.num_tables, cfg.lookups_per_table)
    if torch.device(device).type == "meta":
        return dense, torch.zeros(shape, dtype=torch.long, device=device)
    # Uniform row index per table: floor(u * rows_t) < rows_t.
    rows = torch.tensor(cfg.table_rows, dtype=torch.float64)[None, :, None]
    u = _common.rand(shape, "cpu", seed + 1).double()
    sparse = (u * rows).long().clamp_max(rows.long() - 1)
    return dense, sparse.to(device)


def make_targets(model: DLRM, inputs: tuple, seed: int = 1) -> torch.Tensor:
    """Click labels in {0., 1.}, [B]."""
    dense, _ = inputs
    return (_common.rand((dense.shape[0],), dense.device, seed + 100) < 0.5).float()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets)


def build(size: str = "tiny", batch_size: int | None = None, device="cpu"):
    if size not in PRESETS:
        raise KeyError(f"dlrm: unknown size {size!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[size][0]()
    model = _common.build_on(device, lambda: DLRM(cfg))
    bs = batch_size if batch_size is not None else (4 if size == "tiny" else 8192)
    return model, example_inputs(cfg, bs, device)


def tiny(batch_size: int = 4, device="cpu"):
    return build("tiny", batch_size, device)


def dlrm_large(batch_size: int = 8192, device="meta"):
    return build("dlrm_large", batch_size, device)


def dlrm_criteo_1tb(batch_size: int = 8192, device="meta"):
    return build("dlrm_criteo_1tb", batch_size, device)
