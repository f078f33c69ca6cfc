"""The training loop: prepare, loop, step, log, evaluate, checkpoint. Everything specific (head,
loss, where teacher logits come from, augmentation) lives in the pieces passed in; the loop's own
pieces are the Trainer's step, its end of epoch and the FitResult it returns."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from kdkit.accelerator import check_not_sharded, create_accelerator, peers_watched
from kdkit.config import NONFINITE
from kdkit.console import console, progress_bar
from kdkit.data import note_skipped
from kdkit.data.sampler import seek
from kdkit.engine.checkpoint import Checkpointer, Position
from kdkit.engine.evaluate import evaluate, gather_names
from kdkit.engine.metrics import MetricsLog, Tracker
from kdkit.engine.step import (
    DistillationStep,
    global_terms,
    make_batch,
    nonfinite_step,
    train_step,
)
from kdkit.registry import KdkitError


@dataclass
class LoopSettings:
    """How the loop runs (the recipe's optim/run keys of the same names).

    clip_grad: gradient-norm clipping, 0 = off. log_every: steps between metrics.jsonl lines.
    eval_every: epochs between evaluations (0: the last one only). ema_decay: timm's ModelEmaV3 of
    the student, evaluated too as ema_*, 0 = off; ema_warmup: its decay warm-up (use_warmup).
    checkpoint_every: updates between checkpoints (plus one per epoch); keep_checkpoints: how many
    are kept (0: none written). on_nonfinite: "stop" or "skip" a step whose loss is NaN/inf.
    eval_metric: the evaluation key (or top1 / top5: fused_top1 / fused_top5) whose highest value
    saves the student as "student_best" too (timm's --eval-metric and model_best).
    """

    clip_grad: float = 0.0
    log_every: int = 10
    eval_every: int = 1
    progress: bool = True
    ema_decay: float = 0.0
    ema_warmup: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"
    eval_metric: str = "top1"

    def __post_init__(self) -> None:
        if self.on_nonfinite not in NONFINITE:
            raise KdkitError(f"on_nonfinite must be one of {NONFINITE}, got {self.on_nonfinite!r}")


@dataclass
class FitResult:
    """The last evaluation, the best one's {"epoch", "metric", "value"} (RUN/student_best) and the
    run's counters (skipped_images summed over processes; skipped_names: the unreadable images, sorted,
    up to kdkit.data.NAMED_SKIPS)."""

    eval: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    updates: int = 0
    skipped_steps: int = 0
    skipped_images: int = 0
    skipped_names: list[str] = field(default_factory=list)


@dataclass
class EpochMeter:
    """An epoch's progress bar and throughput count."""

    bar: Callable[..., None]
    start: float = field(default_factory=time.perf_counter)
    seen: int = 0  # images over all processes

    def images_per_s(self) -> float:
        return self.seen / (time.perf_counter() - self.start)


class Trainer:
    """The prepared pieces of one run and the work of a step and of an epoch's end."""

    def __init__(self, acc: Accelerator, student: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 step_fn: DistillationStep, eval_loader: DataLoader | None, ema: ModelEmaV3 | None,
                 ckpt: Checkpointer, log: MetricsLog, settings: LoopSettings,
                 save: Callable[[nn.Module, str], None] | None):
        self.acc, self.student, self.optimizer, self.scheduler = acc, student, optimizer, scheduler
        self.step_fn, self.eval_loader, self.ema, self.ckpt, self.log = step_fn, eval_loader, ema, ckpt, log
        self.s, self.save = settings, save

    def step(self, raw: dict, pos: Position, end: int, epoch: int, meter: EpochMeter) -> None:
        """One batch: train (unless every image of it was unreadable), count, log, checkpoint when due."""
        acc, s = self.acc, self.s
        step, updated = pos.step, False
        if raw["images"] is not None:
            out, values, bad = train_step(acc, self.student, self.optimizer, self.step_fn,
                                          make_batch(raw, acc.device), s.clip_grad)
            if bad:
                nonfinite_step(s.on_nonfinite, self.ckpt, pos, self.log, bad)
            updated = acc.sync_gradients and not bad
        pos.step, pos.skipped_images = step + 1, pos.skipped_images + raw["skipped"]
        if raw["skipped"]:
            pos.skipped_names = note_skipped(pos.skipped_names, raw.get("skipped_names", ()))
        if raw["images"] is None:
            return
        if updated:
            pos.updates += 1
            if self.scheduler is not None:
                self.scheduler.step_update(pos.updates)
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(self.student), step=pos.updates)
        meter.seen += len(raw["index"]) * acc.num_processes
        meter.bar(**values)
        if step % s.log_every == 0:
            loss, terms = global_terms(acc, out)
            self.log.write(epoch=epoch, step=step, update=pos.updates, loss=loss, **terms,
                           lr=self.optimizer.param_groups[0]["lr"],
                           images_per_s=meter.images_per_s(),
                           skipped=raw["skipped"], skipped_steps=pos.skipped_steps)
        if updated and self.ckpt.due(pos) and pos.step < end:  # the epoch's end saves anyway
            self.ckpt.save(pos, self.log)

    def end_of_epoch(self, pos: Position, epoch: int, epochs: int) -> None:
        """Scheduler, evaluation when due (student and EMA), the saved student, a checkpoint."""
        acc, s, result = self.acc, self.s, pos.eval
        if self.scheduler is not None:
            self.scheduler.step(epoch + 1)
        last = epoch + 1 == epochs
        if self.eval_loader is not None and (last or (s.eval_every > 0 and (epoch + 1) % s.eval_every == 0)):
            result = self.evaluate(epoch, pos.updates)
        best = is_best(result, pos.best, s.eval_metric) if result is not pos.eval else False
        if best:
            pos.best = {"epoch": epoch + 1, "metric": s.eval_metric, "value": result[metric_key(s.eval_metric)]}
        if acc.is_main_process and self.save is not None and (last or self.eval_loader is not None):
            self.save(acc.unwrap_model(self.student), "student")
            if best:
                self.save(acc.unwrap_model(self.student), "student_best")
            if self.ema is not None:
                self.save(self.ema.module, "student_ema")
        pos.epoch, pos.step, pos.eval = epoch + 1, 0, result
        self.ckpt.save(pos, self.log)

    def evaluate(self, epoch: int, updates: int) -> dict:
        acc, progress = self.acc, self.s.progress
        result = evaluate(self.student, self.eval_loader, acc, f"eval {epoch + 1}", progress)
        if self.ema is not None:
            ema_result = evaluate(self.ema.module, self.eval_loader, acc, f"eval EMA {epoch + 1}", progress)
            result.update({f"ema_{k}": v for k, v in ema_result.items() if "_top" in k})
        self.log.write(epoch=epoch, update=updates, eval=result)
        if acc.is_main_process and progress:
            ema_fused = f"  EMA fused {result['ema_fused_top1']:.2f}%" if self.ema is not None else ""
            console.print(f"epoch {epoch + 1}: class {result['class_top1']:.2f}%  dist {result['dist_top1']:.2f}%  "
                          f"fused {result['fused_top1']:.2f}%{ema_fused}")
        return result


