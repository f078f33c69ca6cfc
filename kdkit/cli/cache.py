"""kdkit cache: run the teacher once over every view a distillation run will draw, write its
outputs to disk; `--verify` checks a cache."""

from __future__ import annotations

import argparse
import json

from kdkit.cli.common import DISTILL_FLAGS, RUN_FLAGS, add_recipe_args, recipe_from_args

EPILOG = """examples:
  # replay: the exact augmented views (RandAugment, erasing, Mixup/CutMix) of 5 epochs, seed 0
  kdkit cache --recipe cifar10_deit_cpu --teacher resnet9_cifar_s \\
      --teacher-weights kdkit/assets/teachers/resnet9_cifar_s --data /data/cifar10 --epochs 5 --out cache/r9
  kdkit distill --recipe cifar10_deit_cpu --logit-cache cache/r9 --data /data/cifar10 --epochs 5
  # fixed: one record per image (clean view), top-5 in float16
  kdkit cache --mode fixed --topk 5 --teacher regnety_160 --data /data/imagenet --out cache/rg-fixed
  # with unlabeled images (labels dropped): the same --unlabeled and --unlabeled-ratio as the run
  kdkit cache --mode fixed --teacher resnet9_cifar_s --teacher-weights kdkit/assets/teachers/resnet9_cifar_s \\
      --data /data/cifar10-semi --unlabeled /data/cifar10-semi/unlabeled --out cache/r9-semi
  # check every shard, and re-run the teacher on 64 random records
  kdkit cache --verify cache/r9 --teacher resnet9_cifar_s --teacher-weights kdkit/assets/teachers/resnet9_cifar_s
Pass the same recipe, seed, image size and augmentation as the distillation run: a cache that
does not match a run is refused, naming the difference. An interrupted cache resumes when the
same command is run again; a larger --epochs extends it.
"""

# the flags that decide the teacher and the views it sees: those of the distillation run to replay
FLAGS = {k: v for k, v in {**DISTILL_FLAGS, **RUN_FLAGS}.items()
         if v.group in ("recipe", "data", "augmentation", "distributed")
         or k in ("--teacher", "--teacher-weights", "--teacher-path", "--student", "--img-size", "--input-size",
                  "--patch-size", "--epochs", "--seed", "--no-progress")}
MODES = ("replay", "fixed")
DTYPES = ("float16", "bfloat16", "float32")  # kdkit.cache.store.DTYPES, which imports torch

DESCRIPTION = """Run the teacher once over every view a distillation run will draw and write its outputs to
disk. Pass the flags of the run that will read the cache; the defaults below are those of a run
without --recipe (preset deit)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="precompute teacher logits to disk (or --verify a cache)",
                       description=DESCRIPTION, epilog=EPILOG,
                       usage="%(prog)s [--recipe FILE] --teacher NAME [--data DIR] --out DIR [FLAG ...]\n"
                             "       %(prog)s --verify DIR [--teacher NAME --teacher-weights FILE]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p, FLAGS, preset="deit")
    g = p.add_argument_group("cache", "the cache folder and its records")
    g.add_argument("--out", metavar="DIR", help="cache folder to write (or resume)")
    g.add_argument("--mode", default="replay", choices=MODES,
                   help="replay: every augmented view of every epoch; fixed: one clean view per image (default: replay)")
    g.add_argument("--topk", type=int, default=0, metavar="N", help="values kept per record (default: 0, every class)")
    g.add_argument("--dtype", default="float16", choices=DTYPES, help="stored value type (default: float16)")
    g.add_argument("--shard-size", type=int, default=4096, metavar="N", help="records per shard file (default: 4096)")
    g.add_argument("--overwrite", action="store_true", help="replace a different cache in --out")
    g.add_argument("--verify", metavar="DIR", help="check the shards of cache DIR (and re-run --teacher on a sample)")
    g.add_argument("--samples", type=int, default=64, metavar="N",
                   help="records re-run by --verify with a teacher (default: 64)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.engine.caching import cache_teacher, verify_cache
    from kdkit.registry import KdkitError

    recipe = recipe_from_args(args, FLAGS)
    if args.verify:
        report = verify_cache(args.verify, recipe if args.teacher else None, args.samples)
        _print(report, args.json)
        return 0 if report["ok"] else 1
    if not args.out:
        raise KdkitError("pass --out CACHE (the folder to write), or --verify CACHE")
    if not recipe.model.teacher:
        raise KdkitError("pass --teacher NAME (and --teacher-weights FILE): the cache holds its outputs")
    _print(cache_teacher(recipe, args.out, args.mode, args.topk, args.dtype, args.shard_size, args.overwrite),
           args.json)
    return 0


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kdkit cache")
    table.add_column("")
    table.add_column("")
    for k, v in result.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)  # the result goes to stdout, progress and messages to stderr
