"""The losses of DeiT (Touvron et al., 2021, section 4), each one small class.

Contract: a loss maps (student outputs, teacher logits, target) to a dict of named terms; the
total to back-propagate is under "loss". The task term reads the class head (`out.logits`), the
distillation term reads the distillation head (`out.dist_logits`): with the `token` head this is
the paper's distillation-token loss, with the `shared` head both terms read one head.

Targets: (B,) class indices, -1 where a sample has no label (its task term is masked out), or
(B, K) probabilities (Mixup/CutMix, already label-smoothed by timm's Mixup).

A new loss is a subclass and one registry line: implement `distill(student, teacher, target)`,
the distillation term of every sample, (B,) (or, with `per_sample = False`, one batch-level
scalar); keep each constructor argument as an attribute of the same name (they are the loss's
recorded conventions). See docs/concepts.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.losses.standardize import z_score
from kdkit.registry import KdkitError, Registry, parameters
from kdkit.types import StudentOut

LOSSES: Registry[type[DistillationLoss]] = Registry("loss")

KL_REDUCTIONS = ("batchmean", "deit")


def _wide(student: Tensor, *others: Tensor) -> list[Tensor]:
    """`student` and `others` in float32 at least (float64 stays float64): float16/bfloat16 sums
    of extreme logits overflow or lose the loss."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    return [x.to(dtype) for x in (student, *others)]