def metric_key(metric: str) -> str:
    """The evaluation key of a run.eval_metric: timm's top1 / top5 are the student's prediction (fused)."""
    return {"top1": "fused_top1", "top5": "fused_top5"}.get(metric, metric)


def is_best(result: dict, best: dict, metric: str) -> bool:
    """Whether evaluation `result` beats `best` ({} = none yet) on `metric` (higher is better;
    a tie keeps the earlier one, as timm's CheckpointSaver)."""
    value = result.get(metric_key(metric))
    return value is not None and (not best or value > best["value"])


def fit(student: nn.Module, step_fn: DistillationStep, train_loader: DataLoader,
        optimizer: torch.optim.Optimizer, *, epochs: int, scheduler=None, eval_loader: DataLoader | None = None,
        accelerator: Accelerator | None = None, run_dir: str | Path | None = None,
        save: Callable[[nn.Module, str], None] | None = None, settings: LoopSettings | None = None,
        resume: bool = False, recipe: dict | None = None, tracker: Tracker | None = None) -> FitResult:
    """Train `student` for `epochs`; returns the last evaluation ({} without an eval loader) and the counters.

    Logs per-step loss terms, lr and images/s, and per-epoch evaluations, to RUN/metrics.jsonl.
    `save(module, name)` ("student", and "student_ema" with an EMA) is called by the main process
    after every epoch that has an eval loader, and at the end; "student_best" too after an
    evaluation that beats the earlier ones on settings.eval_metric. With a `run_dir`, the whole training
    state is checkpointed to RUN/checkpoints/ (engine/checkpoint.py), and `recipe` written to
    RUN/recipe.toml once the run has started (or a resume been accepted); `resume` continues from the
    newest valid checkpoint, under any number of processes; `recipe` (Recipe.to_dict()) is saved
    in each checkpoint, and a resume whose recipe differs from it outside
    kdkit.engine.checkpoint.RESUME_SAFE is refused, naming each key. `train_loader` must come from
    kdkit.data.create_loader (its sampler seeks to any (epoch, step)). `tracker` (a
    kdkit.engine.metrics.Tracker, e.g. RunTrackers) mirrors every line of metrics.jsonl.
    """
    s = settings or LoopSettings()
    acc = accelerator or create_accelerator()
    check_not_sharded(acc.distributed_type)  # an Accelerator of the caller's
    hint = f"--resume {run_dir} continues from its newest checkpoint" if run_dir and s.keep_checkpoints else ""
    # a collective failing on a dead or hung process is one line (kdkit.accelerator.peer_failure)
    with peers_watched(acc, hint):
        return _fit(acc, student, step_fn, train_loader, optimizer, epochs, scheduler, eval_loader, run_dir, save,
                    s, resume, recipe, tracker)


