"""One training step: the forward through the logit source, the student and the loss; backward and
update; the values to log; what a non-finite loss does."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from kdkit.console import console
from kdkit.data import batch_images
from kdkit.engine.checkpoint import Checkpointer, Position
from kdkit.engine.metrics import MetricsLog
from kdkit.losses import DistillationLoss
from kdkit.registry import KdkitError
from kdkit.types import Batch, StepOut


class DistillationStep:
    """One step's forward: the teacher's answer for the (mixed) batch, the student's heads, the loss terms.

    The logit source gives (B, K) logits, or, for a loss with `needs_features`, a TeacherOut with
    the teacher's features (`source.features(batch)`).
    """

    def __init__(self, loss: DistillationLoss, logits: Callable[[Batch], Tensor] | None = None):
        if loss.needs_teacher and logits is None:
            raise KdkitError(f"loss {loss.name!r} needs a teacher or cached logits")
        if loss.needs_features and not hasattr(logits, "features"):
            raise KdkitError(f"loss {loss.name!r} needs the teacher's features, which {type(logits).__name__} "
                             f"does not give")
        self.loss, self.logits = loss, logits

    def __call__(self, student: nn.Module, batch: Batch) -> StepOut:
        teacher = None
        if self.loss.needs_teacher:
            teacher = self.logits.features(batch) if self.loss.needs_features else self.logits(batch)
        out = student(batch.images)
        extra = {"epoch": batch.epoch} if self.loss.needs_epoch else {}
        terms = self.loss(out, teacher, batch.target, **extra)
        return StepOut(terms.pop("loss"), out, terms)

    def to(self, device: torch.device) -> DistillationStep:
        """Move the logit source (a teacher: moved, never wrapped for data parallelism) and the loss."""
        for part in (self.logits, self.loss):
            if isinstance(part, nn.Module):
                part.to(device)
        return self


def make_batch(raw: dict, device: torch.device) -> Batch:
    """Move a collated batch to the device (its views finished there if the loader left them so)."""
    return Batch(batch_images(raw, device), raw["target"].to(device, non_blocking=True),
                 raw["index"], raw["epoch"])


def train_step(acc: Accelerator, student: nn.Module, optimizer: torch.optim.Optimizer, step_fn: DistillationStep,
               batch: Batch, clip_grad: float = 0.0) -> tuple[StepOut, dict[str, float], dict[str, float]]:
    """Forward; then, when the loss and every term are finite, backward and (at an accumulation
    boundary) the optimizer step. Returns the step's output, its loss and terms as floats (read
    once, before the backward, for the finite check and the progress bar) and its non-finite terms:
    a step with any is not applied, and at a boundary its accumulated gradients are dropped."""
    with acc.accumulate(student):
        out = step_fn(student, batch)
        values = {"loss": out.loss.item(), **{k: v.item() for k, v in out.terms.items()}}
        bad = nonfinite_terms(values, acc)
        if not bad:
            acc.backward(out.loss)
            if clip_grad and acc.sync_gradients:
                acc.clip_grad_norm_(student.parameters(), clip_grad)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out, values, bad


def global_terms(acc: Accelerator, out: StepOut) -> tuple[float, dict[str, float]]:
    """The loss and its terms averaged over processes: the values of the global batch (every
    process holds an equal share of it), as one process would log them."""
    names = list(out.terms)
    values = torch.stack([out.loss.detach().float(), *(out.terms[k].detach().float() for k in names)])
    values = acc.reduce(values, "mean") if acc.num_processes > 1 else values
    return values[0].item(), dict(zip(names, values[1:].tolist(), strict=True))


def nonfinite_step(policy: str, ckpt: Checkpointer, pos: Position, log: MetricsLog, bad: dict[str, float]) -> None:
    """A step with a NaN or infinite loss: "skip" counts it and goes on; "stop" makes sure a checkpoint
    of the last good weights exists, then raises KdkitError naming the step and the bad terms."""
    parts = ", ".join(f"{k}={v}" for k, v in sorted(bad.items(), key=lambda kv: kv[0] == "loss"))
    where = f"epoch {pos.epoch} step {pos.step} (after {pos.updates} updates; numbered as in metrics.jsonl)"
    if policy == "skip":
        pos.skipped_steps += 1
        console.print(f"[bold yellow]warning: non-finite loss at {where}: {parts}; step skipped "
                      f"({pos.skipped_steps} so far)")
        return
    kept = ckpt.keep_good(pos, log)
    hint = (f"the last good checkpoint is {kept}: continue with --resume {ckpt.run_dir}" if kept else
            "no checkpoint was kept")
    raise KdkitError(f"non-finite loss at {where}: {parts}; {hint} (run.on_nonfinite = \"skip\" skips such steps)")


def nonfinite_terms(values: dict[str, float], accelerator: Accelerator | None = None) -> dict[str, float]:
    """Those of a step's loss and named terms (`values`) that are NaN or infinite ({} when all are
    finite). With several processes every one gets the same answer, so that they all skip or stop
    together."""
    bad = {k: v for k, v in values.items() if not np.isfinite(v)}
    if accelerator is not None and accelerator.num_processes > 1:
        anywhere = accelerator.reduce(torch.tensor(float(bool(bad)), device=accelerator.device), "max")
        if anywhere.item() and not bad:
            bad = {"loss (on another process)": float("nan")}
    return bad
