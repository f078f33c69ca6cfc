"""Logit-cache benchmark: distillation reading a cache vs plain training vs the live teacher; bytes
per record; reads per second from a cold start.

    python bench/cache_speed.py [--data cifar10-sample] [--teacher resnet50] [--teacher-size 32]

1. Steps/s of three runs of the same student on the same batches, measured in one process and
   interleaved over --rounds (median): plain training (labels only, no teacher), distillation
   reading a replay cache (soft KD), distillation with the teacher online. The batches are
   drawn once (augmented views, Mixup/CutMix) and kept in memory, so data loading, identical in
   the three runs, is left out; what differs is the teacher (forward vs. lookup) and the KD term.
2. Bytes on disk per record (shard files / records) for K = 10 of 10 classes and K = 10 of 1000.
3. Records read per second from a cold start: a fresh reader over a --records-record cache,
   shuffled batches of 256 view ids like a training epoch (page cache dropped when permitted).
Prints a table and writes JSON (--json-out, default bench/results/cache_speed.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kdkit.cache import FORMAT, LogitCache, build_manifest, data_identity
from kdkit.cache.store import LogitStore, encode_record, record_bytes
from kdkit.cache.writer import write_cache
from kdkit.config import AugConfig
from kdkit.data import create_loader, open_dataset, view_settings, with_views
from kdkit.engine.build import student_data_config
from kdkit.engine.step import DistillationStep, make_batch
from kdkit.losses import create_loss
from kdkit.models import create_model, create_student
from kdkit.models.teacher import Teacher
from kdkit.sources import CachedLogits, LiveTeacher


def step_rate(student, step: DistillationStep, batches: list, optimizer) -> float:
    start = time.perf_counter()
    for raw in batches:
        out = step(student, make_batch(raw, torch.device("cpu")))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return len(batches) / (time.perf_counter() - start)


def training_speed(args, tmp: Path) -> dict:
    torch.manual_seed(0)
    ds = open_dataset(args.data, "train", seed=0)
    classes = len(ds.classes)
    student = create_student(args.student, classes, "token", img_size=args.img_size, patch_size=args.patch_size)
    data_cfg = student_data_config(student, args.img_size)
    aug = dataclasses.asdict(AugConfig(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0))
    views = view_settings(data_cfg, aug)
    ds = with_views(ds, views, classes)
    loader = create_loader(ds, args.batch_size, training=True, workers=args.workers, seed=0)
    batches = []
    for raw in loader:
        batches.append(raw)
        if len(batches) == args.steps:
            break
    size = args.teacher_size
    teacher = Teacher(create_model(args.teacher, classes), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                      input_size=(3, size, size), student_mean=data_cfg["mean"], student_std=data_cfg["std"])
    manifest = build_manifest(mode="replay", teacher={"name": args.teacher, "weights_sha256": "random"},
                              data=data_identity(ds, args.data, "train"), views=views, seed=0, epochs=1, topk=10,
                              dtype="float16", shard_size=4096)
    start = time.perf_counter()
    write_cache(teacher, ds, tmp / "train-cache", manifest, batch_size=256, workers=args.workers, progress=False)
    cache_seconds = time.perf_counter() - start
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    kd = create_loss("soft", task_weight=0.5, kd_weight=0.5, tau=3.0)
    modes = {"plain": DistillationStep(create_loss("none"), None),
             "cached": DistillationStep(kd, CachedLogits(LogitCache(tmp / "train-cache"))),
             "online": DistillationStep(kd, LiveTeacher(teacher))}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for step in modes.values():  # warm-up
        step_rate(student, step, batches[:2], optimizer)
    for _ in range(args.rounds):
        for m, step in modes.items():
            rates[m].append(step_rate(student, step, batches, optimizer))
    med = {m: statistics.median(r) for m, r in rates.items()}
    return {"student": args.student, "student_img_size": args.img_size, "teacher": args.teacher,
            "teacher_img_size": size, "batch_size": args.batch_size, "steps_per_round": len(batches),
            "rounds": args.rounds, "steps_per_s": med, "all_rates": rates,
            "cached_over_plain": med["cached"] / med["plain"], "cached_over_online": med["cached"] / med["online"],
            "cache_write_seconds": cache_seconds, "cache_records": len(ds)}


def disk_and_reads(args, tmp: Path) -> dict:
    out = {}
    for classes in (10, 1000):
        root = tmp / f"synthetic-{classes}"
        manifest = {"format": FORMAT, "mode": "replay", "epochs": 1, "repeats": 1, "num_classes": classes, "topk": 10,
                    "dtype": "float16", "records_per_epoch": args.records, "shard_size": 4096}
        (root / "shards").mkdir(parents=True)
        (root / "manifest.json").write_text(json.dumps(manifest))
        store = LogitStore(root, manifest)
        g = torch.Generator().manual_seed(0)
        for shard in range(store.shards_per_epoch()):
            n = min(4096, args.records - shard * 4096)
            labels = torch.randint(classes, (n,), generator=g)
            store.write(0, shard, encode_record(torch.randn(n, classes, generator=g) * 3, 10, torch.float16, labels))
        on_disk = sum(p.stat().st_size for p in (root / "shards").iterdir())
        dropped = subprocess.run("sync && echo 3 > /proc/sys/vm/drop_caches", shell=True,
                                 capture_output=True).returncode == 0
        start = time.perf_counter()
        cache = LogitCache(root)  # cold: no shard mapped yet
        order = torch.randperm(args.records, generator=g)
        for i in range(0, args.records, 256):
            cache.lookup(0, order[i:i + 256])
        seconds = time.perf_counter() - start
        out[f"K10_of_{classes}"] = {"record_bytes": record_bytes(10, classes, "float16"),
                                    "bytes_per_record_on_disk": on_disk / args.records,
                                    "records": args.records, "reads_per_s": args.records / seconds,
                                    "page_cache_dropped": dropped}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="cifar10-sample")
    p.add_argument("--student", default="deit_tiny")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--teacher-size", type=int, default=32, help="teacher input size (224: ImageNet-native)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="batches per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--json-out", default="bench/results/cache_speed.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        speed = training_speed(args, Path(tmp))
        disk = disk_and_reads(args, Path(tmp))
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                          "torch_threads": torch.get_num_threads()},
              "command": "python bench/cache_speed.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json_out"),
              "training": speed, "storage": disk}
    table = Table(title="kdkit logit cache")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for mode, rate in speed["steps_per_s"].items():
        table.add_row(f"{mode} steps/s", f"{rate:.3f}")
    table.add_row("cached / plain (goal >= 0.95)", f"{speed['cached_over_plain']:.3f}")
    table.add_row("cached / online (speed-up)", f"{speed['cached_over_online']:.2f}x")
    for name, d in disk.items():
        table.add_row(f"{name}: bytes/record (disk)", f"{d['record_bytes']} ({d['bytes_per_record_on_disk']:.1f})")
        table.add_row(f"{name}: cold reads/s", f"{d['reads_per_s']:,.0f}")
    Console().print(table)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
