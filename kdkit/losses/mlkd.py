"""Multi-level logit distillation (Jin et al., CVPR 2023, "Multi-Level Logit Distillation").

The student matches the teacher at three levels, each at several temperatures (the paper's
"prediction augmentation"). With P^T = softmax(Z / T) of student and teacher, (B, C):

    instance = sum_T T^2 * (1/B) sum_i KL(P_t^T[i] || P_s^T[i])      each sample's class distribution
    batch    = sum_T ||P_t^T P_t^T' - P_s^T P_s^T'||_F^2 / B           (B, B): how samples relate
    class    = sum_T ||P_t^T' P_t^T - P_s^T' P_s^T||_F^2 / C           (C, C): how classes co-occur
    MLKD     = instance_weight * instance + batch_weight * batch + class_weight * class

as the reference code computes them (Jin-Ying/Multi-Level-Logit-Distillation,
mdistiller/distillers/KD_ours.py: `kd_loss`, `bc_loss`, `cc_loss`; temperatures {T, 2, 3, 5, 6}
with T = 4 on CIFAR-100, the default here, and T = 1 on ImageNet: pass (1, 2, 3, 5, 6); CE and KD
weight 0.5 each on ImageNet).

Why MLKD as kdkit's batch-relational loss (rather than SKD, CVPR 2026): its authors' code is
public, so the formula is tested against it; it is a pure logit loss (no extra state, no second
forward), so it runs from a cache exactly as from a live teacher.

What is implemented: the single-view loss above. Not implemented: the reference's second, strongly
augmented view (RandAugment; kdkit trains on one view per sample: choose the augmentation with
the aug settings), and its confidence masks, which there multiply an already batch-averaged
scalar (`kd_loss(...) * mask`, reduce=True) and so act as a constant factor, the fraction of
samples (or classes) at or below the median confidence, about 1/2: fold it into kd_weight.

The batch term relates the samples of one batch: no per-sample decomposition; it changes with the
batch size (`per_sample = False`, like DIST's intra term). `MultiLevelLoss` (registered as "mlkd").
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdkit.losses.distillation import LOSSES, DistillationLoss, _wide
from kdkit.registry import KdkitError

TEMPERATURES = (2.0, 3.0, 4.0, 5.0, 6.0)  # the reference code's CIFAR-100 set


def mlkd_terms(student: Tensor, teacher: Tensor,
               temperatures: tuple[float, ...] = TEMPERATURES) -> tuple[Tensor, Tensor, Tensor]:
    """(instance, batch, class), three scalars, each summed over `temperatures` (module docstring).
    student, teacher: (B, C) logits of any float dtype; float32 at least (float64 stays float64)."""
    if student.ndim != 2 or student.shape != teacher.shape:
        raise KdkitError(f"MLKD needs student and teacher logits of one shape (B, C), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if not temperatures or not all(t > 0 for t in temperatures):
        raise KdkitError(f"MLKD needs one or more temperatures > 0, got {temperatures}")
    student, teacher = _wide(student, teacher)
    b, c = student.shape
    instance = batch = klass = student.new_zeros(())
    for tau in temperatures:
        log_s, log_t = F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1)
        kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / b
        p_s, p_t = log_s.exp(), log_t.exp()
        instance = instance + tau * tau * kl
        batch = batch + (p_t @ p_t.T - p_s @ p_s.T).square().sum() / b
        klass = klass + (p_t.T @ p_t - p_s.T @ p_s).square().sum() / c
    return instance, batch, klass


@LOSSES.register("mlkd")
class MultiLevelLoss(DistillationLoss):
    """task_weight * CE(psi(Zs), y) + kd_weight * MLKD on the distillation head (module docstring;
    Jin et al., CVPR 2023). temperatures: the set T runs over, default (2, 3, 4, 5, 6), the
    reference's CIFAR-100 one; a term of the whole batch (needs no label)."""

    per_sample = False

    def __init__(self, temperatures: tuple[float, ...] | list[float] = TEMPERATURES, instance_weight: float = 1.0,
                 batch_weight: float = 1.0, class_weight: float = 1.0, task_weight: float = 0.5,
                 kd_weight: float = 0.5, label_smoothing: float = 0.0, standardize: bool = False):
        super().__init__(task_weight, kd_weight, label_smoothing, standardize)
        if min(instance_weight, batch_weight, class_weight) < 0:
            raise KdkitError("mlkd instance_weight, batch_weight and class_weight must be >= 0")
        if not temperatures or not all(isinstance(t, int | float) and t > 0 for t in temperatures):
            raise KdkitError(f"mlkd temperatures must be a list of numbers > 0, got {temperatures!r}")
        self.temperatures = tuple(float(t) for t in temperatures)
        self.instance_weight, self.batch_weight, self.class_weight = (float(instance_weight), float(batch_weight),
                                                                      float(class_weight))

    def distill(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        instance, batch, klass = mlkd_terms(student, teacher, self.temperatures)
        return self.instance_weight * instance + self.batch_weight * batch + self.class_weight * klass

    def conventions(self) -> dict:
        return {**super().conventions(), "temperatures": list(self.temperatures)}
