"""Flags shared by the training verbs: each maps onto one recipe key, and flags win over the recipe.

RUN_FLAGS (train, distill, cache) and DISTILL_FLAGS (distill, cache) are the single source of those
flags: the parsers, their grouped help with the default a run would use, `recipe_from_args`,
`kdkit completion` and docs/cli.md's tables follow them. A new flag is one entry here.

Only kdkit.config (dataclasses, PRESETS) and kdkit.cli.compat (timm's and DeiT's flags that need
more than a key) are imported here: `kdkit VERB --help` needs no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from kdkit.cli.compat import (
    REFUSED,
    TIMM_KD,
    Refuse,
    check_teacher_url,
    input_size,
    lr_scale,
    mixup_mode,
    opt_kwargs,
    output_dir,
    teacher_from_url,
    teacher_path,
)
from kdkit.config import (
    CHANNELS_LAST,
    EVAL_METRICS,
    LR_BASE_SCALES,
    NONFINITE,
    PRECISIONS,
    PRESETS,
    TRACKERS,
    Recipe,
    load_recipe,
)
from kdkit.registry import KdkitError, suggest

# argument groups, in the order --help shows them: title -> what the group holds
GROUPS: dict[str, str] = {
    "recipe": "where settings come from: defaults < --preset < --recipe file < the flags < --set",
    "model": "the models and the student's head",
    "data": "--batch-size is global (split over the processes); -b is per process, as timm's",
    "augmentation": "training views, with timm's names and meanings",
    "loss": "what the student learns from the labels and the teacher",
    "optimisation": "optimizer and schedule, as timm's create_optimizer_v2 / create_scheduler_v2",
    "run": "run directory, seed, logging and checkpoints",
    "distributed": "precision and kernels; the launcher (accelerate launch -m kdkit) sets processes and devices",
    "refused": "timm's and DeiT's flags with no kdkit meaning: each is refused in one line naming kdkit's way",
}

# Strategy names a plugin can extend: shown in the help and completed, but checked by the registry
# (which names the registered ones and suggests the closest), so that a plugin's name is accepted.
BUILTIN_LOSSES = ("none", "soft", "hard", "dkd", "dist", "feature", "ctkd", "mlkd")
BUILTIN_HEADS = ("auto", "token", "dual", "shared", "native")
# fixed sets (argparse refuses anything else); kdkit.losses.semi.PSEUDO_LABELS, which imports torch
PSEUDO_LABELS = ("auto", "soft", "hard")
PRESET_NAMES = (*PRESETS, "none")


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag that sets one recipe key.

    type: int, float or str (a value), or bool (a switch that sets `const`, True unless given).
    choices: a fixed set, refused otherwise by argparse; names: suggested names (help, completion)
    that the registry checks instead. metavar: what it takes (default: N, FLOAT or NAME by type).
    nargs: values taken (default 1). const: for a value flag, also allowed bare, meaning `const`.
    default: what the help says of the default where the recipe's value says little.
    per_process: the value is per process; the recipe gets value x WORLD_SIZE.
    repeat: the flag may be given several times (a list; one value stays a plain value).
    convert: the parsed value -> the key's value (may raise KdkitError).
    implies: the parsed value -> other keys the flag sets as timm or DeiT do, each unless the command
    line sets that key itself (a flag or --set); a flag with no key of its own (key "") sets them
    outright, and another flag setting one of them is an error.
    requires: the flag refines another (timm's --model-ema-decay refines --model-ema): refused
    without it, and its value wins over the other's for their shared key.
    check: given the parsed value and the resolved {key: (flag, value)}, raises KdkitError where the
    flags disagree (DeiT's --teacher-path URL and another --teacher-model).
    """

    key: str
    type: type
    help: str
    group: str
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None
    metavar: str | tuple[str, ...] | None = None
    nargs: int | str | None = None
    const: object = None
    default: str | None = None
    per_process: bool = False
    repeat: bool = False
    convert: Callable[[object], object] | None = None
    implies: Callable[[object], dict[str, object]] | None = None
    requires: str = ""
    check: Callable[[object, dict], None] | None = None


