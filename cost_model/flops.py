"""Closed-form training FLOPs of a GPT, to check the graph-derived counts against.

Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", sec. 5.1 / appendix: per transformer layer the forward pass costs
``24 B s h^2 + 4 B s^2 h`` FLOPs, and the logit layer ``2 B s h V``. Backward is 2x
forward; full activation recomputation adds one more forward of every layer (not of the
logit layer). Hence

    with recompute:    96 B s l h^2 (1 + s/(6h) + V/(16 l h))      (the paper's eq. 3)
    without:           72 B s l h^2 (1 + s/(6h) + V/(12 l h))

(without recompute the logit term keeps its 3x: 6 B s h V = 72 B s l h^2 * V/(12 l h)).
"""
from __future__ import annotations


def gpt_train_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int,
                    recompute: bool = True) -> float:
    """FLOPs of one training step (forward + backward [+ recompute]) of a GPT."""
    for name, v in (("batch", batch), ("seq", seq), ("layers", layers), ("hidden", hidden), ("vocab", vocab)):
        if v < 1:
            raise ValueError(f"gpt_train_flops: {name} must be >= 1, got {v}")
    B, s, l, h, V = batch, seq, layers, hidden, vocab
    if recompute:
        return 96.0 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return 72.0 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))


def gpt_forward_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Forward FLOPs: layers (24Bsh^2 + 4Bs^2h each) plus the logit layer 2BshV."""
    B, s, l, h, V = batch, seq, layers, hidden, vocab
    return l * (24.0 * B * s * h * h + 4.0 * B * s * s * h) + 2.0 * B * s * h * V


def gpt_params(layers: int, hidden: int, vocab: int, seq: int = 0) -> int:
    """Parameter count, Narayanan et al. eq. 2: 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h))."""
    l, h = layers, hidden
    return 12 * l * h * h + 13 * l * h + (vocab + seq) * h
