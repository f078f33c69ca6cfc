"""kdkit plan: time a few steps of the run on this machine and data, and say whether to cache the
teacher's logits (online, cached or hybrid), with the numbers behind it."""

from __future__ import annotations

import argparse
import json

from kdkit.cli.common import DISTILL_FLAGS, RUN_FLAGS, add_recipe_args, recipe_from_args

DESCRIPTION = """Time a few steps of the distillation run the flags describe, on this machine and its data: the
data loader, the teacher's forward, the student's training step, and a logit cache's records
(encoded, then densified). Then price three ways of running --runs runs of --epochs epochs: online
(the teacher in every step), cached (`kdkit cache` once, every run reads it) and hybrid (the first
--cache-epochs epochs cached, the teacher live after), and name the fastest. Nothing is written.
Pass the flags of the run you plan; without --recipe, preset deit, as `kdkit distill`."""

EPILOG = """examples:
  kdkit plan --recipe quickstart --teacher-weights kdkit/assets/teachers/resnet9_cifar_s
  kdkit plan --teacher regnety_160 --student deit_tiny --data /data/imagenet --runs 3 --topk 10 --json
  kdkit plan --recipe deit_tiny_imagenet --data /data/imagenet --out /scratch/cache   # the cache's disk
Online runs the teacher in every step of every run; a cache runs it once per view and is read by
every run: it pays when the runs it serves save more teacher time than writing it costs (the
report's cache_pays_from_runs). A step's time is max(loader, compute) with loader workers, else
their sum.
"""

FLAGS = {**DISTILL_FLAGS, **RUN_FLAGS}
DTYPES = ("float16", "bfloat16", "float32")  # kdkit.cache.store.DTYPES, which imports torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="time the run's parts here and say whether to cache the teacher's logits",
                       description=DESCRIPTION, epilog=EPILOG,
                       usage="%(prog)s [--recipe FILE] [--teacher NAME] [--student NAME] [--data DIR] [--runs N] "
                             "[FLAG ...]", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p, FLAGS, preset="deit")
    g = p.add_argument_group("plan", "what is timed and priced")
    g.add_argument("--steps", type=int, default=5, metavar="N",
                   help="timed batches of each part, after one untimed warm-up (default: 5)")
    g.add_argument("--runs", type=int, default=1, metavar="N",
                   help="runs that will read one cache: seeds, students, settings (default: 1)")
    g.add_argument("--topk", type=int, default=0, metavar="N",
                   help="the cache's values per record, as kdkit cache --topk (default: 0, every class)")
    g.add_argument("--dtype", default="float16", choices=DTYPES, help="the cache's value type (default: float16)")
    g.add_argument("--cache-epochs", type=int, default=0, metavar="N",
                   help="epochs the hybrid caches (default: 0, as many as fit on --out's disk)")
    g.add_argument("--out", default=".", metavar="DIR",
                   help="where the cache would go: its free space decides what fits (default: .)")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.engine.plan import plan_cache

    recipe = recipe_from_args(args, FLAGS)
    report = plan_cache(recipe, steps=args.steps, runs=args.runs, topk=args.topk, dtype=args.dtype,
                        cache_epochs=args.cache_epochs, out=args.out)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        from kdkit.cli.report import print_cache_plan

        print_cache_plan(report)
    return 0
