"""Distillation losses, chosen by name: `create_loss("hard", task_weight=0.5, kd_weight=0.5)`."""

from kdkit.losses.ctkd import CurriculumTemperatureLoss, curriculum_lambda, reverse_gradient
from kdkit.losses.dist import DISTLoss, dist_loss, dist_terms
from kdkit.losses.distillation import (
    LOSSES,
    DistillationLoss,
    HardDistillationLoss,
    SoftDistillationLoss,
    TaskLoss,
    create_loss,
    gt_index,
    hard_kd,
    hard_kd_per_sample,
    has_label,
    soft_kd,
    soft_kd_per_sample,
    task_ce,
)
from kdkit.losses.dkd import DecoupledKDLoss, dkd, dkd_per_sample
from kdkit.losses.feature import FeatureDistillationLoss
from kdkit.losses.mlkd import MultiLevelLoss, mlkd_terms
from kdkit.losses.semi import PSEUDO_LABELS, SemiSupervisedLoss, semi_supervised
from kdkit.losses.standardize import z_score

__all__ = [
    "LOSSES", "PSEUDO_LABELS", "CurriculumTemperatureLoss", "DISTLoss", "DecoupledKDLoss", "DistillationLoss",
    "FeatureDistillationLoss", "HardDistillationLoss", "MultiLevelLoss", "SemiSupervisedLoss", "SoftDistillationLoss",
    "TaskLoss", "create_loss", "curriculum_lambda", "dist_loss", "dist_terms", "dkd", "dkd_per_sample", "gt_index",
    "hard_kd", "hard_kd_per_sample", "has_label", "mlkd_terms", "reverse_gradient", "semi_supervised", "soft_kd",
    "soft_kd_per_sample", "task_ce", "z_score",
]
