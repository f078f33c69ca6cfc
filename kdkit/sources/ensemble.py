"""A teacher ensemble as a logit source: several teachers, each with its own weights, normalisation
and input size, answer together for the student's batch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdkit.models.teacher import Teacher
from kdkit.registry import KdkitError
from kdkit.sources.base import LOGIT_SOURCES, LogitSource, SourceContext, teacher_identity
from kdkit.types import Batch

COMBINE = ("probs", "logits")


@LOGIT_SOURCES.register("ensemble")
class TeacherEnsemble(LogitSource):
    """The members' answers combined into one (B, K) float32 tensor.

    combine "probs" (default): log(mean_m softmax(Z_m)), the log of the averaged distribution, so
        that a softmax of it gives the ensemble's probabilities (and a softmax at temperature tau
        sharpens or softens that average, as for any logits); "logits": mean_m Z_m, the averaged
        logits (a geometric mean of the members' distributions, up to normalisation).
    Every member sees the student's batch through its own normalisation bridge and input size.
    """

    def __init__(self, teachers: list[Teacher], combine: str = "probs"):
        super().__init__()
        if len(teachers) < 2:
            raise KdkitError(f"an ensemble needs at least two teachers, got {len(teachers)}: repeat --teacher")
        if combine not in COMBINE:
            raise KdkitError(f"ensemble combine must be one of {', '.join(COMBINE)}, got {combine!r}")
        self.members = torch.nn.ModuleList(teachers)
        self.combine = combine

    @classmethod
    def from_run(cls, run: SourceContext, combine: str = "probs") -> TeacherEnsemble:
        return cls(run.teachers(), combine)

    def teachers(self) -> list[Teacher]:
        return list(self.members)

    def feature_size(self) -> int:
        raise KdkitError("feature distillation matches one teacher's features: an ensemble has no one feature "
                         "space (give one --teacher)")

    def forward(self, batch: Batch | Tensor) -> Tensor:  # a Batch in training, images when writing a cache
        images = batch.images if isinstance(batch, Batch) else batch
        logits = torch.stack([t(images) for t in self.members])  # (M, B, K) float32
        if self.combine == "logits":
            return logits.mean(dim=0)
        return torch.logsumexp(logits.log_softmax(dim=-1), dim=0) - math.log(len(self.members))

    def identity(self) -> dict:
        members = [teacher_identity(t) for t in self.members]
        return {"name": "ensemble(" + ",".join(m["name"] for m in members) + ")", "combine": self.combine,
                "members": members,
                "weights_sha256": "+".join(m["weights_sha256"] for m in members)}
