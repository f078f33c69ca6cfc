"""From a recipe to a finished run: build the pieces by name (engine/build.py), call `fit`, write the
run directory (recipe.toml, metrics.jsonl, student/, summary.json)."""

from __future__ import annotations

import contextlib
import inspect
import json
import time
from pathlib import Path

from torch import nn

from kdkit.card import write_model_card
from kdkit.config import PRESET_NOTES, Recipe
from kdkit.console import console
from kdkit.curves import write_curves
from kdkit.engine.build import build_optimizer, build_run, data_identities
from kdkit.engine.checkpoint import list_checkpoints
from kdkit.engine.loop import LoopSettings, fit
from kdkit.engine.metrics import RunTrackers
from kdkit.engine.step import DistillationStep
from kdkit.engine.summary import run_summary
from kdkit.files import atomic_write_text, check_new_output, clear_folder, exclusive_lock
from kdkit.models import HEADS
from kdkit.models.saved import save_student
from kdkit.registry import KdkitError
from kdkit.version import __version__


def run_dir_for(recipe: Recipe, mode: str) -> Path:
    name = recipe.run.name or f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(recipe.run.output) / name

def student_config(student: nn.Module, recipe: Recipe, classes: list[str], data_cfg: dict,
                   conventions: dict) -> dict:
    """timm's config.json layout (architecture, num_classes, model_args, pretrained_cfg) + kdkit's block."""
    m = recipe.model
    args = dict(m.kwargs)
    args.update({k: v for k, v in (("img_size", m.img_size), ("patch_size", m.patch_size))
                 if v is not None and _accepts(type(student.model), k)})
    arch = getattr(student.model, "pretrained_cfg", {}).get("architecture") or type(student.model).__name__
    pcfg = {k: data_cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")}
    return {"architecture": arch, "num_classes": len(classes), "label_names": classes, "model_args": args,
            "pretrained_cfg": {**pcfg, "num_classes": len(classes)},
            "kdkit": {"version": __version__, "head": HEADS.name_of(student), "head_args": recipe.model.head_args,
                      "plain_timm": _plain_timm(student), "conventions": conventions}}

def _accepts(cls: type, name: str) -> bool:
    """Whether cls(...) takes keyword `name`, following **kwargs up the class hierarchy."""
    for klass in cls.__mro__:
        params = inspect.signature(klass.__init__).parameters
        if name in params:
            return True
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return False
    return False

def _plain_timm(student: nn.Module) -> bool:
    """Whether plain timm rebuilds every head of the saved student (see models/saved.py)."""
    return not any(not k.startswith(("model.", "adapters.")) for k in student.state_dict())

RUN_FILES = ("recipe.toml", "metrics.jsonl", "summary.json", "checkpoints", "student")  # one of them: a run


def check_run_dir(out_dir: Path, overwrite: bool) -> bool:
    """Refuse a run directory that holds anything, unless `overwrite` and it holds a kdkit run
    (anything else is not ours to delete). Returns whether an earlier run is to be replaced."""
    hint = f"--resume {out_dir} continues its run, --overwrite replaces it, or choose another --name"
    there = check_new_output(out_dir, overwrite, hint)
    if there and not (out_dir.is_dir() and any((out_dir / f).exists() for f in RUN_FILES)):
        raise KdkitError(f"{out_dir} exists and is not a kdkit run directory: --overwrite replaces runs only; "
                         f"choose another --name or --output")
    return there


def run(recipe: Recipe, mode: str = "distill", student: nn.Module | None = None,
        teacher: nn.Module | None = None, resume: str | Path | None = None, overwrite: bool = False,
        data: object | None = None, eval_data: object | None = None) -> dict:
    """Run `mode` ("distill" or "train") as the recipe says. `student`/`teacher` may be nn.Modules that
    replace the recipe's model names; `data` / `eval_data` data objects that replace data.path
    (kdkit.data.open_dataset takes them). `resume`: a run directory whose newest valid checkpoint the
    run continues from (same recipe). A run directory (run.output/run.name) that holds anything is
    refused, unless `overwrite`, which replaces the earlier run in it. A run that fails before its
    first checkpoint or saved student leaves no run directory. Returns the summary (also written to
    RUN/summary.json)."""
    r = recipe
    if resume and overwrite:
        raise KdkitError("--resume continues a run and --overwrite replaces one: give one of them")
    out_dir = Path(resume) if resume else run_dir_for(r, mode)
    # checked by every process before any of them can create the folder (they meet in build_run)
    replace = not resume and check_run_dir(out_dir, overwrite)
    parts = build_run(r, mode, student, teacher, out_dir, data, eval_data)
    acc = parts.acc
    optimizer, scheduler, lr = build_optimizer(r, parts.student, len(parts.train_loader), acc.device)
    if r.run.compile:
        parts.student.compile()  # in place: state-dict names stay the student's own
    # one run at a time in a run directory: a second is refused, naming the first (a killed one's lock is taken over)
    with exclusive_lock(out_dir, "run") if acc.is_main_process else contextlib.nullcontext():
        if acc.is_main_process and replace:
            console.print(f"[bold yellow]--overwrite: the earlier run in {out_dir} is removed", soft_wrap=True)
            clear_folder(out_dir)
        try:
            return _run_locked(r, mode, parts, optimizer, scheduler, lr, out_dir, resume)
        except BaseException:
            if acc.is_main_process and not resume and out_dir.is_dir() and not list_checkpoints(out_dir) \
                    and not (out_dir / "student").exists():
                clear_folder(out_dir)  # nothing to resume or use: the lock's release removes the folder
            raise


def _run_locked(r: Recipe, mode: str, parts, optimizer, scheduler, lr: float, out_dir: Path,
                resume: str | Path | None) -> dict:
    """The run's body, under its run directory's lock: header, fit, summary, card and curves."""
    acc, student, train_ds, eval_ds, semi = parts.acc, parts.student, parts.train_ds, parts.eval_ds, parts.semi
    train_loader, eval_loader, logits, loss = parts.train_loader, parts.eval_loader, parts.logits, parts.loss
    train_images = train_ds.num_labeled if semi else len(train_ds)
    data_cfg, kind, classes = parts.data_cfg, parts.kind, train_ds.classes
    config = student_config(student, r, classes, data_cfg, loss.conventions())
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        console.print(f"{mode}: {config['architecture']} ({sum(p.numel() for p in student.parameters()) / 1e6:.2f}M "
                      f"params, head {HEADS.name_of(student)}) on {train_images} images"
                      f"{f' + {len(train_ds.unlabeled)} unlabeled' if semi else ''}, {len(classes)} classes, "
                      f"loss {kind}, lr {lr:.3g}, {r.optim.epochs} epochs, precision {acc.mixed_precision}, "
                      f"{acc.num_processes} process{'es' if acc.num_processes > 1 else ''}"
                      f"{', compiled' if r.run.compile else ''} -> {out_dir}")
        note = PRESET_NOTES.get(r.preset, "") if r.preset or not r.description else ""
        console.print(f"recipe: {r.description or 'command line'}; preset {r.preset or 'none'}{note}")
    settings = LoopSettings(clip_grad=r.optim.clip_grad, log_every=r.run.log_every, eval_every=r.run.eval_every,
                            progress=r.run.progress, ema_decay=r.optim.ema_decay, ema_warmup=r.optim.ema_warmup,
                            checkpoint_every=r.run.checkpoint_every, keep_checkpoints=r.run.keep_checkpoints,
                            on_nonfinite=r.run.on_nonfinite, eval_metric=r.run.eval_metric)
    start = time.perf_counter()
    recorded = r.to_dict()
    trackers = RunTrackers(acc, out_dir, recorded)  # run.log_with: started by fit as it opens metrics.jsonl
    try:
        result = fit(student, DistillationStep(loss, logits), train_loader, optimizer, epochs=r.optim.epochs,
                     scheduler=scheduler, eval_loader=eval_loader, accelerator=acc, run_dir=out_dir,
                     save=lambda module, name: save_student(out_dir / name, module, config), settings=settings,
                     resume=bool(resume), recipe=recorded, tracker=trackers if acc.log_with else None)
    finally:  # a failed run's trackers are closed too (what they got is flushed)
        trackers.finish()
    seconds = time.perf_counter() - start
    # the splits' fingerprints from the datasets in memory, for the model card (which would
    # otherwise list and stat every file again)
    identity = data_identities(r, train_ds, eval_ds) if acc.is_main_process else None
    summary = run_summary(r, mode, parts, result, seconds, out_dir, identity)
    if acc.is_main_process:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        try:
            write_model_card(out_dir)
            write_curves(out_dir)
        except KdkitError as e:  # matplotlib missing, say: the run itself is complete
            console.print(f"note: {e}")
    summary["model"] = acc.unwrap_model(student)
    return summary
