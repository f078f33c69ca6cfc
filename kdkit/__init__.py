"""kdkit: knowledge distillation for image classifiers, the DeiT recipe for any timm teacher and student.

The public names are imported on first use (PEP 562), so that `import kdkit`, `kdkit.__version__`
and `kdkit --help` do not pay for torch and timm; `from kdkit import distill` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kdkit.version import __version__

# public name -> the module that defines it
_SOURCES: dict[str, str] = {
    "distill": "kdkit.api", "train": "kdkit.api", "Result": "kdkit.api",
    "Recipe": "kdkit.config", "load_recipe": "kdkit.config",
    "DistillationStep": "kdkit.engine", "evaluate": "kdkit.engine", "fit": "kdkit.engine",
    **dict.fromkeys(("LOSSES", "DISTLoss", "DecoupledKDLoss", "DistillationLoss", "FeatureDistillationLoss",
                     "HardDistillationLoss", "SoftDistillationLoss", "TaskLoss", "create_loss"), "kdkit.losses"),
    **dict.fromkeys(("HEADS", "DualHead", "NativeHead", "SharedHead", "Teacher", "TokenHead", "create_student",
                     "create_teacher"), "kdkit.models"),
    "KdkitError": "kdkit.registry",
    "load_plugins": "kdkit.plugins",
    **dict.fromkeys(("LOGIT_SOURCES", "CachedLogits", "LiveTeacher", "LogitSource", "TeacherEnsemble"),
                    "kdkit.sources"),
    "Batch": "kdkit.types", "StepOut": "kdkit.types", "StudentOut": "kdkit.types", "TeacherOut": "kdkit.types",
}

__all__ = [
    "HEADS", "LOGIT_SOURCES", "LOSSES", "Batch", "CachedLogits", "DISTLoss", "DecoupledKDLoss", "DistillationLoss",
    "DistillationStep", "DualHead", "FeatureDistillationLoss", "HardDistillationLoss", "KdkitError", "LiveTeacher",
    "LogitSource", "NativeHead", "Recipe", "Result", "SharedHead", "SoftDistillationLoss", "StepOut", "StudentOut", "TaskLoss",
    "Teacher", "TeacherEnsemble", "TeacherOut", "TokenHead", "__version__", "create_loss", "create_student",
    "create_teacher", "distill", "evaluate", "fit", "load_plugins", "load_recipe", "train",
]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'kdkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from kdkit.api import Result, distill, train
    from kdkit.config import Recipe, load_recipe
    from kdkit.engine import DistillationStep, evaluate, fit
    from kdkit.losses import (
        LOSSES,
        DecoupledKDLoss,
        DistillationLoss,
        DISTLoss,
        FeatureDistillationLoss,
        HardDistillationLoss,
        SoftDistillationLoss,
        TaskLoss,
        create_loss,
    )
    from kdkit.models import (
        HEADS,
        DualHead,
        NativeHead,
        SharedHead,
        Teacher,
        TokenHead,
        create_student,
        create_teacher,
    )
    from kdkit.plugins import load_plugins
    from kdkit.registry import KdkitError
    from kdkit.sources import LOGIT_SOURCES, CachedLogits, LiveTeacher, LogitSource, TeacherEnsemble
    from kdkit.types import Batch, StepOut, StudentOut, TeacherOut
