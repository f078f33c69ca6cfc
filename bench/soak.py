"""Soak: one long `kdkit distill` on a tiny set, a checkpoint and an evaluation every epoch; its
resident memory, open file descriptors and checkpoint folder are sampled from /proc throughout.

    python bench/soak.py [--epochs 200] [--images 32] [--workers 0] [--keep 2]

The run: a 2-block, 32-wide DeiT distilled from a fixed random resnet10t on --images bundled
CIFAR-10 training images (and as many test images), batch 16, EMA, a checkpoint at each epoch's
end (run.checkpoint_every = 0), the newest --keep kept, an evaluation and a saved student each epoch.
Flat means: after the warm-up (the first 10% of epochs), the largest and the median RSS and fd count
of the last 10% of epochs (before the run's final writes) are within 5% of those of the 10% after
the warm-up, and the checkpoint folder holds --keep checkpoints (--keep + 1 for a moment, while the
newest is renamed in and the oldest removed) of one size. Prints a table and JSON; writes --json-out (bench/results/soak.json).
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, kdkit_source  # noqa: E402

from kdkit.data import sample_path  # noqa: E402


def make_inputs(root: Path, images: int) -> tuple[Path, Path]:
    """`images` training and test images, spread over the 10 classes, and a tiny fixed teacher."""
    data = root / "data"
    per_class = -(-images // 10)
    for split in ("train", "test"):
        n = 0
        for cls in sorted((sample_path() / split).iterdir()):
            (data / split / cls.name).mkdir(parents=True)
        for i in range(per_class):
            for cls in sorted((sample_path() / split).iterdir()):
                if n < images:
                    f = sorted(cls.iterdir())[i]
                    shutil.copy(f, data / split / cls.name / f.name)
                    n += 1
    teacher = root / "resnet10t.safetensors"
    torch.manual_seed(1)
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), teacher)
    return data, teacher


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    """Direct children (data-loader workers), from /proc/PID/task/*/children."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def epoch_of(run_dir: Path) -> int:
    """Epochs finished: from the newest checkpoint's state.json (the run's own record)."""
    folders = sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
    for folder in reversed(folders):
        try:
            return json.loads((folder / "state.json").read_text())["position"]["epoch"]
        except (OSError, ValueError, KeyError):
            continue
    return 0


def window(samples: list[dict], lo: float, hi: float, key: str, how: str = "max") -> int:
    """The largest (or the median) value of `key` over the samples of epochs [lo, hi)."""
    values = sorted(s[key] for s in samples if lo <= s["epoch"] < hi)
    if not values:
        return 0
    return values[-1] if how == "max" else values[len(values) // 2]


def pct(v: float | None) -> str:
    return f"{100 * v:+.1f}%" if v is not None else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--images", type=int, default=32, help="training images (and as many test images)")
    p.add_argument("--workers", type=int, default=0, help="data-loader workers (persistent)")
    p.add_argument("--keep", type=int, default=2, help="run.keep_checkpoints")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    p.add_argument("--json-out", default="bench/results/soak.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdkit-soak-") as tmp:
        root = Path(tmp)
        data, teacher = make_inputs(root, args.images)
        run_dir = root / "runs" / "soak"
        cmd = [sys.executable, "-m", "kdkit", "distill", "--teacher", "resnet10t", "--teacher-weights", str(teacher),
               "--student", "deit_tiny", "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}",
               "--img-size", "32", "--patch-size", "8", "--data", str(data), "--output", str(run_dir.parent),
               "--name", run_dir.name, "--loss", "soft", "--epochs", str(args.epochs), "--batch-size", "16",
               "--workers", str(args.workers), "--no-progress", "--preset", "none", "--set", "optim.warmup_epochs=1",
               "--set", "optim.ema_decay=0.9", "--set", "run.checkpoint_every=0",
               "--set", f"run.keep_checkpoints={args.keep}", "--set", "run.log_every=1",
               "--set", "run.eval_every=1", "--set", "run.teacher_check_batches=1"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples: list[dict] = []
        while proc.poll() is None:
            try:
                kids = children(proc.pid)
                sample = {"t": round(time.perf_counter() - start, 2), "epoch": epoch_of(run_dir),
                          "rss_kib": rss_kib(proc.pid), "fds": open_fds(proc.pid),
                          "workers": len(kids), "workers_rss_kib": sum(rss_kib(k) for k in kids),
                          "checkpoints": len(list((run_dir / "checkpoints").glob("step-*"))),
                          "checkpoint_bytes": folder_bytes(run_dir / "checkpoints")}
                samples.append(sample)
            except (OSError, ValueError):
                pass  # the process ended between two reads
            time.sleep(args.interval)
        err = proc.stderr.read()
        if proc.returncode != 0:
            sys.exit(f"the soak run failed ({proc.returncode}):\n{err[-3000:]}")
        seconds = time.perf_counter() - start
        final = {"checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
                 "checkpoint_bytes": folder_bytes(run_dir / "checkpoints"),
                 "run_dir_entries": sorted(p.name for p in run_dir.iterdir()),
                 "metrics_lines": len((run_dir / "metrics.jsonl").read_text().splitlines())}
    e = args.epochs
    warm, after, last = 0.1 * e, 0.2 * e, 0.9 * e
    rows = {}
    for key in ("rss_kib", "fds", "workers_rss_kib"):
        # the end window stops before the run's last writes (summary, model card, curves: matplotlib)
        base, end = window(samples, warm, after, key), window(samples, last, e, key)
        mid_base, mid_end = window(samples, warm, after, key, "median"), window(samples, last, e, key, "median")
        rows[key] = {"first": samples[0][key] if samples else 0, "after_warmup": base, "end": end,
                     "growth": round(end / base - 1, 4) if base else None,
                     "median_after_warmup": mid_base, "median_end": mid_end,
                     "median_growth": round(mid_end / mid_base - 1, 4) if mid_base else None}
    steady = [s for s in samples if s["epoch"] >= 2]  # from the second checkpoint on
    # sizes while exactly --keep checkpoints are complete (not mid-rename or mid-removal)
    sizes = sorted(s["checkpoint_bytes"] for s in steady if s["checkpoints"] == args.keep)
    sizes = sizes[len(sizes) // 20: len(sizes) - len(sizes) // 20]  # 5% at each end: samples taken mid-removal
    result = {
        "epochs": e, "images": args.images, "batch_size": 16, "workers": args.workers, "keep_checkpoints": args.keep,
        "seconds": round(seconds, 1), "samples": len(samples), "rss_kib": rows["rss_kib"], "fds": rows["fds"],
        "workers_rss_kib": rows["workers_rss_kib"],
        "checkpoints_seen_max": max((s["checkpoints"] for s in samples), default=0),
        "after_last_epoch": {"rss_kib_max": max((s["rss_kib"] for s in samples if s["epoch"] >= e), default=0),
                             "fds_max": max((s["fds"] for s in samples if s["epoch"] >= e), default=0)},
        "checkpoint_bytes_steady": [sizes[0], sizes[-1]] if sizes else None, "final": final,
        # a new checkpoint is renamed into place before the oldest goes: keep + 1 for a moment
        "flat": all(r[g] is not None and r[g] <= 0.05 for r in (rows["rss_kib"], rows["fds"])
                    for g in ("growth", "median_growth"))
                and len(final["checkpoints"]) == args.keep
                and max((s["checkpoints"] for s in samples), default=0) <= args.keep + 1,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores", "torch": torch.__version__, "kdkit": kdkit_source(),
        "trace": samples,
    }
    table = Table(title=f"soak: {e} epochs of {args.images} images, a checkpoint per epoch (keep {args.keep}), "
                        f"{args.workers} workers")
    for col in ("", "first sample", f"epochs {warm:.0f}-{after:.0f}: max (median)",
                f"epochs {last:.0f}-{e}: max (median)", "growth: max (median)"):
        table.add_column(col, justify="right")
    names = {"rss_kib": "RSS (MiB)", "fds": "open fds", "workers_rss_kib": "workers' RSS (MiB)"}
    for key, r in rows.items():
        if key == "workers_rss_kib" and not args.workers:
            continue
        show = (lambda v: f"{v / 1024:.1f}") if key != "fds" else str
        table.add_row(names[key], show(r["first"]), f"{show(r['after_warmup'])} ({show(r['median_after_warmup'])})",
                      f"{show(r['end'])} ({show(r['median_end'])})", f"{pct(r['growth'])} ({pct(r['median_growth'])})")
    table.add_row("checkpoints", "", "", f"{len(final['checkpoints'])} ({final['checkpoint_bytes'] / 1024:.0f} KiB)",
                  f"max {result['checkpoints_seen_max']} seen")
    Console(width=120).print(table)
    Console().print(f"{'flat' if result['flat'] else 'NOT flat'}: {seconds:.0f} s, {len(samples)} samples; "
                    f"checkpoint folder {final['checkpoints']}, steady size {result['checkpoint_bytes_steady']} bytes")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("trace", "kdkit")}))


if __name__ == "__main__":
    main()
