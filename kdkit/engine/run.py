"""From a recipe to a finished run: build the pieces by name, check the teacher, call `fit`, write
the run directory (recipe.toml, metrics.jsonl, student/, summary.json)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from kdkit import __version__
from kdkit.accelerator import create_accelerator, set_deterministic
from kdkit.cache import LogitCache
from kdkit.config import PRESET_NOTES, Recipe
from kdkit.console import console
from kdkit.data import (
    SemiSupervisedDataset,
    apply_views,
    create_loader,
    eval_transform,
    is_augmented,
    open_dataset,
    open_unlabeled,
    view_settings,
)
from kdkit.engine.evaluate import evaluate
from kdkit.engine.loop import fit
from kdkit.engine.step import DistillationStep
from kdkit.files import atomic_write_text
from kdkit.losses import create_loss, semi_supervised
from kdkit.models import create_student, create_teacher, model_data_config, resolve_model_name
from kdkit.models.saved import save_student
from kdkit.models.teacher import Teacher
from kdkit.registry import KdkitError
from kdkit.teachers import CachedLogits, LiveTeacher


def make_accelerator(recipe: Recipe) -> Accelerator:
    """The run's Accelerator: run.precision (auto = Accelerate decides) and gradient accumulation."""
    return create_accelerator(recipe.run.precision, recipe.optim.grad_accum)


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a mixed precision ("no": None, full precision)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def teacher_precision(r: Recipe, acc: Accelerator) -> str:
    """The teacher's precision: run.teacher_precision, or the run's own when it is "auto"."""
    return str(acc.mixed_precision) if r.run.teacher_precision == "auto" else r.run.teacher_precision


