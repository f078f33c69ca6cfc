"""Logit sources: where the teacher's answer for a batch comes from. The training loop calls
`source(batch) -> (B, K) float32 logits` and never knows whether a teacher ran.

A new source is a class and one registry line: an nn.Module (so the loop can move it to the
device) whose forward maps a Batch to (B, K) logits, and a classmethod `from_run(run, **settings)`
that builds it from what the run offers (`SourceContext`); its own settings come from the recipe's
`model.logit_source_args`, checked against `from_run`'s signature. A source that can also give the
teacher's features implements `features(batch) -> TeacherOut`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from kdkit.cache import TAILS, LogitCache, record_labels, weights_sha256
from kdkit.console import console
from kdkit.models.teacher import Teacher
from kdkit.registry import KdkitError, Registry
from kdkit.types import Batch, TeacherOut

LOGIT_SOURCES: Registry[type[LogitSource]] = Registry("logit source")


@dataclass
class SourceContext:
    """What a run offers a logit source as it is built; the teachers are built only when asked for.

    teachers(): the run's teachers (frozen, bridged to the student's normalisation, checked on the
        evaluation split); several for an ensemble.
    expected_manifest(mode): the manifest a cache of this run must have ("replay" or "fixed").
    """

    num_classes: int
    epochs: int
    teachers: Callable[[], list[Teacher]]
    has_teachers: bool = True  # whether the run names a teacher (or was given one) for teachers() to build
    cache: str = ""
    view_cycle: int = 0  # the cached epochs the training views replay (decided with the data; 0: none)
    expected_manifest: Callable[[str], dict] | None = None
    augmented: bool = False  # training views are augmented (a fixed cache then answers for the clean image)
    standardize: bool = False  # the loss z-scores the teacher's logits (a top-K cache then fills its tail "normal")


class LogitSource(nn.Module):
    """Base of the sources: `forward(batch) -> (B, K)`. What the engine asks of a source beyond
    its logits goes through these methods, whose defaults suit a source without a teacher:

    teachers(): the teachers it runs (`kdkit plan` prices and times them); default [].
    describe(): what the run summary records about it (summary["logits"]); default {}.
    feature_size(): the pooled feature size of the one teacher whose features it gives (a feature
        loss sizes its projection with it); default: refused, the source gives logits only.
    features(batch) -> TeacherOut: that teacher's features and logits for the batch.
    identity(): what produced the logits, for a cache's manifest; default: refused.
    """

    @classmethod
    def from_run(cls, run: SourceContext) -> LogitSource:
        raise NotImplementedError

    def teachers(self) -> list[Teacher]:
        """The teachers this source runs (none for a source that reads its answers)."""
        return []

    def describe(self) -> dict:
        """The run summary's record of this source (summary["logits"]); {}: nothing to record."""
        return {}

    def feature_size(self) -> int:
        """The teacher's pooled feature size, for a feature loss's projection."""
        raise KdkitError(f"feature distillation needs a live teacher (features are not cached): the logit source "
                         f"{type(self).__name__} gives logits only; drop --logit-cache and pass --teacher")

    def features(self, batch: Batch) -> TeacherOut:
        raise KdkitError(f"the logit source {type(self).__name__} gives logits only; feature distillation needs "
                         f"the teacher itself (features are not cached): drop --logit-cache and pass --teacher")

    def identity(self) -> dict:
        """What produced the logits, for a cache's manifest."""
        raise KdkitError(f"the logit source {type(self).__name__} cannot be written to a cache")


def teacher_identity(teacher: Teacher) -> dict:
    """A teacher as a cache's manifest records it: name, where its weights came from, their sha256."""
    return {"name": teacher.name, "weights": teacher.weights_source, "weights_sha256": weights_sha256(teacher.model)}


def single_teacher(run: SourceContext) -> Teacher:
    teachers = run.teachers()
    if len(teachers) != 1:
        raise KdkitError(f"{len(teachers)} teachers: several make an ensemble (model.logit_source = \"ensemble\")")
    return teachers[0]


