"""Flags shared by the training verbs: each maps onto one recipe key, and flags win over the recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdkit.config import Recipe, load_recipe
from kdkit.registry import KdkitError

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
    "--precision": ("run.precision", str, "auto | no | bf16 | fp16 mixed precision; auto (default) lets "
                    "Accelerate decide (accelerate launch --mixed_precision, ACCELERATE_MIXED_PRECISION, "
                    "accelerate config)"),
    "--teacher-precision": ("run.teacher_precision", str, "auto | no | bf16 | fp16: the teacher's autocast; auto = "
                            "the run's precision (bf16 speeds a teacher up on CPUs with AMX)"),
    "--compile": ("run.compile", bool, "torch.compile the student and the teacher"),
}
DISTILL_FLAGS: dict[str, tuple[str, type, str]] = {
    "--teacher": ("model.teacher", str, "teacher: timm name (regnety_160 = DeiT's RegNetY-16GF)"),
    "--teacher-weights": ("model.teacher_weights", str, "local teacher weights (file or kdkit student folder)"),
    "--logits": ("model.teacher_logits", str, "read the teacher's outputs from a `kdkit cache` folder "
                 "(the teacher is not loaded, unless the run is longer than the cache)"),
    "--student": ("model.student", str, "student: timm name (deit_tiny = DeiT-Ti with distillation token)"),
    "--head": ("model.head", str, "token | dual | shared | auto"),
    "--loss": ("loss.kind", str, "none | soft | hard"),
    "--task-weight": ("loss.task_weight", float, "weight of the label term, in [0, 1]"),
    "--kd-weight": ("loss.kd_weight", float, "weight of the teacher term, in [0, 1]"),
    "--tau": ("loss.tau", float, "soft-distillation temperature (> 0)"),
    "--preset": ("preset", str, "named settings: deit | deit_soft | function_matching | none (see "
                 "docs/concepts.md). Without --recipe, distill uses deit: DeiT's recipe (hard distillation "
                 "through the token, RandAugment, random erasing, Mixup/CutMix, repeated augmentation, label "
                 "smoothing, drop_path 0.1); none = kdkit's plain defaults"),
    "--unlabeled": ("data.unlabeled", str, "unlabeled images the student learns from through the teacher: a "
                    "folder (flat or nested, no class folders), a save_to_disk folder or hf:NAME"),
    "--unlabeled-ratio": ("data.unlabeled_ratio", float, "MU: unlabeled images per labeled one in every step"),
    "--pseudo-label": ("loss.pseudo_label", str, "what unlabeled images learn: soft (KL tau^2) | hard (teacher's "
                       "argmax) | auto (the --loss kind)"),
    "--confidence-threshold": ("loss.confidence_threshold", float, "keep an unlabeled image only where the "
                               "teacher's top probability (tau 1) is >= this; 0 keeps all"),
}


def add_recipe_args(p: argparse.ArgumentParser, flags: dict[str, tuple[str, type, str]]) -> None:
    p.add_argument("--recipe", help="TOML/YAML recipe file or bundled recipe name (see `kdkit recipes`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set optim.weight_decay=0.1 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--strict", action="store_true",
                   help="stop at an unreadable image or an empty class folder (without it, an unreadable image is "
                        "skipped and counted, and an empty class folder stays a class with no samples, with a "
                        "warning; hidden files and folders are always ignored) [data.strict]")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run from its newest valid checkpoint, with its recorded recipe "
                        "(only flags that cannot change results, such as --workers, may be added)")
    for flag, (key, tp, text) in flags.items():
        if tp is bool:
            p.add_argument(flag, action="store_const", const=True, default=None, help=f"{text} [{key}]")
        else:
            p.add_argument(flag, type=tp, default=None, help=f"{text} [{key}]")


def recipe_from_args(args: argparse.Namespace, flags: dict[str, tuple[str, type, str]],
                     extra: dict[str, object] | None = None) -> Recipe:
    items = []
    for flag, (key, _, _) in flags.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            items.append((key, value))
    items += list((extra or {}).items())
    if "--preset" in flags and args.preset is None and not args.recipe and not args.resume:
        items.append(("preset", "deit"))  # the headline command runs the paper's whole recipe
    if args.no_progress:
        items.append(("run.progress", False))
    if args.strict:
        items.append(("data.strict", True))
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
    if args.resume:
        return resumed_recipe(args.resume, over, args.recipe)
    return load_recipe(args.recipe, over)


# recipe keys a resumed run may change: they cannot change its results
RESUME_SAFE = ("data.workers", "data.strict", "run.progress", "run.checkpoint_every", "run.keep_checkpoints",
               "run.on_nonfinite", "run.teacher_check_batches")


def resumed_recipe(run_dir: str | Path, over: dict, recipe: str | None = None) -> Recipe:
    """RUN/recipe.toml with the command line's overrides, which may only touch RESUME_SAFE keys."""
    run_dir = Path(run_dir)
    saved = run_dir / "recipe.toml"
    if recipe:
        raise KdkitError("--resume reads the run's own recipe.toml: drop --recipe")
    if not saved.is_file():
        raise KdkitError(f"{run_dir} is not a kdkit run directory (it has no recipe.toml)")
    before, after = _flat(load_recipe(saved)), load_recipe(saved, over)
    changed = [f"{k} ({before[k]!r} -> {v!r})" for k, v in _flat(after).items()
               if v != before[k] and k not in RESUME_SAFE and k not in ("run.output", "run.name")]
    if changed:
        raise KdkitError(f"--resume continues {run_dir} with its recorded recipe, and these would change it: "
                         f"{', '.join(changed)}. Only {', '.join(RESUME_SAFE)} may change on resume")
    after.run.output, after.run.name = str(run_dir.parent), run_dir.name
    return after


def _flat(recipe: Recipe) -> dict[str, object]:
    return {f"{section}.{k}" if isinstance(values, dict) else section: v
            for section, values in recipe.to_dict().items()
            for k, v in (values.items() if isinstance(values, dict) else [(section, values)])}
