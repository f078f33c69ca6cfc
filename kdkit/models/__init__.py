"""Students (with a head strategy) and teachers (frozen, with a normalisation bridge)."""

from kdkit.models import cifar, t2t_vit  # noqa: F401  (registers the CIFAR models and T2T-ViT with timm)
from kdkit.models.factory import (
    create_model,
    create_student,
    create_teacher,
    has_saved_config,
    load_saved,
    load_weights,
    model_data_config,
    saved_head_name,
)
from kdkit.models.names import ALIASES, resolve_model_name
from kdkit.models.student import (
    HEADS,
    DualHead,
    NativeHead,
    SharedHead,
    TokenHead,
    default_head,
    wrap_student,
)
from kdkit.models.teacher import Teacher

__all__ = [
    "ALIASES", "HEADS", "DualHead", "NativeHead", "SharedHead", "Teacher", "TokenHead", "create_model",
    "create_student", "create_teacher", "default_head", "has_saved_config", "load_saved", "load_weights",
    "model_data_config", "resolve_model_name", "saved_head_name", "wrap_student",
]
