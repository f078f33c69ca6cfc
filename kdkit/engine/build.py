"""Builders: the recipe turned into the run's pieces (accelerator, data, student, teachers, logit
source, loss, optimizer). Configuration stops here: below, classes take flat typed arguments, and
the strategies (heads, losses, logit sources) are built by name through their registries with
their own settings checked against their constructors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from kdkit.accelerator import create_accelerator, set_deterministic
from kdkit.cache import build_manifest, data_identity, read_manifest, replay_cycle
from kdkit.config import PRESETS, DataConfig, LossConfig, Recipe
from kdkit.console import console
from kdkit.data import (
    SemiSupervisedDataset,
    StreamDataset,
    create_loader,
    is_augmented,
    is_data_object,
    open_dataset,
    open_unlabeled,
    view_settings,
    with_views,
)
from kdkit.engine.evaluate import check_teacher
from kdkit.engine.metrics import resolve_trackers
from kdkit.losses import LOSSES, DistillationLoss, semi_supervised
from kdkit.models import HEADS, create_student, create_teacher, model_data_config, resolve_model_name
from kdkit.models.student import eval_mode, num_pooled_features
from kdkit.models.teacher import Teacher
from kdkit.registry import KdkitError, Lazy, call_with, check_settings, parameters
from kdkit.sources import LOGIT_SOURCES, LogitSource, SourceContext


def make_accelerator(recipe: Recipe, run_dir: Path | None = None) -> Accelerator:
    """The run's Accelerator: run.precision (auto = Accelerate decides), gradient accumulation and,
    given the `run_dir` they write under, the trackers of run.log_with (one not installed is an
    error). Without a run_dir (kdkit cache), no trackers."""
    trackers = resolve_trackers(recipe.run.trackers()) if run_dir is not None else None
    return create_accelerator(recipe.run.precision, recipe.optim.grad_accum, log_with=trackers, project_dir=run_dir)


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a mixed precision ("no": None, full precision)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

def teacher_precision(r: Recipe, acc: Accelerator) -> str:
    """The teacher's precision: run.teacher_precision, or the run's own when it is "auto"."""
    return str(acc.mixed_precision) if r.run.teacher_precision == "auto" else r.run.teacher_precision

def is_convnet(model: nn.Module) -> bool:
    """Whether convolutions do most of the work (more than a patch-embedding convolution)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1

def check_student_classes(student: nn.Module, num_classes: int, data_cfg: dict) -> None:
    """One forward of two blank images: a student whose heads do not predict the data's classes is
    refused before training (it would fail mid-epoch with an index error)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), eval_mode(student):
        out = student(torch.zeros(2, *data_cfg["input_size"]))
    k = out.logits.shape[-1]
    if k != num_classes or out.dist_logits.shape[-1] != num_classes:
        raise KdkitError(f"the student predicts {k} classes but the data has {num_classes}: build it with "
                         f"num_classes={num_classes} (or give the data its {k} classes)")

def student_data_config(student: nn.Module, img_size: int | None, data: DataConfig | None = None) -> dict:
    """The student's timm data config, at `img_size` when given; tiny images (CIFAR) are evaluated
    whole (crop_pct 1.0), as the teacher is. `data`'s crop_pct, mean and std win where set."""
    cfg = model_data_config(student.model)
    if img_size:
        cfg["input_size"] = (3, img_size, img_size)
    if cfg["input_size"][-1] <= 64:
        cfg["crop_pct"] = 1.0
    if data is not None:
        cfg["mean"], cfg["std"] = data.normalization(cfg)
        if data.crop_pct is not None:
            cfg["crop_pct"] = data.crop_pct
    return cfg

