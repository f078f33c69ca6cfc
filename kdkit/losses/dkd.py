"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation").

The classical KD loss splits into a target-class term and a non-target-class term; DKD weights the
two independently. With p = softmax(z / tau) over K classes and t the sample's gt class:

    b     = [p_t, 1 - p_t]                           binary: the gt class against all the others
    p_hat = softmax of the K - 1 logits other than t  (= p_j / (1 - p_t), j != t)
    TCKD  = KL(b^T || b^S)          NCKD = KL(p_hat^T || p_hat^S)
    DKD   = tau^2 * (alpha * TCKD + beta * NCKD)

KD itself is TCKD + (1 - p_t^T) * NCKD (the paper's reformulation of KD): DKD drops the
(1 - p_t^T) factor that suppresses NCKD on samples the teacher is sure of. The tau^2 factor is the
reference code's (megvii-research/mdistiller, `dkd_loss`), applied to both terms. The defaults
here are that code's CIFAR-100 ones (alpha 1, beta 8, tau 4; beta 2 or 6 for some pairs); its
ImageNet config uses alpha 1, beta 0.5, tau 1.

`DecoupledKDLoss` (registered as "dkd") is the loss built on these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.losses.distillation import LOSSES, DistillationLoss, _wide, check_loss_settings, gt_index
from kdkit.registry import KdkitError


def _check(student: Tensor, teacher: Tensor, target: Tensor, tau: float) -> None:
    if not tau > 0:
        raise KdkitError(f"tau must be > 0, got {tau}")
    if student.ndim != 2 or student.shape != teacher.shape:
        raise KdkitError(f"DKD needs student and teacher logits of one shape (B, K), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[1] < 2:
        raise KdkitError(f"DKD needs at least 2 classes (it splits the gt class from the others), "
                         f"got {student.shape[1]}")
    if target.ndim != 1 or target.shape[0] != student.shape[0] or target.is_floating_point():
        raise KdkitError(f"DKD needs one gt class index per sample, a ({student.shape[0]},) integer "
                         f"tensor, got {tuple(target.shape)} {target.dtype}; for Mixup/CutMix soft "
                         f"rows pass target.argmax(dim=1)")
    if ((target < 0) | (target >= student.shape[1])).any():
        raise KdkitError(f"DKD needs a gt class in [0, {student.shape[1]}) for every sample; for "
                         f"unlabeled samples (-1) pass the teacher's argmax instead")


def dkd_terms(student: Tensor, teacher: Tensor, target: Tensor, tau: float = 4.0) -> tuple[Tensor, Tensor]:
    """The two DKD terms of every sample, each already multiplied by tau^2: (tckd, nckd), both (B,).

    student, teacher: (B, K) logits. target: (B,) integer gt class of each sample (see
    `dkd_per_sample`). TCKD = tau^2 * KL(b^T || b^S) over [p_gt, 1 - p_gt]; NCKD = tau^2 *
    KL(p_hat^T || p_hat^S) over the K - 1 other classes renormalised. Computed in float32 at least
    (float64 stays float64), entirely in the log domain: log(1 - p_gt) is the logsumexp of the
    other classes' logits less that of all, finite however close p_gt is to 1, where the
    reference code's log of 1 - p_gt computed from probabilities is log(0) = -inf in float32.
    """
    _check(student, teacher, target, tau)
    student, teacher = _wide(student, teacher)
    idx = target.long()[:, None]
    gt = torch.zeros_like(student, dtype=torch.bool).scatter_(1, idx, True)  # (B, K)
    s, t = student / tau, teacher / tau

    # The gt logit at -inf: a softmax over the other K - 1 classes, exactly (the reference code's
    # z / tau - 1000 leaks mass once the gt logit leads by nearly 1000 * tau, and a division by
    # 1 - p_gt fails as p_gt reaches 1 in float32). Everything below stays in logs:
    # log p_gt = z_gt - lse(z), log(1 - p_gt) = lse(z without gt) - lse(z), finite however close
    # p_gt is to 1, and log p_hat_j = z_j - lse(z without gt).
    s_rest, t_rest = s.masked_fill(gt, -torch.inf), t.masked_fill(gt, -torch.inf)
    lse_s, lse_t = torch.logsumexp(s, 1, keepdim=True), torch.logsumexp(t, 1, keepdim=True)
    rest_s, rest_t = torch.logsumexp(s_rest, 1, keepdim=True), torch.logsumexp(t_rest, 1, keepdim=True)
    log_b_s = torch.cat([s.gather(1, idx) - lse_s, rest_s - lse_s], dim=1)
    log_b_t = torch.cat([t.gather(1, idx) - lse_t, rest_t - lse_t], dim=1)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="none", log_target=True).sum(dim=1)

    # The gt entries are -inf on both sides, NaN inside the KL: set to 0 first, so with weight
    # exp(-inf) = 0 they contribute exactly nothing, in value and gradient.
    lhat_s = (s_rest - rest_s).masked_fill(gt, 0.0)
    lhat_t = (t_rest - rest_t).masked_fill(gt, 0.0)
    p_hat_t = lhat_t.exp().masked_fill(gt, 0.0)
    nckd = (p_hat_t * (lhat_t - lhat_s)).sum(dim=1)
    return tckd * (tau * tau), nckd * (tau * tau)


def dkd_per_sample(student: Tensor, teacher: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0,
                   tau: float = 4.0) -> Tensor:
    """Per-sample DKD, (B,): tau^2 * (alpha * TCKD + beta * NCKD); its batch mean is `dkd`.

    student, teacher: (B, K) logits of any float dtype; the result is float32 at least (float64
    stays float64). target: (B,) integer class indices, the gt class that DKD decouples. The
    function takes whatever gt index it is given and checks only that it lies in [0, K):

    - Mixup/CutMix soft rows (B, K): pass `target.argmax(dim=1)`, the class with the larger mixing
      weight (DKD has no soft-target form: the binary split needs one class).
    - unlabeled samples (-1, or an all-zero soft row, whose argmax would silently be class 0): the
      caller passes the teacher's argmax, `teacher.argmax(dim=1)`, for those rows.

    Defaults alpha=1, beta=8, tau=4 are the paper's CIFAR-100 settings. Warm-up is the caller's
    choice: the paper's code multiplies the whole DKD loss by min(epoch / 20, 1), epochs counted
    from 1, a linear ramp over the first 20 epochs on CIFAR-100 (its ImageNet config sets the
    ramp to 1 epoch, i.e. none).
    """
    tckd, nckd = dkd_terms(student, teacher, target, tau)
    return alpha * tckd + beta * nckd


def dkd(student: Tensor, teacher: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0,
        tau: float = 4.0) -> Tensor:
    """DKD averaged over the batch, a scalar: the mean of `dkd_per_sample` (same arguments), which
    is the reference code's sum over the batch divided by B."""
    return dkd_per_sample(student, teacher, target, alpha, beta, tau).mean()


@LOSSES.register("dkd")
class DecoupledKDLoss(DistillationLoss):
    """task_weight * CE(psi(Zs), y) + kd_weight * tau^2 * (alpha * TCKD + beta * NCKD), on the
    distillation head (module docstring; Zhao et al., CVPR 2022). The paper's CIFAR-100 setting is
    task_weight = kd_weight = 1, alpha = 1, beta = 8, tau = 4 (loss.tau is shared with the other
    losses: set it). The gt class is the label, the argmax of a Mixup/CutMix row, or the teacher's
    argmax for an unlabeled sample (losses/distillation.py `gt_index`). The paper ramps the DKD term
    in over 20 epochs; here it is on from the start (a schedule is the caller's choice).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, task_weight: float = 0.5, kd_weight: float = 0.5,
                 tau: float = 1.0, label_smoothing: float = 0.0, standardize: bool = False):
        super().__init__(task_weight, kd_weight, label_smoothing, standardize)
        if alpha < 0 or beta < 0:
            raise KdkitError(f"dkd alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        check_loss_settings(tau=tau)
        self.alpha, self.beta, self.tau = float(alpha), float(beta), float(tau)

    def distill(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        return dkd_per_sample(student, teacher, gt_index(target, teacher), self.alpha, self.beta, self.tau)
