"""What a run would cost, without training it or writing anything.

`plan` (`kdkit distill --dry-run`): the recipe is resolved, the models are built and the teacher is
checked exactly as a run would (engine/build.py:build_run); then it reports the parameters and
FLOPs of student and teacher, the teacher's share of a training step's compute and the size of a
logit cache of this run.

`plan_cache` (`kdkit plan`): the same, then it times a few steps on this machine and this data
(the loader, the teacher's forward, the student's training step, a cache record's encoding and
densifying) and prices the three ways to feed the teacher's answers to `runs` runs of the
recipe's epochs: online (the teacher runs in every step of every run), cached (`kdkit cache`
writes every epoch's views once, every run reads them) and hybrid (the cache holds the first
`cache_epochs` epochs, the teacher runs live after them: what a disk too small for the whole cache
allows). `compare_strategies` is the arithmetic, on measured `StepTimes`.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save
from torch import Tensor, nn

from kdkit.cache.store import DTYPES, decode_record, encode_record, record_bytes, record_labels
from kdkit.config import Recipe
from kdkit.engine.build import BuiltRun, build_optimizer, build_run, expected_manifest
from kdkit.engine.step import DistillationStep, make_batch, train_step
from kdkit.engine.summary import run_summary
from kdkit.models.flops import count_flops
from kdkit.registry import KdkitError
from kdkit.types import Batch

BACKWARD_FACTOR = 3  # a training step's forward + backward is about 3 forwards (the backward is ~2)
STRATEGIES = ("online", "cached", "hybrid")


def plan(recipe: Recipe, mode: str = "distill", student: nn.Module | None = None,
         teacher: nn.Module | None = None) -> dict:
    """The dry run's report (a dict): the resolved recipe's run, parameters, FLOPs per image (one
    forward, 2 per multiply-add), the teacher's share of a step's compute (teacher forward /
    (teacher forward + 3 x student forward)), and a replay cache's size (float16, every class)."""
    return describe(recipe, mode, build_run(recipe, mode, student, teacher))


def describe(r: Recipe, mode: str, parts: BuiltRun) -> dict:
    """`plan`'s report of a run already built (`build_run`)."""
    s = parts.student
    size = tuple(parts.data_cfg["input_size"])
    s_flops = count_flops(s, size)
    teachers = [{"name": t.name, "params": sum(p.numel() for p in t.model.parameters()),
                 "input_size": list(t.input_size or size), "flops_per_image": count_flops(t.model, t.input_size or size)}
                for t in (parts.logits.teachers() if parts.logits is not None else [])]
    t_flops = sum(t["flops_per_image"] for t in teachers)
    per_epoch = expected_manifest(r, parts.train_ds, parts.data_cfg, "replay")["records_per_epoch"]
    k = len(parts.train_ds.classes)
    summary = run_summary(r, mode, parts)
    return {
        "mode": mode, "preset": r.preset or "none", "loss": parts.kind, "conventions": summary["conventions"],
        "logit_source": type(parts.logits).__name__ if parts.logits is not None else None,
        "student": {"name": parts.student.model.pretrained_cfg.get("architecture", type(s.model).__name__)
                    if hasattr(s, "model") else type(s).__name__,
                    "params": sum(p.numel() for p in s.parameters()), "input_size": list(size),
                    "flops_per_image": s_flops},
        "teachers": teachers,
        "teacher_share_of_step": t_flops / (t_flops + BACKWARD_FACTOR * s_flops) if teachers else 0.0,
        "train_images": summary["train_images"], "classes": k, "epochs": r.optim.epochs,
        "steps_per_epoch": len(parts.train_loader), "global_batch_size": r.data.batch_size,
        "processes": parts.acc.num_processes, "precision": summary["precision"],
        "cache_records_per_epoch": per_epoch,
        "cache_bytes": per_epoch * r.optim.epochs * record_bytes(k, k, "float16"),
        "teacher_check": summary.get("teacher_check"),
    }


@dataclass(frozen=True)
class StepTimes:
    """Median seconds per training batch (one process's share of the global batch) of each part.

    loader: the data loader delivering a batch with nothing else running (its workers' pace);
    teacher: the logit source's forward; student: forward, loss, backward and optimizer step, the
    teacher's answer given; encode: turning the teacher's answer into cache records and their
    safetensors bytes (the disk write itself is not timed); read: densifying the records back.
    """

    loader: float
    teacher: float
    student: float
    encode: float
    read: float


