"""Flags shared by the training verbs: each maps onto one recipe key, and flags win over the recipe.

RUN_FLAGS (train, distill, cache) and DISTILL_FLAGS (distill, cache) are the single source of those
flags: the parsers, their grouped help with the default a run would use, `recipe_from_args`,
`kdkit completion` and docs/cli.md's tables follow them. A new flag is one entry here.

Only kdkit.config (dataclasses, PRESETS) is imported here: `kdkit VERB --help` needs no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from kdkit.config import CHANNELS_LAST, NONFINITE, PRECISIONS, PRESETS, TRACKERS, Recipe, load_recipe
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
    """

    key: str
    type: type
    help: str
    group: str
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None
    metavar: str | tuple[str, ...] | None = None
    nargs: int | None = None
    const: object = None
    default: str | None = None
    per_process: bool = False
    repeat: bool = False


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
    "--pretrained": Flag("model.pretrained", bool, "start the student from timm's hub weights (needs internet; "
                         "offline, give --pretrained-path FILE)", "model"),
    "--pretrained-path": Flag("model.pretrained_path", str, "start the student from a local timm or DeiT checkpoint, "
                              "offline, as timm's --pretrained --pretrained-path (--pretrained not needed): image and "
                              "patch size resampled, distillation token and head from the class token and head, the "
                              "classifier reset if the class count differs (timm's train.py always resets it)",
                              "model", metavar="FILE"),
    "--student-weights": Flag("model.student_weights", str, "load a checkpoint of exactly this student, strictly "
                              "(timm's --initial-checkpoint); another class count or size: --pretrained-path",
                              "model", aliases=("--initial-checkpoint",), metavar="FILE"),
    # data
    "--data": Flag("data.path", str, "ImageFolder root with train/ and val/ or test/, a folder of webdataset tar "
                   "shards (or one .tar), a save_to_disk folder, hf:NAME, or cifar10-sample (bundled)", "data",
                   aliases=("--data-dir",), metavar="DIR"),
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
    "--workers": Flag("data.workers", int, "data-loading worker processes (per process)", "data", aliases=("-j",)),
    "--strict": Flag("data.strict", bool, "stop at an unreadable image or an empty class folder (without it, an "
                     "unreadable image is skipped and counted, an empty class folder stays a class with no samples "
                     "and a warning; hidden files and folders are always ignored)", "data"),
    # augmentation
    "--auto-augment": Flag("aug.auto_augment", str, "RandAugment / AutoAugment policy in timm's notation, '' = off",
                           "augmentation", aliases=("--aa",), metavar="POLICY"),
    "--reprob": Flag("aug.reprob", float, "random erasing probability", "augmentation"),
    "--mixup": Flag("aug.mixup", float, "Mixup alpha, 0 = off", "augmentation"),
    "--cutmix": Flag("aug.cutmix", float, "CutMix alpha, 0 = off", "augmentation"),
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
                           "(3 in DeiT; 0 or 1 = off)", "augmentation", aliases=("--aug-repeats",)),
    # optimisation
    "--epochs": Flag("optim.epochs", int, "training epochs", "optimisation"),
    "--lr": Flag("optim.lr", float, "base learning rate, scaled by global batch / --lr-base-batch", "optimisation"),
    "--lr-base-batch": Flag("optim.lr_base_batch", int, "batch size the base learning rate is for; 0 = no scaling",
                            "optimisation", aliases=("--lr-base-size",)),
    "--opt": Flag("optim.opt", str, "optimizer, a timm name (adamw, sgd, lamb, ...)", "optimisation"),
    "--weight-decay": Flag("optim.weight_decay", float, "weight decay", "optimisation"),
    "--momentum": Flag("optim.momentum", float, "SGD momentum", "optimisation"),
    "--sched": Flag("optim.sched", str, "learning-rate schedule, a timm name (cosine, step, ...)", "optimisation"),
    "--warmup-epochs": Flag("optim.warmup_epochs", int, "linear warm-up epochs", "optimisation"),
    "--warmup-lr": Flag("optim.warmup_lr", float, "learning rate the warm-up starts from", "optimisation"),
    "--min-lr": Flag("optim.min_lr", float, "learning rate the schedule ends at", "optimisation"),
    "--clip-grad": Flag("optim.clip_grad", float, "gradient-norm clipping, 0 = off", "optimisation"),
    "--grad-accum": Flag("optim.grad_accum", int, "batches accumulated per optimizer update", "optimisation",
                         aliases=("--grad-accum-steps",)),
    "--ema-decay": Flag("optim.ema_decay", float, "EMA of the student's weights (e.g. 0.99996), 0 = off",
                        "optimisation", aliases=("--model-ema-decay",)),
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
    "--compile": Flag("run.compile", bool, "torch.compile the student and the teacher", "distributed"),
    "--channels-last": Flag("run.channels_last", str, "the teacher's memory format; auto = channels-last for "
                            "ConvNet teachers; bare --channels-last = on", "distributed", choices=CHANNELS_LAST,
                            const="on"),
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
                      aliases=("--kd-model-name",), repeat=True),
    "--teacher-weights": Flag("model.teacher_weights", str, "local teacher weights: a file or a kdkit student "
                              "folder; not set = timm's hub weights; one per --teacher, in order ('' for the hub's)",
                              "model", metavar="FILE", repeat=True),
    "--logits": Flag("model.teacher_logits", str, "read the teacher's outputs from a `kdkit cache` folder (the "
                     "teacher is not loaded, unless the run is longer than the cache)", "model", metavar="DIR"),
    "--logits-cycle": Flag("model.teacher_logits_cycle", bool, "past the cached epochs, replay them again instead "
                           "of running the teacher", "model"),
    "--student": Flag("model.student", str, "student: a timm name or kdkit short name (deit_tiny = DeiT-Ti with "
                      "a distillation token)", "model", aliases=("--model",)),
    "--unlabeled": Flag("data.unlabeled", str, "unlabeled images the student learns from through the teacher: a "
                        "folder (flat or nested, no class folders), a save_to_disk folder or hf:NAME", "data",
                        metavar="DIR"),
    "--unlabeled-ratio": Flag("data.unlabeled_ratio", float, "MU: unlabeled images per labeled one in every step",
                              "data"),
    "--loss": Flag("loss.kind", str, "distillation loss: a built-in name or a plugin's", "loss",
                   names=BUILTIN_LOSSES),
    "--task-weight": Flag("loss.task_weight", float, "weight of the label term, in [0, 1]", "loss",
                          aliases=("--task-loss-weight",)),
    "--kd-weight": Flag("loss.kd_weight", float, "weight of the teacher term, in [0, 1]", "loss",
                        aliases=("--distill-loss-weight",)),
    "--tau": Flag("loss.tau", float, "soft-distillation temperature (> 0)", "loss", aliases=("--kd-temperature",)),
    "--pseudo-label": Flag("loss.pseudo_label", str, "what unlabeled images learn: soft (KL tau^2), hard (the "
                           "teacher's argmax) or auto (the --loss kind)", "loss", choices=PSEUDO_LABELS),
    "--confidence-threshold": Flag("loss.confidence_threshold", float, "keep an unlabeled image only where the "
                                   "teacher's top probability (tau 1) is >= this; 0 keeps all", "loss"),
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
        return f"{flag.help} (default: {flag.default}; {flag.key})"
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
              if title == "recipe" or any(f.group == title for f in flags.values())}
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
    return groups


def bundled_recipes() -> list[str]:
    """The bundled recipes' names (for shell completion; config is imported only when asked)."""
    from kdkit.config import list_recipes

    return list_recipes()


def recipe_from_args(args: argparse.Namespace, flags: dict[str, Flag], extra: dict[str, object] | None = None) -> Recipe:
    """The recipe the command line asks for: the --recipe file (or the run's own, with --resume), the
    flags given, `extra`, then --set. distill and cache without --recipe use preset deit."""
    given: dict[str, tuple[str, object]] = {}
    for name, flag in flags.items():
        value = getattr(args, dest(name))
        if value is None:
            continue
        if flag.per_process:
            value *= world_size()
        if flag.repeat:
            value = value[0] if len(value) == 1 else list(value)
        if flag.key in given:
            raise KdkitError(f"{given[flag.key][0]} and {name} both set {flag.key}: give one of them")
        given[flag.key] = (name, value)
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