RUN_FLAGS: dict[str, Flag] = {
    # model
    "--head": Flag("model.head", str, "student head strategy: auto (token for ViTs with a class token, else dual "
                   "when distilling, shared in train), token, dual, shared, native, or a plugin's", "model",
                   names=BUILTIN_HEADS),
    "--img-size": Flag("model.img_size", int, "student input size, where the architecture takes it", "model",
                       default="the model's own"),
    "--patch-size": Flag("model.patch_size", int, "student patch size, where the architecture takes it", "model",
                         default="the model's own"),
    "--drop-path": Flag("model.drop_path", float, "stochastic depth rate of the student", "model"),
    "--drop": Flag("model.drop_rate", float, "dropout rate of the student (timm's and DeiT's --drop)", "model"),
    "--input-size": Flag("model.img_size", int, "DeiT's --input-size N or timm's C H W (3 N N): the student's "
                         "image size, as --img-size", "model", nargs="+", metavar="N", convert=input_size,
                         default="the model's own"),
    "--grad-checkpointing": Flag("model.grad_checkpointing", bool, "gradient checkpointing through the student's "
                                 "blocks (timm's set_grad_checkpointing: less memory, a slower step)", "model"),
    "--pretrained": Flag("model.pretrained", bool, "start the student from timm's hub weights (needs internet; "
                         "offline, give --pretrained-path FILE)", "model"),
    "--pretrained-path": Flag("model.pretrained_path", str, "start the student from a local timm or DeiT checkpoint, "
                              "offline, as timm's --pretrained --pretrained-path (--pretrained not needed): image and "
                              "patch size resampled, distillation token and head from the class token and head, the "
                              "classifier reset if the class count differs (timm's train.py always resets it)",
                              "model", metavar="FILE"),
    "--init-from": Flag("model.init_from", str, "weight selection (Xu et al., ICLR 2024): start the student from "
                        "evenly spaced channels of the first layers of a larger pretrained model of its family: a "
                        "timm name (hub weights), a safetensors or weights-only .pth file, or a kdkit student "
                        "folder; the classifier keeps its random init", "model", metavar="MODEL_OR_FILE"),
    "--student-weights": Flag("model.student_weights", str, "load a checkpoint of exactly this student, strictly "
                              "(timm's --initial-checkpoint); another class count or size: --pretrained-path",
                              "model", aliases=("--initial-checkpoint",), metavar="FILE"),
    # data
    "--data": Flag("data.path", str, "ImageFolder root with train/ and val/ or test/, a folder of webdataset tar "
                   "shards (or one .tar), a save_to_disk folder, hf:NAME, or cifar10-sample (bundled)", "data",
                   aliases=("--data-dir", "--data-path"), metavar="DIR"),
    "--train-split": Flag("data.train_split", str, "training split: a split folder, a split of the folder's "
                          "_info.json, or shards as a brace pattern ('train-{000000..000146}.tar'), as timm's",
                          "data", metavar="SPLIT"),
    "--val-split": Flag("data.eval_split", str, "evaluation split, as --train-split; auto-eval = the first of val, "
                        "validation, test", "data", metavar="SPLIT"),
    "--input-key": Flag("data.input_key", str, "image member of a shard sample ('jpg;png': the first present) or "
                        "image column of a datasets dataset, as timm's", "data", metavar="KEY", default="auto"),
    "--target-key": Flag("data.target_key", str, "label member of a shard sample (cls) or label column of a "
                         "datasets dataset (integers or class names), as timm's", "data", metavar="KEY",
                         default="auto"),
    "--class-map": Flag("data.class_map", str, "file of class names, one a line (line i = class i), fixing the "
                        "label space, as timm's", "data", metavar="FILE", default="the data's own"),
    "--streaming": Flag("data.streaming", bool, "stream hf:NAME (datasets' streaming=True) instead of downloading "
                        "it first; shards at URLs are always streamed (docs/data.md: what a stream guarantees)", "data"),
    "--batch-size": Flag("data.batch_size", int, "global batch size, split over the processes", "data"),
    "--batch-size-per-process": Flag(
        "data.batch_size", int, "batch size per process, as timm's -b: sets data.batch_size to N x the launcher's "
        "WORLD_SIZE (1 without a launcher); give it or --batch-size", "data", aliases=("-b",),
        default="not set", per_process=True),
    "--workers": Flag("data.workers", int, "data-loading worker processes (per process)", "data",
                      aliases=("-j", "--num_workers")),
    "--no-prefetcher": Flag("data.prefetcher", bool, "on a CUDA device, the loader workers normalise, erase and mix "
                            "the views (timm's); by default the device does, from uint8 batches", "data",
                            const=False, default="the device finishes them"),
    "--crop-pct": Flag("data.crop_pct", float, "evaluation centre crop: resize to size / crop-pct, crop size "
                       "(timm's; DeiT's --eval-crop-ratio)", "data", aliases=("--eval-crop-ratio",),
                       default="1 for images of 64 px or less, else the student's timm config"),
    "--mean": Flag("data.mean", float, "normalisation mean, 1 or 3 values (timm's)", "data", nargs="+",
                   metavar="MEAN", default="the student's timm config"),
    "--std": Flag("data.std", float, "normalisation std, 1 or 3 values (timm's)", "data", nargs="+", metavar="STD",
                  default="the student's timm config"),
    "--strict": Flag("data.strict", bool, "stop at an unreadable image or an empty class folder (without it, an "
                     "unreadable image is skipped and counted, an empty class folder stays a class with no samples "
                     "and a warning; hidden files and folders are always ignored)", "data"),
    # augmentation
    "--auto-augment": Flag("aug.auto_augment", str, "RandAugment / AutoAugment policy in timm's notation, '' = off",
                           "augmentation", aliases=("--aa",), metavar="POLICY"),
    "--reprob": Flag("aug.reprob", float, "random erasing probability", "augmentation"),
    "--remode": Flag("aug.remode", str, "random erasing fill: pixel (per-pixel noise), rand (per-channel) or "
                     "const (zeros)", "augmentation", choices=("pixel", "rand", "const")),
    "--recount": Flag("aug.recount", int, "random erasing: most boxes erased per image", "augmentation"),
    "--mixup": Flag("aug.mixup", float, "Mixup alpha, 0 = off", "augmentation"),
    "--cutmix": Flag("aug.cutmix", float, "CutMix alpha, 0 = off", "augmentation"),
    "--cutmix-minmax": Flag("aug.cutmix_minmax", float, "CutMix box side range (fractions of the image); turns "
                            "CutMix on, its alpha unused (timm's)", "augmentation", nargs=2, metavar=("MIN", "MAX"),
                            default="not set"),
    "--mixup-mode": Flag("", str, "timm's: how Mixup/CutMix draws its lambda; kdkit's is pair (one lambda per pair "
                         "of views, both ways: what a logit cache can replay), so batch and elem are refused",
                         "augmentation", choices=("batch", "pair", "elem"), implies=mixup_mode,
                         default="pair"),
    "--mixup-prob": Flag("aug.mixup_prob", float, "probability of Mixup or CutMix on a batch", "augmentation"),
    "--mixup-switch-prob": Flag("aug.mixup_switch_prob", float, "probability of CutMix instead of Mixup when both "
                                "are on", "augmentation"),
    "--label-smoothing": Flag("aug.label_smoothing", float, "label smoothing of the label term", "augmentation",
                              aliases=("--smoothing",)),
    "--color-jitter": Flag("aug.color_jitter", float, "colour jitter strength", "augmentation"),
    "--hflip": Flag("aug.hflip", float, "horizontal flip probability", "augmentation"),
    "--scale": Flag("aug.scale", float, "random-resized-crop area range", "augmentation", nargs=2,
                    metavar=("MIN", "MAX")),
    "--repeated-aug": Flag("aug.repeated_aug", int, "repeated augmentation: views of each image per epoch "
                           "(0 or 1 = off); bare = 3, DeiT's switch", "augmentation", aliases=("--aug-repeats",),
                           const=3),
    "--no-repeated-aug": Flag("aug.repeated_aug", bool, "DeiT's: no repeated augmentation (= --repeated-aug 0)",
                              "augmentation", const=0, default="off"),
    "--crops-per-image": Flag("aug.crops_per_image", int, "FKD's crops (its --num_crops): N views of every image "
                              "an epoch from one decode, the epoch N times longer (0 or 1 = off)", "augmentation"),
    # optimisation
    "--epochs": Flag("optim.epochs", int, "training epochs", "optimisation"),
    "--lr": Flag("optim.lr", float, "absolute learning rate, as timm's --lr (wins over --lr-base); 0 = from "
                 "--lr-base. DeiT's --lr is scaled: DeiT's --lr X = --lr-base X --lr-base-size 512 --lr-base-scale "
                 "linear", "optimisation", default="0, from optim.lr_base"),
    "--lr-base": Flag("optim.lr_base", float, "base learning rate, as timm's --lr-base: lr = lr_base x (global "
                      "batch x grad-accum / --lr-base-size), or its square root; given, --lr-base-size and "
                      "--lr-base-scale default to timm's 256 and auto", "optimisation",
                      implies=lambda v: {"optim.lr_base_size": 256, "optim.lr_base_scale": "auto"}),
    "--lr-base-size": Flag("optim.lr_base_size", int, "the batch size --lr-base is for (DeiT 512, timm 256); "
                           "given, --lr-base-scale defaults to timm's auto", "optimisation",
                           implies=lambda v: {"optim.lr_base_scale": "auto"}),
    "--lr-base-scale": Flag("optim.lr_base_scale", str, "how --lr-base follows the batch: linear, sqrt, or auto "
                            "(timm's '': sqrt for adam/lamb-family optimizers, else linear)", "optimisation",
                            names=LR_BASE_SCALES, metavar="SCALE", convert=lr_scale),
    "--opt": Flag("optim.opt", str, "optimizer, a timm name (adamw, sgd, lamb, ...)", "optimisation"),
    "--opt-eps": Flag("optim.opt_eps", float, "optimizer epsilon", "optimisation", default="the optimizer's"),
    "--opt-betas": Flag("optim.opt_betas", float, "optimizer betas", "optimisation", nargs="+", metavar="BETA",
                        default="the optimizer's"),
    "--opt-kwargs": Flag("optim.opt_kwargs", str, "other optimizer arguments, KEY=VALUE ... (timm's)",
                         "optimisation", nargs="*", metavar="KEY=VALUE", convert=opt_kwargs, default="none"),
    "--weight-decay": Flag("optim.weight_decay", float, "weight decay", "optimisation"),
    "--momentum": Flag("optim.momentum", float, "SGD momentum", "optimisation"),
    "--sched": Flag("optim.sched", str, "learning-rate schedule, a timm name (cosine, step, ...)", "optimisation"),
    "--decay-epochs": Flag("optim.decay_epochs", float, "--sched step: epochs between decays", "optimisation"),
    "--decay-rate": Flag("optim.decay_rate", float, "--sched step: learning-rate factor at each decay",
                         "optimisation", aliases=("--dr",)),
    "--warmup-epochs": Flag("optim.warmup_epochs", int, "linear warm-up epochs", "optimisation"),
    "--warmup-lr": Flag("optim.warmup_lr", float, "learning rate the warm-up starts from", "optimisation"),
    "--min-lr": Flag("optim.min_lr", float, "learning rate the schedule ends at", "optimisation"),
    "--clip-grad": Flag("optim.clip_grad", float, "gradient-norm clipping, 0 = off", "optimisation"),
    "--grad-accum": Flag("optim.grad_accum", int, "batches accumulated per optimizer update", "optimisation",
                         aliases=("--grad-accum-steps",)),
    "--ema-decay": Flag("optim.ema_decay", float, "EMA of the student's weights (e.g. 0.99996), 0 = off",
                        "optimisation"),
    "--model-ema": Flag("optim.ema_decay", bool, "timm's switch: EMA of the student's weights, at decay 0.9998 "
                        "(timm's default; DeiT's is 0.99996) unless --model-ema-decay", "optimisation",
                        const=0.9998, default="off"),
    "--model-ema-decay": Flag("optim.ema_decay", float, "the decay of --model-ema (timm's; needs --model-ema)",
                              "optimisation", requires="--model-ema", default="0.9998 with --model-ema"),
    "--model-ema-warmup": Flag("optim.ema_warmup", bool, "EMA decay warm-up (timm's)", "optimisation"),
    "--layer-decay": Flag("optim.layer_decay", float, "layer-wise learning-rate decay (e.g. 0.75), 0 = off",
                          "optimisation"),
    # run
    "--output": Flag("run.output", str, "folder for run directories", "run", metavar="DIR"),
    "--name": Flag("run.name", str, "run directory name", "run", aliases=("--experiment",),
                   default="the verb and the time"),
    "--seed": Flag("run.seed", int, "run seed (augmentation, order, initialisation)", "run"),
    "--no-progress": Flag("run.progress", bool, "no progress bars", "run", const=False, default="bars on"),
    "--log-every": Flag("run.log_every", int, "optimizer updates between metrics.jsonl lines", "run",
                        aliases=("--log-interval",)),
    "--eval-every": Flag("run.eval_every", int, "epochs between evaluations, 0 = the last epoch only", "run"),
    "--checkpoint-every": Flag("run.checkpoint_every", int, "optimizer updates between checkpoints (plus one per "
                               "epoch), 0 = per epoch only", "run"),
    "--eval-metric": Flag("run.eval_metric", str, "the evaluation whose best keeps RUN/student_best beside "
                          "RUN/student (timm's model_best): top1 / top5 = the student's prediction, or a head's",
                          "run", choices=EVAL_METRICS),
    "--output_dir": Flag("", str, "DeiT's: write the run to DIR itself (= --output PARENT --name NAME)", "run",
                         metavar="DIR", implies=output_dir, default="not set"),
    "--keep-checkpoints": Flag("run.keep_checkpoints", int, "newest checkpoints kept, 0 = write none", "run",
                               aliases=("--checkpoint-hist",)),
    "--on-nonfinite": Flag("run.on_nonfinite", str, "what a NaN/inf loss does: stop the run, or skip the step",
                           "run", choices=NONFINITE),
    "--log-with": Flag("run.log_with", str, "experiment trackers that mirror metrics.jsonl, comma-separated: "
                       "tensorboard (RUN/kdkit/), wandb, mlflow, aim, or all installed; each is a pip extra, "
                       'pip install "kdkit[tensorboard]"', "run", names=(*TRACKERS, "all"), metavar="NAMES",
                       default="none"),
    # distributed
    "--precision": Flag("run.precision", str, "mixed precision; auto lets Accelerate decide (accelerate launch "
                        "--mixed_precision, ACCELERATE_MIXED_PRECISION, accelerate config)", "distributed",
                        choices=PRECISIONS),
    "--teacher-precision": Flag("run.teacher_precision", str, "the teacher's autocast; auto = the run's precision "
                                "(bf16 speeds a teacher up on CPUs with AMX)", "distributed", choices=PRECISIONS),
    "--amp": Flag("run.precision", bool, "timm's switch: mixed precision in float16 (= --precision fp16) or in "
                  "--amp-dtype", "distributed", const="fp16", default="off"),
    "--amp-dtype": Flag("run.precision", str, "timm's --amp dtype: float16 or bfloat16 (needs --amp)",
                        "distributed", choices=("float16", "bfloat16"), requires="--amp",
                        convert=lambda v: {"float16": "fp16", "bfloat16": "bf16"}[v], default="float16"),
    "--compile": Flag("run.compile", bool, "torch.compile the student and the teacher", "distributed"),
    "--channels-last": Flag("run.channels_last", bool, "the student in channels-last memory format (timm's)",
                            "distributed"),
    "--teacher-channels-last": Flag("run.teacher_channels_last", str, "the teacher's memory format; auto = "
                                    "channels-last for ConvNet teachers; bare = on", "distributed",
                                    choices=CHANNELS_LAST, const="on"),
    "--deterministic": Flag("run.deterministic", bool, "deterministic kernels (CUDA); CPU runs are reproducible "
                            "anyway", "distributed"),
}

