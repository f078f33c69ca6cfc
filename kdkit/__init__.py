"""kdkit: knowledge distillation for image classifiers, the DeiT recipe for any timm teacher and student."""

__version__ = "0.1.0"

from kdkit.api import distill, train  # noqa: E402
from kdkit.config import Recipe, load_recipe  # noqa: E402
from kdkit.engine import DistillationStep, evaluate, fit  # noqa: E402
from kdkit.losses import LOSSES, HardDistillationLoss, SoftDistillationLoss, TaskLoss, create_loss  # noqa: E402
from kdkit.models import (  # noqa: E402
    HEADS,
    DualHead,
    SharedHead,
    Teacher,
    TokenHead,
    create_student,
    create_teacher,
)
from kdkit.registry import KdkitError  # noqa: E402
from kdkit.teachers import LOGIT_SOURCES, LiveTeacher  # noqa: E402
from kdkit.types import Batch, StepOut, StudentOut  # noqa: E402

__all__ = [
    "HEADS", "LOGIT_SOURCES", "LOSSES", "Batch", "DistillationStep", "DualHead", "HardDistillationLoss",
    "KdkitError", "LiveTeacher", "Recipe", "SharedHead", "SoftDistillationLoss", "StepOut", "StudentOut",
    "TaskLoss", "Teacher", "TokenHead", "__version__", "create_loss", "create_student", "create_teacher",
    "distill", "evaluate", "fit", "load_recipe", "train",
]
