"""Logit sources: where the teacher's answer for a batch comes from. The training loop calls
`source(batch) -> (B, K) float32 logits` and never knows whether a teacher ran."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from kdkit.models.teacher import Teacher
from kdkit.registry import Registry
from kdkit.types import Batch

LOGIT_SOURCES: Registry[type] = Registry("logit source")


class LogitSource(Protocol):
    def __call__(self, batch: Batch) -> Tensor: ...


@LOGIT_SOURCES.register("live")
class LiveTeacher(nn.Module):
    """Runs the frozen teacher on the batch the student sees (after Mixup/CutMix)."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, batch: Batch) -> Tensor:
        return self.teacher(batch.images)


__all__ = ["LOGIT_SOURCES", "LiveTeacher", "LogitSource"]
