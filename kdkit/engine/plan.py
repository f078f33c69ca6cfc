"""`kdkit distill --dry-run`: what a run would do, without training or writing anything.

The recipe is resolved, the models are built and the teacher is checked exactly as a run would
(engine/build.py:build_run); then the plan reports the parameters and FLOPs of student and
teacher, the teacher's share of a training step's compute and the size of a logit cache of this run.
"""

from __future__ import annotations

from torch import nn

from kdkit.cache.store import record_bytes
from kdkit.config import Recipe
from kdkit.engine.benchmark import count_flops
from kdkit.engine.build import build_run, expected_manifest
from kdkit.models.teacher import Teacher

BACKWARD_FACTOR = 3  # a training step's forward + backward is about 3 forwards (the backward is ~2)


def _teachers(source: nn.Module | None) -> list[Teacher]:
    if source is None:
        return []
    if hasattr(source, "teachers"):  # an ensemble
        return list(source.teachers)
    teacher = getattr(source, "teacher", None) or getattr(getattr(source, "fallback", None), "teacher", None)
    return [teacher] if teacher is not None else []


def plan(recipe: Recipe, mode: str = "distill", student: nn.Module | None = None,
         teacher: nn.Module | None = None) -> dict:
    """The dry run's report (a dict): the resolved recipe's run, parameters, FLOPs per image (one
    forward, 2 per multiply-add), the teacher's share of a step's compute (teacher forward /
    (teacher forward + 3 x student forward)), and a replay cache's size (float16, every class)."""
    r = recipe
    parts = build_run(r, mode, student, teacher)
    s = parts.student
    size = tuple(parts.data_cfg["input_size"])
    s_flops = count_flops(s, size)
    teachers = [{"name": t.name, "params": sum(p.numel() for p in t.model.parameters()),
                 "input_size": list(t.input_size or size), "flops_per_image": count_flops(t.model, t.input_size or size)}
                for t in _teachers(parts.logits)]
    t_flops = sum(t["flops_per_image"] for t in teachers)
    per_epoch = expected_manifest(r, parts.train_ds, parts.data_cfg, "replay")["records_per_epoch"]
    k = len(parts.train_ds.classes)
    report = {
        "mode": mode, "preset": r.preset or "none", "loss": parts.kind, "conventions": parts.summary["conventions"],
        "logit_source": type(parts.logits).__name__ if parts.logits is not None else None,
        "student": {"name": parts.student.model.pretrained_cfg.get("architecture", type(s.model).__name__)
                    if hasattr(s, "model") else type(s).__name__,
                    "params": sum(p.numel() for p in s.parameters()), "input_size": list(size),
                    "flops_per_image": s_flops},
        "teachers": teachers,
        "teacher_share_of_step": t_flops / (t_flops + BACKWARD_FACTOR * s_flops) if teachers else 0.0,
        "train_images": parts.summary["train_images"], "classes": k, "epochs": r.optim.epochs,
        "steps_per_epoch": len(parts.train_loader), "global_batch_size": r.data.batch_size,
        "processes": parts.acc.num_processes, "precision": parts.summary["precision"],
        "cache_records_per_epoch": per_epoch,
        "cache_bytes": per_epoch * r.optim.epochs * record_bytes(k, k, "float16"),
        "teacher_check": parts.summary.get("teacher_check"),
    }
    return report
