"""Distillation losses, chosen by name: `create_loss("hard", task_weight=0.5, kd_weight=0.5)`."""

from kdkit.losses.distillation import (
    LOSSES,
    DistillationLoss,
    HardDistillationLoss,
    SoftDistillationLoss,
    TaskLoss,
    create_loss,
    hard_kd,
    hard_kd_per_sample,
    soft_kd,
    soft_kd_per_sample,
    task_ce,
)
from kdkit.losses.semi import PSEUDO_LABELS, SemiSupervisedLoss, has_label, semi_supervised

__all__ = [
    "LOSSES",
    "PSEUDO_LABELS",
    "DistillationLoss",
    "HardDistillationLoss",
    "SemiSupervisedLoss",
    "SoftDistillationLoss",
    "TaskLoss",
    "create_loss",
    "hard_kd",
    "hard_kd_per_sample",
    "has_label",
    "semi_supervised",
    "soft_kd",
    "soft_kd_per_sample",
    "task_ce",
]
