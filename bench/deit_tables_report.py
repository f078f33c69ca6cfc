"""Collect bench/cifar10_deit_tables.sh's runs into DeiT's tables: JSON and rich tables.

    python bench/deit_tables_report.py [--runs /tmp/deit-tables] [--json-out bench/results/cifar10_deit_tables.json]

Reads RUNS/s<seed>-<row>/summary.json (top-1 on the 10,000 CIFAR-10 test images), the teachers' own
training summaries and RUNS/compare-s<seed>/disagreement.csv. Spreads are over the seeds found: mean, and
min..max. Rows missing a run are reported with the seeds that exist.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

METHODS = [  # (label, run suffix, head, uses labels, teacher term)
    ("no distillation (class token)", "none", "fused", "yes", "-"),
    ("usual distillation, no labels (soft, tau 3)", "soft", "fused", "no", "soft"),
    ("hard distillation, no labels", "hard", "fused", "no", "hard"),
    ("DeiT token: class embedding", "token", "class", "yes", "hard"),
    ("DeiT token: distillation embedding", "token", "dist", "yes", "hard"),
    ("DeiT token: class + distillation (late fusion)", "token", "fused", "yes", "hard"),
    ("extra: soft (tau 3) through the token, with labels: class", "soft-token", "class", "yes", "soft"),
    ("extra: soft (tau 3) through the token, with labels: dist", "soft-token", "dist", "yes", "soft"),
    ("extra: soft (tau 3) through the token, with labels: fused", "soft-token", "fused", "yes", "soft"),
]
TEACHER_ROWS = {"soft": "soft distillation, no labels (class token)", "token": "DeiT token, hard (late fusion)"}
BUNDLED = "resnet9_cifar_s"


def top1(run: Path, head: str) -> float | None:
    f = run / "summary.json"
    return json.loads(f.read_text())["eval"][f"{head}_top1"] if f.is_file() else None


def spread(values: dict[int, float]) -> dict:
    v = list(values.values())
    return {"per_seed": values, "mean": statistics.mean(v) if v else None,
            "min": min(v) if v else None, "max": max(v) if v else None}


def fmt(s: dict) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.2f}" + (f" ({s['min']:.2f}..{s['max']:.2f})" if len(s["per_seed"]) > 1 else "")


def seed_cells(s: dict, seeds: list[int]) -> list[str]:
    return [f"{s['per_seed'][k]:.2f}" if k in s["per_seed"] else "-" for k in seeds] + [fmt(s)]


def read_matrix(path: Path) -> tuple[list[str], list[list[float]]]:
    """A disagreement.csv of `kdkit compare`: (labels, fractions)."""
    rows = list(csv.reader(path.read_text().splitlines()))
    return rows[0][1:], [[float(x) for x in r[1:]] for r in rows[1:]]


def to_markdown(title: str, columns: list[str], rows: list[list[str]]) -> str:
    return "\n".join([f"{title}:", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="/tmp/deit-tables")
    p.add_argument("--json-out", default="bench/results/cifar10_deit_tables.json")
    p.add_argument("--markdown", help="also write the tables as Markdown to this file (for docs/results.md)")
    args = p.parse_args()
    runs = Path(args.runs)
    seeds = sorted({int(m.group(1)) for d in runs.glob("s*-*") if (m := re.match(r"s(\d+)-", d.name))})
    per_seed = [*(f"seed {s}" for s in seeds), "mean (min..max)"]
    result: dict = {"runs": str(runs), "seeds": seeds, "machine": f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}"}
    tables = []  # (title, columns, rows of cells): printed with rich and, with --markdown, written as Markdown

    rows = []
    result["methods"] = {}
    for label, suffix, head, labels, teacher in METHODS:
        values = spread({s: v for s in seeds if (v := top1(runs / f"s{s}-{suffix}", head)) is not None})
        result["methods"][label] = values
        if values["per_seed"]:
            rows.append([label, labels, teacher, *seed_cells(values, seeds)])
    tables.append(("Distillation methods (top-1 %, 10,000 CIFAR-10 test images; mean (min..max) over seeds)",
                   ["method", "labels", "teacher", *per_seed], rows))

    matrices = {f.parent.name: read_matrix(f) for f in sorted(runs.glob("compare-s*/disagreement.csv"))}
    # The bundled teacher's accuracy is its cell in the ground-truth row of a disagreement matrix.
    bundled = next((100 * (1 - m[0][labels.index(BUNDLED)]) for labels, m in matrices.values()
                    if BUNDLED in labels), None)
    tags = [d.name.removesuffix("-teacher") for d in sorted(runs.glob("*-teacher"))]
    rows = []
    result["teacher_choice"] = {}
    for row, desc in TEACHER_ROWS.items():
        if not any((runs / f"s{s}-{row}-{t}").is_dir() for s in seeds for t in tags):
            continue
        for tag in [*tags, f"bundled {BUNDLED}"]:
            run, acc = (f"{row}-{tag}", top1(runs / f"{tag}-teacher", "fused")) if tag in tags else (row, bundled)
            values = spread({s: v for s in seeds if (v := top1(runs / f"s{s}-{run}", "fused")) is not None})
            if not values["per_seed"]:
                continue
            result["teacher_choice"][f"{row}/{tag}"] = {"teacher_top1": acc, "student": desc, "fused": values}
            rows.append([desc, tag, "-" if acc is None else f"{acc:.2f}", *seed_cells(values, seeds)])
    tables.append(("Teacher choice: one student, one recipe, different teachers (top-1 %, fused)",
                   ["student", "teacher", "teacher top-1", *per_seed], rows))

    result["disagreement"] = {}
    for name, (labels, matrix) in matrices.items():
        percent = [[100 * x for x in r] for r in matrix]
        result["disagreement"][name] = {"labels": labels, "percent": percent}
        tables.append((f"Disagreement (% of test images), {name}", ["", *labels],
                       [[lab, *(f"{x:.2f}" for x in r)] for lab, r in zip(labels, percent, strict=True)]))

    console = Console(width=160)
    for title, columns, rows in tables:
        table = Table(title=title)
        names = 2 if columns[0] == "student" else 1  # leading text columns, left-aligned
        for i, c in enumerate(columns):
            table.add_column(c, justify="left" if i < names else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join(to_markdown(*t) for t in tables) + "\n")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
