"""kdkit benchmark: parameters, FLOPs per image and inference throughput (the DeiT paper's model table)."""

from __future__ import annotations

import argparse
import json

EPILOG = """examples:
  kdkit benchmark --models deit_tiny deit_small regnety_160 t2t_vit_14      # 224x224, largest batch that fits
  kdkit benchmark --models resnet9_cifar_s deit_tiny --img-size 32 --num-classes 10
  kdkit benchmark --models vit_small --batch-size 256 --json > vit_small.json

GFLOPs count 2 FLOPs per multiply-add (torch.utils.flop_counter: matmuls, convolutions, attention
whichever kernel runs it; DeiT-Ti 1.25 GMACs, Swin-T 4.49, ResNet-50 4.09);
the DeiT and T2T-ViT papers and timm list multiply-adds as "FLOPs": compare those with GMACs.
Throughput: inference images/s, bf16 autocast on CUDA, fp32 on CPU (batch capped at 64 there).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="parameters, FLOPs and images/s of models (no weights needed)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="NAME", help="timm names or kdkit short names")
    p.add_argument("--img-size", type=int, metavar="N", help="input size (default: each model's own, 224 for most)")
    p.add_argument("--batch-size", type=int, metavar="N", help="throughput batch (default: the largest that fits, "
                   "doubling from 8 up to 1024 on CUDA; 64 on CPU)")
    p.add_argument("--num-classes", type=int, default=1000, metavar="N", help="classifier size (default: 1000)")
    p.add_argument("--device", metavar="DEVICE", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--warmup", type=int, metavar="N", help="untimed passes before timing (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="timed passes, the median is reported (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.analysis.benchmark import benchmark
    from kdkit.registry import KdkitError

    for flag in ("img_size", "batch_size", "num_classes", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise KdkitError(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    if args.warmup is not None and args.warmup < 0:
        raise KdkitError(f"--warmup must be at least 0, not {args.warmup}")
    rows = benchmark(args.models, args.img_size, args.batch_size, args.num_classes, args.device, args.warmup,
                     args.repeats)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    from rich.table import Table

    from kdkit.cli.report import out

    table = Table(title="models", caption="GFLOPs = 2 x multiply-adds (GMACs), per image; "
                  "the DeiT/T2T-ViT papers' \"FLOPs\" are GMACs")
    for col in ("model", "params (M)", "image size", "GMACs", "GFLOPs", "batch", "images/s"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    for r in rows:
        table.add_row(r["model"], f"{r['params'] / 1e6:.2f}", "x".join(map(str, r["input_shape"][1:])) or
                      str(r["input_shape"][0]), f"{r['gmacs']:.3g}", f"{r['gflops']:.3g}", str(r["batch_size"]),
                      f"{r['images_per_s']:.0f}")
    out.print(table)
    if rows:
        out.print(f"device: {rows[0]['device']} ({rows[0]['dtype']})")
