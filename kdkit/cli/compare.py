"""kdkit compare: how often classifiers disagree on a test split (the DeiT paper's disagreement table)."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  kdkit compare --models runs/no-kd/student runs/distilled/student --data /data/cifar10
  kdkit compare --models runs/distilled/student resnet9_cifar_s=kdkit/assets/teachers/resnet9_cifar_s \\
      --data cifar10-sample --out runs/compare-cifar
  kdkit compare --models regnety_160=regnety_160.safetensors runs/deit-ti/student --data /data/imagenet

A model is a kdkit student folder (config.json + model.safetensors; two-headed students give a
class, distillation and fused row) or NAME=PATH: a timm name and a weights file or folder.
Each cell is the fraction of images on which the two rows' top-1 predictions differ; the ground
truth row holds each model's top-1 error. Writes OUT/disagreement.csv and OUT/disagreement.png
(an earlier comparison there is replaced only with --overwrite).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="disagreement matrix of models and heads on a test split", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="kdkit student folders, or NAME=PATH (timm name + weights file or folder)")
    p.add_argument("--data", required=True, metavar="DIR", help="data source (as for distill)")
    p.add_argument("--split", default="auto-eval", metavar="NAME",
                   help="split to compare on (default: auto-eval, the first of val, validation, test)")
    p.add_argument("--out", default="runs/compare", metavar="DIR",
                   help="folder for disagreement.csv and .png (default: runs/compare)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="evaluation batch size (default: 256)")
    p.add_argument("-j", "--workers", type=int, default=2, metavar="N", help="data-loading workers (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace disagreement.csv and .png in --out (else "
                   "refused, naming them)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from kdkit.analysis.compare import compare, draw_heatmap, write_csv
    from kdkit.cli.report import out
    from kdkit.files import check_new_output

    folder = Path(args.out)
    for name in ("disagreement.csv", "disagreement.png"):  # checked before the models run
        check_new_output(folder / name, args.overwrite, "pass --overwrite to replace it, or another --out")
    labels, matrix, n = compare(args.models, args.data, args.split, args.batch_size, args.workers,
                                progress=not args.no_progress)
    table = Table(title=f"disagreement on {n} images (% of images with different top-1)")
    # Columns by number, so that a wide matrix still fits a terminal; rows carry the names, which fold
    # before a number is cut (rich narrows the widest column first, and logs are 80 columns wide).
    table.add_column("#", justify="right")
    table.add_column("model (head)", overflow="fold")
    for i in range(len(labels)):
        table.add_column(str(i + 1), justify="right", no_wrap=True, min_width=4)
    for i, (label, row) in enumerate(zip(labels, matrix.tolist(), strict=True)):
        table.add_row(str(i + 1), label, *(f"{100 * v:.1f}" for v in row))
    out.print(table)
    csv = write_csv(folder / "disagreement.csv", labels, matrix)
    png = draw_heatmap(folder / "disagreement.png", labels, matrix, f"disagreement on {n} images")
    out.print(f"wrote {csv} and {png}")
    return 0
