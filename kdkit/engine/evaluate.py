"""Evaluation: top-1/top-5 of the class head, the distillation head and their late fusion; the teacher's
check before distilling; a saved student scored on a data split."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdkit.accelerator import create_accelerator
from kdkit.console import console, progress_bar
from kdkit.data import NAMED_SKIPS, batch_images, create_loader, eval_transform, note_skipped, open_dataset
from kdkit.models import has_saved_config, load_saved
from kdkit.models.student import eval_mode
from kdkit.models.teacher import Teacher
from kdkit.registry import KdkitError
from kdkit.types import StudentOut


def _correct(logits: Tensor, target: Tensor, k: int) -> Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).float().sum()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator | None = None,
             description: str = "eval", progress: bool = True) -> dict[str, float]:
    """Accuracy (in %) over the whole loader, gathered over processes without double counting.

    model: returns StudentOut, or plain (B, K) logits (a teacher or any classifier; its "dist" and
    "fused" rows then equal its class row). Returns class_top1/top5, dist_top1/top5, fused_top1/top5,
    heads (1 when one head gives both logits: shared, or a plain classifier; else 2), n (images
    counted), skipped (unreadable images), skipped_names (their names, sorted; only when there are any)
    and images_per_s.
    """
    acc = accelerator or create_accelerator()
    sums = {f"{h}_top{k}": 0.0 for h in ("class", "dist", "fused") for k in (1, 5)}
    n, skipped, seconds, one_head, names = 0, 0, 0.0, True, []
    with eval_mode(model), progress_bar(acc, description, total=len(loader), enabled=progress) as bar:
        for raw in loader:
            skipped += raw["skipped"]
            if raw["skipped"]:
                names = note_skipped(names, raw.get("skipped_names", ()))
            if raw["images"] is not None:
                images, target = batch_images(raw, acc.device), raw["target"].to(acc.device)
                start = time.perf_counter()
                out = model(images)
                out = out if isinstance(out, StudentOut) else StudentOut(out, out)
                one_head = out.dist_logits is out.logits
                seconds += time.perf_counter() - start
                heads = {"class": out.logits, "dist": out.dist_logits, "fused": out.fused}
                gathered = acc.gather_for_metrics((target, *heads.values()))
                target, logits = gathered[0], dict(zip(heads, gathered[1:], strict=True))
                n += target.shape[0]
                for h, lg in logits.items():
                    for k in (1, 5):
                        sums[f"{h}_top{k}"] += _correct(lg.float(), target, k).item()
            bar()
    result = {k: 100.0 * v / max(n, 1) for k, v in sums.items()}
    result.update(heads=1 if one_head else 2, n=n, skipped=int(skipped),
                  images_per_s=n / seconds if seconds else 0.0)
    names = gather_names(acc, names)
    if names:
        result["skipped_names"] = names
    return result


def gather_names(acc: Accelerator, names: list[str]) -> list[str]:
    """Every process's names (a collective under several processes), sorted, up to NAMED_SKIPS."""
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        names = [n for part in gather_object([names]) for n in part]
    return sorted(set(names))[:NAMED_SKIPS]


def check_teacher(teacher: Teacher, loader, num_classes: int, batches: int, accelerator: Accelerator,
                  empty: list[str] | tuple[str, ...] = ()) -> dict:
    """Top-1 of the teacher on a slice of the evaluation split, through the student's pipeline."""
    teacher.to(accelerator.device)
    correct = n = 0
    k = None
    for i, raw in enumerate(loader):
        if i >= batches:
            break
        if raw["images"] is None:
            continue
        logits = teacher(batch_images(raw, accelerator.device))
        k = logits.shape[1]
        if k != num_classes:
            hint = f" (the data's class folders include empty ones: {', '.join(empty[:5])})" if empty else ""
            raise KdkitError(f"the teacher predicts {k} classes but the data has {num_classes}{hint}: fine-tune "
                             f"it on this label space first (kdkit train --model NAME --data DIR) or pass "
                             f"matching --teacher-weights")
        correct += (logits.argmax(1).cpu() == raw["target"]).sum().item()
        n += raw["target"].numel()
    top1 = 100.0 * correct / max(n, 1)
    info = {"teacher_top1_slice": top1, "images": n, "num_classes": k, "mean": teacher.mean, "std": teacher.std,
            "input_size": teacher.input_size, "student_mean": teacher.student_mean,
            "student_std": teacher.student_std}
    if accelerator.is_main_process:
        console.print(f"teacher check: top-1 {top1:.1f}% on {n} evaluation images, {k} classes, "
                      f"mean {tuple(round(x, 4) for x in teacher.mean)}, std "
                      f"{tuple(round(x, 4) for x in teacher.std)}, input {teacher.input_size}")
        if top1 <= 1.5 * 100.0 / num_classes:
            console.print(f"[bold red]WARNING: the teacher is at chance level ({top1:.1f}%, chance "
                          f"{100.0 / num_classes:.1f}%): wrong weights, wrong normalisation or wrong label order?")
    return info


def evaluate_saved(weights: str | Path, data: str, model: str | None = None, batch_size: int = 256,
                   workers: int = 2, split: str = "auto-eval", progress: bool = True) -> dict:
    """Evaluate a saved student folder (or any timm model + weights file) on a data split."""
    acc = create_accelerator()
    # a bare weights file has no class count of its own: the data's is the one it must have
    num_classes = None if has_saved_config(weights) else len(open_dataset(data, split).classes)
    student, classes, dcfg = load_saved(weights, model, num_classes)
    ds = open_dataset(data, split, eval_transform(dcfg), classes=classes)
    loader = acc.prepare(create_loader(ds, batch_size, training=False, workers=workers))
    return evaluate(acc.prepare(student), loader, acc, "eval", progress)
