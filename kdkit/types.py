"""The few shapes every strategy speaks: a batch, the student's outputs, a training step's result."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Batch:
    """One training or evaluation batch.

    images: (B, 3, H, W) normalised with the student's mean/std (after Mixup/CutMix when on).
    target: (B,) class indices, or (B, K) soft targets after Mixup/CutMix or label smoothing.
    index: (B,) dataset index of every sample, so a logit source can look samples up.
    epoch: the epoch the batch belongs to (augmentation and cached logits depend on it).
    """

    images: Tensor
    target: Tensor
    index: Tensor
    epoch: int = 0


@dataclass
class StudentOut:
    """What a student head returns.

    logits: (B, K) class-head logits, trained against the labels.
    dist_logits: (B, K) distillation-head logits, trained against the teacher; the same tensor
        as `logits` for the `shared` head.
    features: (B, D) pooled pre-logit features, where the head exposes them (feature distillation).
    tokens: (B, N, D) the ViT's patch tokens (prefix tokens dropped), where the model has them.
    adapted: what a loss's trainable adapters (a feature projection) made of these outputs, by
        name; adapters live in the head (`head.adapters`) so that data parallelism syncs them.
    """

    logits: Tensor
    dist_logits: Tensor
    features: Tensor | None = None
    tokens: Tensor | None = None
    adapted: dict[str, Tensor] = field(default_factory=dict)  # outputs of the head's training adapters

    @property
    def fused(self) -> Tensor:
        """Late fusion as in DeiT: the average of the two heads' logits, (B, K)."""
        return (self.logits + self.dist_logits) / 2


@dataclass
class StepOut:
    """One training step: the loss to back-propagate, the student's outputs and named loss terms."""

    loss: Tensor
    out: StudentOut
    terms: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TeacherOut:
    """The teacher's answer with its features, for losses that match features (`needs_features`).

    logits: (B, K) float32. features: (B, D) pooled pre-logit features. spatial: the unpooled
    features, (B, C, H, W) for a ConvNet, (B, N, D) tokens for a ViT.
    """

    logits: Tensor
    features: Tensor
    spatial: Tensor
