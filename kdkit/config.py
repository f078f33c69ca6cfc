"""Recipes: every hyperparameter of a run, as data (TOML or YAML), validated against dataclasses.

Unknown keys and wrong types are errors that name the key and the closest valid one. Command-line
flags and dotted overrides (`optim.lr=1e-3`) win over the file, which wins over the preset, which
wins over the defaults below.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import yaml

from kdkit.registry import KdkitError, suggest

PRECISIONS = ("auto", "no", "bf16", "fp16")
NONFINITE = ("stop", "skip")  # run.on_nonfinite: what a non-finite loss does
FUSED = ("auto", "fused", "foreach", "off")
CHANNELS_LAST = ("auto", "on", "off")  # run.teacher_channels_last
LR_BASE_SCALES = ("linear", "sqrt", "auto")  # optim.lr_base_scale; auto = timm's '' (by optimizer)
EVAL_METRICS = ("top1", "top5", "class_top1", "class_top5", "dist_top1", "dist_top5", "fused_top1",
                "fused_top5")  # run.eval_metric; top1 / top5 = fused_top1 / fused_top5 (the student's prediction)
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")  # run.log_with: Accelerate's trackers kdkit installs as extras


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise KdkitError(f"{key} must be one of {', '.join(choices)}, got {value!r}.{suggest(str(value), list(choices))}")


def folder_name(name: str, key: str) -> str:
    """`name` if it names one folder inside its parent (no separator, not '.' or '..', not absolute,
    not blank), else a KdkitError naming `key`: a name from a recipe file must not place a run, or
    anything it writes, outside the output folder."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
        raise KdkitError(f"{key} must be one folder name inside the output folder (no '/', no '..', not absolute, "
                         f"not empty), got {name!r}")
    return name


