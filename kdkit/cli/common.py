"""Flags shared by the training verbs: each maps onto one recipe key, and flags win over the recipe."""

from __future__ import annotations

import argparse

from kdkit.config import Recipe, load_recipe

# flag -> (recipe key, type, help)
RUN_FLAGS: dict[str, tuple[str, type, str]] = {
    "--data": ("data.path", str, "ImageFolder root with train/ and val/ or test/, a save_to_disk folder, "
               "hf:NAME, or cifar10-sample (bundled)"),
    "--epochs": ("optim.epochs", int, "training epochs"),
    "--batch-size": ("data.batch_size", int, "global batch size (split over processes)"),
    "--lr": ("optim.lr", float, "base learning rate (scaled by batch / optim.lr_base_batch)"),
    "--img-size": ("model.img_size", int, "student input size, where the architecture takes it"),
    "--patch-size": ("model.patch_size", int, "student patch size, where the architecture takes it"),
    "--workers": ("data.workers", int, "data-loading worker processes"),
    "--seed": ("run.seed", int, "run seed (augmentation, order, initialisation)"),
    "--output": ("run.output", str, "folder for run directories"),
    "--name": ("run.name", str, "run directory name (default: verb and time)"),
    "--precision": ("run.precision", str, "no | bf16 | fp16 mixed precision (Accelerate)"),
}
DISTILL_FLAGS: dict[str, tuple[str, type, str]] = {
    "--teacher": ("model.teacher", str, "teacher: timm name (regnety_160 = DeiT's RegNetY-16GF)"),
    "--teacher-weights": ("model.teacher_weights", str, "local teacher weights (file or kdkit student folder)"),
    "--student": ("model.student", str, "student: timm name (deit_tiny = DeiT-Ti with distillation token)"),
    "--head": ("model.head", str, "token | dual | shared | auto"),
    "--loss": ("loss.kind", str, "none | soft | hard"),
    "--task-weight": ("loss.task_weight", float, "weight of the label term, in [0, 1]"),
    "--kd-weight": ("loss.kd_weight", float, "weight of the teacher term, in [0, 1]"),
    "--tau": ("loss.tau", float, "soft-distillation temperature (> 0)"),
}


def add_recipe_args(p: argparse.ArgumentParser, flags: dict[str, tuple[str, type, str]]) -> None:
    p.add_argument("--recipe", help="TOML/YAML recipe file or bundled recipe name (see `kdkit recipes`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set optim.weight_decay=0.1 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for flag, (key, tp, text) in flags.items():
        p.add_argument(flag, type=tp, default=None, help=f"{text} [{key}]")


def recipe_from_args(args: argparse.Namespace, flags: dict[str, tuple[str, type, str]],
                     extra: dict[str, object] | None = None) -> Recipe:
    items = []
    for flag, (key, _, _) in flags.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            items.append((key, value))
    items += list((extra or {}).items())
    if args.no_progress:
        items.append(("run.progress", False))
    over: dict = {}
    for key, value in items:
        node = over
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    from kdkit.config import _merge, parse_override

    for item in args.overrides:
        over = _merge(over, parse_override(item))
    return load_recipe(args.recipe, over)
