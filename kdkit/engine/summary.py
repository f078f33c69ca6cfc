"""A run's summary (RUN/summary.json), assembled in one function from what the pieces return: the
built run (engine/build.py:BuiltRun: its datasets, their issues, the teacher check, the logit
source's describe(), the loss's conventions) and fit's FitResult."""

from __future__ import annotations

import json
from pathlib import Path

from kdkit.config import Recipe
from kdkit.engine.build import BuiltRun, teacher_precision
from kdkit.engine.loop import FitResult


def unlabeled_summary(r: Recipe, train_ds, train_loader, run_dir: Path | None = None) -> dict:
    """What a run learnt from unlabeled images; with `run_dir`, the mean fraction kept by the
    confidence threshold over the steps logged in metrics.jsonl."""
    info = {"source": r.data.unlabeled, "images": len(train_ds.unlabeled), "ratio": r.data.unlabeled_ratio,
            "per_step": train_loader.sampler.unlabeled_batch, "pseudo_label": r.loss.pseudo_label,
            "confidence_threshold": r.loss.confidence_threshold}
    path = run_dir / "metrics.jsonl" if run_dir else None
    if path and path.is_file():
        kept = [x["unlabeled_kept"] for x in map(json.loads, path.read_text().splitlines()) if "unlabeled_kept" in x]
        info["kept_mean_logged_steps"] = sum(kept) / len(kept) if kept else None
    return info


def run_summary(r: Recipe, mode: str, parts: BuiltRun, result: FitResult | None = None,
                train_seconds: float | None = None, run_dir: Path | None = None,
                data_identity: dict | None = None) -> dict:
    """The run's summary: what it is (mode, the verb run; classes, precision, images, processes),
    what building it found (a pretrained/init_from record, the teacher check, the logit source's
    describe(), the loss's conventions, the unlabeled images) and, given fit's `result`, what it
    gave (evaluation, best, updates, skipped steps and images, the splits' issues); `data_identity`
    (build.data_identities) when given. Without `result`: the summary a run starts from (`plan`)."""
    acc, train_ds, eval_ds = parts.acc, parts.train_ds, parts.eval_ds
    summary: dict = {"mode": mode, "classes": len(train_ds.classes), "precision": str(acc.mixed_precision),
                     "teacher_precision": teacher_precision(r, acc),
                     "train_images": train_ds.num_labeled if parts.semi else len(train_ds),
                     "eval_images": len(eval_ds), "processes": acc.num_processes,
                     "global_batch_size": r.data.batch_size}
    if parts.loaded:
        summary["init_from" if r.model.init_from else "pretrained"] = parts.loaded
    if parts.teacher_check is not None:
        summary["teacher_check"] = parts.teacher_check
    described = parts.logits.describe() if parts.logits is not None else {}
    if described:
        summary["logits"] = described
    summary["conventions"] = parts.loss.conventions()
    if parts.semi:
        summary["unlabeled"] = unlabeled_summary(r, train_ds, parts.train_loader, run_dir if result else None)
    if result is None:
        return summary
    summary.update(eval=result.eval, best=result.best, train_seconds=train_seconds, run_dir=str(run_dir),
                   student=str(Path(run_dir) / "student"), updates=result.updates,
                   skipped_steps=result.skipped_steps,
                   data={"train": {**train_ds.issues(), "skipped_images": result.skipped_images,
                                   "skipped_names": result.skipped_names},
                         "eval": {**eval_ds.issues(), "skipped_images": result.eval.get("skipped", 0),
                                  "skipped_names": result.eval.get("skipped_names", [])}})
    if data_identity is not None:
        summary["data_identity"] = data_identity
    return summary