DISTILL_FLAGS: dict[str, Flag] = {
    "--preset": Flag("preset", str, "named settings (docs/concepts.md): deit = DeiT's recipe (hard distillation "
                     "through the token, RandAugment, random erasing, Mixup/CutMix, repeated augmentation, label "
                     "smoothing, drop_path 0.1); none = kdkit's plain defaults. A preset sits under the --recipe "
                     "file: the file's own keys win", "recipe", choices=PRESET_NAMES,
                     default="deit without --recipe, else the recipe's"),
    "--teacher": Flag("model.teacher", str, "teacher: a timm name or kdkit short name (regnety_160 = DeiT's "
                      "RegNetY-16GF); repeat it for an ensemble (--teacher a --teacher b)", "model",
                      aliases=("--teacher-model",), repeat=True),
    "--teacher-weights": Flag("model.teacher_weights", str, "local teacher weights: a file or a kdkit student "
                              "folder; not set = timm's hub weights; one per --teacher, in order ('' for the hub's)",
                              "model", metavar="FILE", repeat=True),
    "--teacher-path": Flag("model.teacher_weights", str, "DeiT's: the teacher's weights, a local file; the URL of "
                           "weights timm has (DeiT's regnety_160) reads timm's copy and names that teacher",
                           "model", metavar="FILE", convert=teacher_path, implies=teacher_from_url,
                           check=check_teacher_url, default="not set"),
    "--logit-cache": Flag("model.logit_cache", str, "read the teacher's outputs from a `kdkit cache` folder (the "
                          "teacher is not loaded, unless the run is longer than the cache); --logits: its old name",
                          "model", metavar="DIR", aliases=("--logits",)),
    "--logit-cache-cycle": Flag("model.logit_cache_cycle", bool, "past the cached epochs, replay them again instead "
                                "of running the teacher; --logits-cycle: its old name", "model",
                                aliases=("--logits-cycle",)),
    "--logit-source": Flag("model.logit_source", str, "the logit source by name: auto (a cache with --logit-cache, "
                           "an ensemble with several --teacher, else the live teacher), live, cache, ensemble, or a "
                           "plugin's; its settings: --set model.logit_source_args={...}", "model", metavar="NAME"),
    "--student": Flag("model.student", str, "student: a timm name or kdkit short name (deit_tiny = DeiT-Ti with "
                      "a distillation token)", "model", aliases=("--model",)),
    "--unlabeled": Flag("data.unlabeled", str, "unlabeled images the student learns from through the teacher: a "
                        "folder (flat or nested, no class folders), a save_to_disk folder or hf:NAME", "data",
                        metavar="DIR"),
    "--unlabeled-ratio": Flag("data.unlabeled_ratio", float, "MU: unlabeled images per labeled one in every step",
                              "data"),
    "--loss": Flag("loss.kind", str, "distillation loss: a built-in name or a plugin's", "loss",
                   names=BUILTIN_LOSSES),
    "--distillation-type": Flag("loss.kind", str, "DeiT's: none, soft or hard (= --loss)", "loss",
                                choices=("none", "soft", "hard")),
    "--task-weight": Flag("loss.task_weight", float, "weight of the label term, in [0, 1] (the other weight "
                          "stays)", "loss"),
    "--kd-weight": Flag("loss.kd_weight", float, "weight of the teacher term, in [0, 1] (the other weight stays)",
                        "loss"),
    "--task-loss-weight": Flag("loss.task_weight", float, "timm's: the label term's weight; alone, the teacher "
                               "term's is 1 - it (timm's complementary mode)", "loss",
                               implies=lambda w: {"loss.kd_weight": 1.0 - w}),
    "--distill-loss-weight": Flag("loss.kd_weight", float, "timm's: the teacher term's weight; alone, the label "
                                  "term's is 1 (timm's independent mode)", "loss",
                                  implies=lambda w: {"loss.task_weight": 1.0}),
    "--distillation-alpha": Flag("loss.kd_weight", float, "DeiT's alpha: the teacher term's weight; alone, the "
                                 "label term's is 1 - alpha (DeiT's)", "loss",
                                 implies=lambda a: {"loss.task_weight": 1.0 - a}),
    "--tau": Flag("loss.tau", float, "soft-distillation temperature (> 0)", "loss",
                  aliases=("--kd-temperature", "--distillation-tau")),
    "--pseudo-label": Flag("loss.pseudo_label", str, "what unlabeled images learn: soft (KL tau^2), hard (the "
                           "teacher's argmax) or auto (the --loss kind)", "loss", choices=PSEUDO_LABELS),
    "--confidence-threshold": Flag("loss.confidence_threshold", float, "keep an unlabeled image only where the "
                                   "teacher's top probability (tau 1) is >= this; 0 keeps all", "loss"),
    # timm's distillation flags; --kd-model-name last: its defaults give way to the weights' own
    "--kd-distill-type": Flag("model.head", str, "timm's: logit (one head, = --head shared) or token (the "
                              "distillation token, = --head token)", "model", choices=("logit", "token"),
                              convert=lambda v: {"logit": "shared", "token": "token"}[v], default="logit"),
    "--kd-token-distill-type": Flag("loss.kind", str, "timm's token distillation: soft or hard (= --loss)", "loss",
                                    choices=("soft", "hard"), default="soft"),
    "--kd-model-name": Flag("model.teacher", str, "timm's teacher flag; with it, unless given, timm's logit "
                            "distillation: --loss soft, --head shared, --tau 4, task and teacher weights 1, "
                            "batchmean KL", "model", implies=lambda v: dict(TIMM_KD)),
}