def is_convnet(model: nn.Module) -> bool:
    """Whether convolutions do most of the work (more than a patch-embedding convolution)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


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
            "kdkit": {"version": __version__, "head": type(student).__name__, "plain_timm": _plain_timm(student),
                      "conventions": conventions}}


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
    """Whether plain timm rebuilds every head of the saved student (see engine/checkpoint.py)."""
    return not any(not k.startswith("model.") for k in student.state_dict())


def check_student_classes(student: nn.Module, num_classes: int, data_cfg: dict) -> None:
    """One forward of two blank images: a student whose heads do not predict the data's classes is
    refused before training (it would fail mid-epoch with an index error)."""
    was_training = student.training
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        out = student.eval()(torch.zeros(2, *data_cfg["input_size"]))
    student.train(was_training)
    k = out.logits.shape[-1]
    if k != num_classes or out.dist_logits.shape[-1] != num_classes:
        raise KdkitError(f"the student predicts {k} classes but the data has {num_classes}: build it with "
                         f"num_classes={num_classes} (or give the data its {k} classes)")


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
        logits = teacher(raw["images"].to(accelerator.device))
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


def student_data_config(student: nn.Module, img_size: int | None) -> dict:
    """The student's timm data config, at `img_size` when given; tiny images (CIFAR) are evaluated
    whole (crop_pct 1.0), as the teacher is."""
    cfg = model_data_config(student.model)
    if img_size:
        cfg["input_size"] = (3, img_size, img_size)
    if cfg["input_size"][-1] <= 64:
        cfg["crop_pct"] = 1.0
    return cfg


def build_data(r: Recipe, data_cfg: dict, train_ds, eval_ds, acc: Accelerator):
    """Views (transforms, per-sample Mixup/CutMix) and per-process loaders from the recipe."""
    apply_views(train_ds, view_settings(data_cfg, dataclasses.asdict(r.aug)), len(train_ds.classes))
    apply_views(eval_ds, view_settings(data_cfg), len(train_ds.classes))
    per_proc = r.data.batch_size // acc.num_processes
    if per_proc * acc.num_processes != r.data.batch_size:
        raise KdkitError(f"batch_size {r.data.batch_size} is not divisible by {acc.num_processes} processes")
    loader_kw = {"workers": r.data.workers, "persistent_workers": r.data.persistent_workers,
                 "prefetch_factor": r.data.prefetch_factor}
    train_loader = create_loader(train_ds, per_proc, training=True, seed=r.run.seed, num_replicas=acc.num_processes,
                                 rank=acc.process_index, repeated_aug=r.aug.repeated_aug, **loader_kw)
    if len(train_loader) == 0:
        raise KdkitError(f"{len(train_ds)} training images make no full batch of {per_proc}: lower batch_size")
    eval_loader = create_loader(eval_ds, max(r.data.eval_batch_size // acc.num_processes, 1), training=False,
                                **loader_kw)
    return train_loader, eval_loader


def kernel_kwargs(opt: str, fused: str, device: torch.device) -> dict:
    """`fused` / `foreach` for the optimizer: "auto" is torch's fused Adam(W) kernel (on CUDA, and
    on CPU too: 10% faster a step than foreach for the quickstart student, docs/results.md) and
    foreach for other optimizers."""
    if fused == "auto":
        fused = "fused" if opt in ("adam", "adamw") and device.type in ("cuda", "cpu") else "foreach"
    if fused == "fused":
        if opt not in ("adam", "adamw"):
            raise KdkitError(f"optim.fused = 'fused' needs optim.opt adam or adamw, not {opt!r}: use 'foreach'")
        return {"fused": True, "foreach": False}
    return {"foreach": fused == "foreach"}


def build_optimizer(r: Recipe, student: nn.Module, batches_per_epoch: int, device: torch.device):
    """timm optimizer (parameter groups as timm builds them for the bare model: no weight decay on
    what its no_weight_decay() names and on 1-D parameters; optional layer-wise lr decay) and
    per-update scheduler; lr scaled by global batch / lr_base_batch (DeiT)."""
    o = r.optim
    lr = o.lr * (r.data.batch_size * o.grad_accum / o.lr_base_batch if o.lr_base_batch else 1)
    optimizer = create_optimizer_v2(student, o.opt, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                    layer_decay=o.layer_decay or None, **kernel_kwargs(o.opt, o.fused, device))
    scheduler, _ = create_scheduler_v2(optimizer, o.sched, num_epochs=o.epochs, warmup_epochs=o.warmup_epochs,
                                       warmup_lr=o.warmup_lr, min_lr=o.min_lr, step_on_epochs=False,
                                       updates_per_epoch=max(batches_per_epoch // o.grad_accum, 1))
    return optimizer, scheduler, lr


def open_train(r: Recipe):
    """The training split; with `data.unlabeled`, a SemiSupervisedDataset of it and the unlabeled images."""
    train_ds = open_dataset(r.data.path, r.data.train_split, seed=r.run.seed, strict=r.data.strict)
    if r.data.unlabeled:
        unlabeled = open_unlabeled(r.data.unlabeled, train_ds.classes, seed=r.run.seed, strict=r.data.strict)
        train_ds = SemiSupervisedDataset(train_ds, unlabeled, r.data.unlabeled_ratio)
    return train_ds


def open_data(r: Recipe):
    """The training split (with its unlabeled images, if any) and the evaluation split (in the
    training split's label space)."""
    train_ds = open_train(r)
    eval_ds = open_dataset(r.data.path, r.data.eval_split, classes=train_ds.classes, strict=r.data.strict)
    return train_ds, eval_ds


def build_loss(r: Recipe, mode: str, mixup: bool):
    """The recipe's loss; with unlabeled images, wrapped with per-sample masks (losses/semi.py)."""
    settings = dict(task_weight=r.loss.task_weight, kd_weight=r.loss.kd_weight, tau=r.loss.tau,
                    kl_reduction=r.loss.kl_reduction, hard_smoothing=r.loss.hard_smoothing,
                    label_smoothing=0.0 if mixup else r.aug.label_smoothing)
    loss = create_loss("none" if mode == "train" else r.loss.kind, **settings)
    if not r.data.unlabeled:
        if r.loss.confidence_threshold > 0 and mode == "distill":
            console.print("[bold yellow]warning: loss.confidence_threshold applies to unlabeled images only, "
                          "and this run has none (data.unlabeled)")
        return loss
    return semi_supervised(loss, r.loss.pseudo_label, r.loss.confidence_threshold, **settings)


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


def build_student(r: Recipe, mode: str, student: nn.Module | str | None, num_classes: int) -> nn.Module:
    """The recipe's student (or the given module) wrapped with its head strategy."""
    head = r.model.head
    if mode == "train" and head == "auto":
        # plain supervised training; a model with a distillation token still trains both heads
        head = "token" if getattr(student, "dist_token", None) is not None or (
            student is None and "distilled" in resolve_model_name(r.model.student)) else "shared"
    return create_student(student if student is not None else r.model.student, num_classes, head,
                          pretrained=r.model.pretrained, weights=r.model.student_weights or None,
                          img_size=r.model.img_size, patch_size=r.model.patch_size,
                          drop_path_rate=r.model.drop_path, model_kwargs=r.model.kwargs)


def build_teacher(r: Recipe, teacher: nn.Module | str | None, num_classes: int, data_cfg: dict,
                  acc: Accelerator | None = None) -> Teacher:
    """The recipe's teacher (or the given module), frozen, bridged to the student's normalisation,
    in the run's precision (`acc`) and memory format (run.channels_last), compiled with
    run.compile. Built under a forked RNG so that a teacher (or none, with a cache) never changes
    the student's random stream: a run reading cached logits draws the same dropout as one running
    the teacher."""
    if teacher is None and not r.model.teacher:
        raise KdkitError("distillation needs a teacher: pass --teacher NAME (and --teacher-weights FILE), "
                         "or --logits CACHE")
    with torch.random.fork_rng(devices=[]):
        t = create_teacher(teacher if teacher is not None else r.model.teacher, num_classes,
                           weights=r.model.teacher_weights or None, model_kwargs=r.model.teacher_kwargs)
    t.set_student_normalization(data_cfg["mean"], data_cfg["std"])
    if acc is not None:
        t.amp_dtype = amp_dtype(teacher_precision(r, acc))
        cl = r.run.channels_last
        if cl == "on" or (cl == "auto" and is_convnet(t.model)):
            t.use_channels_last()
    if r.run.compile:
        t.model.compile()
    return t


def build_logit_source(r: Recipe, teacher: nn.Module | str | None, data_cfg: dict, train_ds, eval_loader,
                       acc: Accelerator, summary: dict):
    """A LiveTeacher, or CachedLogits when the recipe names a cache (checked against this run; a
    live teacher serves the epochs past the cache, unless the cached epochs are cycled)."""
    num_classes = len(train_ds.classes)
    if not r.model.teacher_logits:
        t = build_teacher(r, teacher, num_classes, data_cfg, acc)
        summary["teacher_check"] = check_teacher(t, eval_loader, num_classes, r.run.teacher_check_batches, acc,
                                                 train_ds.issues().get("empty_classes", ()))
        return LiveTeacher(t)
    from kdkit.engine.caching import expected_manifest

    cache = LogitCache(r.model.teacher_logits)
    cache.check_run(expected_manifest(r, train_ds, data_cfg, cache.mode))
    fallback = None
    if cache.mode == "fixed" and is_augmented(view_settings(data_cfg, dataclasses.asdict(r.aug))):
        console.print("[bold yellow]warning: the cache holds one fixed record per image, but training augments "
                      "every view: the teacher's answer is for the clean image, not the view the student sees")
    if cache.mode == "replay" and r.optim.epochs > cache.epochs:
        if r.model.teacher_logits_cycle:
            train_ds.view_cycle = cache.epochs
        elif teacher is not None or r.model.teacher:
            fallback = LiveTeacher(build_teacher(r, teacher, num_classes, data_cfg, acc))
        else:
            raise KdkitError(f"the cache holds {cache.epochs} epochs and the run has {r.optim.epochs}: pass "
                             f"--teacher to compute the rest live, or --logits-cycle to replay the cached ones")
    summary["logits"] = {"cache": str(cache.root), "mode": cache.mode, "epochs": cache.epochs,
                         "topk": cache.manifest["topk"], "dtype": cache.manifest["dtype"],
                         "cycle": bool(train_ds.view_cycle), "live_after": cache.epochs if fallback else None}
    return CachedLogits(cache, fallback)


def run(recipe: Recipe, mode: str = "distill", student: nn.Module | None = None,
        teacher: nn.Module | None = None, resume: str | Path | None = None) -> dict:
    """Run `mode` ("distill" or "train") as the recipe says. `student`/`teacher` may be nn.Modules that
    replace the recipe's model names. `resume`: a run directory whose newest valid checkpoint the
    run continues from (same recipe). Returns the summary (also written to RUN/summary.json)."""
    r = recipe
    if r.data.unlabeled and (mode == "train" or r.loss.kind == "none"):
        raise KdkitError("unlabeled images (data.unlabeled) learn from the teacher only: use kdkit distill with "
                         "loss soft or hard")
    set_seed(r.run.seed)
    if r.run.deterministic:
        set_deterministic()
    acc = make_accelerator(r)
    train_ds, eval_ds = open_data(r)
    classes = train_ds.classes
    student = build_student(r, mode, student, len(classes))
    data_cfg = student_data_config(student, r.model.img_size)
    check_student_classes(student, len(classes), data_cfg)
    empty = train_ds.issues().get("empty_classes")
    if empty and acc.is_main_process:
        console.print(f"[bold yellow]warning: class folders without images, kept as classes with no samples "
                      f"(the label space has {len(classes)} classes): {', '.join(empty[:10])}; remove them, or "
                      f"--strict to stop")
    train_loader, eval_loader = build_data(r, data_cfg, train_ds, eval_ds, acc)
    loss_kind = "none" if mode == "train" else r.loss.kind
    loss = build_loss(r, mode, train_ds.mixup is not None)
    semi = isinstance(train_ds, SemiSupervisedDataset)
    summary: dict = {"mode": mode, "classes": len(classes), "precision": str(acc.mixed_precision),
                     "teacher_precision": teacher_precision(r, acc),
                     "train_images": train_ds.num_labeled if semi else len(train_ds),
                     "eval_images": len(eval_ds), "conventions": loss.conventions(),
                     "processes": acc.num_processes, "global_batch_size": r.data.batch_size}
    if semi:
        summary["unlabeled"] = unlabeled_summary(r, train_ds, train_loader)
    logits = build_logit_source(r, teacher, data_cfg, train_ds, eval_loader, acc, summary) \
        if loss.needs_teacher else None
    optimizer, scheduler, lr = build_optimizer(r, student, len(train_loader), acc.device)
    if r.run.compile:
        student.compile()  # in place: state-dict names stay the student's own
    out_dir = Path(resume) if resume else run_dir_for(r, mode)
    config = student_config(student, r, classes, data_cfg, loss.conventions())
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "recipe.toml", r.to_toml())
        console.print(f"{mode}: {config['architecture']} ({sum(p.numel() for p in student.parameters()) / 1e6:.2f}M "
                      f"params, head {type(student).__name__}) on {summary['train_images']} images"
                      f"{f' + {len(train_ds.unlabeled)} unlabeled' if semi else ''}, {len(classes)} classes, "
                      f"loss {loss_kind}, lr {lr:.3g}, {r.optim.epochs} epochs, precision {acc.mixed_precision}"
                      f"{', compiled' if r.run.compile else ''} -> {out_dir}")
        note = PRESET_NOTES.get(r.preset, "") if r.preset or not r.description else ""
        console.print(f"recipe: {r.description or 'command line'}; preset {r.preset or 'none'}{note}")
    start = time.perf_counter()
    result = fit(student, DistillationStep(loss, logits), train_loader, epochs=r.optim.epochs, optimizer=optimizer,
                 scheduler=scheduler, eval_loader=eval_loader, accelerator=acc,
                 clip_grad=r.optim.clip_grad, run_dir=out_dir, log_every=r.run.log_every,
                 eval_every=r.run.eval_every, progress=r.run.progress,
                 save=lambda s: save_student(out_dir / "student", s, config),
                 ema_decay=r.optim.ema_decay, save_ema=lambda s: save_student(out_dir / "student_ema", s, config),
                 checkpoint_every=r.run.checkpoint_every, keep_checkpoints=r.run.keep_checkpoints,
                 resume=bool(resume), on_nonfinite=r.run.on_nonfinite, stats=(stats := {}))
    summary.update(eval=result, train_seconds=time.perf_counter() - start, run_dir=str(out_dir),
                   student=str(out_dir / "student"), updates=stats["updates"], skipped_steps=stats["skipped_steps"],
                   data={"train": {**train_ds.issues(), "skipped_images": stats["skipped_images"]},
                         "eval": {**eval_ds.issues(), "skipped_images": result.get("skipped", 0)}})
    if semi:
        summary["unlabeled"] = unlabeled_summary(r, train_ds, train_loader, out_dir)
    if acc.is_main_process:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    summary["model"] = acc.unwrap_model(student)
    return summary


