"""kdkit eval: top-1/top-5 of the class head, distillation head and late fusion; images/s."""

from __future__ import annotations

import argparse
import json

EPILOG = """examples:
  kdkit eval --weights runs/distill-x/student --data /data/cifar10
  kdkit eval --model resnet50 --weights resnet50.safetensors --data /data/imagenet
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a saved student or any timm model", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, metavar="FILE", help="a kdkit student folder, or a weights file")
    p.add_argument("--model", metavar="NAME", help="timm name (needed when the weights have no config.json)")
    p.add_argument("--data", required=True, metavar="DIR", help="data source (as for distill)")
    p.add_argument("--split", default="auto-eval", metavar="NAME",
                   help="split to evaluate (default: auto-eval, the first of val, validation, test)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="evaluation batch size (default: 256)")
    p.add_argument("-j", "--workers", type=int, default=2, metavar="N", help="data-loading workers (default: 2)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.cli.report import print_eval
    from kdkit.engine.evaluate import evaluate_saved

    result = evaluate_saved(args.weights, args.data, args.model, args.batch_size, args.workers, args.split,
                            progress=not args.json)
    print(json.dumps(result)) if args.json else print_eval(result, str(args.weights))
    return 0
