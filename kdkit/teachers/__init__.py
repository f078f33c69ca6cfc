"""Logit sources: where the teacher's answer for a batch comes from. The training loop calls
`source(batch) -> (B, K) float32 logits` and never knows whether a teacher ran."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from kdkit.cache import LogitCache
from kdkit.models.teacher import Teacher
from kdkit.registry import KdkitError, Registry
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


@LOGIT_SOURCES.register("cache")
class CachedLogits(nn.Module):
    """Reads the teacher's answer for each view of the batch from a `kdkit cache` folder.

    Replay caches are looked up by (batch.epoch, batch.index); epochs past the cached ones go to
    `fallback` (a LiveTeacher), or fail when there is none. Fixed caches answer for any epoch.
    Returns (B, C) float32 log-probabilities on the batch's device (a softmax of them, at any
    temperature, is the teacher's distribution; see kdkit/cache/store.py for top-K records).
    """

    def __init__(self, cache: LogitCache | str, fallback: LiveTeacher | None = None):
        super().__init__()
        self.cache = cache if isinstance(cache, LogitCache) else LogitCache(cache)
        self.fallback = fallback
        self.live_batches = 0

    def forward(self, batch: Batch) -> Tensor:
        if self.cache.mode == "fixed" or batch.epoch < self.cache.epochs:
            return self.cache.lookup(batch.epoch, batch.index).to(batch.images.device, non_blocking=True)
        if self.fallback is None:
            raise KdkitError(f"epoch {batch.epoch} is past the {self.cache.epochs} cached epochs and no teacher "
                             f"was given to compute it live")
        self.live_batches += 1
        return self.fallback(batch)


__all__ = ["LOGIT_SOURCES", "CachedLogits", "LiveTeacher", "LogitSource"]