def _fit(acc: Accelerator, student: nn.Module, step_fn: DistillationStep, train_loader: DataLoader,
         optimizer: torch.optim.Optimizer, epochs: int, scheduler, eval_loader: DataLoader | None,
         run_dir: str | Path | None, save: Callable[[nn.Module, str], None] | None, s: LoopSettings,
         resume: bool, recipe: dict | None, tracker: Tracker | None) -> FitResult:
    # prepare: the student and optimizer for the devices; the teacher is moved, never wrapped
    student, optimizer = acc.prepare(student, optimizer)
    step_fn.to(acc.device)
    eval_loader = acc.prepare(eval_loader) if eval_loader is not None else None
    ema = ModelEmaV3(acc.unwrap_model(student), decay=s.ema_decay, use_warmup=s.ema_warmup) if s.ema_decay else None
    streamed = isinstance(train_loader.dataset, IterableDataset)  # a stream: its readers decide the batches
    ckpt = Checkpointer(run_dir, acc, student, optimizer, scheduler, ema, every=s.checkpoint_every,
                        keep=s.keep_checkpoints, recipe=recipe,
                        stream_readers=acc.num_processes * max(train_loader.num_workers, 1) if streamed else None)
    pos = ckpt.restore() if resume else ckpt.start()
    if pos.epoch > epochs or (pos.epoch == epochs and pos.step):
        done = f"{pos.epoch} epochs" + (f" and {pos.step} steps" if pos.step else "")
        raise KdkitError(f"the checkpoint is {done} into the run, past the {epochs} epochs asked for: resume with "
                         f"--epochs {pos.epoch + bool(pos.step)} or more")
    ckpt.write_recipe()
    log = MetricsLog(Path(run_dir) / "metrics.jsonl" if run_dir and acc.is_main_process else None, pos.metrics_lines,
                     tracker)
    trainer = Trainer(acc, student, optimizer, scheduler, step_fn, eval_loader, ema, ckpt, log, s, save)
    try:
        # loop: each epoch's batches (from the saved step on a resume), then the epoch's end
        for epoch in range(pos.epoch, epochs):
            seek(train_loader, epoch, pos.step)  # mid-epoch on resume: the batches before are not read
            pos.epoch, end = epoch, pos.step + len(train_loader)
            student.train()
            with progress_bar(acc, f"epoch {epoch + 1}/{epochs}", len(train_loader), s.progress) as bar:
                meter = EpochMeter(bar)
                for raw in train_loader:
                    trainer.step(raw, pos, end, epoch, meter)
            trainer.end_of_epoch(pos, epoch, epochs)
    finally:
        log.close()  # on an error too: a long-lived process (the Python API) keeps no open file
    skipped = acc.reduce(torch.tensor(pos.skipped_images, device=acc.device), "sum").item()
    names = gather_names(acc, pos.skipped_names)
    acc.wait_for_everyone()
    return FitResult(pos.eval, pos.best, pos.updates, pos.skipped_steps, int(skipped), names)