def dest(flag: str) -> str:
    """The argparse destination of a table flag ('--kd-weight' -> 'kd_weight')."""
    return flag.lstrip("-").replace("-", "_")


def world_size() -> int:
    """Processes of this run, from the launcher's WORLD_SIZE (accelerate launch, torchrun); 1 without one."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise KdkitError(f"WORLD_SIZE={raw!r} is not a number of processes: unset it, or launch with "
                         "accelerate launch / torchrun, which set it")
    return n


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Recipe)
             if f.default_factory is not dataclasses.MISSING}


def recipe_default(key: str, preset: str = "") -> object:
    """The value a run uses for `key` when nothing sets it: `preset`'s, else the dataclass default.
    Read from the classes (not instances: LossConfig's check imports torch)."""
    section, _, leaf = key.rpartition(".")
    node: object = PRESETS.get(preset, {})
    for part in key.split("."):
        node = node.get(part, dataclasses.MISSING) if isinstance(node, dict) else dataclasses.MISSING
    if node is not dataclasses.MISSING:
        return node
    fields = {f.name: f for f in dataclasses.fields(_SECTIONS[section] if section else Recipe)}
    return fields[leaf].default


def _same(a: object, b: object) -> bool:
    return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == "":
        return "not set"
    if isinstance(value, list | tuple):
        return " ".join(_show(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def help_text(flag: Flag, preset: str = "") -> str:
    """The flag's help with the default a run without --recipe would use (`preset`: the verb's preset
    then, "" for none), and the recipe key it sets."""
    if flag.default is not None:
        return f"{flag.help} (default: {flag.default}{f'; {flag.key}' if flag.key else ''})"
    plain, used = recipe_default(flag.key), recipe_default(flag.key, preset)
    if not _same(used, plain):
        return f"{flag.help} (default: {_show(used)} from preset {preset}, {_show(plain)} with --preset none; {flag.key})"
    return f"{flag.help} (default: {_show(plain)}, from {flag.key})"


def _choice_type(choices: tuple[str, ...]):
    def parse(text: str) -> str:
        for value in (text, text.replace("-", "_")):  # "function-matching" names "function_matching"
            if value in choices:
                return value
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}.{suggest(text, choices)}")

    return parse


def _metavar(flag: Flag) -> str | tuple[str, ...] | None:
    if flag.metavar or flag.choices:
        return flag.metavar
    if flag.names:
        return "{" + ",".join(flag.names) + "}"
    return {int: "N", float: "FLOAT"}.get(flag.type, "NAME")


def add_flag(group: argparse._ActionsContainer, name: str, flag: Flag, preset: str = "") -> argparse.Action:
    """Add one table flag (and its aliases, short ones first) to a parser or argument group."""
    options = sorted((name, *flag.aliases), key=lambda o: (o.startswith("--"), o != name))
    text = help_text(flag, preset).replace("%", "%%")
    kwargs: dict = {"dest": dest(name), "default": None, "help": text}
    if flag.type is bool:
        action = group.add_argument(*options, action="store_const", const=True if flag.const is None else flag.const,
                                    **kwargs)
    else:
        if flag.const is not None:
            kwargs.update(nargs="?", const=flag.const)
        elif flag.nargs:
            kwargs["nargs"] = flag.nargs
        if flag.repeat:
            kwargs["action"] = "append"
        action = group.add_argument(*options, type=_choice_type(flag.choices) if flag.choices else flag.type,
                                    choices=flag.choices, metavar=_metavar(flag), **kwargs)
    if flag.names:
        action.complete = flag.names  # read by `kdkit completion`
    return action


def add_recipe_args(p: argparse.ArgumentParser, flags: dict[str, Flag],
                    preset: str = "") -> dict[str, argparse._ArgumentGroup]:
    """The recipe options (--recipe, --set, --resume) and `flags`, in GROUPS' argument groups; the help
    shows the defaults of a run without --recipe under `preset` ("" = none). Returns the groups, for a
    verb's own flags."""
    groups = {title: p.add_argument_group(title, text) for title, text in GROUPS.items()
              if title in ("recipe", "refused") or any(f.group == title for f in flags.values())}
    g = groups["recipe"]
    recipe = g.add_argument("-c", "--recipe", "--config", dest="recipe", metavar="FILE",
                            help="TOML/YAML recipe file, or a bundled recipe's name (see `kdkit recipes`)")
    recipe.complete = bundled_recipes
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set optim.weight_decay=0.1 (repeatable, wins over the flags)")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run from its newest valid checkpoint, with its recorded recipe "
                        "(only flags that cannot change results, such as --workers, may be added)")
    # within the data group the run's own data comes first, then a verb's extra sources (--unlabeled)
    for name, flag in sorted(flags.items(), key=lambda kv: kv[1].group == "data" and kv[0] in DISTILL_FLAGS):
        add_flag(groups[flag.group], name, flag, preset)
    for name, (nargs, message) in REFUSED.items():
        groups["refused"].add_argument(name, action=Refuse, nargs=nargs, message=message, dest=dest(name),
                                       default=None, metavar="X", help=message.replace("%", "%%"))
    return groups


def bundled_recipes() -> list[str]:
    """The bundled recipes' names (for shell completion; config is imported only when asked)."""
    from kdkit.config import list_recipes

    return list_recipes()


def recipe_from_args(args: argparse.Namespace, flags: dict[str, Flag], extra: dict[str, object] | None = None) -> Recipe:
    """The recipe the command line asks for: the --recipe file (or the run's own, with --resume), the
    flags given (with what they imply, as timm or DeiT: Flag.implies), `extra`, then --set.
    distill and cache without --recipe use preset deit."""
    given = flag_values(args, flags)
    if given.get("run.name", ("", None))[1] == "":  # names no folder (a recipe's "" is the default name)
        from kdkit.config import folder_name

        folder_name("", "--name")
    items = [(key, value) for key, (_, value) in given.items()] + list((extra or {}).items())
    if "--preset" in flags and args.preset is None and not args.recipe and not args.resume:
        items.append(("preset", "deit"))  # the headline command runs the paper's whole recipe
    over: dict = {}
    for key, value in items:
        node = over
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    from kdkit.config import _merge, parse_override

    for item in args.overrides:
        over = _merge(over, parse_override(item))
    if args.resume:
        return resumed_recipe(args.resume, over, args.recipe)
    return load_recipe(args.recipe, over)


def flag_values(args: argparse.Namespace, flags: dict[str, Flag]) -> dict[str, tuple[str, object]]:
    """{recipe key: (flag, value)} of the flags given, then the keys they imply (Flag.implies) that
    neither another flag nor --set gives. Two flags setting one key is an error, unless one
    refines the other (Flag.requires)."""
    given: dict[str, tuple[str, object]] = {}
    implied: list[tuple[str, bool, dict[str, object]]] = []
    for name, flag in flags.items():
        value = getattr(args, dest(name))
        if value is None:
            continue
        if flag.per_process:
            value *= world_size()
        if flag.repeat:
            value = value[0] if len(value) == 1 else list(value)
        if flag.implies:
            implied.append((name, not flag.key, flag.implies(value)))
        if flag.convert:
            value = flag.convert(value)
        if not flag.key:
            continue
        if flag.key in given:
            other = given[flag.key][0]
            if flags[other].requires == name:
                continue  # the other flag refines this one: its value stands
            if flag.requires != other:
                raise KdkitError(f"{other} and {name} both set {flag.key}: give one of them")
        given[flag.key] = (name, value)
    for name, flag in flags.items():
        if flag.requires and getattr(args, dest(name)) is not None and getattr(args, dest(flag.requires)) is None:
            raise KdkitError(f"{name} refines timm's {flag.requires}, which is not given: add {flag.requires}")
    over_keys = {item.split("=", 1)[0].strip() for item in args.overrides}
    for name, strict, values in implied:
        for key, value in values.items():
            if strict and key in given:
                raise KdkitError(f"{given[key][0]} and {name} both set {key}: give one of them")
            if key not in given and key not in over_keys:
                given[key] = (name, value)
    for name, flag in flags.items():
        if flag.check and getattr(args, dest(name)) is not None:
            flag.check(getattr(args, dest(name)), given)
    return given


def resumed_recipe(run_dir: str | Path, over: dict, recipe: str | None = None) -> Recipe:
    """RUN/recipe.toml with the command line's overrides, which may only touch the keys a resume may
    change (kdkit.engine.checkpoint.RESUME_SAFE); any other is refused, naming each key."""
    run_dir = Path(run_dir)
    saved = run_dir / "recipe.toml"
    if recipe:
        raise KdkitError("--resume reads the run's own recipe.toml: drop --recipe")
    if not saved.is_file():
        raise KdkitError(f"{run_dir} is not a kdkit run directory (it has no recipe.toml)")
    from kdkit.engine.checkpoint import RESUME_SAFE, recipe_changes  # torch: a verb is running anyway

    before, after = load_recipe(saved), load_recipe(saved, over)
    changed = recipe_changes(before.to_dict(), after.to_dict())
    if changed:
        raise KdkitError(f"--resume continues {run_dir} with its recorded recipe, and these would change it: "
                         f"{', '.join(changed)}. Only {', '.join(RESUME_SAFE)} may change on resume")
    if after.optim.epochs != before.optim.epochs:
        from kdkit.console import console

        console.print(f"note: optim.epochs {before.optim.epochs} -> {after.optim.epochs}: the learning-rate schedule "
                      f"stays the one the run started with (it does not stretch; with cosine, epochs past its end "
                      f"train at optim.min_lr)")
    after.run.output, after.run.name = str(run_dir.parent), run_dir.name
    return after
