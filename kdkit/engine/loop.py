"""The training loop: prepare, loop, forward, backward, step, evaluate, save. Everything specific
(head, loss, where teacher logits come from, augmentation) lives in the pieces passed in."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdkit.engine.evaluate import evaluate
from kdkit.engine.progress import console, progress_bar
from kdkit.losses import DistillationLoss
from kdkit.registry import KdkitError
from kdkit.types import Batch, StepOut


class DistillationStep:
    """One step's forward: teacher logits for the (mixed) batch, the student's heads, the loss terms."""

    def __init__(self, loss: DistillationLoss, logits: Callable[[Batch], Tensor] | None = None):
        if loss.needs_teacher and logits is None:
            raise KdkitError(f"loss {loss.name!r} needs a teacher or cached logits")
        self.loss, self.logits = loss, logits

    def __call__(self, student: nn.Module, batch: Batch) -> StepOut:
        teacher = self.logits(batch) if self.loss.needs_teacher else None
        out = student(batch.images)
        terms = self.loss(out, teacher, batch.target)
        return StepOut(terms.pop("loss"), out, terms)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written (main process only)."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", buffering=1) if path else None  # noqa: SIM115

    def write(self, **record: object) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()


def make_batch(raw: dict, device: torch.device) -> Batch:
    """Move a collated batch to the device (Mixup/CutMix already happened per sample, in the data)."""
    return Batch(raw["images"].to(device, non_blocking=True), raw["target"].to(device, non_blocking=True),
                 raw["index"], raw["epoch"])


def fit(student: nn.Module, step_fn: DistillationStep, train_loader: DataLoader, *, epochs: int,
        optimizer: torch.optim.Optimizer, scheduler=None, eval_loader: DataLoader | None = None,
        accelerator: Accelerator | None = None, clip_grad: float = 0.0, run_dir: str | Path | None = None,
        save: Callable[[nn.Module], None] | None = None, log_every: int = 10, eval_every: int = 1,
        progress: bool = True) -> dict:
    """Train `student` for `epochs`; returns the last evaluation (or {} without an eval loader).

    Logs per-step loss terms, lr and images/s, and per-epoch evaluation, to RUN/metrics.jsonl.
    `save(student)` is called by the main process after every epoch that has an eval loader, and at the end.
    """
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    student, optimizer = acc.prepare(student, optimizer)
    if isinstance(step_fn.logits, nn.Module):
        step_fn.logits.to(acc.device)  # the teacher: moved, never wrapped for data parallelism
    if eval_loader is not None:
        eval_loader = acc.prepare(eval_loader)
    log = MetricsLog(Path(run_dir) / "metrics.jsonl" if run_dir and acc.is_main_process else None)
    updates, result = 0, {}
    for epoch in range(epochs):
        train_loader.sampler.set_epoch(epoch)
        train_loader.dataset.set_epoch(epoch)
        student.train()
        tick, seen = time.perf_counter(), 0
        with progress_bar(acc, f"epoch {epoch + 1}/{epochs}", len(train_loader), progress) as bar:
            for step, raw in enumerate(train_loader):
                if raw["images"] is None:
                    continue
                batch = make_batch(raw, acc.device)
                with acc.accumulate(student):
                    out = step_fn(student, batch)
                    if not math.isfinite(out.loss.item()):
                        raise KdkitError(f"non-finite loss at epoch {epoch} step {step}: "
                                         f"{ {k: v.item() for k, v in out.terms.items()} }")
                    acc.backward(out.loss)
                    if clip_grad and acc.sync_gradients:
                        acc.clip_grad_norm_(student.parameters(), clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    updates += 1
                    if scheduler is not None:
                        scheduler.step_update(updates)
                seen += batch.images.shape[0] * acc.num_processes
                terms = {k: v.item() for k, v in out.terms.items()}
                bar(loss=out.loss.item(), **terms)
                if step % log_every == 0:
                    rate = seen / (time.perf_counter() - tick)
                    log.write(epoch=epoch, step=step, update=updates, loss=out.loss.item(), **terms,
                              lr=optimizer.param_groups[0]["lr"], images_per_s=rate, skipped=raw["skipped"])
        if scheduler is not None:
            scheduler.step(epoch + 1)
        last = epoch + 1 == epochs
        if eval_loader is not None and ((epoch + 1) % eval_every == 0 or last):
            result = evaluate(student, eval_loader, acc, f"eval {epoch + 1}", progress)
            log.write(epoch=epoch, eval=result)
            if acc.is_main_process and progress:
                console.print(f"epoch {epoch + 1}: class {result['class_top1']:.2f}%  "
                              f"dist {result['dist_top1']:.2f}%  fused {result['fused_top1']:.2f}%")
        if save is not None and acc.is_main_process and (last or eval_loader is not None):
            save(acc.unwrap_model(student))
    log.close()
    acc.wait_for_everyone()
    return result
