"""kdkit distill: train a student from a teacher."""

from __future__ import annotations

import argparse

from kdkit.cli.common import DISTILL_FLAGS, RUN_FLAGS, add_recipe_args, recipe_from_args
from kdkit.cli.report import print_summary

EPILOG = """examples:
  kdkit distill --teacher regnety_160 --student deit_tiny --data /data/imagenet
  kdkit distill --recipe deit_tiny_imagenet --data /data/imagenet --batch-size 1024
  kdkit distill --teacher resnet9_cifar_s --teacher-weights runs/teacher/student \\
      --student deit_tiny --img-size 32 --patch-size 4 --data cifar10-sample --epochs 5
  kdkit distill --logits cache/r9 --student deit_tiny --img-size 32 --patch-size 4 --epochs 5
  # semi-supervised: 3 unlabeled images per labeled one, hard pseudo-labels where the teacher is >= 80% sure
  kdkit distill --recipe quickstart --data /data/cifar10-semi --unlabeled /data/unlabeled-images \\
      --unlabeled-ratio 3 --pseudo-label hard --confidence-threshold 0.8
  # function matching (Beyer et al., 2022): no label term, Mixup on every batch, a long schedule
  # (a preset sits under the recipe file: a --recipe's own loss/aug keys would win over it)
  kdkit distill --preset function_matching --teacher resnet9_cifar_s \\
      --teacher-weights kdkit/assets/teachers/resnet9_cifar_s --student deit_tiny_patch16_224 \\
      --img-size 32 --patch-size 4 --data DIR --unlabeled UDIR --epochs 300
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a student", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p, {**DISTILL_FLAGS, **RUN_FLAGS})
    p.add_argument("--logits-cycle", action="store_true",
                   help="past the cached epochs, replay them again instead of running the teacher")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.engine.run import run as run_recipe

    extra = {"model.teacher_logits_cycle": True} if args.logits_cycle else {}
    recipe = recipe_from_args(args, {**DISTILL_FLAGS, **RUN_FLAGS}, extra)
    print_summary(run_recipe(recipe, "distill", resume=args.resume))
    return 0
