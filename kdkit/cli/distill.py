"""kdkit distill: train a student from a teacher."""

from __future__ import annotations

import argparse

from kdkit.cli.common import DISTILL_FLAGS, RUN_FLAGS, add_recipe_args, recipe_from_args

DESCRIPTION = """Distil a teacher into a student. Without --recipe the run uses preset deit, DeiT's recipe;
the defaults below are that run's (a --recipe file's values replace them, flags and --set win over it).
Every flag sets one recipe key, named after its default."""

EPILOG = """examples:
  kdkit distill --teacher regnety_160 --student deit_tiny --data /data/imagenet
  kdkit distill --recipe deit_tiny_imagenet --data /data/imagenet --batch-size 1024
  # timm's names: 8 processes x 128 per process = data.batch_size 1024
  accelerate launch --num_processes 8 -m kdkit distill -c deit_tiny_imagenet --data-dir /data/imagenet -b 128
  kdkit distill --teacher resnet9_cifar_s --teacher-weights runs/teacher/student \\
      --student deit_tiny --img-size 32 --patch-size 4 --data cifar10-sample --epochs 5
  kdkit distill --logit-cache cache/r9 --student deit_tiny --img-size 32 --patch-size 4 --epochs 5
  # semi-supervised: 3 unlabeled images per labeled one, hard pseudo-labels where the teacher is >= 80% sure
  kdkit distill --recipe quickstart --data /data/cifar10-semi --unlabeled /data/unlabeled-images \\
      --unlabeled-ratio 3 --pseudo-label hard --confidence-threshold 0.8
  # function matching (Beyer et al., 2022): no label term, Mixup on every batch, a long schedule
  # (a preset sits under the recipe file: a --recipe's own loss/aug keys would win over it)
  kdkit distill --preset function_matching --teacher resnet9_cifar_s \\
      --teacher-weights kdkit/assets/teachers/resnet9_cifar_s --student deit_tiny_patch16_224 \\
      --img-size 32 --patch-size 4 --data DIR --unlabeled UDIR --epochs 300
"""


FLAGS = {**DISTILL_FLAGS, **RUN_FLAGS}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a student", description=DESCRIPTION, epilog=EPILOG,
                       usage="%(prog)s [--recipe FILE] [--teacher NAME] [--student NAME] [--data DIR] [FLAG ...]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_recipe_args(p, FLAGS, preset="deit")
    groups["run"].add_argument("--overwrite", action="store_true",
                               help="replace an earlier run in the run directory (without it, a run directory "
                                    "that holds anything is refused, naming it)")
    groups["run"].add_argument("--dry-run", action="store_true",
                               help="resolve the recipe, build the models, check the teacher, print parameters, "
                                    "FLOPs per image, the teacher's share of a step and a logit cache's size, and "
                                    "exit without training or writing anything")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.cli.report import print_summary
    from kdkit.engine.run import run as run_recipe

    recipe = recipe_from_args(args, FLAGS)
    if args.dry_run:
        from kdkit.cli.report import print_plan
        from kdkit.engine.plan import plan

        print_plan(plan(recipe, "distill"))
        return 0
    print_summary(run_recipe(recipe, "distill", resume=args.resume, overwrite=args.overwrite))
    return 0
