"""What the read-time shard check costs: a cached epoch with and without it.

    python bench/cache_read_check.py [--records 50000] [--rounds 5] [--train-steps 3]

A replay cache of CIFAR-10 size (--records views an epoch, 4,096 records a shard, float16) is
written through the cache's own shard writer, once with K = C = 10 classes (CIFAR-10: 21 bytes a
record) and once with the top 10 of 1,000 classes (ImageNet-style: 40 bytes). Then, interleaved
over --rounds (median), a fresh `LogitCache` looks every view of one epoch up in the training
sampler's order, in batches of --batch-size, as `CachedLogits` does in training: once with the
check (`check_shards=True`, the default: each shard's sha256 verified when first mapped) and once
without. Shards stay in the page cache (written just before), so reads are as fast as they get and
the check's share is at its largest. Also timed:

- the check alone: hashing every shard of an epoch, as the check does (the figure held to the goal;
  the difference of the two lookup timings is noisier than the check itself);
- a training step of the CPU recipe's student (recipes/cifar10_deit_cpu.toml: DeiT 6 x 128,
  patch 4, 32 px, batch 128 by default; hard distillation from the cache, AdamW), for the share of
  the check in a whole cached epoch (steps x step time + the lookups).

Goal: the check under 2% of a cached epoch's time; the table gives its share of the lookups alone
too (a stricter bound). Prints a table and writes JSON (--json-out, default
bench/results/cache_read_check.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, kdkit_source  # noqa: E402

from kdkit.cache import LogitCache, build_manifest  # noqa: E402
from kdkit.cache.store import LogitStore, encode_record, mmap_safetensors, tensors_sha256  # noqa: E402
from kdkit.data.sampler import epoch_views  # noqa: E402
from kdkit.engine.step import DistillationStep  # noqa: E402
from kdkit.losses import create_loss  # noqa: E402
from kdkit.models import create_student  # noqa: E402
from kdkit.sources import CachedLogits  # noqa: E402
from kdkit.types import Batch  # noqa: E402


def write_cache(root: Path, records: int, classes: int, topk: int, epochs: int, shard_size: int) -> LogitStore:
    """A replay cache of random teacher logits, written shard by shard with LogitStore.write."""
    data = {"source": "synthetic", "split": "train", "num_samples": records,
            "classes": [f"c{i}" for i in range(classes)], "fingerprint": "-"}
    manifest = build_manifest(mode="replay", teacher={"name": "random", "weights_sha256": "-"}, data=data,
                              views={"repeated_aug": 1}, seed=0, epochs=epochs, topk=topk, dtype="float16",
                              shard_size=shard_size)
    (root / "shards").mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    store = LogitStore(root, manifest)
    g = torch.Generator().manual_seed(0)
    for epoch, shard in store.all_shards():
        n = min(shard_size, records - shard * shard_size)
        store.write(epoch, shard, encode_record(torch.randn(n, classes, generator=g) * 3, manifest["topk"], torch.float16))
    return store


def lookup_epoch(root: Path, epoch: int, batch_size: int, check: bool) -> float:
    cache = LogitCache(root, check_shards=check)  # fresh: no shard mapped or checked yet
    views = epoch_views(cache.manifest["records_per_epoch"], 0, epoch)
    start = time.perf_counter()
    for batch in views.split(batch_size):
        cache.lookup(epoch, batch)
    return time.perf_counter() - start


def hash_epoch(store: LogitStore, epoch: int) -> float:
    """The check's own work for one epoch: hash every shard's tensors, freshly mapped (so its first
    touch of each page counts here). Mapping is left out: the lookups map every shard anyway."""
    records = [mmap_safetensors(store.path(epoch, shard))[0] for shard in range(store.shards_per_epoch())]
    start = time.perf_counter()
    for record in records:
        tensors_sha256(record)
    return time.perf_counter() - start


def train_step_seconds(root: Path, classes: int, batch_size: int, steps: int) -> float:
    """Median seconds of one training step of the CPU recipe's student (`classes` outputs), reading
    the cache (no check)."""
    torch.manual_seed(0)
    student = create_student("deit_tiny", classes, "token", img_size=32, patch_size=4,
                             model_kwargs={"depth": 6, "embed_dim": 128, "num_heads": 4})
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.05)
    step = DistillationStep(create_loss("hard"), CachedLogits(LogitCache(root, check_shards=False)))
    views = epoch_views(LogitCache(root).manifest["records_per_epoch"], 0, 0)
    times = []
    for i in range(steps + 1):  # the first is warm-up
        batch = Batch(torch.randn(batch_size, 3, 32, 32), torch.randint(classes, (batch_size,)),
                      views[i * batch_size:(i + 1) * batch_size], 0)
        start = time.perf_counter()
        out = step(student, batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(args, root: Path, classes: int, topk: int) -> dict:
    store = write_cache(root, args.records, classes, topk, args.epochs, args.shard_size)
    on_disk = sum(p.stat().st_size for p in store.path(0, 0).parent.glob("e0000-*.safetensors"))
    lookups: dict[str, list[float]] = {"checked": [], "unchecked": []}
    hashes = []
    for r in range(args.rounds + 1):  # round 0 warms up (page cache, allocator)
        epoch = r % args.epochs
        order = ("checked", "unchecked") if r % 2 else ("unchecked", "checked")
        got = {mode: lookup_epoch(root, epoch, args.lookup_batch_size, mode == "checked") for mode in order}
        h = hash_epoch(store, epoch)
        if r:
            for mode, t in got.items():
                lookups[mode].append(t)
            hashes.append(h)
    med = {mode: statistics.median(t) for mode, t in lookups.items()}
    hash_s = statistics.median(hashes)
    out = {"classes": classes, "topk": store.manifest["topk"], "records_per_epoch": args.records,
           "shards_per_epoch": store.shards_per_epoch(), "epoch_bytes_on_disk": on_disk,
           "lookup_epoch_s": med, "lookup_epoch_s_min": {mode: min(t) for mode, t in lookups.items()},
           "lookup_epoch_s_all": lookups, "hash_epoch_s": hash_s,
           "hash_MB_per_s": on_disk / hash_s / 1e6,
           "check_share_of_lookups": hash_s / med["unchecked"],
           "measured_difference_share_of_lookups": (med["checked"] - med["unchecked"]) / med["unchecked"]}
    if args.train_steps:
        step_s = train_step_seconds(root, classes, args.batch_size, args.train_steps)
        steps = args.records // args.batch_size
        epoch_s = steps * step_s + med["unchecked"]  # the lookups of a whole epoch; each step timed one batch's
        out.update(train_step_s=step_s, steps_per_epoch=steps, cached_epoch_s=epoch_s,
                   check_share_of_cached_epoch=hash_s / epoch_s)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=50_000, help="views per epoch (CIFAR-10: 50,000)")
    p.add_argument("--epochs", type=int, default=3, help="epochs in the cache (rounds cycle over them)")
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--lookup-batch-size", type=int, default=128, help="views per lookup (a training batch)")
    p.add_argument("--batch-size", type=int, default=128, help="the training step's batch (the CPU recipe's)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=3, help="training steps timed (0: lookups only)")
    p.add_argument("--json-out", default="bench/results/cache_read_check.json")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for classes, topk in ((10, 0), (1000, 10)):
            name = f"K{topk or classes}_of_{classes}"
            results[name] = measure(args, Path(tmp) / name, classes, topk)
    result = {"machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
              "kdkit": kdkit_source(),
              "command": "python bench/cache_read_check.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json_out"),
              "goal": "check < 2% of a cached epoch", "results": results}
    table = Table(title=f"read-time shard check, {args.records:,} records an epoch ({cpu_model()})")
    for col in ("records", "MB/epoch", "lookups ms", "+ check ms", "sha256 ms", "% lookups", "step s", "epoch s",
                "% epoch"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        trained = "cached_epoch_s" in r
        table.add_row(name.replace("_", " "), f"{r['epoch_bytes_on_disk'] / 1e6:.2f}",
                      f"{r['lookup_epoch_s']['unchecked'] * 1e3:.0f}", f"{r['lookup_epoch_s']['checked'] * 1e3:.0f}",
                      f"{r['hash_epoch_s'] * 1e3:.2f}", f"{100 * r['check_share_of_lookups']:.2f}",
                      f"{r['train_step_s']:.2f}" if trained else "-", f"{r['cached_epoch_s']:.0f}" if trained else "-",
                      f"{100 * r['check_share_of_cached_epoch']:.2g}" if trained else "-")
    table.caption = ("lookups: an epoch of batched lookups without / with the check (median of rounds); sha256: "
                     "the check alone; % epoch: of steps x step time + lookups (goal < 2)")
    Console(width=120).print(table)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
