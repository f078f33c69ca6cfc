"""Fault injection: kill a short distillation with SIGKILL at random points, resume each, and count
the resumed runs whose per-step losses and final weights equal the uninterrupted run's.

    python bench/fault_injection.py [--kills 20] [--seed 0] [--workers 0]

The run (a 2-block DeiT distilled from a tiny resnet10t on 120 bundled CIFAR-10 images, 3 epochs
of 7 steps, drop_path, Mixup, EMA, a checkpoint after every update, the newest 2 kept,
run.deterministic) is run once uninterrupted, then 20 times killed after a random step: the
even-numbered kills a random fraction of a step later (in the forward, backward, metrics write or
evaluation), the odd-numbered ones as soon as the next checkpoint's temporary folder appears (in
the middle of writing the checkpoint).
Prints a table and JSON; writes --json-out (default bench/results/fault_injection.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from kdkit.data import sample_path

STEPS_PER_EPOCH, EPOCHS = 7, 3


def make_inputs(root: Path) -> tuple[Path, Path]:
    """12 training and 6 test images per class from the bundled sample, and a tiny fixed teacher."""
    data = root / "data"
    for split, n in (("train", 12), ("test", 6)):
        for cls in sorted((sample_path() / split).iterdir()):
            (data / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, data / split / cls.name / f.name)
    teacher = root / "resnet10t.safetensors"
    torch.manual_seed(1)
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), teacher)
    return data, teacher


def distill_cmd(data: Path, teacher: Path, run_dir: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "kdkit", "distill", "--teacher", "resnet10t", "--teacher-weights", str(teacher),
            "--student", "deit_tiny", "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}",
            "--img-size", "32", "--patch-size", "8", "--data", str(data), "--output", str(run_dir.parent),
            "--name", run_dir.name, "--loss", "soft", "--tau", "2", "--epochs", str(EPOCHS), "--batch-size", "16",
            "--lr", "1e-3", "--workers", str(workers), "--no-progress", "--set", "optim.lr_base_batch=0",
            "--set", "optim.warmup_epochs=1", "--set", "model.drop_path=0.1", "--set", "aug.mixup=0.8",
            "--set", "optim.ema_decay=0.9", "--set", "run.checkpoint_every=1", "--set", "run.keep_checkpoints=2",
            "--set", "run.log_every=1", "--set", "run.teacher_check_batches=1",
            "--set", "run.deterministic=true"]


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("images_per_s", None)
        rec.get("eval", {}).pop("images_per_s", None)
        out.append(rec)
    return out


def same_weights(a: Path, b: Path) -> bool:
    for folder in ("student", "student_ema"):
        x, y = load_file(a / folder / "model.safetensors"), load_file(b / folder / "model.safetensors")
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def kill_and_resume(cmd: list[str], run_dir: Path, after_step: int, fraction: float, step_s: float,
                    workers: int, in_write: bool = False) -> dict:
    """Start the run, SIGKILL it `fraction` of a step after metrics.jsonl shows step `after_step`
    (`in_write`: as soon as the next checkpoint's temporary folder appears), resume it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, folder, deadline = run_dir / "metrics.jsonl", run_dir / "checkpoints", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count('"step"') > after_step:
            break
        time.sleep(0.005)
    if in_write:
        while proc.poll() is None and time.monotonic() < deadline and not any(folder.glob(".step-*")):
            pass  # busy-wait: a checkpoint write takes milliseconds
    else:
        time.sleep(fraction * step_s)
    finished = proc.poll() is not None
    os.kill(proc.pid, signal.SIGKILL) if not finished else None
    proc.wait()
    checkpoints = sorted(int(p.name[5:]) for p in folder.glob("step-*")) if not finished else []
    torn = [p.name for p in folder.glob(".step-*")]  # a checkpoint write the kill interrupted
    resumed = subprocess.run([sys.executable, "-m", "kdkit", "distill", "--resume", str(run_dir), "--no-progress",
                              "--workers", str(workers)], capture_output=True, text=True)
    line = next((x for x in resumed.stderr.splitlines() if x.startswith("resuming from")), "")
    return {"after_step": after_step, "in_write": in_write, "fraction": round(fraction, 3),
            "finished_before_kill": finished,
            "checkpoints_on_disk": checkpoints, "interrupted_write": torn,
            "resumed_from": int(line.split("step-")[-1].split(":")[0]) if line else None,
            "resume_rc": resumed.returncode, "error": resumed.stderr.strip().splitlines()[-1:] if resumed.returncode
            else []}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data-loader workers of every run")
    p.add_argument("--json-out", default="bench/results/fault_injection.json")
    args = p.parse_args()
    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdkit-faults-") as tmp:
        root = Path(tmp)
        data, teacher = make_inputs(root)
        reference = root / "runs" / "reference"
        subprocess.run(distill_cmd(data, teacher, reference, args.workers), check=True, capture_output=True)
        summary = json.loads((reference / "summary.json").read_text())
        step_s = summary["train_seconds"] / (STEPS_PER_EPOCH * EPOCHS)
        want, rows = records(reference), []
        for i in range(args.kills):
            run_dir = root / "runs" / f"kill{i:02d}"
            row = kill_and_resume(distill_cmd(data, teacher, run_dir, args.workers), run_dir,
                                  rng.randrange(STEPS_PER_EPOCH * EPOCHS), rng.random(), step_s, args.workers,
                                  in_write=i % 2 == 1)
            row["same_losses"] = row["resume_rc"] == 0 and records(run_dir) == want
            row["same_weights"] = row["resume_rc"] == 0 and same_weights(run_dir, reference)
            rows.append({"kill": i, **row})
            shutil.rmtree(run_dir)
    table = Table(title=f"fault injection: {args.kills} SIGKILLs of `kdkit distill`, each resumed")
    for col in ("kill", "after step", "then", "checkpoints", "torn write", "resumed from", "same losses",
                "same weights"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["kill"]), str(r["after_step"]), "in write" if r["in_write"] else f"+{r['fraction']:.2f}",
                      "finished" if r["finished_before_kill"] else " ".join(map(str, r["checkpoints_on_disk"])),
                      "yes" if r["interrupted_write"] else "", str(r["resumed_from"] or "-"), str(r["same_losses"]),
                      str(r["same_weights"]))
    Console(width=110).print(table)
    equal = sum(r["same_losses"] and r["same_weights"] for r in rows)
    result = {"kills": args.kills, "equal": equal, "seed": args.seed, "workers": args.workers,
              "seconds": round(time.perf_counter() - start, 1), "steps": STEPS_PER_EPOCH * EPOCHS,
              "interrupted_writes": sum(bool(r["interrupted_write"]) for r in rows), "rows": rows, "torch": torch.__version__,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    Console().print(f"{equal}/{args.kills} resumed runs equal the uninterrupted run (per-step losses and final "
                    f"student and EMA weights, bit for bit); {result['interrupted_writes']} kills interrupted a "
                    f"checkpoint write; {result['seconds']:.0f} s")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
