"""Distillation losses, chosen by name: `create_loss("hard", task_weight=0.5, kd_weight=0.5)`."""

from kdkit.losses.distillation import (
    LOSSES,
    DistillationLoss,
    HardDistillationLoss,
    SoftDistillationLoss,
    TaskLoss,
    create_loss,
    hard_kd,
    soft_kd,
    task_ce,
)

__all__ = [
    "LOSSES",
    "DistillationLoss",
    "HardDistillationLoss",
    "SoftDistillationLoss",
    "TaskLoss",
    "create_loss",
    "hard_kd",
    "soft_kd",
    "task_ce",
]
