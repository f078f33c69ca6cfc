"""Logit standardisation (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation").

KD with one temperature for both networks asks the student to match the teacher's logit range as
well as the relations between its logits. The paper standardises each sample's logits before the
temperature softmax, for the student and the teacher alike:

    Z(z) = (z - mean(z)) / (std(z) + eps)       over the K classes of one sample
    KD   = tau^2 * KL(softmax(Z(z_t) / tau) || softmax(Z(z_s) / tau))

which amounts to a per-sample temperature tau * std(z) (the paper's "weighted standard deviation"
temperature) and makes the loss invariant to a shift and a positive scaling of either network's
logits. std is the sample standard deviation (divisor K - 1, torch.std's default, as the reference
code's `normalize` in sunshangquan/logit-standardization-KD), eps = 1e-7 as there, added to std.

tau is then a "base temperature": the reference code's default is 2 (`--base-temp 2`; 3 for some
CIFAR-100 pairs), with the KD term weighted 9 (`--kd-weight 9`, which also multiplies DKD's
alpha and beta) against CE weight 1. Those are the caller's choices; it
composes with any logit loss, e.g. `soft_kd(z_score(s), z_score(t), tau=2.0)` or DKD on z_score'd
logits as the paper does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkit.registry import KdkitError

Z_SCORE_EPS = 1e-7  # the reference code's


def z_score(logits: Tensor, eps: float = Z_SCORE_EPS) -> Tensor:
    """(z - mean(z)) / (std(z) + eps) per sample, over the classes: (B, K) -> (B, K).

    std is the sample standard deviation (divisor K - 1), so each output row has mean 0 and sample
    std std / (std + eps), 1 up to eps. A constant row becomes all zeros (no NaN); near one the
    gradient grows like 1 / (std + eps), the price of ignoring scale. Computed and returned in
    float32 at least (float64 stays float64): bfloat16 has 8 bits of mantissa, too few for a
    mean subtracted from logits of magnitude 10^2.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise KdkitError(f"z_score needs (B, K) logits with K >= 2 classes, got {tuple(logits.shape)}")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as losses/distillation.py's _wide
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)