@dataclass
class ModelConfig:
    student: str = "deit_tiny"
    head: str = "auto"  # a HEADS name: auto (native / token / dual, see models/student.py) | token | dual | shared | native
    head_args: dict = field(default_factory=dict)  # the head strategy's own settings (its constructor's arguments)
    img_size: int | None = None
    patch_size: int | None = None
    drop_path: float = 0.0
    drop_rate: float = 0.0  # the student's dropout (timm's and DeiT's --drop)
    pretrained: bool = False  # student from timm's hub weights
    pretrained_path: str = ""  # student from a local timm/DeiT checkpoint, adapted (classes, size, tokens): no network
    student_weights: str = ""  # load a checkpoint of exactly this student, strictly (timm's --initial-checkpoint)
    init_from: str = ""  # weight selection (Xu et al., ICLR 2024) from a larger model: timm name, weights file, student folder
    init_from_layers: str = "first"  # which layers of a deeper model: first (the paper's first-N) | uniform
    grad_checkpointing: bool = False  # timm's set_grad_checkpointing on the student (less memory, slower step)
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs for the student
    teacher: str | list[str] = ""  # a timm name; several = an ensemble (model.logit_source "ensemble")
    teacher_weights: str | list[str] = ""  # local weights (one per teacher); empty = timm's hub weights
    teacher_kwargs: dict = field(default_factory=dict)
    logit_cache: str = ""  # a `kdkit cache` folder: read the teacher's outputs instead of running it
    logit_cache_cycle: bool = False  # past the cached epochs, replay them again (else run the teacher live)
    logit_source: str = "auto"  # a LOGIT_SOURCES name: auto (cache with logit_cache, ensemble with several teachers, else live)
    logit_source_args: dict = field(default_factory=dict)  # the logit source's own settings

    def teachers(self) -> list[tuple[str, str]]:
        """(name, weights) of every teacher; weights "" for the hub's."""
        names = [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)
        names = [n for n in names if n]
        weights = [self.teacher_weights] if isinstance(self.teacher_weights, str) else list(self.teacher_weights)
        if len(weights) == 1 and len(names) > 1 and not weights[0]:
            weights = [""] * len(names)
        if names and len(weights) != len(names):
            raise KdkitError(f"{len(names)} teachers and {len(weights)} teacher weights: give one --teacher-weights "
                             f"per --teacher, in the same order (\"\" for the hub's)")
        return list(zip(names, weights, strict=False))

    def __post_init__(self) -> None:
        for key in ("drop_path", "drop_rate"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise KdkitError(f"model.{key} must be in [0, 1), got {getattr(self, key)}")
        _choice("model.init_from_layers", self.init_from_layers, ("first", "uniform"))


@dataclass
class DataConfig:
    path: str = "cifar10-sample"
    train_split: str = "train"
    eval_split: str = "auto-eval"
    batch_size: int = 128  # global: split over processes
    eval_batch_size: int = 256
    workers: int = 2
    strict: bool = False  # fail on an unreadable image instead of skipping it
    unlabeled: str = ""  # unlabeled images (distillation only): a folder (flat or nested), save_to_disk folder, hf:NAME
    unlabeled_ratio: float = 1.0  # MU: unlabeled images per labeled one in every step
    persistent_workers: bool = True  # keep loader workers alive between epochs (no respawn per epoch)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    # on a CUDA device, training and evaluation batches come as uint8 pixels that the device normalises, erases and
    # mixes (timm's prefetcher; same views); false: the workers finish them (timm's --no-prefetcher)
    prefetcher: bool = True
    input_key: str = ""  # image member of a shard sample ('jpg;png') or column of a datasets dataset; "" = auto
    target_key: str = ""  # label member ('cls') or column; "" = auto
    class_map: str = ""  # a file of class names, one a line (timm's --class-map): fixes the label space
    streaming: bool = False  # hf:NAME streamed (datasets' streaming=True); URL shards are always streamed
    # evaluation centre crop: resize to img_size / crop_pct, crop img_size (timm's --crop-pct, DeiT's
    # --eval-crop-ratio); not set = 1.0 for images of 64 px or less, else the student's timm config
    crop_pct: float | None = None
    mean: list[float] | None = None  # normalisation (timm's --mean); not set = the student's timm config
    std: list[float] | None = None  # (timm's --std); one value = the same for the 3 channels

    def source_options(self) -> dict:
        """The keyword arguments kdkit.data.open_dataset takes for this data besides path and split."""
        return {"input_key": self.input_key or None, "target_key": self.target_key or None,
                "class_map": self.class_map or None, "streaming": self.streaming}

    def __post_init__(self) -> None:
        if not self.unlabeled_ratio > 0:
            raise KdkitError(f"data.unlabeled_ratio must be > 0, got {self.unlabeled_ratio}")
        if self.prefetch_factor < 1:
            raise KdkitError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise KdkitError(f"data.crop_pct must be in (0, 1], got {self.crop_pct}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) not in (1, 3):
                raise KdkitError(f"data.{key} takes 1 or 3 values (RGB), got {len(value)}: {value}")
        if self.std is not None and min(self.std) <= 0:
            raise KdkitError(f"data.std must be > 0, got {self.std}")

    def normalization(self, model_cfg: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the data: data.mean / data.std where set (one value for all 3 channels, as
        timm's resolve_data_config), else the model's timm config's."""
        return tuple(_rgb(self.mean, model_cfg["mean"])), tuple(_rgb(self.std, model_cfg["std"]))


def _rgb(value: list[float] | None, default) -> list[float]:
    return [float(x) for x in default] if value is None else [float(x) for x in value] * (3 // len(value))


@dataclass
class AugConfig:
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str = ""  # e.g. "rand-m9-mstd0.5-inc1"
    reprob: float = 0.0
    remode: str = "pixel"  # random erasing fill (timm's --remode): pixel | rand | const
    recount: int = 1  # random erasing: most boxes per image (timm's --recount)
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    cutmix_minmax: list[float] | None = None  # CutMix box side range, as a fraction (timm's --cutmix-minmax): CutMix on
    label_smoothing: float = 0.0
    repeated_aug: int = 0  # number of repeats (3 in DeiT); 0 or 1 = off
    crops_per_image: int = 0  # FKD's crops: N views of every image an epoch, one decode (epoch N x longer); 0 or 1 = off
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        _choice("aug.remode", self.remode, ("pixel", "rand", "const"))
        if self.recount < 1:
            raise KdkitError(f"aug.recount must be >= 1, got {self.recount}")
        mm = self.cutmix_minmax
        if mm is not None and not (len(mm) == 2 and 0 < mm[0] < mm[1] <= 1):
            raise KdkitError(f"aug.cutmix_minmax takes MIN MAX with 0 < MIN < MAX <= 1, got {mm}")
        if self.crops_per_image > 1 and self.repeated_aug > 1:
            raise KdkitError(f"aug.crops_per_image {self.crops_per_image} and aug.repeated_aug {self.repeated_aug} both "
                             "repeat images: choose one (crops: every image N times an epoch; repeats: DeiT's epoch)")
        for key in ("repeated_aug", "crops_per_image"):
            if getattr(self, key) < 0:
                raise KdkitError(f"aug.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class LossConfig:
    """The loss: `kind` names it (LOSSES), `args` holds its own settings (checked against its
    constructor), and the shared distillation settings below go to every loss whose constructor
    names them (and to the pseudo-label loss of unlabeled images)."""

    kind: str = "hard"  # a LOSSES name: none | soft | hard | dkd | dist | feature | ...
    args: dict = field(default_factory=dict)  # the loss's own settings, e.g. {alpha = 1.0, beta = 8.0} for dkd
    task_weight: float = 0.5
    kd_weight: float = 0.5
    tau: float = 1.0
    kl_reduction: str = "batchmean"  # batchmean | deit (sum / numel, as the DeiT reference code)
    hard_smoothing: float = 0.0
    pseudo_label: str = "auto"  # unlabeled samples' term: auto (= kind) | soft | hard
    confidence_threshold: float = 0.0  # unlabeled samples count where the teacher's max prob (tau 1) >= this

    SHARED = ("task_weight", "kd_weight", "tau", "kl_reduction", "hard_smoothing")

    def shared(self) -> dict:
        return {k: getattr(self, k) for k in self.SHARED}

    def __post_init__(self) -> None:
        # imported here, not at the top: `kdkit VERB --help` reads this module without loading torch
        from kdkit.losses.distillation import check_loss_settings
        from kdkit.losses.semi import PSEUDO_LABELS, check_threshold

        check_loss_settings(self.task_weight, self.kd_weight, self.tau, self.kl_reduction, self.hard_smoothing)
        check_threshold(self.confidence_threshold)
        if self.pseudo_label not in PSEUDO_LABELS:
            raise KdkitError(f"loss.pseudo_label must be one of {PSEUDO_LABELS}, got {self.pseudo_label!r}")


@dataclass
class OptimConfig:
    opt: str = "adamw"
    # the learning rate, as timm's train.py: `lr` if set (absolute), else lr_base scaled by the
    # global batch (x grad_accum) / lr_base_size, linearly or by its square root (learning_rate())
    lr: float = 0.0  # absolute (timm's --lr); 0 = from lr_base
    lr_base: float = 5e-4  # DeiT's 5e-4 per 512 images
    lr_base_size: int = 512  # DeiT's 512 (timm's default: 256)
    lr_base_scale: str = "linear"  # linear (DeiT) | sqrt | auto (timm's: sqrt for adam/lamb-family optimizers)
    opt_eps: float | None = None  # optimizer epsilon (timm's --opt-eps); not set = the optimizer's default
    opt_betas: list[float] | None = None  # optimizer betas (timm's --opt-betas); not set = the optimizer's
    opt_kwargs: dict = field(default_factory=dict)  # other optimizer arguments (timm's --opt-kwargs)
    weight_decay: float = 0.05
    momentum: float = 0.9
    epochs: int = 300
    sched: str = "cosine"
    decay_epochs: float = 90.0  # step schedule: epochs between decays (timm's --decay-epochs)
    decay_rate: float = 0.1  # step schedule: lr factor at each decay (timm's --decay-rate)
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float = 0.0  # 0 = off
    grad_accum: int = 1
    ema_decay: float = 0.0  # EMA of the student's weights (timm ModelEmaV3), e.g. 0.99996; 0 = off
    ema_warmup: bool = False  # EMA decay warm-up (timm's --model-ema-warmup: ModelEmaV3 use_warmup)
    layer_decay: float = 0.0  # layer-wise lr decay (timm param_groups_layer_decay), e.g. 0.75; 0 = off
    fused: str = "auto"  # auto | fused | foreach | off: optimizer kernel (auto: fused Adam(W), else foreach)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise KdkitError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.layer_decay < 1.0:
            raise KdkitError(f"optim.layer_decay must be in [0, 1) (0 = off), got {self.layer_decay}")
        _choice("optim.fused", self.fused, FUSED)
        _choice("optim.lr_base_scale", self.lr_base_scale, LR_BASE_SCALES)
        if self.lr < 0 or not self.lr_base > 0:
            raise KdkitError(f"optim.lr must be >= 0 (0 = from optim.lr_base) and optim.lr_base > 0, got "
                             f"{self.lr} and {self.lr_base}")
        if self.lr_base_size < 1:
            raise KdkitError(f"optim.lr_base_size must be >= 1 (the batch size lr_base is for), got {self.lr_base_size}")
        if self.opt_eps is not None and not self.opt_eps > 0:
            raise KdkitError(f"optim.opt_eps must be > 0, got {self.opt_eps}")
        if self.opt_betas is not None and not (1 <= len(self.opt_betas) <= 3 and all(0 <= b < 1 for b in self.opt_betas)):
            raise KdkitError(f"optim.opt_betas takes 1 to 3 values in [0, 1), got {self.opt_betas}")
        if not self.decay_epochs > 0 or not 0 < self.decay_rate <= 1:
            raise KdkitError(f"optim.decay_epochs must be > 0 and optim.decay_rate in (0, 1], got "
                             f"{self.decay_epochs} and {self.decay_rate}")

    def learning_rate(self, batch_size: int) -> float:
        """The optimizer's learning rate for a global batch of `batch_size`, as timm's train.py:
        lr if set, else lr_base * ratio with ratio = batch_size * grad_accum / lr_base_size, or
        sqrt(ratio) for sqrt scaling ("auto": sqrt when the optimizer's name contains "ada" or
        "lamb", timm's rule, else linear). DeiT's main.py is lr_base_size 512, linear."""
        if self.lr:
            return self.lr
        ratio = batch_size * self.grad_accum / self.lr_base_size
        scale = self.lr_base_scale
        if scale == "auto":
            scale = "sqrt" if any(o in self.opt.lower() for o in ("ada", "lamb")) else "linear"
        return self.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)

    def optimizer_kwargs(self) -> dict:
        """opt_eps / opt_betas (where set) and opt_kwargs, as timm's optimizer_kwargs gives them."""
        kwargs = {"eps": self.opt_eps, "betas": tuple(self.opt_betas) if self.opt_betas else None}
        return {**{k: v for k, v in kwargs.items() if v is not None}, **self.opt_kwargs}


@dataclass
class RunConfig:
    seed: int = 0
    output: str = "runs"
    name: str = ""
    precision: str = "auto"  # auto (Accelerate decides: launcher flag, env, accelerate config) | no | bf16 | fp16
    teacher_precision: str = "auto"  # auto (= the run's precision) | no | bf16 | fp16: the teacher's autocast
    compile: bool = False  # torch.compile the student and the teacher
    channels_last: bool = False  # the student in channels-last memory format (timm's --channels-last)
    teacher_channels_last: str = "auto"  # auto (ConvNet teachers) | on | off: the teacher's memory format
    log_every: int = 10
    eval_every: int = 1  # epochs between evaluations; 0 = the last epoch only
    # the evaluation that picks RUN/student_best (timm's --eval-metric and model_best): top1 / top5
    # are the student's prediction (fused_top1 / fused_top5), or a head's: class_top1, dist_top1
    eval_metric: str = "top1"
    teacher_check_batches: int = 4  # evaluation batches the teacher is checked on before distilling
    progress: bool = True
    checkpoint_every: int = 500  # optimizer updates between checkpoints (plus one per epoch); 0 = per epoch only
    keep_checkpoints: int = 2  # newest checkpoints kept in RUN/checkpoints; 0 = write none
    deterministic: bool = False  # deterministic kernels (CUDA); CPU runs are reproducible anyway
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss does
    log_with: str | list[str] = ""  # trackers mirroring metrics.jsonl: tensorboard, wandb, mlflow, aim, all; "a,b" or a list

    def __post_init__(self) -> None:
        self.trackers()
        if self.name:  # "" = the verb and the time
            folder_name(self.name, "run.name")
        _choice("run.precision", self.precision, PRECISIONS)
        _choice("run.teacher_precision", self.teacher_precision, PRECISIONS)
        _choice("run.teacher_channels_last", self.teacher_channels_last, CHANNELS_LAST)
        _choice("run.eval_metric", self.eval_metric, EVAL_METRICS)
        if self.on_nonfinite not in NONFINITE:
            raise KdkitError(f"run.on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        for key in ("checkpoint_every", "keep_checkpoints", "eval_every"):
            if getattr(self, key) < 0:
                raise KdkitError(f"run.{key} must be >= 0, got {getattr(self, key)}")
        if self.log_every < 1:
            raise KdkitError(f"run.log_every must be >= 1, got {self.log_every}")

    def trackers(self) -> list[str]:
        """run.log_with as a list of names ([] = none), "all" kept as given; an unknown name is an error."""
        items = self.log_with.split(",") if isinstance(self.log_with, str) else self.log_with
        names = [n.strip().lower() for n in items if n.strip()]
        for n in names:
            _choice("run.log_with", n, (*TRACKERS, "all"))
        return list(dict.fromkeys(names))


@dataclass
class Recipe:
    description: str = ""
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


# Named settings that reproduce a paper; a recipe names one with `preset = "deit"`.
PRESETS: dict[str, dict] = {
    # DeiT's recipe (Touvron et al., 2021, Table 9 and the reference code): hard distillation
    # through the token, 1/2 CE(y) + 1/2 CE(argmax teacher) with the reference code's KL convention,
    # label smoothing 0.1, RandAugment, random erasing, Mixup/CutMix, repeated augmentation,
    # stochastic depth 0.1. `kdkit distill` without --recipe uses it.
    "deit": {"model": {"head": "auto", "drop_path": 0.1},
             "loss": {"kind": "hard", "task_weight": 0.5, "kd_weight": 0.5, "tau": 1.0, "kl_reduction": "deit"},
             "aug": {"label_smoothing": 0.1, "scale": [0.08, 1.0], "hflip": 0.5, "color_jitter": 0.3,
                     "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0,
                     "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "repeated_aug": 3}},
    # DeiT's soft distillation (paper, section 5.2): tau = 3, lambda = 0.1.
    "deit_soft": {"model": {"head": "token"}, "loss": {"kind": "soft", "task_weight": 0.9, "kd_weight": 0.1,
                                                       "tau": 3.0, "kl_reduction": "deit"},
                  "aug": {"label_smoothing": 0.1}},
    # Function matching (Beyer et al., 2022, "Knowledge distillation: A good teacher is patient and
    # consistent"): no label term, KL at tau = 1 on the very view the teacher sees, Mixup (Beta(1, 1))
    # on every batch after an inception crop and a flip, gradient clipping at 1; long schedules
    # (set optim.epochs). Labeled, unlabeled (data.unlabeled) or mixed data.
    "function_matching": {"model": {"head": "shared"},
                          "loss": {"kind": "soft", "task_weight": 0.0, "kd_weight": 1.0, "tau": 1.0,
                                   "kl_reduction": "batchmean", "pseudo_label": "soft"},
                          "aug": {"mixup": 1.0, "cutmix": 0.0, "mixup_prob": 1.0, "label_smoothing": 0.0,
                                  "scale": [0.08, 1.0], "hflip": 0.5},
                          "optim": {"clip_grad": 1.0}},
}


# what the run's header says of each preset
PRESET_NOTES = {
    "deit": " (DeiT's recipe: hard distillation through the token, RandAugment, random erasing 0.25, Mixup 0.8 / "
            "CutMix 1.0, 3 repeats, label smoothing 0.1, drop_path 0.1; --preset none for kdkit's plain defaults)",
    "": " (kdkit's plain defaults, no RandAugment/Mixup/CutMix unless set; --preset deit for DeiT's recipe)",
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting int -> float and list -> tuple."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except KdkitError:
                pass
        raise KdkitError(f"{key}: expected {_name(tp)}, got {value!r}")
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise KdkitError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, arg, key) for v in value]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise KdkitError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise KdkitError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is dict and isinstance(value, dict):
        return dict(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise KdkitError(f"{key}: expected {_name(tp)}, got {type(value).__name__} {value!r}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


# keys of earlier recipes: read from files (and checkpoints) by upgrade_recipe, refused elsewhere
LEGACY = {
    "optim.lr_base_batch": "optim.lr_base_batch is now optim.lr_base_size, the batch size optim.lr_base is for "
                           "(optim.lr is absolute, as timm's --lr; 0 = from optim.lr_base)",
    "run.channels_last": "run.channels_last is now the student's memory format (true/false, timm's "
                         "--channels-last); the teacher's auto/on/off is run.teacher_channels_last",
}


# keys renamed, old -> new, read under their old names from recipe files, checkpoints, --set and the
# Python API's settings (renamed_keys): the logit source's keys say which is the cache folder and
# which the source's name (model.logits named a source, while the --logits flag named a folder)
RENAMED = {"model.teacher_logits": "model.logit_cache", "model.teacher_logits_cycle": "model.logit_cache_cycle",
           "model.logits": "model.logit_source", "model.logits_args": "model.logit_source_args"}


def renamed_keys(data: dict) -> dict:
    """`data` (a recipe-shaped dict) with the RENAMED keys under their new names (a new dict; a key
    given under both names: the new one wins)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in RENAMED.items():
        (section, key), (_, new_key) = old.split("."), new.split(".")
        table = out.get(section)
        if isinstance(table, dict) and key in table:
            value = table.pop(key)
            table.setdefault(new_key, value)
    return out


def upgrade_recipe(data: dict) -> dict:
    """A recipe dict of an earlier kdkit in today's keys, same run: the RENAMED keys; optim.lr (then
    the base rate) with optim.lr_base_batch N becomes optim.lr_base at lr_base_size N, linear (N = 0:
    an absolute optim.lr); a string run.channels_last (the teacher's) becomes run.teacher_channels_last."""
    out = renamed_keys(data)
    optim, run = out.get("optim"), out.get("run")
    if isinstance(optim, dict) and "lr_base_batch" in optim:
        n, lr = optim.pop("lr_base_batch"), optim.pop("lr", 5e-4)
        if n:
            optim.update(lr_base=lr, lr_base_size=n, lr_base_scale="linear")
        else:
            optim["lr"] = lr
    if isinstance(run, dict) and isinstance(run.get("channels_last"), str):
        run["teacher_channels_last"] = run.pop("channels_last")
    return out


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in LEGACY and (key not in names or isinstance(value, str) != (hints[key] is str)):
            raise KdkitError(LEGACY[full])
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            raise KdkitError(f"unknown recipe key {full!r}.{suggest(full, valid)} Valid keys: {', '.join(valid)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise KdkitError(f"{full}: expected a section (table), got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def read_recipe_file(path: str | Path) -> dict:
    """Parse a TOML or YAML recipe into a dict (data only: nothing is executed)."""
    path = Path(path)
    if not path.is_file():
        bundled = recipes_dir() / f"{path.name}.toml"
        if bundled.is_file() and not path.suffix:
            path = bundled
        else:
            raise KdkitError(f"recipe not found: {path} (bundled: {', '.join(list_recipes())})")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise KdkitError(f"cannot parse recipe {path}: {e}") from None
    if not isinstance(data, dict):
        raise KdkitError(f"recipe {path} must be a mapping of sections")
    return upgrade_recipe(data)


def parse_override(item: str) -> dict:
    """'optim.lr=1e-3' -> {'optim': {'lr': 0.001}}; values are TOML literals, else strings."""
    if "=" not in item:
        raise KdkitError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_recipe(path: str | Path | None = None, overrides: dict | list[str] | None = None) -> Recipe:
    """Defaults <- preset <- recipe file <- overrides (a nested dict or 'a.b=value' strings)."""
    data = read_recipe_file(path) if path else {}
    over: dict = overrides if isinstance(overrides, dict) else {}
    for item in overrides if isinstance(overrides, list) else []:
        over = _merge(over, parse_override(item))
    over = renamed_keys(over)  # --set model.logits=... and the API's old names
    merged = _merge(data, over)
    preset = merged.get("preset", "")
    if not isinstance(preset, str):
        raise KdkitError(f"preset: expected a preset name, got {type(preset).__name__} {preset!r}")
    preset = preset.replace("-", "_")  # "function-matching" names "function_matching"
    if preset == "none":
        merged["preset"] = preset = ""
    if preset:
        if preset not in PRESETS:
            raise KdkitError(f"unknown preset {preset!r}.{suggest(preset, list(PRESETS))} Presets: {list(PRESETS)}")
        merged = _merge(_merge(PRESETS[preset], data), over)
    return _build(Recipe, merged)


def recipes_dir() -> Path:
    return Path(__file__).resolve().parent / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def dumps_toml(data: dict) -> str:
    """A recipe-shaped dict as TOML text (tomli-w): top-level keys, then one table per section.
    Keys whose value is None (not set) are left out: TOML has no null, and reading the file back
    gives the default, None, again."""
    return tomli_w.dumps(_without_none(data))