def build_data(r: Recipe, data_cfg: dict, train_ds, eval_ds, acc: Accelerator, view_cycle: int = 0):
    """The opened splits with their views (transforms, per-sample Mixup/CutMix; the training split
    replaying `view_cycle` epochs, data_view_cycle) and per-process loaders from the recipe.
    Returns (train_ds, eval_ds, train_loader, eval_loader): new datasets, the opened ones unchanged."""
    train_ds = with_views(train_ds, view_settings(data_cfg, dataclasses.asdict(r.aug)), len(train_ds.classes),
                          view_cycle)
    eval_ds = with_views(eval_ds, view_settings(data_cfg), len(train_ds.classes))
    if isinstance(eval_ds, StreamDataset) and acc.num_processes > 1:
        raise KdkitError("a streamed evaluation split is read by one process only: evaluate from local shards or a "
                         "folder (--val-split), or run one process")
    per_proc = r.data.batch_size // acc.num_processes
    if per_proc * acc.num_processes != r.data.batch_size:
        raise KdkitError(f"batch_size {r.data.batch_size} is not divisible by {acc.num_processes} processes")
    # on a GPU (data.prefetcher) the batches travel as uint8 and the device finishes them (timm's prefetcher)
    loader_kw = {"workers": r.data.workers, "persistent_workers": r.data.persistent_workers,
                 "prefetch_factor": r.data.prefetch_factor,
                 "finish_on_device": r.data.prefetcher and acc.device.type == "cuda"}
    train_loader = create_loader(train_ds, per_proc, training=True, seed=r.run.seed, num_replicas=acc.num_processes,
                                 rank=acc.process_index, **loader_kw)
    if len(train_loader) == 0:
        raise KdkitError(f"{len(train_ds)} training images make no full batch of {per_proc}: lower batch_size")
    eval_loader = create_loader(eval_ds, max(r.data.eval_batch_size // acc.num_processes, 1), training=False,
                                **loader_kw)
    return train_ds, eval_ds, train_loader, eval_loader


def data_view_cycle(r: Recipe, kind: str) -> int:
    """The epochs the training views cycle over, decided with the data, before the loaders: a run of
    loss `kind` reading a replay cache (model.logit_cache) with model.logit_cache_cycle and more
    epochs than the cache holds replays the cache's epochs (kdkit.cache.replay_cycle of its
    manifest); else 0."""
    if not (LOSSES.get(kind).needs_teacher and logit_source_name(r) == "cache" and r.model.logit_cache
            and r.model.logit_cache_cycle):
        return 0
    return replay_cycle(read_manifest(r.model.logit_cache), r.optim.epochs, cycle=True)

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
    per-update scheduler; the learning rate as timm's train.py (OptimConfig.learning_rate: optim.lr, or
    optim.lr_base scaled by the global batch)."""
    o = r.optim
    lr = o.learning_rate(r.data.batch_size)
    optimizer = create_optimizer_v2(student, o.opt, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                    layer_decay=o.layer_decay or None, **o.optimizer_kwargs(),
                                    **kernel_kwargs(o.opt, o.fused, device))
    scheduler, _ = create_scheduler_v2(optimizer, o.sched, num_epochs=o.epochs, warmup_epochs=o.warmup_epochs,
                                       warmup_lr=o.warmup_lr, min_lr=o.min_lr, decay_epochs=o.decay_epochs,
                                       decay_rate=o.decay_rate, step_on_epochs=False,
                                       updates_per_epoch=max(batches_per_epoch // o.grad_accum, 1))
    return optimizer, scheduler, lr

STREAM_NO_CACHE = ("a streamed source has no sample positions for a logit cache to address: cache and distil from "
                   "local shards (`kdkit shards SOURCE --out DIR`, then --data DIR)")


def open_train(r: Recipe, data: object | None = None):
    """The training split of data.path, or of `data` (a data object of the Python API, which
    data.path then only names); with `data.unlabeled`, a SemiSupervisedDataset of it and the
    unlabeled images."""
    train_ds = open_dataset(r.data.path if data is None else data, r.data.train_split, seed=r.run.seed,
                            strict=r.data.strict, **r.data.source_options())
    if isinstance(train_ds, StreamDataset) and r.data.unlabeled:
        raise KdkitError("unlabeled images join indexed data only, not a stream: write the labeled data as local "
                         "shards first (`kdkit shards SOURCE --out DIR`)")
    if r.data.unlabeled:
        unlabeled = open_unlabeled(r.data.unlabeled, train_ds.classes, seed=r.run.seed, strict=r.data.strict)
        train_ds = SemiSupervisedDataset(train_ds, unlabeled, r.data.unlabeled_ratio)
    return train_ds

def open_data(r: Recipe, data: object | None = None, eval_data: object | None = None):
    """The training split (with its unlabeled images, if any) and the evaluation split (in the
    training split's label space). `data` / `eval_data`: data objects or paths of the Python API
    in place of data.path; a single dataset object with no `eval_data` is evaluated on itself
    (with a warning)."""
    train_ds = open_train(r, data)
    options = {**r.data.source_options(), "class_map": None}  # the training split's label space
    source = eval_data if eval_data is not None else r.data.path if data is None else data
    if eval_data is None and data is not None and is_data_object(data) and not hasattr(data, "keys"):
        console.print("[bold yellow]warning: no eval_data: the run evaluates on its training data (pass "
                      "eval_data= for a held-out split)")
    eval_ds = open_dataset(source, r.data.eval_split, classes=train_ds.classes, strict=r.data.strict, **options)
    return train_ds, eval_ds


def views_for(r: Recipe, data_cfg: dict, mode: str) -> dict:
    """Replay caches hold the run's training views; fixed caches the evaluation view of each image."""
    return view_settings(data_cfg, dataclasses.asdict(r.aug)) if mode == "replay" else view_settings(data_cfg)


def expected_manifest(r: Recipe, train_ds, data_cfg: dict, mode: str, teacher: dict | None = None, topk: int = 0,
                      dtype: str = "float16", shard_size: int = 4096) -> dict:
    """The manifest of a cache of this run's teacher outputs (teacher {} when no teacher is loaded).
    train_ds: the training split, or a SemiSupervisedDataset (its unlabeled images are recorded too)."""
    if teacher is None:
        names = [resolve_model_name(n) for n, _ in r.model.teachers()]
        teacher = {"name": (names[0] if len(names) == 1 else f"ensemble({','.join(names)})") if names else None}
    ids = data_identities(r, train_ds)
    return build_manifest(mode=mode, teacher=teacher, data=ids["train"], views=views_for(r, data_cfg, mode),
                          seed=r.run.seed, epochs=r.optim.epochs, topk=topk, dtype=dtype, shard_size=shard_size,
                          unlabeled=ids.get("unlabeled"),
                          unlabeled_ratio=train_ds.unlabeled_ratio if "unlabeled" in ids else None)


def split_found(dataset, source: str, split: str) -> str:
    """The split `dataset` was opened from: "auto-eval" resolved to the folder (val, validation,
    test) or `datasets` split it found; "." for a bare ImageFolder evaluated whole."""
    if split != "auto-eval":
        return split
    root = getattr(dataset, "root", None)
    if root is not None:
        return "." if Path(root).resolve() == Path(source).resolve() else Path(root).name
    found = getattr(getattr(dataset, "ds", None), "split", None)  # a datasets.Dataset's NamedSplit
    return str(found) if found else split


def data_identities(r: Recipe, train_ds, eval_ds=None) -> dict:
    """kdkit.cache.data_identity of the run's splits, as opened: "train" (the labeled images),
    "eval" when eval_ds is given, "unlabeled" when train_ds is a SemiSupervisedDataset."""
    semi = isinstance(train_ds, SemiSupervisedDataset)
    ids = {"train": data_identity(train_ds.labeled if semi else train_ds, r.data.path, r.data.train_split)}
    if eval_ds is not None:
        ids["eval"] = data_identity(eval_ds, r.data.path, split_found(eval_ds, r.data.path, r.data.eval_split))
    if semi:
        ids["unlabeled"] = data_identity(train_ds.unlabeled, r.data.unlabeled, "")
    return ids


# what the run gives the strategies' constructors (never strategy settings of their own)
LOSS_PROVIDED = (*LossConfig.SHARED, "label_smoothing", "student_features", "teacher_features", "num_classes")


def check_auto_augment(policy: str) -> None:
    """aug.auto_augment built as timm's create_transform builds it (rand-*: RandAugment, augmix-*:
    AugMix, else an AutoAugment policy name), so that a policy timm refuses is one line before the
    run, not an AssertionError from inside the transforms."""
    if not policy:
        return
    from timm.data import auto_augment as aa

    make = (aa.rand_augment_transform if policy.startswith("rand") else
            aa.augment_and_mix_transform if policy.startswith("augmix") else aa.auto_augment_transform)
    try:
        make(policy, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise KdkitError(f"aug.auto_augment {policy!r} is not a timm augmentation policy ({str(e) or 'cannot parse'}"
                         f"): e.g. rand-m9-mstd0.5-inc1 (RandAugment, DeiT's), augmix-m5-w4-d2 (AugMix), v0 or "
                         f"original (AutoAugment), '' = off") from None


def loss_kind(r: Recipe, mode: str) -> str:
    """The run's loss by name: "none" (no teacher) for `kdkit train`, else loss.kind. Decided here
    once; below, "no teacher" is the loss kind "none", and `mode` is only the verb the user ran."""
    return "none" if mode == "train" else r.loss.kind


def check_strategies(r: Recipe, kind: str) -> None:
    """Every strategy name and setting of the recipe checked before anything is built or written;
    kind: the run's loss (loss_kind)."""
    check_auto_augment(r.aug.auto_augment)
    if kind != "none":
        check_settings(LOSSES.get(kind), r.loss.args, f"loss {kind!r}", LOSS_PROVIDED)
        if r.data.unlabeled and LOSSES.get(kind).needs_features:
            raise KdkitError(f"loss {kind!r} matches the teacher's features on labeled batches; unlabeled "
                             f"images (data.unlabeled) work with the logit losses (soft, hard, dkd, dist, mlkd)")
        if r.data.unlabeled and LOSSES.get(kind).needs_epoch:
            raise KdkitError(f"loss {kind!r} learns from whole labeled steps (a curriculum over epochs); "
                             f"unlabeled images (data.unlabeled) work with soft, hard, dkd, dist, mlkd")
    elif r.loss.args:
        raise KdkitError("loss.args: kdkit train (loss 'none') has no distillation loss to give them to")
    if r.model.head != "auto":
        check_settings(HEADS.get(r.model.head), r.model.head_args, f"student head {r.model.head!r}", ("model",))
    if LOSSES.get(kind).needs_teacher:
        name = logit_source_name(r)
        check_settings(LOGIT_SOURCES.get(name).from_run, r.model.logit_source_args, f"logit source {name!r}", ("run",))


def build_loss(r: Recipe, kind: str, mixup: bool, **provided: object) -> DistillationLoss:
    """The loss `kind` (loss_kind: "none" for kdkit train, else loss.kind) by name: its own settings
    are `loss.args`; the shared distillation settings (loss.task_weight, tau, ...), the label
    smoothing (0 when Mixup/CutMix smooths the targets) and `provided` (num_classes,
    student_features, teacher_features, ...) go to it where its constructor names them. With
    unlabeled images, wrapped with per-sample masks (losses/semi.py)."""
    shared = {**r.loss.shared(), "label_smoothing": 0.0 if mixup else r.aug.label_smoothing}
    loss = LOSSES.create(kind, r.loss.args if kind != "none" else None, **shared, **provided)
    if kind != "none":
        warn_unused_settings(r, loss)
    if not r.data.unlabeled:
        if r.loss.confidence_threshold > 0 and kind != "none":
            console.print("[bold yellow]warning: loss.confidence_threshold applies to unlabeled images only, "
                          "and this run has none (data.unlabeled)")
        return loss
    return semi_supervised(loss, r.loss.pseudo_label, r.loss.confidence_threshold, **shared)


def warn_unused_settings(r: Recipe, loss: DistillationLoss) -> None:
    """A shared loss setting changed from its default (the recipe's preset's value, else the
    dataclass default) that neither the loss nor the pseudo-label loss takes has no effect: say
    so, rather than ignore it silently. A preset's own values are not the user's: not warned of."""
    defaults = type(r.loss)(**{k: v for k, v in PRESETS.get(r.preset, {}).get("loss", {}).items()
                               if k in r.loss.SHARED})
    takes = set(parameters(LOSSES.get(r.loss.kind)))
    if r.data.unlabeled and r.loss.pseudo_label not in ("auto", r.loss.kind):
        takes |= set(parameters(LOSSES.get(r.loss.pseudo_label)))
    unused = [k for k in r.loss.SHARED if getattr(r.loss, k) != getattr(defaults, k) and k not in takes]
    if unused:
        console.print(f"[bold yellow]warning: {', '.join(f'loss.{k} = {getattr(r.loss, k)!r}' for k in unused)} "
                      f"has no effect on loss {loss.name!r}")


def build_student(r: Recipe, mode: str, student: nn.Module | str | None, num_classes: int,
                  report: Callable[[str], object] | None = None) -> nn.Module:
    """The recipe's student (or the given module) wrapped with its head strategy, with model.drop_rate
    (timm's drop_rate), in channels-last memory format with run.channels_last, and with gradient
    checkpointing with model.grad_checkpointing; `report` receives the one-line record of a
    model.pretrained_path load or of a model.init_from weight selection."""
    head = r.model.head
    if mode == "train" and head == "auto":
        # plain supervised training; a model with a distillation token still trains both heads
        head = "token" if getattr(student, "dist_token", None) is not None or (
            student is None and "distilled" in resolve_model_name(r.model.student)) else "shared"
    kwargs = {**r.model.kwargs, "drop_rate": r.model.drop_rate} if r.model.drop_rate else r.model.kwargs
    built = create_student(student if student is not None else r.model.student, num_classes, head,
                           pretrained=r.model.pretrained, weights=r.model.student_weights or None,
                           img_size=r.model.img_size, patch_size=r.model.patch_size,
                           drop_path_rate=r.model.drop_path, model_kwargs=kwargs, head_args=r.model.head_args,
                           pretrained_path=r.model.pretrained_path or None, init_from=r.model.init_from or None,
                           init_from_layers=r.model.init_from_layers, report=report)
    if r.run.channels_last:  # timm's --channels-last: the student's memory format
        built.to(memory_format=torch.channels_last)
    if r.model.grad_checkpointing:
        if not hasattr(built.model, "set_grad_checkpointing"):
            raise KdkitError(f"model.grad_checkpointing: {type(built.model).__name__} has no set_grad_checkpointing "
                             f"(timm's models have it)")
        built.model.set_grad_checkpointing(True)
    return built


def build_teacher(r: Recipe, teacher: nn.Module | str | None, num_classes: int, data_cfg: dict,
                  acc: Accelerator | None = None, weights: str | None = None) -> Teacher:
    """The recipe's teacher (or the given module), frozen, bridged to the student's normalisation,
    in the run's precision (`acc`) and memory format (run.teacher_channels_last), compiled with
    run.compile. Built under a forked RNG so that a teacher (or none, with a cache) never changes
    the student's random stream: a run reading cached logits draws the same dropout as one running
    the teacher."""
    members = r.model.teachers()
    if teacher is None and not members:
        raise KdkitError("distillation needs a teacher: pass --teacher NAME (and --teacher-weights FILE), "
                         "or --logit-cache CACHE")
    if teacher is None and weights is None:
        teacher, weights = members[0]
    with torch.random.fork_rng(devices=[]):
        t = create_teacher(teacher, num_classes, weights=weights or None, model_kwargs=r.model.teacher_kwargs)
    t.set_student_normalization(data_cfg["mean"], data_cfg["std"])
    if acc is not None:
        t.amp_dtype = amp_dtype(teacher_precision(r, acc))
        cl = r.run.teacher_channels_last
        if cl == "on" or (cl == "auto" and is_convnet(t.model)):
            t.use_channels_last()
    if r.run.compile:
        t.model.compile()
    return t


def build_teachers(r: Recipe, teacher: nn.Module | str | None, num_classes: int, data_cfg: dict,
                   acc: Accelerator | None = None) -> list[Teacher]:
    """Every teacher of the recipe (several for an ensemble), or the given module."""
    members = r.model.teachers()
    if teacher is not None or not members:  # a module of the Python API; or none, and the clear error
        return [build_teacher(r, teacher, num_classes, data_cfg, acc, weights="")]
    return [build_teacher(r, name, num_classes, data_cfg, acc, weights=w) for name, w in members]


def logit_source_name(r: Recipe) -> str:
    """model.logit_source, with "auto" resolved: a cache when one is named, an ensemble for several teachers."""
    if r.model.logit_source != "auto":
        return r.model.logit_source
    if r.model.logit_cache:
        return "cache"
    return "ensemble" if len(r.model.teachers()) > 1 else "live"


def build_logit_source(r: Recipe, teacher: nn.Module | str | None, data_cfg: dict, train_ds,
                       acc: Accelerator | None) -> LogitSource:
    """The recipe's logit source by name (model.logit_source), with its settings (model.logit_source_args); the
    teachers it asks for are built only then (check_teachers checks them). train_ds: the training
    split with its views (its view_cycle: the cached epochs the run replays)."""
    num_classes = len(train_ds.classes)
    if isinstance(train_ds, StreamDataset) and logit_source_name(r) == "cache":
        raise KdkitError(STREAM_NO_CACHE)
    pieces = SourceContext(num_classes=num_classes, epochs=r.optim.epochs,
                       teachers=lambda: build_teachers(r, teacher, num_classes, data_cfg, acc),
                       has_teachers=teacher is not None or bool(r.model.teachers()),
                       cache=r.model.logit_cache, view_cycle=getattr(train_ds, "view_cycle", 0),
                       expected_manifest=lambda mode: expected_manifest(r, train_ds, data_cfg, mode),
                       augmented=is_augmented(view_settings(data_cfg, dataclasses.asdict(r.aug))),
                       standardize=bool(r.loss.args.get("standardize", False)))
    name = logit_source_name(r)
    return call_with(LOGIT_SOURCES.get(name).from_run, r.model.logit_source_args, f"logit source {name!r}", {"run": pieces})


def check_teachers(r: Recipe, source: LogitSource, eval_loader, num_classes: int, acc: Accelerator,
                   empty_classes: list[str] | tuple[str, ...] = ()) -> dict | None:
    """The source's teachers (LogitSource.teachers) checked on a slice of the evaluation split
    (engine/evaluate.py:check_teacher): the run summary's teacher_check, with "members" for
    several; None when the source runs no teacher."""
    teachers = source.teachers()
    if not teachers:
        return None
    checks = [check_teacher(t, eval_loader, num_classes, r.run.teacher_check_batches, acc, empty_classes) for t in teachers]
    return checks[0] if len(checks) == 1 else {**checks[0], "members": checks}


def provided_features(student: nn.Module, source: LogitSource | None) -> dict:
    """What a feature loss may ask for: the student's and the teacher's feature sizes (lazily; the
    source says its teacher's, LogitSource.feature_size)."""
    def teacher_features() -> int:
        if source is None:
            raise KdkitError("feature distillation needs a live teacher (features are not cached): pass --teacher")
        return source.feature_size()

    model = student.model
    return {"student_features": Lazy(lambda: num_pooled_features(model)),
            "teacher_features": Lazy(teacher_features), "num_classes": Lazy(lambda: int(model.num_classes))}


def attach_adapters(student: nn.Module, loss: DistillationLoss) -> None:
    """Put the loss's trainable adapters (feature projections) into the student's head, so that the
    optimizer, data parallelism and checkpoints include them."""
    adapters = loss.student_adapters()
    if adapters and not hasattr(student, "adapters"):
        raise KdkitError(f"loss {loss.name!r} trains projections inside the student's head, and "
                         f"{type(student).__name__} has no adapters (use a kdkit head: token, dual, shared, native)")
    for name, module in adapters.items():
        student.adapters[name] = module


@dataclass
class BuiltRun:
    """A run's pieces, built from the recipe, before the optimizer: what `run` trains and `plan`
    reports, with what building them found (engine/summary.py:run_summary records it)."""

    acc: Accelerator
    kind: str  # the loss's name ("none" for kdkit train)
    train_ds: object
    eval_ds: object
    student: nn.Module
    data_cfg: dict
    train_loader: object
    eval_loader: object
    logits: LogitSource | None
    loss: DistillationLoss
    semi: bool
    loaded: str = ""  # the record of a model.pretrained_path load or model.init_from selection
    teacher_check: dict | None = None  # check_teachers' report


def build_run(r: Recipe, mode: str = "distill", student: nn.Module | None = None,
              teacher: nn.Module | None = None, run_dir: Path | None = None, data: object | None = None,
              eval_data: object | None = None) -> BuiltRun:
    """Check the recipe's strategies, then build the accelerator (with run.log_with's trackers under
    `run_dir`, when given), data (data.path, or the Python API's `data` / `eval_data` objects:
    open_data), student, logit source (the teachers, checked on the evaluation split) and loss, as
    the run's loss kind (loss_kind: "none" for kdkit train) needs them."""
    kind = loss_kind(r, mode)
    if r.data.unlabeled and kind == "none":
        raise KdkitError("unlabeled images (data.unlabeled) learn from the teacher only: use kdkit distill with "
                         "a distillation loss (soft, hard, dkd, ...)")
    check_strategies(r, kind)
    set_seed(r.run.seed)
    if r.run.deterministic:
        set_deterministic()
    acc = make_accelerator(r, run_dir)
    train_ds, eval_ds = open_data(r, data, eval_data)
    classes = train_ds.classes
    loaded: list[str] = []
    student = build_student(r, mode, student, len(classes), report=loaded.append)
    if loaded and acc.is_main_process:
        console.print(loaded[0], highlight=False)
    data_cfg = student_data_config(student, r.model.img_size, r.data)
    check_student_classes(student, len(classes), data_cfg)
    empty = train_ds.issues().get("empty_classes")
    if empty and acc.is_main_process:
        console.print(f"[bold yellow]warning: class folders without images, kept as classes with no samples "
                      f"(the label space has {len(classes)} classes): {', '.join(empty[:10])}; remove them, or "
                      f"--strict to stop")
    for split, ds in (("train", train_ds), ("eval", eval_ds)):
        found = ds.issues() if acc.is_main_process else {}
        for key, what in (("dangling_links", "symlinks point to nothing, skipped"),
                          ("folders_reached_again", "folders reached again through symlinks, not entered again")):
            if found.get(key):
                console.print(f"[bold yellow]warning: {split}: {len(found[key])} {what} (listed in summary.json): "
                              f"{', '.join(found[key][:3])}")
    train_ds, eval_ds, train_loader, eval_loader = build_data(r, data_cfg, train_ds, eval_ds, acc,
                                                              data_view_cycle(r, kind))
    semi = isinstance(train_ds, SemiSupervisedDataset)
    logits, checked = None, None
    if LOSSES.get(kind).needs_teacher:
        logits = build_logit_source(r, teacher, data_cfg, train_ds, acc)
        checked = check_teachers(r, logits, eval_loader, len(classes), acc, empty or ())
    loss = build_loss(r, kind, train_ds.mixup is not None, **provided_features(student, logits))
    attach_adapters(student, loss)
    return BuiltRun(acc, kind, train_ds, eval_ds, student, data_cfg, train_loader, eval_loader, logits, loss,
                    semi, loaded[0] if loaded else "", checked)