def compare_strategies(t: StepTimes, *, overlap: bool, steps_per_epoch: int, write_batches_per_epoch: float,
                       images_per_step: int, epochs: int, runs: int, cache_epochs: int, cache_bytes_per_epoch: int,
                       free_bytes: int | None, cacheable: bool = True) -> dict:
    """Price online, cached and hybrid for `runs` runs of `epochs` epochs.

    A step takes max(loader, compute) when the loader's workers run beside the step (`overlap`),
    else loader + compute; compute is teacher + student online, read + student from a cache, and
    teacher + encode for the cache writer, whose batches (`write_batches_per_epoch` of them: the
    records of an epoch over the batch size) are written once for all runs. Hybrid caches the
    first `cache_epochs` epochs. A strategy is infeasible when its cache does not fit in
    `free_bytes` (None: not known) or the loss needs the live teacher (`cacheable` False).

    Returns {"online", "cached", "hybrid": {...}, "fastest", "cache_pays_from_runs"}: each strategy
    with seconds per step, training images/s, the write's seconds and bytes, the total for every
    run, the teacher passes over an epoch's views and whether it is feasible (and why not);
    `cache_pays_from_runs`: the fewest runs for which cached beats online (None: never, reading the
    cache is no faster than running the teacher).
    """
    def step(compute: float) -> float:
        return max(t.loader, compute) if overlap else t.loader + compute

    online, cached, write = step(t.teacher + t.student), step(t.read + t.student), step(t.teacher + t.encode)
    per_epoch_write = write_batches_per_epoch * write

    def priced(cached_epochs: int) -> dict:
        train = steps_per_epoch * (cached_epochs * cached + (epochs - cached_epochs) * online)
        need = cached_epochs * cache_bytes_per_epoch
        fits = free_bytes is None or need <= free_bytes
        why = ("the loss needs the live teacher (features are not cached)" if not cacheable and cached_epochs else
               f"the cache needs {need} bytes, {free_bytes} are free" if not fits else None)
        return {"cache_epochs": cached_epochs, "seconds_per_step": train / (steps_per_epoch * epochs),
                "images_per_s": images_per_step * steps_per_epoch * epochs / train, "train_s": runs * train,
                "write_s": cached_epochs * per_epoch_write, "cache_bytes": need,
                "total_s": runs * train + cached_epochs * per_epoch_write,
                "teacher_passes": cached_epochs + runs * (epochs - cached_epochs), "feasible": why is None,
                "why_not": why}

    out = {"online": priced(0), "cached": priced(epochs), "hybrid": priced(min(max(cache_epochs, 1), epochs))}
    feasible = [name for name in STRATEGIES if out[name]["feasible"]]
    out["fastest"] = min(feasible, key=lambda name: (out[name]["total_s"], STRATEGIES.index(name)))
    saved = epochs * steps_per_epoch * (online - cached)  # per run
    out["cache_pays_from_runs"] = math.floor(epochs * per_epoch_write / saved) + 1 if saved > 0 else None
    return out


