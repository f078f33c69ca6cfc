"""Rich tables for run summaries and evaluations (stdout)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

out = Console()


def print_eval(result: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("head", "top-1 %", "top-5 %"):
        table.add_column(col, justify="right" if col != "head" else "left")
    for prefix in ("", "ema_") if "ema_class_top1" in result else ("",):
        for head in ("class", "dist", "fused"):
            key = f"{prefix}{head}"
            table.add_row(key.replace("_", " "), f"{result[f'{key}_top1']:.2f}", f"{result[f'{key}_top5']:.2f}")
    out.print(table)
    out.print(f"{result['n']} images, {result['images_per_s']:.0f} images/s, {result['skipped']} unreadable skipped")


def print_summary(summary: dict) -> None:
    if summary.get("eval"):
        print_eval(summary["eval"], f"{summary['mode']}: {summary['run_dir']}")
    out.print(f"student saved to {summary['student']}  ({summary['train_seconds']:.0f} s)")
    skipped = {split: d.get("skipped_images", 0) for split, d in summary.get("data", {}).items()}
    if summary.get("skipped_steps") or any(skipped.values()):
        out.print(f"skipped: {summary.get('skipped_steps', 0)} steps with a non-finite loss, "
                  f"{skipped.get('train', 0)} unreadable training images (see summary.json)")
