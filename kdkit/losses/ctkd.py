"""Curriculum Temperature KD (Li et al., AAAI 2023, "Curriculum Temperature for Knowledge Distillation").

KD's temperature becomes a learnable parameter that plays against the student: the student
minimises the KD loss, the temperature maximises it (the hardest temperature for the student),
through a gradient reversal layer whose strength lambda grows over the first epochs (the
curriculum: easy first, harder later). With the paper's default global temperature (one scalar):

    theta                                     a learnable scalar, 1 at the start
    T        = tau_min + tau_range * sigmoid(GRL_lambda(theta))     in (tau_min, tau_min + tau_range)
    GRL      identity forward; backward, the gradient times -lambda
    KD       = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))       (batchmean, as soft_kd)
    lambda_e = lambda_min + (lambda_max - lambda_min) * (1 - cos(pi * min(e, E) / E)) / 2

e is the epoch counted from 1 (kdkit's epoch + 1, as the reference code's loop), E =
`lambda_epochs`. Reference code: zhengli97/CTKD (models/temp_global.py `Global_T`, the loop's
`temp = t_start + t_end * sigmoid(temp)`, train_student.py `CosineDecay(max 0, min -1)`, whose
negative value multiplies the gradient: that is -lambda_e here). Its settings, the defaults here:
tau_min 1 (`--t_start`), tau_range 20 (`--t_end`), so T starts at 1 + 20 * sigmoid(1) = 15.6;
lambda 0 -> 1 over 10 epochs on CIFAR-100 (5 on ImageNet, `--decay_loops`); CE weight 0.1 and KD
weight 0.9 on CIFAR-100, 1 and 1 on ImageNet.

theta lives in the student's head as an adapter (`student_adapters`), so the optimizer trains it
(timm puts a 1-D parameter in the no-weight-decay group; the reference code's SGD decays it),
data parallelism syncs it and checkpoints save and resume it; it is not part of the saved student.
`CurriculumTemperatureLoss` (registered as "ctkd") is the loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdkit.losses.distillation import LOSSES, DistillationLoss, check_loss_settings, soft_kd, task_ce
from kdkit.registry import KdkitError
from kdkit.types import StudentOut

ADAPTER = "ctkd_temperature"


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * -ctx.strength, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    """The gradient reversal layer (Ganin & Lempitsky, 2015): x forward, -strength * gradient backward."""
    return _ReverseGradient.apply(x, float(strength))


def curriculum_lambda(epoch: int, lambda_epochs: int = 10, lambda_max: float = 1.0, lambda_min: float = 0.0) -> float:
    """lambda of the epoch (0-based, kdkit's): the cosine ramp from lambda_min to lambda_max over
    `lambda_epochs`, epochs counted from 1 as the reference code's loop (module docstring)."""
    e = min(max(epoch + 1, 0), lambda_epochs)
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * e / lambda_epochs)) / 2.0


class LearnableTemperature(nn.Module):
    """Adapter: StudentOut -> theta, the global temperature's raw parameter, 0-dim (the reference's
    `Global_T`, initialised to 1). Returned by the head's forward so that data parallelism syncs it."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.ones(1))

    def forward(self, out: StudentOut) -> Tensor:
        return self.theta.reshape(())


@LOSSES.register("ctkd")
class CurriculumTemperatureLoss(DistillationLoss):
    """task_weight * CE(psi(Zs), y) + kd_weight * T^2 * KL(psi(Zt / T) || psi(Zs / T)) with T learnt
    adversarially (module docstring; Li et al., AAAI 2023); the reference's CIFAR-100 setting is
    task_weight 0.1, kd_weight 0.9. Logs the temperature as the term "tau". Needs the batch's
    epoch: the forward takes `epoch` (kdkit's step passes it, `needs_epoch`)."""

    needs_epoch = True

    def __init__(self, tau_min: float = 1.0, tau_range: float = 20.0, lambda_max: float = 1.0,
                 lambda_min: float = 0.0, lambda_epochs: int = 10, task_weight: float = 0.5, kd_weight: float = 0.5,
                 kl_reduction: str = "batchmean", label_smoothing: float = 0.0, standardize: bool = False):
        super().__init__(task_weight, kd_weight, label_smoothing, standardize)
        check_loss_settings(tau=tau_min, kl_reduction=kl_reduction)
        if not tau_range > 0 or lambda_epochs < 1 or not 0 <= lambda_min <= lambda_max:
            raise KdkitError(f"ctkd needs tau_range > 0, lambda_epochs >= 1 and 0 <= lambda_min <= lambda_max, got "
                             f"{tau_range}, {lambda_epochs}, {lambda_min}, {lambda_max}")
        self.tau_min, self.tau_range, self.kl_reduction = float(tau_min), float(tau_range), kl_reduction
        self.lambda_max, self.lambda_min, self.lambda_epochs = float(lambda_max), float(lambda_min), int(lambda_epochs)

    def student_adapters(self) -> dict[str, nn.Module]:
        return {ADAPTER: LearnableTemperature()}

    def temperature(self, theta: Tensor, epoch: int) -> Tensor:
        """T (0-dim) from the raw parameter, through the gradient reversal of the epoch's lambda."""
        strength = curriculum_lambda(epoch, self.lambda_epochs, self.lambda_max, self.lambda_min)
        return self.tau_min + self.tau_range * torch.sigmoid(reverse_gradient(theta, strength))

    def distill(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        raise KdkitError("loss 'ctkd' learns its temperature with the student: call the loss itself "
                         "(loss(out, teacher_logits, target, epoch=...)), whose output carries it")

    def forward(self, out: StudentOut, teacher_logits: Tensor | None, target: Tensor,
                epoch: int = 0) -> dict[str, Tensor]:
        if teacher_logits is None:
            raise KdkitError("loss 'ctkd' needs teacher logits; give it a teacher or a cache")
        if ADAPTER not in out.adapted:
            raise KdkitError("loss 'ctkd': the student carries no learnable temperature (attach the loss's "
                             "student_adapters() to its head: kdkit.engine.build.attach_adapters)")
        tau = self.temperature(out.adapted[ADAPTER], epoch)
        task = task_ce(out.logits, target, self.label_smoothing)
        kd = soft_kd(*self._inputs(out.dist_logits, teacher_logits), tau, self.kl_reduction)
        loss = self.task_weight * task + self.kd_weight * kd
        return {"loss": loss, "task": task.detach(), "kd": kd.detach(), "tau": tau.detach()}
