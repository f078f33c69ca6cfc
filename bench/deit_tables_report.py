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

METHODS = [  # (label, run suffix, head)
    ("no distillation (class token)", "none", "fused"),
    ("usual distillation, no labels (soft, tau 3)", "soft", "fused"),
    ("hard distillation, no labels", "hard", "fused"),
    ("DeiT token: class embedding", "token", "class"),
    ("DeiT token: distillation embedding", "token", "dist"),
    ("DeiT token: class + distillation (late fusion)", "token", "fused"),
    ("extra: soft (tau 3) through the token, with labels: class", "soft-token", "class"),
    ("extra: soft (tau 3) through the token, with labels: dist", "soft-token", "dist"),
    ("extra: soft (tau 3) through the token, with labels: fused", "soft-token", "fused"),
]
TEACHER_ROWS = {"soft": "soft distillation, no labels (class token)", "token": "DeiT token, hard (late fusion)"}


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


def markdown(result: dict) -> str:
    """The three tables of `result` in Markdown, as docs/results.md shows them."""
    seeds = result["seeds"]
    lines = ["| method | labels | teacher | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (min..max) |",
             "|---" * (len(seeds) + 4) + "|"]
    for label, suffix, _ in METHODS:
        row = result["methods"][label]
        if row["mean"] is None:
            continue
        labels = "yes" if suffix in ("none", "token", "soft-token") else "no"
        teacher = {"none": "-", "soft": "soft", "hard": "hard", "token": "hard", "soft-token": "soft"}[suffix]
        lines.append(f"| {label} | {labels} | {teacher} | "
                     + " | ".join(f"{row['per_seed'][s]:.2f}" if s in row["per_seed"] else "-" for s in seeds)
                     + f" | {fmt(row)} |")
    lines += ["", "| student | teacher | teacher top-1 | " + " | ".join(f"seed {s}" for s in seeds)
              + " | mean (min..max) |", "|---" * (len(seeds) + 4) + "|"]
    for key, row in result["teacher_choice"].items():
        acc = "-" if row["teacher_top1"] is None else f"{row['teacher_top1']:.2f}"
        per = row["fused"]["per_seed"]
        lines.append(f"| {row['student']} | {key.split('/', 1)[1]} | {acc} | "
                     + " | ".join(f"{per[s]:.2f}" if s in per else "-" for s in seeds) + f" | {fmt(row['fused'])} |")
    for name, m in result["disagreement"].items():
        lines += ["", f"{name}:", "", "| | " + " | ".join(m["labels"]) + " |", "|---" * (len(m["labels"]) + 1) + "|"]
        lines += [f"| {lab} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
                  for lab, row in zip(m["labels"], m["percent"], strict=True)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="/tmp/deit-tables")
    p.add_argument("--json-out", default="bench/results/cifar10_deit_tables.json")
    p.add_argument("--markdown", help="also write the tables as Markdown to this file (for docs/results.md)")
    args = p.parse_args()
    runs = Path(args.runs)
    seeds = sorted({int(m.group(1)) for d in runs.glob("s*-*") if (m := re.match(r"s(\d+)-", d.name))})
    console = Console(width=160)
    result: dict = {"runs": str(runs), "seeds": seeds, "machine": f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}"}

    methods = {}
    table = Table(title="Distillation methods (top-1 %, 10,000 CIFAR-10 test images; mean (min..max) over seeds)")
    for c in ("method", "labels", "teacher", *(f"seed {s}" for s in seeds), "mean (min..max)"):
        table.add_column(c, justify="left" if c == "method" else "right")
    for label, suffix, head in METHODS:
        values = {s: v for s in seeds if (v := top1(runs / f"s{s}-{suffix}", head)) is not None}
        methods[label] = spread(values)
        if not values:
            continue
        uses_labels = "yes" if suffix in ("none", "token", "soft-token") else "no"
        teacher = {"none": "-", "soft": "soft", "hard": "hard", "token": "hard", "soft-token": "soft"}[suffix]
        table.add_row(label, uses_labels, teacher, *(f"{values[s]:.2f}" if s in values else "-" for s in seeds),
                      fmt(methods[label]))
    result["methods"] = methods
    console.print(table)

    # The bundled teacher's accuracy is the ground-truth row of a disagreement matrix, where there is one.
    bundled = None
    for f in sorted(runs.glob("compare-s*/disagreement.csv")):
        rows = list(csv.reader(f.read_text().splitlines()))
        if "resnet9_cifar_s" in rows[0]:
            bundled = 100 * (1 - float(rows[1][rows[0].index("resnet9_cifar_s")]))
    teachers = {}
    table = Table(title="Teacher choice: one student, one recipe, different teachers (top-1 %, fused)")
    for c in ("student", "teacher", "teacher top-1", *(f"seed {s}" for s in seeds), "mean (min..max)"):
        table.add_column(c, justify="left" if c in ("student", "teacher") else "right")
    tags = [d.name.removesuffix("-teacher") for d in sorted(runs.glob("*-teacher"))]
    for row, desc in TEACHER_ROWS.items():
        for tag in [*tags, "bundled resnet9_cifar_s"]:
            run = f"{row}-{tag}" if tag in tags else row
            values = {s: v for s in seeds if (v := top1(runs / f"s{s}-{run}", "fused")) is not None}
            if not values or (tag not in tags and not any((runs / f"s{s}-{row}-{t}").is_dir()
                                                           for s in seeds for t in tags)):
                continue
            acc = top1(runs / f"{tag}-teacher", "fused") if tag in tags else bundled
            teachers[f"{row}/{tag}"] = {"teacher_top1": acc, "student": desc, "fused": spread(values)}
            table.add_row(desc, tag, "-" if acc is None else f"{acc:.2f}",
                          *(f"{values[s]:.2f}" if s in values else "-" for s in seeds), fmt(spread(values)))
    result["teacher_choice"] = teachers
    console.print(table)

    result["disagreement"] = {}
    for f in sorted(runs.glob("compare-s*/disagreement.csv")):
        rows = list(csv.reader(f.read_text().splitlines()))
        labels = rows[0][1:]
        matrix = [[float(x) for x in r[1:]] for r in rows[1:]]
        result["disagreement"][f.parent.name] = {"labels": labels, "percent": [[100 * x for x in r] for r in matrix]}
        table = Table(title=f"Disagreement (% of test images), {f.parent.name}")
        table.add_column("")
        for lab in labels:
            table.add_column(lab, justify="right")
        for lab, r in zip(labels, matrix, strict=True):
            table.add_row(lab, *(f"{100 * x:.2f}" for x in r))
        console.print(table)

    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
