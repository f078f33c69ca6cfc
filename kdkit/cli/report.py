"""Rich tables for run summaries and evaluations (stdout)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

out = Console()


def print_eval(result: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("head", "top-1 %", "top-5 %"):
        table.add_column(col, justify="right" if col != "head" else "left")
    for head in ("class", "dist", "fused"):
        table.add_row(head, f"{result[f'{head}_top1']:.2f}", f"{result[f'{head}_top5']:.2f}")
    out.print(table)
    out.print(f"{result['n']} images, {result['images_per_s']:.0f} images/s, {result['skipped']} unreadable skipped")


def print_summary(summary: dict) -> None:
    if summary.get("eval"):
        print_eval(summary["eval"], f"{summary['mode']}: {summary['run_dir']}")
    out.print(f"student saved to {summary['student']}  ({summary['train_seconds']:.0f} s)")