def task_ce(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against labels, averaged over the samples that have one.

    logits: (B, K). target: (B,) indices with -1 for "no label", or (B, K) probabilities with an
    all-zero row for "no label". Returns a scalar (float32 at least); 0 when no sample in the batch has a label.
    Computed in float32: float16/bfloat16 logits of magnitude 1e4 would overflow the sum.
    """
    (logits,) = _wide(logits)
    if target.ndim == 1:
        labeled = target >= 0
        if not labeled.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits[labeled], target[labeled], label_smoothing=label_smoothing)
    labeled = target.sum(dim=1) > 0
    if not labeled.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labeled], target[labeled], label_smoothing=label_smoothing)


def soft_kd(student: Tensor, teacher: Tensor, tau: float, reduction: str = "batchmean") -> Tensor:
    """tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)), both (B, K).

    reduction: "batchmean" divides the summed KL by B (the mathematically correct mean of the
    per-sample KL, as in Hinton et al.); "deit" divides by B*K, as the DeiT reference code does
    (its soft loss is therefore K times smaller for the same tau and weight). Computed in float32
    (the KL summed over a batch of extreme float16 logits overflows float16's 65504).
    """
    student, teacher = _wide(student, teacher)
    kl = F.kl_div(
        F.log_softmax(student / tau, dim=1),
        F.log_softmax(teacher / tau, dim=1),
        reduction="sum",
        log_target=True,
    )
    denom = student.shape[0] if reduction == "batchmean" else student.numel()
    return kl * (tau * tau) / denom


def hard_kd(student: Tensor, teacher: Tensor, smoothing: float = 0.0) -> Tensor:
    """CE(student, argmax teacher), both (B, K).

    With smoothing eps the teacher's label gets 1 - eps and every other class eps / (K - 1)
    (DeiT section 4, "label smoothing with hard distillation"); this differs from torch's
    label_smoothing, which also gives eps / K to the true class. Computed in float32.
    """
    (student,) = _wide(student)
    y_t = teacher.argmax(dim=1)
    if smoothing == 0.0:
        return F.cross_entropy(student, y_t)
    k = student.shape[1]
    q = torch.full_like(student, smoothing / (k - 1))
    q.scatter_(1, y_t[:, None], 1.0 - smoothing)
    return -(q * F.log_softmax(student, dim=1)).sum(dim=1).mean()


def soft_kd_per_sample(student: Tensor, teacher: Tensor, tau: float, reduction: str = "batchmean") -> Tensor:
    """Per-sample soft_kd, (B,): tau^2 * KL(softmax(teacher_i/tau) || softmax(student_i/tau)), divided by K
    under the "deit" reduction; its mean over the batch is soft_kd. Computed in float32 at least."""
    student, teacher = _wide(student, teacher)
    kl = F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1), reduction="none",
                  log_target=True).sum(dim=1)
    return kl * (tau * tau) / (1 if reduction == "batchmean" else student.shape[1])


def hard_kd_per_sample(student: Tensor, teacher: Tensor, smoothing: float = 0.0) -> Tensor:
    """Per-sample hard_kd, (B,): CE(student_i, argmax teacher_i), the teacher's label smoothed by
    `smoothing` as in hard_kd; its mean over the batch is hard_kd. Computed in float32 at least."""
    (student,) = _wide(student)
    y_t = teacher.argmax(dim=1)
    if smoothing == 0.0:
        return F.cross_entropy(student, y_t, reduction="none")
    q = torch.full_like(student, smoothing / (student.shape[1] - 1))
    q.scatter_(1, y_t[:, None], 1.0 - smoothing)
    return -(q * F.log_softmax(student, dim=1)).sum(dim=1)


def _check_weight(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise KdkitError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_loss_settings(task_weight: float = 0.5, kd_weight: float = 0.5, tau: float = 1.0,
                        kl_reduction: str = "batchmean", hard_smoothing: float = 0.0,
                        label_smoothing: float = 0.0) -> None:
    """Raise KdkitError for a shared distillation setting out of range, whichever loss will use it."""
    _check_weight("task_weight", task_weight)
    _check_weight("kd_weight", kd_weight)
    if not tau > 0:
        raise KdkitError(f"tau must be > 0, got {tau}")
    if kl_reduction not in KL_REDUCTIONS:
        raise KdkitError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
    for name, value in (("hard_smoothing", hard_smoothing), ("label_smoothing", label_smoothing)):
        if not 0.0 <= value < 1.0:
            raise KdkitError(f"{name} must be in [0, 1), got {value}")


def has_label(target: Tensor) -> Tensor:
    """(B,) bool: which samples carry a label. target: (B,) indices (-1: none) or (B, K) soft rows
    (all zero: none, as Mixup/CutMix leaves an unlabeled sample)."""
    return target >= 0 if target.ndim == 1 else target.sum(dim=1) > 0


def gt_index(target: Tensor, teacher: Tensor) -> Tensor:
    """(B,) the ground-truth class of every sample for losses that need one (DKD): the label; the
    argmax of a soft (Mixup/CutMix) row; the teacher's argmax where a sample has no label."""
    label = target if target.ndim == 1 else target.argmax(dim=1)
    return torch.where(has_label(target), label, teacher.argmax(dim=1))


class DistillationLoss(nn.Module):
    """Base: task_weight * CE(class head, y) + kd_weight * KD(distillation head, teacher).

    Args:
        task_weight: weight of the label term, in [0, 1] (the paper's 1 - lambda).
        kd_weight: weight of the teacher term, in [0, 1] (the paper's lambda, the DeiT code's alpha).
        label_smoothing: smoothing of the labels in the task term (0 when Mixup smooths them).
        standardize: z-score student and teacher logits per sample before the distillation term
            (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation"; kdkit/losses/standardize.py).

    Subclasses implement `distill(student, teacher, target)`: (B,) per-sample terms, or a scalar
    when `per_sample` is False (a term of the whole batch, such as DIST's intra-class relation).
    """

    needs_teacher = True
    needs_features = False  # the teacher's features too (a TeacherOut instead of its logits)
    needs_epoch = False  # forward(out, teacher, target, epoch=batch.epoch): a curriculum over epochs (ctkd)
    per_sample = True

    def __init__(self, task_weight: float = 0.5, kd_weight: float = 0.5, label_smoothing: float = 0.0,
                 standardize: bool = False):
        super().__init__()
        check_loss_settings(task_weight=task_weight, kd_weight=kd_weight, label_smoothing=label_smoothing)
        self.task_weight, self.kd_weight = float(task_weight), float(kd_weight)
        self.label_smoothing = label_smoothing
        self.standardize = bool(standardize)

    @property
    def name(self) -> str:
        try:
            return LOSSES.name_of(self)
        except KeyError:
            return type(self).__name__

    def distill(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def student_adapters(self) -> dict[str, nn.Module]:
        """Trainable modules the loss needs on the student's side (a feature projection), attached to
        the student's head by name before the optimizer is built; {} for logit losses."""
        return {}

    def _inputs(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        return (z_score(student), z_score(teacher)) if self.standardize else (student, teacher)

    def kd_per_sample(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        """The distillation term of every sample, (B,); its batch mean is kd_term."""
        if not self.per_sample:
            raise KdkitError(f"loss {self.name!r} is a term of the whole batch, not of each sample")
        return self.distill(*self._inputs(student, teacher), target)

    def kd_term(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        """The batch's distillation term, a scalar (float32 at least)."""
        if not self.per_sample:
            return self.distill(*self._inputs(student, teacher), target)
        return self.kd_per_sample(student, teacher, target).mean()

    def forward(self, out: StudentOut, teacher_logits: Tensor | None, target: Tensor) -> dict[str, Tensor]:
        task = task_ce(out.logits, target, self.label_smoothing)
        if teacher_logits is None:
            raise KdkitError(f"{type(self).__name__} needs teacher logits; give it a teacher or a cache")
        kd = self.kd_term(out.dist_logits, teacher_logits, target)  # float32 at least inside
        loss = self.task_weight * task + self.kd_weight * kd
        return {"loss": loss, "task": task.detach(), "kd": kd.detach()}

    def conventions(self) -> dict[str, float | str | bool]:
        """The settings that define the loss (its constructor's arguments), stored with every run and checkpoint."""
        own = {n: getattr(self, n) for n in parameters(type(self)) if isinstance(getattr(self, n, None),
                                                                               bool | int | float | str)}
        if not own.get("standardize", True):
            del own["standardize"]  # recorded when on only: a run without it reads as runs always have
        return {"loss": self.name, **own}


@LOSSES.register("none")
class TaskLoss(DistillationLoss):
    """No distillation: CE(class head, y) with label smoothing; the distillation head, if any,
    is trained on the labels too so that its metrics stay meaningful."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__(task_weight=1.0, kd_weight=0.0, label_smoothing=label_smoothing)

    def forward(self, out: StudentOut, teacher_logits: Tensor | None, target: Tensor) -> dict[str, Tensor]:
        task = task_ce(out.logits, target, self.label_smoothing)
        loss = task
        if out.dist_logits is not out.logits:
            loss = (task + task_ce(out.dist_logits, target, self.label_smoothing)) / 2
        return {"loss": loss, "task": task.detach()}

    def conventions(self) -> dict[str, float | str | bool]:
        return {"loss": self.name, "task_weight": 1.0, "kd_weight": 0.0, "label_smoothing": self.label_smoothing}


@LOSSES.register("soft")
class SoftDistillationLoss(DistillationLoss):
    """Soft distillation (Hinton et al., 2015; DeiT eq. 2):

        task_weight * CE(psi(Zs), y) + kd_weight * tau^2 * KL(psi(Zt / tau) || psi(Zs / tau))

    KL reduction "batchmean" (sum / B, default) or "deit" (sum / (B * K), the reference code's).
    The paper's soft setting is tau = 3, kd_weight = 0.1, task_weight = 0.9.
    """

    def __init__(self, task_weight: float = 0.5, kd_weight: float = 0.5, tau: float = 1.0,
                 kl_reduction: str = "batchmean", label_smoothing: float = 0.0, standardize: bool = False):
        super().__init__(task_weight, kd_weight, label_smoothing, standardize)
        check_loss_settings(tau=tau, kl_reduction=kl_reduction)
        self.tau = float(tau)
        self.kl_reduction = kl_reduction

    def distill(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        return soft_kd_per_sample(student, teacher, self.tau, self.kl_reduction)

    def kd_term(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        # the batch form sums once: the same value as the mean of the per-sample terms, one reduction fewer
        return soft_kd(*self._inputs(student, teacher), self.tau, self.kl_reduction)


@LOSSES.register("hard")
class HardDistillationLoss(DistillationLoss):
    """Hard-label distillation (DeiT eq. 3): task_weight * CE(psi(Zs), y) + kd_weight * CE(psi(Zs), y_t)
    with y_t = argmax Zt; the paper uses 1/2 and 1/2. `hard_smoothing` eps smooths y_t
    (1 - eps on the teacher's class, eps / (K - 1) elsewhere)."""

    def __init__(self, task_weight: float = 0.5, kd_weight: float = 0.5, hard_smoothing: float = 0.0,
                 label_smoothing: float = 0.0, standardize: bool = False):
        super().__init__(task_weight, kd_weight, label_smoothing, standardize)
        check_loss_settings(hard_smoothing=hard_smoothing)
        self.hard_smoothing = float(hard_smoothing)

    def distill(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        return hard_kd_per_sample(student, teacher, self.hard_smoothing)

    def kd_term(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        return hard_kd(*self._inputs(student, teacher), self.hard_smoothing)


def create_loss(name: str, **settings: object) -> DistillationLoss:
    """Build a loss by registry name (`LOSSES.names()`); every setting must be one of its
    constructor's arguments (an unknown one is an error naming the closest)."""
    return LOSSES.create(name, settings)
