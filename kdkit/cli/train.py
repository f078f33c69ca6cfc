"""kdkit train: plain supervised training (a teacher on your label space, or the no-KD baseline)."""

from __future__ import annotations

import argparse

from kdkit.cli.common import RUN_FLAGS, Flag, add_recipe_args, recipe_from_args

DESCRIPTION = """Supervised training with no teacher (loss.kind = none): a teacher on your label space, or the
no-distillation baseline. The defaults below are kdkit's own (no preset); a --recipe file's values
replace them, flags and --set win over it. Every flag sets one recipe key, named after its default."""

EPILOG = """examples:
  kdkit train --model resnet9_cifar_s --data /data/cifar10 --recipe cifar10_teacher
  kdkit train --model deit_tiny --img-size 32 --patch-size 4 --data cifar10-sample --epochs 5
"""

FLAGS = {"--model": Flag("model.student", str, "the model: a timm name or kdkit short name", "model"), **RUN_FLAGS}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="supervised training, no teacher", description=DESCRIPTION, epilog=EPILOG,
                       usage="%(prog)s [--recipe FILE] [--model NAME] [--data DIR] [FLAG ...]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_recipe_args(p, FLAGS)
    groups["run"].add_argument("--overwrite", action="store_true",
                               help="replace an earlier run in the run directory (without it, a run directory "
                                    "that holds anything is refused, naming it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.cli.report import print_summary
    from kdkit.engine.run import run as run_recipe

    recipe = recipe_from_args(args, FLAGS, {"loss.kind": "none"})
    print_summary(run_recipe(recipe, "train", resume=args.resume, overwrite=args.overwrite))
    return 0
