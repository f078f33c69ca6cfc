"""Logit standardisation (Sun et al., CVPR 2024): z-score each sample's logits before the softmax."""

from __future__ import annotations

import torch
from torch import Tensor


def z_score(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """(B, K) -> (B, K): (z - mean(z)) / (std(z) + eps) per sample over the classes (population
    std), in float32 at least."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True, unbiased=False) + eps)