@LOGIT_SOURCES.register("live")
class LiveTeacher(LogitSource):
    """Runs the frozen teacher on the batch the student sees (after Mixup/CutMix)."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.teacher = teacher

    @classmethod
    def from_run(cls, run: SourceContext) -> LiveTeacher:
        return cls(single_teacher(run))

    def forward(self, batch: Batch | Tensor) -> Tensor:  # a Batch in training, images when writing a cache
        return self.teacher(batch.images if isinstance(batch, Batch) else batch)

    def teachers(self) -> list[Teacher]:
        return [self.teacher]

    def feature_size(self) -> int:
        return self.teacher.num_features

    def features(self, batch: Batch) -> TeacherOut:
        return self.teacher.forward_features(batch.images)

    def identity(self) -> dict:
        return teacher_identity(self.teacher)


@LOGIT_SOURCES.register("cache")
class CachedLogits(LogitSource):
    """Reads the teacher's answer for each view of the batch from a `kdkit cache` folder.

    Replay caches are looked up by (batch.epoch, batch.index); epochs past the cached ones go to
    `fallback` (a LiveTeacher), or fail when there is none. Fixed caches answer for any epoch.
    Returns (B, C) float32 log-probabilities on the batch's device (a softmax of them, at any
    temperature, is the teacher's distribution; see kdkit/cache/store.py for top-K records).

    A top-K record's label goes to the batch's label class (store.record_labels of batch.target,
    the class the writer saw for the same view); a fixed cache under Mixup/CutMix, whose record
    was written for the clean image, leaves it out. `tail` fills the classes a top-K record does
    not hold: "mass" (the tail's probability at tau = 1, spread evenly) or "normal" (the tail's
    mean and variance kept, for a loss that z-scores the logits); "auto": "normal" when the run's
    loss standardises, else "mass".
    """

    def __init__(self, cache: LogitCache | str, fallback: LiveTeacher | None = None, tail: str = "mass",
                 cycle: bool = False):
        super().__init__()
        if tail not in TAILS:
            raise KdkitError(f"unknown cache tail fill {tail!r}: {', '.join(TAILS)} (or auto)")
        self.cache = cache if isinstance(cache, LogitCache) else LogitCache(cache)
        self.fallback = fallback
        self.tail = tail
        self.cycle = cycle  # the run replays the cached epochs past them (recorded by describe)
        self.live_batches = 0

    @classmethod
    def from_run(cls, run: SourceContext, tail: str = "auto") -> CachedLogits:
        """The run's cache (model.logit_cache), checked against the manifest this run expects; a
        live teacher serves the epochs past a replay cache, unless its epochs are cycled. tail:
        model.logit_source_args.tail, "auto" (by the loss), "mass" or "normal"."""
        if not run.cache:
            raise KdkitError("logit source 'cache' reads a `kdkit cache` folder: pass --logit-cache CACHE")
        if tail == "auto":
            tail = "normal" if run.standardize else "mass"
        cache = LogitCache(run.cache)
        if run.expected_manifest is not None:
            cache.check_run(run.expected_manifest(cache.mode))
        fallback = None
        if cache.mode == "fixed" and run.augmented:
            console.print("[bold yellow]warning: the cache holds one fixed record per image, but training augments "
                          "every view: the teacher's answer is for the clean image, not the view the student sees")
        cycle = run.view_cycle > 0  # decided where the data was built (kdkit.cache.replay_cycle)
        if cycle and run.view_cycle != cache.epochs:
            raise KdkitError(f"the training views cycle over {run.view_cycle} epochs, the cache {cache.root} "
                             f"holds {cache.epochs}")
        if not cycle and cache.mode == "replay" and run.epochs > cache.epochs:
            if not run.has_teachers:
                raise KdkitError(f"the cache holds {cache.epochs} epochs and the run has {run.epochs}: pass "
                                 f"--teacher to compute the rest live, or --logit-cache-cycle to replay the cached ones")
            fallback = LiveTeacher(single_teacher(run))
        return cls(cache, fallback, tail, cycle)

    def describe(self) -> dict:
        """The cache read, its epochs, whether they are cycled, the epoch a live teacher takes over
        from (None: never) and, for a top-K cache, how the tail is filled."""
        m, topk = self.cache.manifest, self.cache.manifest["topk"] < self.cache.num_classes
        return {"cache": str(self.cache.root), "mode": self.cache.mode, "epochs": self.cache.epochs, "topk": m["topk"],
                "dtype": m["dtype"], "cycle": self.cycle, "live_after": self.cache.epochs if self.fallback else None,
                **({"tail": self.tail} if topk else {})}

    def teachers(self) -> list[Teacher]:
        """The fallback's teacher, which runs the epochs past the cached ones (none without one)."""
        return self.fallback.teachers() if self.fallback is not None else []

    def forward(self, batch: Batch) -> Tensor:
        if self.cache.mode == "fixed" or batch.epoch < self.cache.epochs:
            # a fixed record is of the clean image: a mixed batch's label class may be another image's
            labels = None if self.cache.mode == "fixed" and batch.target.ndim > 1 else record_labels(batch.target)
            return self.cache.lookup(batch.epoch, batch.index, labels, self.tail).to(batch.images.device,
                                                                                     non_blocking=True)
        if self.fallback is None:
            raise KdkitError(f"epoch {batch.epoch} is past the {self.cache.epochs} cached epochs and no teacher "
                             f"was given to compute it live")
        self.live_batches += 1
        return self.fallback(batch)