class _Given(nn.Module):
    """A logit source that answers with what the teacher already said (the student step alone is timed)."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def forward(self, batch: Batch):
        return self.answer

    def features(self, batch: Batch):
        return self.answer


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def _loader_batches(loader, count: int) -> tuple[list[dict], list[float]]:
    """`count` batches of the loader and the seconds each took to arrive; the first batch after
    the loader (re)starts is not timed (its workers are starting)."""
    batches, seconds = [], []
    while len(batches) < count:
        it, first = iter(loader), True
        while len(batches) < count:
            start = time.perf_counter()
            raw = next(it, None)
            took = time.perf_counter() - start
            if raw is None:
                if first:
                    raise KdkitError("the training loader gives no batch: too few images for one batch?")
                break
            if raw["images"] is not None and not first:
                batches.append(raw)
                seconds.append(took)
            first = False
    return batches, seconds


def measure(r: Recipe, parts: BuiltRun, steps: int, topk: int, dtype: str, tail: str) -> StepTimes:
    """Time `steps` batches of every part (StepTimes), after one untimed warm-up each."""
    if steps < 1:
        raise KdkitError(f"--steps must be at least 1, not {steps}")
    acc, loss = parts.acc, parts.loss
    source = parts.logits
    if source is None or not source.teachers():
        raise KdkitError("kdkit plan times the teacher: pass --teacher (with --teacher-weights), not --logit-cache")
    raws, loader_s = _loader_batches(parts.train_loader, steps + 1)
    batches = [make_batch(raw, acc.device) for raw in raws]
    source.to(acc.device)
    ask = source.features if loss.needs_features else source
    answers, teacher_s = [], []
    for batch in batches:
        took, answer = _timed(lambda b=batch: ask(b), acc.device)
        answers.append(answer)
        teacher_s.append(took)
    optimizer, _, _ = build_optimizer(r, parts.student, len(parts.train_loader), acc.device)
    student, optimizer = acc.prepare(parts.student, optimizer)
    student.train()
    student_s = []
    for batch, answer in zip(batches, answers, strict=True):
        step_fn = DistillationStep(loss, _Given(answer)).to(acc.device)
        took, _ = _timed(lambda b=batch, f=step_fn: train_step(acc, student, optimizer, f, b, r.optim.clip_grad),
                         acc.device)
        student_s.append(took)
    k = topk if topk > 0 else len(parts.train_ds.classes)
    encode_s, read_s = [], []
    for batch, answer in zip(batches, answers, strict=True):
        logits: Tensor = answer.logits if loss.needs_features else answer
        labels = record_labels(batch.target).cpu()
        took, records = _timed(lambda z=logits, y=labels: encode_record(z.float().cpu(), k, DTYPES[dtype], y),
                               torch.device("cpu"))
        took += _timed(lambda rec=records: save(rec), torch.device("cpu"))[0]
        encode_s.append(took)
        classes = logits.shape[1]
        read_s.append(_timed(lambda rec=records, y=labels, c=classes: decode_record(rec, c, y, tail).to(acc.device),
                             acc.device)[0])
    # the first of each: warm-up (lazy initialisation, the optimizer's state, kernel choice)
    return StepTimes(*(statistics.median(x[1:]) for x in (loader_s, teacher_s, student_s, encode_s, read_s)))


def free_bytes(where: str | Path) -> int | None:
    """Free bytes on the file system that holds `where` (or its nearest existing parent)."""
    path = Path(where).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def plan_cache(recipe: Recipe, steps: int = 5, runs: int = 1, topk: int = 0, dtype: str = "float16",
               cache_epochs: int = 0, out: str | Path = ".") -> dict:
    """`kdkit plan`'s report (a dict): the dry run's (`describe`), then "measured" (StepTimes, in
    seconds per batch of one process), "cache" (records, bytes, free disk at `out`) and the
    strategies priced by `compare_strategies` for `runs` runs. cache_epochs: the hybrid's cached
    epochs (0: as many as fit on the disk, all of them when the whole cache fits)."""
    r = recipe
    if runs < 1:
        raise KdkitError(f"--runs must be at least 1, not {runs}")
    if dtype not in DTYPES:
        raise KdkitError(f"unknown cache dtype {dtype!r}: {', '.join(DTYPES)}")
    if topk < 0 or cache_epochs < 0:
        raise KdkitError("--topk and --cache-epochs must be >= 0 (0: every class; as many epochs as fit)")
    parts = build_run(r, "distill")
    report = describe(r, "distill", parts)
    standardize = bool(r.loss.args.get("standardize", False))
    times = measure(r, parts, steps, topk, dtype, "normal" if standardize else "mass")
    classes = report["classes"]
    k = min(topk, classes) if topk > 0 else classes
    per_record = record_bytes(k, classes, dtype)
    per_epoch = report["cache_records_per_epoch"] * per_record
    free = free_bytes(out)
    fit = free // per_epoch if free is not None and per_epoch else r.optim.epochs
    epochs = r.optim.epochs
    hybrid = cache_epochs or max(min(fit, epochs), 1)
    processes, per_process = parts.acc.num_processes, r.data.batch_size // parts.acc.num_processes
    strategies = compare_strategies(
        times, overlap=r.data.workers > 0, steps_per_epoch=report["steps_per_epoch"],
        write_batches_per_epoch=report["cache_records_per_epoch"] / (per_process * processes),
        images_per_step=r.data.batch_size, epochs=epochs, runs=runs, cache_epochs=hybrid,
        cache_bytes_per_epoch=per_epoch, free_bytes=free, cacheable=not parts.loss.needs_features)
    device = parts.acc.device
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report.update(
        cpus=os.cpu_count(), load_average=load,
        runs=runs, workers=r.data.workers, loader_overlaps=r.data.workers > 0,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device), timed_steps=steps,
        measured=asdict(times),
        measured_teacher_share=times.teacher / (times.teacher + times.student),
        cache={"mode": "replay", "topk": k, "dtype": dtype, "bytes_per_record": per_record,
               "records_per_epoch": report["cache_records_per_epoch"], "bytes": per_epoch * epochs,
               "write_s": strategies["cached"]["write_s"], "where": str(out), "free_bytes": free,
               "epochs_that_fit": int(min(fit, epochs))},
        **strategies)
    return report
