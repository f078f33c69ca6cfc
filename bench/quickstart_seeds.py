"""Quickstart over several seeds: does distillation beat the same student without it, every time?

    python bench/quickstart_seeds.py --seeds 0 1 2 [--set key=value ...]

Runs `kdkit quickstart` (recipes/quickstart.toml) once per seed, prints a table and writes JSON
(--json-out, default bench/results/quickstart_seeds.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kdkit.cli.quickstart import run_quickstart
from kdkit.config import _merge, parse_override


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--output", default="runs/bench-quickstart")
    p.add_argument("--json-out", default="bench/results/quickstart_seeds.json")
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        over: dict = {"run": {"seed": seed, "output": f"{args.output}/seed{seed}", "progress": False}}
        for item in args.overrides:
            over = _merge(over, parse_override(item))
        start = time.perf_counter()
        r = run_quickstart(over)
        base, kd = r["no_kd"]["eval"], r["distilled"]["eval"]
        rows.append({"seed": seed, "teacher": r["teacher"]["class_top1"], "no_kd": base["fused_top1"],
                     "class": kd["class_top1"], "dist": kd["dist_top1"], "fused": kd["fused_top1"],
                     "gain": kd["fused_top1"] - base["fused_top1"], "seconds": time.perf_counter() - start,
                     "train_seconds": r["no_kd"]["train_seconds"] + r["distilled"]["train_seconds"]})
    table = Table(title="quickstart over seeds (top-1 %, 2,000 held-out CIFAR-10 images)")
    cols = ("seed", "teacher", "no_kd", "class", "dist", "fused", "gain", "seconds")
    for c in cols:
        table.add_column(c, justify="right")
    for row in rows:
        table.add_row(*(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    Console().print(table)
    gains = [row["gain"] for row in rows]
    result = {"rows": rows, "mean_gain": statistics.mean(gains), "min_gain": min(gains),
              "overrides": args.overrides, "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}"}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
