"""Persistent loader workers against workers respawned every epoch, on the quickstart's data.

    python bench/loader_workers.py [--epochs 6] [--workers 2] [--json-out bench/results/loader_workers.json]

Iterates the quickstart's training loader (bundled 3,000-image sample, crop + flip at 32 px, batch
64) for `--epochs` epochs, as the trainer does (seek, then a full pass), with
`data.persistent_workers` off and on, alternating; reports seconds per epoch after the first (whose
start-up both pay) and the time to the first batch of an epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from kdkit.config import AugConfig
from kdkit.data import create_loader, open_dataset, view_settings, with_views
from kdkit.data.sampler import seek

ROOT = Path(__file__).resolve().parent.parent


def run(persistent: bool, epochs: int, workers: int) -> dict:
    ds = open_dataset("cifar10-sample", "train", seed=0)
    cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
           "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0}
    ds = with_views(ds, view_settings(cfg, dataclasses.asdict(AugConfig(scale=(0.35, 1.0)))), 10)
    loader = create_loader(ds, 64, training=True, workers=workers, seed=0, persistent_workers=persistent)
    per_epoch, first_batch = [], []
    for epoch in range(epochs):
        seek(loader, epoch)
        start = time.perf_counter()
        for i, _ in enumerate(loader):
            if i == 0:
                first_batch.append(time.perf_counter() - start)
        per_epoch.append(time.perf_counter() - start)
    return {"epoch_seconds": per_epoch, "first_batch_seconds": first_batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "loader_workers.json")
    args = p.parse_args()
    results: dict[str, list[dict]] = {"respawned": [], "persistent": []}
    for r in range(args.rounds):
        for persistent in ((False, True) if r % 2 == 0 else (True, False)):
            results["persistent" if persistent else "respawned"].append(run(persistent, args.epochs, args.workers))
    table = Table(title=f"loader epochs after the first, {args.workers} workers, batch 64, 32 px, bundled sample")
    for col in ("workers", "s per epoch (median)", "first batch s (median)"):
        table.add_column(col)
    summary = {}
    for name, runs in results.items():
        epoch = statistics.median(s for r in runs for s in r["epoch_seconds"][1:])
        first = statistics.median(s for r in runs for s in r["first_batch_seconds"][1:])
        summary[name] = {"epoch_seconds_median": epoch, "first_batch_seconds_median": first}
        table.add_row(name, f"{epoch:.3f}", f"{first:.3f}")
    Console().print(table)
    cpu = cpu_model()
    out = {"bench": "loader_workers", "cpu": cpu, "args": {k: str(v) for k, v in vars(args).items()},
           "summary": summary, "runs": results}
    print(json.dumps(out))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
