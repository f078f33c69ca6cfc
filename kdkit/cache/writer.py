"""Writing a cache: every process runs the teacher over its share of the shards still missing
(missing shard j goes to process j mod N), in shard-aligned batches, so the bytes written depend
on neither the number of processes nor on which shards were already there, and a resumed cache
keeps every process busy. One writer at a time: the main process holds CACHE/.kdkit.lock
(kdkit.files.exclusive_lock) while the cache is written, and a second `kdkit cache` on the same
folder is refused, naming the first.

A killed writer leaves complete shards (each written through a temporary file and a rename), at
most one hidden temporary file per process, and the manifest; the same command again removes
the temporaries and computes the missing shards."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import DataLoader

from kdkit.accelerator import create_accelerator, peers_watched
from kdkit.cache import LogitCache
from kdkit.cache.manifest import differences
from kdkit.cache.store import DTYPES, LogitStore, encode_record, read_manifest, record_bytes, record_labels
from kdkit.console import progress_bar
from kdkit.data import SeededDataset, batch_images, collate, start_worker
from kdkit.files import LOCK_NAME, atomic_write_text, exclusive_lock, remove_stale_temporaries
from kdkit.registry import KdkitError

# keys that must match to resume (or extend) an existing cache folder
RESUME_KEYS = ("format", "mode", "teacher", "data.classes", "data.num_samples", "data.fingerprint", "views", "seed",
               "repeats", "unlabeled.num_samples", "unlabeled.fingerprint", "unlabeled_ratio", "topk", "dtype",
               "num_classes", "records_per_epoch", "shard_size")


def open_for_writing(root: Path, manifest: dict, overwrite: bool, accelerator: Accelerator) -> LogitStore:
    """Create the cache folder, or resume one written with the same settings (a larger `epochs`
    extends it). Anything else is refused, naming the differences, unless `overwrite`."""
    if accelerator.is_main_process:
        # what a killed writer leaves half-written: a manifest (at the very start) or one shard per
        # process. We hold the lock, so no writer is running; a folder that is not a cache keeps its files.
        torn_manifest = list(root.glob(".manifest.json.*.tmp"))
        if (root / "manifest.json").is_file():
            old = read_manifest(root)
            diffs = differences(old, manifest, RESUME_KEYS)
            if diffs and not overwrite:
                raise KdkitError(f"{root} holds a different cache ({'; '.join(diffs)}): pass --overwrite to "
                                 f"replace it, or choose another --out")
            remove_stale_temporaries(root / "shards")
            # safetensors' save_file writes through its own hidden temporary (.tmpXXXXXX) too
            for p in (root / "shards").glob(".tmp*") if (root / "shards").is_dir() else ():
                p.unlink(missing_ok=True) if p.is_file() else None
            if diffs:
                shutil.rmtree(root / "shards", ignore_errors=True)
            elif old["epochs"] > manifest["epochs"]:
                manifest = {**manifest, "epochs": old["epochs"]}  # keep what is there; compute nothing more
        elif root.exists() and any(p.name != LOCK_NAME and p not in torn_manifest for p in root.iterdir()):
            raise KdkitError(f"{root} exists and is not a kdkit logit cache: choose another --out")
        for p in torn_manifest:
            p.unlink(missing_ok=True)
        # the manifest first: a folder with shards/ but no manifest would not be taken for this cache again
        atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=2))
        (root / "shards").mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return LogitStore(root, read_manifest(root))


def write_cache(teacher: Callable[[Tensor], Tensor], dataset: SeededDataset, root: str | Path, manifest: dict, *,
                batch_size: int = 256, workers: int = 2, accelerator: Accelerator | None = None,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Run `teacher` ((B, 3, H, W) -> (B, C) logits) over every record `manifest` promises and write
    the missing shards. `dataset` must already carry the manifest's views (kdkit.data.with_views).

    Returns {"shards_written", "shards_present", "records", "seconds", "records_per_s", "bytes_per_record"}.
    Another writer on the same folder is a KdkitError naming it (its lock is held until this returns).
    """
    acc = accelerator or create_accelerator()
    root = Path(root)
    hint = "the shards written so far are complete: rerun the same `kdkit cache` to compute the others"
    with exclusive_lock(root, "cache writer") if acc.is_main_process else nullcontext(), peers_watched(acc, hint):
        return _write(teacher, dataset, root, manifest, batch_size, workers, acc, overwrite, progress)


def _write(teacher: Callable[[Tensor], Tensor], dataset: SeededDataset, root: Path, manifest: dict, batch_size: int,
           workers: int, acc: Accelerator, overwrite: bool, progress: bool) -> dict:
    store = open_for_writing(root, manifest, overwrite, acc)
    m = store.manifest
    reader = LogitCache(root, partial=True)
    # one listing, by the main process, shared: a process listing later would see shards the others
    # have begun writing and skip its own
    missing = store.missing_shards() if acc.is_main_process else None
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        missing = broadcast_object_list([missing])[0]
    todo = missing[acc.process_index::acc.num_processes]
    topk, dtype = m["topk"], DTYPES[m["dtype"]]
    if isinstance(teacher, torch.nn.Module):
        teacher.to(acc.device)
    start, records = time.perf_counter(), 0
    with progress_bar(acc, f"caching {m['mode']} logits", len(todo), progress) as bar:
        for epoch, shard in todo:
            dataset.set_epoch(epoch)
            lo = shard * store.shard_size
            views = reader.views_of_epoch(epoch)[lo:lo + store.shard_size]
            loader = DataLoader(dataset, batch_size=batch_size, sampler=views.tolist(), num_workers=workers,
                                collate_fn=collate, worker_init_fn=start_worker)
            record = encode_record(torch.zeros(len(views), m["num_classes"]), topk, dtype)  # unreadable views stay 0
            row_of = {v: r for r, v in enumerate(views.tolist())}
            for raw in loader:
                if raw["images"] is None:
                    continue
                rows = torch.tensor([row_of[v] for v in raw["index"].tolist()])
                logits = teacher(batch_images(raw, acc.device)).cpu()
                for k, v in encode_record(logits, topk, dtype, record_labels(raw["target"])).items():
                    record[k][rows] = v
            store.write(epoch, shard, record)
            records += len(views)
            bar(records=records)
    acc.wait_for_everyone()
    seconds = time.perf_counter() - start
    present = len(store.all_shards()) - len(missing)
    return {"shards_written": len(todo), "shards_present": present, "records": records,
            "seconds": seconds, "records_per_s": records / seconds if seconds else 0.0,
            "bytes_per_record": record_bytes(topk, m["num_classes"], m["dtype"])}
