"""The training loop: prepare, loop, forward, backward, step, evaluate, save. Everything specific
(head, loss, where teacher logits come from, augmentation) lives in the pieces passed in."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from kdkit.accelerator import create_accelerator
from kdkit.console import console, progress_bar
from kdkit.data.sampler import seek
from kdkit.engine.checkpoint import Checkpointer
from kdkit.engine.evaluate import evaluate
from kdkit.engine.metrics import MetricsLog
from kdkit.engine.step import (
    NONFINITE,
    DistillationStep,
    global_terms,
    make_batch,
    nonfinite_step,
    train_step,
)
from kdkit.registry import KdkitError


def fit(student: nn.Module, step_fn: DistillationStep, train_loader: DataLoader, *, epochs: int,
        optimizer: torch.optim.Optimizer, scheduler=None, eval_loader: DataLoader | None = None,
        accelerator: Accelerator | None = None, clip_grad: float = 0.0, run_dir: str | Path | None = None,
        save: Callable[[nn.Module], None] | None = None, log_every: int = 10, eval_every: int = 1,
        progress: bool = True, ema_decay: float = 0.0, save_ema: Callable[[nn.Module], None] | None = None,
        checkpoint_every: int = 0, keep_checkpoints: int = 2, resume: bool = False,
        on_nonfinite: str = "stop", stats: dict | None = None) -> dict:
    """Train `student` for `epochs`; returns the last evaluation (or {} without an eval loader).

    Logs per-step loss terms, lr and images/s, and per-epoch evaluation, to RUN/metrics.jsonl.
    `save(student)` (and `save_ema(ema_model)` with `ema_decay` > 0: timm's ModelEmaV3, evaluated
    too as ema_*) is called by the main process after every epoch that has an eval loader, and at
    the end. With a `run_dir`, the whole training state is checkpointed to RUN/checkpoints/ (see
    engine/checkpoint.py) every `checkpoint_every` updates and at the end of every epoch, the newest
    `keep_checkpoints` kept; `resume` continues from the newest valid one. `on_nonfinite`: "stop"
    or "skip" a step whose loss is NaN/inf. `stats`, if given, receives updates, skipped_steps and
    skipped_images (unreadable training images over the run, all processes).
    """
    if on_nonfinite not in NONFINITE:
        raise KdkitError(f"on_nonfinite must be one of {NONFINITE}, got {on_nonfinite!r}")
    acc = accelerator or create_accelerator()
    student, optimizer = acc.prepare(student, optimizer)
    if isinstance(step_fn.logits, nn.Module):
        step_fn.logits.to(acc.device)  # the teacher: moved, never wrapped for data parallelism
    if eval_loader is not None:
        eval_loader = acc.prepare(eval_loader)
    ema = ModelEmaV3(acc.unwrap_model(student), decay=ema_decay) if ema_decay else None
    ckpt = Checkpointer(run_dir, acc, student, optimizer, scheduler, ema, every=checkpoint_every, keep=keep_checkpoints)
    pos = ckpt.restore() if resume else ckpt.start()
    log = MetricsLog(Path(run_dir) / "metrics.jsonl" if run_dir and acc.is_main_process else None, pos.metrics_lines)
    result = pos.eval
    for epoch in range(pos.epoch, epochs):
        seek(train_loader, epoch, pos.step)  # mid-epoch on resume: the batches before are not read
        pos.epoch, end = epoch, pos.step + len(train_loader)
        student.train()
        tick, seen = time.perf_counter(), 0
        with progress_bar(acc, f"epoch {epoch + 1}/{epochs}", len(train_loader), progress) as bar:
            for raw in train_loader:
                step, updated = pos.step, False
                if raw["images"] is not None:
                    out, bad = train_step(acc, student, optimizer, step_fn, make_batch(raw, acc.device), clip_grad)
                    if bad:
                        nonfinite_step(on_nonfinite, ckpt, pos, log, bad)
                    updated = acc.sync_gradients and not bad
                pos.step, pos.skipped_images = step + 1, pos.skipped_images + raw["skipped"]
                if raw["images"] is None:
                    continue
                if updated:
                    pos.updates += 1
                    if scheduler is not None:
                        scheduler.step_update(pos.updates)
                    if ema is not None:
                        ema.update(acc.unwrap_model(student), step=pos.updates)
                seen += raw["images"].shape[0] * acc.num_processes
                terms = {k: v.item() for k, v in out.terms.items()}
                bar(loss=out.loss.item(), **terms)
                if step % log_every == 0:
                    loss, terms = global_terms(acc, out)
                    log.write(epoch=epoch, step=step, update=pos.updates, loss=loss, **terms,
                              lr=optimizer.param_groups[0]["lr"], images_per_s=seen / (time.perf_counter() - tick),
                              skipped=raw["skipped"], skipped_steps=pos.skipped_steps)
                if updated and ckpt.due(pos) and pos.step < end:  # the epoch's end saves anyway
                    ckpt.save(pos, log)
        if scheduler is not None:
            scheduler.step(epoch + 1)
        last = epoch + 1 == epochs
        if eval_loader is not None and (last or (eval_every > 0 and (epoch + 1) % eval_every == 0)):
            result = evaluate(student, eval_loader, acc, f"eval {epoch + 1}", progress)
            if ema is not None:
                ema_result = evaluate(ema.module, eval_loader, acc, f"eval EMA {epoch + 1}", progress)
                result.update({f"ema_{k}": v for k, v in ema_result.items() if "_top" in k})
            log.write(epoch=epoch, eval=result)
            if acc.is_main_process and progress:
                ema_fused = f"  EMA fused {result['ema_fused_top1']:.2f}%" if ema is not None else ""
                console.print(f"epoch {epoch + 1}: class {result['class_top1']:.2f}%  "
                              f"dist {result['dist_top1']:.2f}%  fused {result['fused_top1']:.2f}%{ema_fused}")
        if acc.is_main_process and (last or eval_loader is not None):
            if save is not None:
                save(acc.unwrap_model(student))
            if save_ema is not None and ema is not None:
                save_ema(ema.module)
        pos.epoch, pos.step, pos.eval = epoch + 1, 0, result
        ckpt.save(pos, log)
    log.close()
    if stats is not None:
        skipped = acc.reduce(torch.tensor(pos.skipped_images, device=acc.device), "sum").item()
        stats.update(updates=pos.updates, skipped_steps=pos.skipped_steps, skipped_images=int(skipped))
    acc.wait_for_everyone()
    return result
