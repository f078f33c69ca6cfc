"""The teacher: frozen in exactly one place, fed the student's batch through a normalisation bridge."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.models.student import num_pooled_features
from kdkit.registry import KdkitError
from kdkit.types import TeacherOut


class Teacher(nn.Module):
    """A frozen classifier that answers for the student's batch.

    The student's batch is normalised with the student's mean/std at the student's size; the teacher
    may expect another mean/std (from its timm pretrained config) and another size. The bridge
    undoes the student's normalisation, resizes to `input_size` when the sizes differ, and applies
    the teacher's own.

    Args:
        model: any classifier returning (B, K) logits.
        mean, std: the teacher's input normalisation (3 floats each); None: whatever the student's is.
        input_size: (C, H, W) the teacher expects; None keeps the student's size.
        student_mean, student_std: how the student's batch is normalised.
        amp_dtype: autocast dtype (the run's mixed precision: bf16 or fp16), None for full precision.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                 input_size: tuple[int, int, int] | None = None,
                 student_mean: tuple[float, ...] | None = None, student_std: tuple[float, ...] | None = None,
                 interpolation: str = "bicubic", amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        self.weights_source = "hub"  # where the weights came from: "hub", a local path, or "module"
        self.input_size = tuple(input_size) if input_size else None
        self.interpolation = interpolation
        self.amp_dtype = amp_dtype
        self.channels_last = False
        # No mean/std of its own (a custom module without a timm config): it takes the student's input.
        self.follows_student = mean is None or std is None
        self.mean, self.std = (None, None) if self.follows_student else (tuple(mean), tuple(std))
        self.set_student_normalization(student_mean or mean or (0.0, 0.0, 0.0), student_std or std or (1.0, 1.0, 1.0))

    def set_student_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """x_teacher = (x_student * s_std + s_mean - t_mean) / t_std, folded into one scale and shift."""
        if self.follows_student:
            self.mean, self.std = tuple(mean), tuple(std)
        s_mean, s_std = torch.tensor(mean), torch.tensor(std)
        t_mean, t_std = torch.tensor(self.mean), torch.tensor(self.std)
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)
        self.student_mean, self.student_std = tuple(mean), tuple(std)

    def use_channels_last(self) -> Teacher:
        """Run the model in channels_last memory format (faster convolutions on GPUs)."""
        self.channels_last = True
        self.model.to(memory_format=torch.channels_last)
        return self

    def train(self, mode: bool = True) -> Teacher:
        # The teacher never leaves eval mode, whatever the caller does to the modules around it.
        return super().train(False)

    def prepare_input(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) student batch -> (B, 3, H', W') teacher batch."""
        if self.input_size is not None and tuple(images.shape[-2:]) != self.input_size[-2:]:
            images = F.interpolate(images, size=self.input_size[-2:], mode=self.interpolation,
                                   align_corners=False, antialias=self.interpolation in ("bilinear", "bicubic"))
        return images * self.scale.to(images.dtype) + self.shift.to(images.dtype)

    def forward(self, images: Tensor) -> Tensor:
        """Returns teacher logits (B, K) in float32, detached from any graph."""
        with torch.inference_mode():
            with self._autocast(x := self._input(images)):
                logits = self.model(x)
        # A plain tensor: inference-mode tensors cannot be saved for the student's backward.
        return logits.float().clone()

    def forward_features(self, images: Tensor) -> TeacherOut:
        """The logits with the pooled pre-logit features and the unpooled map (timm's
        forward_features / forward_head), all float32 and detached."""
        if not hasattr(self.model, "forward_head"):
            raise KdkitError(f"feature distillation needs timm's forward_features/forward_head on the teacher "
                             f"({type(self.model).__name__} has none)")
        with torch.inference_mode():
            with self._autocast(x := self._input(images)):
                spatial = self.model.forward_features(x)
                pooled = self.model.forward_head(spatial, pre_logits=True)
                logits = self.model.forward_head(spatial)
        return TeacherOut(logits.float().clone(), pooled.float().clone(), spatial.float().clone())

    @property
    def num_features(self) -> int:
        """D of the pooled pre-logit features."""
        return num_pooled_features(self.model)

    def _input(self, images: Tensor) -> Tensor:
        x = self.prepare_input(images)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _autocast(self, x: Tensor):
        return torch.autocast(x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)
