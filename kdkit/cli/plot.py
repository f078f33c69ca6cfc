"""kdkit plot: training curves of one run, or several runs overlaid in one figure."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  kdkit plot runs/distilled                     # redraw runs/distilled/curves.png
  kdkit plot runs/distilled runs/no-kd --out kd-vs-no-kd.png
  kdkit plot "DeiT-Ti distilled=runs/distilled" "DeiT-Ti alone=runs/no-kd" --out kd.png
  kdkit plot runs/quickstart/distilled runs/quickstart/no-kd --out runs/quickstart/curves.png

Every run writes RUN/curves.png at its end; this verb redraws it (one RUN, no --out), draws it
elsewhere (one RUN, --out F.png) or overlays several runs (default --out curves.png): the loss and
the learning rate against optimizer updates, top-1 of the heads against epochs, and the teacher's
top-1 (its check on the evaluation split) as a horizontal line. A run is named in the legend by its
directory, or by LABEL in LABEL=RUN. Works on a run still in progress. An existing --out (or
curves.png for several runs) is replaced only with --overwrite. Needs matplotlib:
pip install "kdkit[plot]".
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="training curves of runs (loss, lr, top-1) as a PNG", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (with metrics.jsonl), or LABEL=RUN")
    p.add_argument("--out", metavar="F.png", help="the PNG to write (default: RUN/curves.png for one run, "
                   "curves.png for several)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (RUN/curves.png, the "
                   "run's own figure, is always redrawn)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from kdkit.cli.report import out
    from kdkit.curves import plot_runs, read_run, split_label, write_curves
    from kdkit.files import check_new_output

    pairs = [split_label(r) for r in args.runs]
    runs = [read_run(path, label) for label, path in pairs]  # every run checked before drawing
    png = Path(args.out or (runs[0].run_dir / "curves.png" if len(runs) == 1 else "curves.png"))
    if png.resolve() != (runs[0].run_dir / "curves.png").resolve() or len(runs) > 1:
        check_new_output(png, args.overwrite, "pass --overwrite to replace it, or another --out")
    png = write_curves(runs[0], png) if len(runs) == 1 else plot_runs(runs, png)
    table = Table(title="runs (last logged loss, last evaluation's fused top-1)")
    for col in ("run", "updates", "loss", "evaluations", "top-1 %", "teacher top-1 %"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in runs:
        loss = r.terms.get("loss", [])
        head = "fused" if "fused" in r.top1 else next(iter(r.top1), None)
        table.add_row(r.label, str(r.updates[-1]) if r.updates else "-", f"{loss[-1]:.4g}" if loss else "-",
                      str(len(r.eval_epochs)), f"{r.top1[head][-1]:.2f}" if head and r.top1[head] else "-",
                      f"{r.teacher_top1:.2f}" if r.teacher_top1 is not None else "-")
    out.print(table)
    out.print(f"wrote {Path(png)}")
    return 0
