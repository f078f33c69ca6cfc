"""Semi-supervised distillation: labeled and unlabeled samples share a batch, and per-sample masks
keep every term an average over the samples it applies to, whatever the mix.

The teacher labels the images nobody labeled: unlabeled samples get a distillation term only, as
soft KL·τ² or the teacher's hard label ("pseudo-label"), optionally only where the teacher is
confident (FixMatch's threshold, Sohn et al., 2020, on the teacher's answer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkit.losses.distillation import LOSSES, DistillationLoss, has_label, task_ce
from kdkit.registry import KdkitError
from kdkit.types import StudentOut

PSEUDO_LABELS = ("auto", "soft", "hard")  # auto: the run's own distillation loss


def check_threshold(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise KdkitError(f"confidence_threshold must be in [0, 1], got {value}")
    return float(value)


class SemiSupervisedLoss(DistillationLoss):
    """A distillation loss over labeled and unlabeled samples, with ψ the softmax:

        loss = task_weight * (1/|L|) Σ_{i∈L} CE(ψ(Zs_i), y_i)
             + kd_weight * (Σ_{i∈L} KD_i + Σ_{j∈U'} PL_j) / (|L| + |U'|)

    L: labeled samples; U: unlabeled ones (target -1, or an all-zero soft row); U' ⊆ U: those where
    the teacher's confidence max_k ψ(Zt_j)_k (at τ = 1) is at least `confidence_threshold` T (T
    applies to unlabeled samples only). KD_i is `loss`'s per-sample distillation term (soft τ²·KL or
    hard CE, with its reduction); PL_j is `pseudo`'s (default: `loss` itself). Both read the
    distillation head, the label term the class head: on unlabeled samples only the distillation
    head learns (with the `shared` head, the one head). An average over no sample is 0. A loss of
    the whole batch (DIST, MLKD) has no KD_i: its kd is its value over L ∪ U' (over L and over U'
    apart, weighted by their sizes, when `pseudo` is another loss).

    Args:
        loss: the run's DistillationLoss (soft or hard); its task_weight, kd_weight and label
            smoothing are used.
        pseudo: the loss whose per-sample term the unlabeled samples get (None: `loss`).
        confidence_threshold: T in [0, 1]; 0 keeps every unlabeled sample.

    Terms: loss, task, kd (the average above), kd_labeled (mean KD over L), kd_unlabeled (mean PL
    over U'), unlabeled_kept (|U'| / |U|; 0 when the batch has no unlabeled sample).
    """

    def __init__(self, loss: DistillationLoss, pseudo: DistillationLoss | None = None,
                 confidence_threshold: float = 0.0):
        super().__init__(loss.task_weight, loss.kd_weight, loss.label_smoothing)
        if loss.needs_features:
            raise KdkitError(f"loss {loss.name!r} needs labeled batches of the teacher's features; unlabeled "
                             f"images (data.unlabeled) work with the logit losses")
        if loss.needs_epoch:
            raise KdkitError(f"loss {loss.name!r} learns from whole labeled steps (a curriculum over epochs); "
                             f"unlabeled images (data.unlabeled) work with soft, hard, dkd, dist, mlkd")
        if not loss.needs_teacher:
            raise KdkitError(f"unlabeled images need a distillation loss (soft or hard), not {loss.name!r}")
        self.base, self.pseudo = loss, pseudo if pseudo is not None else loss
        self.confidence_threshold = check_threshold(confidence_threshold)

    def forward(self, out: StudentOut, teacher_logits: Tensor | None, target: Tensor) -> dict[str, Tensor]:
        if teacher_logits is None:
            raise KdkitError(f"{type(self).__name__} needs teacher logits; give it a teacher or a cache")
        labeled = has_label(target)
        unlabeled = ~labeled
        confident = teacher_logits.float().softmax(dim=1).amax(dim=1) >= self.confidence_threshold
        kept = unlabeled & confident
        task = task_ce(out.logits, target, self.label_smoothing)
        # every sample's term under both kinds, then masked: no data-dependent shapes (no device sync)
        kd_l = self._per_sample(self.base, out.dist_logits, teacher_logits, target, labeled)
        kd_u = self._per_sample(self.pseudo, out.dist_logits, teacher_logits, target, kept)
        n_l, n_u, n_kept = labeled.sum(), unlabeled.sum(), kept.sum()
        kd = (kd_l.sum() + kd_u.sum()) / (n_l + n_kept).clamp_min(1)
        if not self.base.per_sample and self.pseudo is self.base:
            # a term of the whole batch (DIST, MLKD): one relation over every sample that counts
            counted = labeled | kept
            kd = self._per_sample(self.base, out.dist_logits, teacher_logits, target, counted).sum() / \
                counted.sum().clamp_min(1)
        loss = self.task_weight * task + self.kd_weight * kd
        return {"loss": loss, "task": task.detach(), "kd": kd.detach(),
                "kd_labeled": (kd_l.sum() / n_l.clamp_min(1)).detach(),
                "kd_unlabeled": (kd_u.sum() / n_kept.clamp_min(1)).detach(),
                "unlabeled_kept": n_kept.float() / n_u.clamp_min(1)}

    @staticmethod
    def _per_sample(loss: DistillationLoss, student: Tensor, teacher: Tensor, target: Tensor,
                    mask: Tensor) -> Tensor:
        """(B,) `loss`'s term of each sample, zero outside `mask`. A loss of the whole batch (DIST,
        MLKD) is computed over the masked samples and each of them carries its value, so that their
        mean is its value."""
        if loss.per_sample:
            return loss.kd_per_sample(student, teacher, target) * mask
        n = mask.sum()
        if not n:
            return student.new_zeros(student.shape[0], dtype=torch.float32)
        return loss.kd_term(student[mask], teacher[mask], target[mask]) * mask

    @property
    def name(self) -> str:
        return self.base.name

    def conventions(self) -> dict[str, float | str]:
        own = {} if self.pseudo is self.base else {  # the pseudo-label loss's settings, when it differs
            f"pseudo_{k}": v for k, v in self.pseudo.conventions().items() if k in ("tau", "kl_reduction",
                                                                                 "hard_smoothing")}
        return {**self.base.conventions(), "pseudo_label": self.pseudo.name,
                "confidence_threshold": self.confidence_threshold, **own}


def semi_supervised(loss: DistillationLoss, pseudo_label: str = "auto", confidence_threshold: float = 0.0,
                    **settings: object) -> SemiSupervisedLoss:
    """Wrap `loss` for labeled + unlabeled batches. pseudo_label: "auto" (the same loss), "soft" or
    "hard"; the shared `settings` (tau, kl_reduction, hard_smoothing, ...) that the pseudo-label
    loss's constructor names build it."""
    if pseudo_label not in PSEUDO_LABELS:
        raise KdkitError(f"pseudo_label must be one of {PSEUDO_LABELS}, got {pseudo_label!r}")
    pseudo = None if pseudo_label in ("auto", loss.name) else LOSSES.create(pseudo_label, None, **settings)
    return SemiSupervisedLoss(loss, pseudo, confidence_threshold)
