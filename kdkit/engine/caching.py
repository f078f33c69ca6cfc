"""`kdkit cache` from a recipe: the same data, student views and seed as the distillation run that
will read the cache, so the manifests agree; and `--verify`, which checks shards and re-runs the
teacher on a random sample of records."""

from __future__ import annotations

from pathlib import Path

import torch

from kdkit.cache import LogitCache
from kdkit.cache.store import DTYPES, STATS, encode_record, record_labels
from kdkit.cache.writer import write_cache
from kdkit.config import Recipe
from kdkit.console import console
from kdkit.data import SemiSupervisedDataset, StreamDataset, open_dataset, open_unlabeled, with_views
from kdkit.engine.build import (
    STREAM_NO_CACHE,
    build_logit_source,
    build_student,
    check_auto_augment,
    expected_manifest,
    logit_source_name,
    make_accelerator,
    open_train,
    student_data_config,
)
from kdkit.registry import KdkitError


def cache_teacher(r: Recipe, out: str | Path, mode: str = "replay", topk: int = 0, dtype: str = "float16",
                  shard_size: int = 4096, overwrite: bool = False) -> dict:
    """Write (or resume, or extend) the cache of the recipe's teacher on its training data."""
    if mode not in ("replay", "fixed"):
        raise KdkitError(f"unknown cache mode {mode!r}: replay or fixed")
    if dtype not in DTYPES:
        raise KdkitError(f"unknown cache dtype {dtype!r}: {', '.join(DTYPES)}")
    if shard_size < 1 or topk < 0:
        raise KdkitError("--shard-size must be >= 1 and --topk >= 0 (0 = every class)")
    check_auto_augment(r.aug.auto_augment)
    acc = make_accelerator(r)
    train_ds = open_train(r)
    if isinstance(train_ds, StreamDataset):
        raise KdkitError(STREAM_NO_CACHE)
    num_classes = len(train_ds.classes)
    data_cfg = student_data_config(build_student(r, "distill", None, num_classes), r.model.img_size, r.data)
    if logit_source_name(r) == "cache":
        raise KdkitError("kdkit cache runs the teacher: pass --teacher (a cache cannot be written from a cache)")
    source = build_logit_source(r, None, data_cfg, train_ds, acc)  # live teacher, or an ensemble
    identity = source.identity()
    manifest = expected_manifest(r, train_ds, data_cfg, mode, identity, topk, dtype, shard_size)
    train_ds = with_views(train_ds, manifest["views"], num_classes)
    per_proc = max(r.data.eval_batch_size // acc.num_processes, 1)
    stats = write_cache(source, train_ds, out, manifest, batch_size=per_proc, workers=r.data.workers,
                        accelerator=acc, progress=r.run.progress, overwrite=overwrite)
    cache = LogitCache(out)
    stats.update(cache=str(out), mode=mode, epochs=cache.epochs, records_per_epoch=manifest["records_per_epoch"],
                 topk=cache.manifest["topk"], dtype=dtype, teacher=identity["name"])
    return stats


def verify_cache(path: str | Path, r: Recipe | None = None, samples: int = 64, seed: int = 0) -> dict:
    """Check every shard's checksum; with a recipe naming the teacher, re-run it on `samples` random
    records and report the largest difference of the stored log-probabilities (and of a top-K
    record's mean, std and label log-probability)."""
    cache = LogitCache(path, partial=True)  # missing shards are reported, not refused
    problems = cache.store.verify()
    report: dict = {"cache": str(path), "shards": len(cache.store.all_shards()), **problems,
                    "ok": not any(problems.values())}
    if r is None or not r.model.teacher:
        return report
    m = cache.manifest
    ds = open_dataset(m["data"]["source"], m["data"]["split"], seed=m["seed"] or 0)
    if m.get("unlabeled"):
        ds = SemiSupervisedDataset(ds, open_unlabeled(m["unlabeled"]["source"], ds.classes), m["unlabeled_ratio"] or 1.0)
    ds = with_views(ds, m["views"], m["num_classes"])
    size = m["views"]["img_size"]
    data_cfg = {"mean": m["views"]["mean"], "std": m["views"]["std"], "input_size": (3, size, size)}
    teacher = build_logit_source(r, None, data_cfg, ds, None)
    report["teacher_matches_manifest"] = teacher.identity()["weights_sha256"] == m["teacher"]["weights_sha256"]
    g = torch.Generator().manual_seed(seed)
    worst, top1_agree, n = 0.0, 0, 0
    for _ in range(samples):
        epoch = int(torch.randint(cache.epochs, (1,), generator=g))
        pos = int(torch.randint(m["records_per_epoch"], (1,), generator=g))
        view = int(cache.views_of_epoch(epoch)[pos])
        ds.set_epoch(epoch)
        sample = ds[view]
        if sample["image"] is None:
            continue
        logits = teacher(sample["image"][None])
        logp = logits.log_softmax(1)[0]
        stored = cache.lookup(epoch, torch.tensor([view]))[0]
        kept = stored.topk(m["topk"]).indices
        worst = max(worst, (stored[kept] - logp[kept]).abs().max().item())
        # a top-K record's mean, std and label, against the same teacher's (NaN label: no label, both sides)
        target = sample["target"]
        target = target[None] if isinstance(target, torch.Tensor) else torch.tensor([target])
        want = encode_record(logits, m["topk"], torch.float32, record_labels(target))
        got = cache.records(epoch, torch.tensor([view]))
        for name in STATS if m["topk"] < m["num_classes"] else ():
            a, b = got[name].float(), want[name].cpu()
            same = a.isnan() == b.isnan()
            worst = max(worst, float("inf") if not same.all() else (a - b).nan_to_num().abs().max().item())
        top1_agree += int(stored.argmax() == logp.argmax())
        n += 1
    report.update(rechecked=n, max_abs_diff=worst, top1_agreement=top1_agree / max(n, 1))
    console.print(f"re-ran the teacher on {n} records: largest |difference| {worst:.3g} (log-probability), "
                  f"top-1 agreement {100 * top1_agree / max(n, 1):.1f}%")
    return report