def load_saved(weights: str | Path, model: str | None = None,
               num_classes: int | None = None) -> tuple[nn.Module, list[str] | None, dict]:
    """Rebuild a saved student folder (or any timm model + weights file) for inference.

    Returns (module, classes, data_cfg): for a folder with config.json, the student in its saved head
    strategy (forward gives StudentOut) and its saved label_names; otherwise the timm model `model`
    with `weights` loaded (forward gives (B, K) logits; num_classes as given, timm's default when
    None) and classes None. data_cfg is the timm data config (input_size, mean, std, ...) to feed it.
    """
    from kdkit.models.saved import load_student_weights, read_config

    path = Path(weights)
    if not path.exists():
        raise KdkitError(f"weights not found: {path}")
    cfg = read_config(path) if has_saved_config(path) else {}
    if cfg:
        head = {"TokenHead": "token", "DualHead": "dual", "SharedHead": "shared"}[cfg["kdkit"]["head"]] if \
            "kdkit" in cfg else "shared"
        student = create_student(model or cfg["architecture"], cfg["num_classes"], head, weights=None,
                                 model_kwargs=cfg.get("model_args", {}))
        load_student_weights(student, path)
        classes = cfg.get("label_names")
    else:
        if model is None:
            raise KdkitError(f"no config.json beside {path}: pass --model NAME")
        t = create_teacher(model, num_classes, weights=path)
        student, classes = t.model, None
    dcfg = cfg.get("pretrained_cfg") or model_data_config(student.model if hasattr(student, "model") else student)
    return student, classes, dcfg


def has_saved_config(weights: str | Path) -> bool:
    """Whether `weights` is (or sits in) a saved folder with its config.json."""
    path = Path(weights)
    return (path if path.is_dir() else path.parent).joinpath("config.json").is_file()


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
