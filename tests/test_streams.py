"""Streamed sources (shards at URLs, a Hub dataset with streaming=True): what they guarantee (a
view's pixels, a run's batches for the same readers, mid-epoch resume) and what they refuse."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from kdkit.config import AugConfig
from kdkit.data import create_loader, open_dataset, view_settings, with_views
from kdkit.data.sampler import seek
from kdkit.data.stream import StreamDataset
from tests.helpers import run_cli

DATA_CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0}


@pytest.fixture(scope="module")
def shards(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "wds"
    assert run_cli("shards", tiny_data, "--out", out, "--shard-size", "20") == 0  # 6 train shards, 3 val
    return out


def stream(shards: Path, seed: int = 0, **aug) -> StreamDataset:
    ds = open_dataset(f"pipe:cat {shards}", "train-{000000..000005}.tar|120", seed=seed)
    assert isinstance(ds, StreamDataset) and len(ds) == 120 and len(ds.classes) == 10  # classes: _info.json
    counted = open_dataset(f"pipe:cat {shards}", "train-{000000..000005}.tar")  # N from _info.json's lengths
    assert len(counted) == 120 and len(open_dataset(f"pipe:cat {shards}", "val")) == 60
    return with_views(ds, view_settings(DATA_CFG, dataclasses.asdict(AugConfig(**aug))), 10)


def epoch(ds: StreamDataset, workers: int, epoch: int = 0, step: int = 0, batch: int = 8) -> list[dict]:
    loader = create_loader(ds, batch, training=True, workers=workers, seed=0)
    seek(loader, epoch, step)
    return list(loader)


def views(batches: list[dict]) -> dict[int, torch.Tensor]:
    return {int(i): x for b in batches for i, x in zip(b["index"], b["images"], strict=True)}


def test_a_view_has_the_same_pixels_whatever_the_readers_and_a_run_repeats_for_the_same_readers(shards):
    ds = stream(shards, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, repeated_aug=3)
    one, two = epoch(ds, 0), epoch(ds, 2)
    assert len(one) == len(two) == 15  # 120 views in batches of 8, whatever the workers
    a, b = views(one), views(two)
    common = set(a) & set(b)
    assert len(common) >= 10 and all(torch.equal(a[v], b[v]) for v in common)
    assert [x["index"].tolist() for x in two] == [x["index"].tolist() for x in epoch(ds, 2)]  # same readers
    assert set(views(epoch(ds, 2, epoch=1))) != set(b)  # another epoch: another shard order


def test_a_stream_resumes_mid_epoch_exactly_with_the_same_readers(shards):
    ds = stream(shards, mixup=0.8, cutmix=1.0, repeated_aug=3)
    whole = epoch(ds, 2, epoch=1)
    loader = create_loader(ds, 8, training=True, workers=2, seed=0)
    seek(loader, 1, 5)
    assert len(loader) == len(whole) - 5 == 10
    tail = list(loader)
    assert len(tail) == 10
    for x, y in zip(whole[5:], tail, strict=True):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["images"], y["images"])
        assert torch.equal(x["target"], y["target"])  # Mixup's soft targets too


def test_a_run_on_a_stream_and_its_refusals(shards, teacher_dir, tmp_path):
    common = ["--data", f"pipe:cat {shards}", "--train-split", "train-{000000..000005}.tar|120", "--val-split",
              "val-{000000..000002}.tar|60", "--img-size", "32", "--epochs", "1", "--batch-size", "16",
              "--workers", "2", "--no-progress", "--output", tmp_path, "--set", "optim.warmup_epochs=0"]
    assert run_cli("train", "--model", "resnet10t", "--set", "model.kwargs={channels=[8, 16, 32, 64], stem_width=8}",
                   "--name", "streamed", *common) == 0
    assert (tmp_path / "streamed" / "student").is_dir()
    distill = ["distill", "--student", "resnet10t", "--teacher", "resnet10t", "--teacher-weights", teacher_dir,
               "--preset", "none", *common]
    assert run_cli(*distill, "--name", "cached", "--logit-cache", tmp_path / "nope") == 2  # no positions to cache by
    assert run_cli("cache", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, *common[:-4],
                   "--out", tmp_path / "cache") == 2
    assert run_cli(*distill, "--name", "semi", "--unlabeled", shards) == 2
    assert not (tmp_path / "cache").exists()


def test_a_hub_dataset_streamed_with_its_classlabel_names(tiny_data, tmp_path, monkeypatch):
    import datasets

    classes = sorted(p.name for p in (tiny_data / "train").iterdir())
    files = [(f.read_bytes(), i) for i, c in enumerate(classes) for f in sorted((tiny_data / "train" / c).iterdir())]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for k in range(3):  # 3 parquet files: 3 stream shards
        part = files[k::3]
        datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in part],
                                    "label": [t for _, t in part]}, features=feats).to_parquet(
            tmp_path / "hub" / "data" / f"train-{k}.parquet")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = open_dataset(f"hf:{tmp_path / 'hub'}", "train|120", streaming=True)
    assert isinstance(ds, StreamDataset) and ds.classes == classes and len(ds.shards) == 3
    ds = with_views(ds, view_settings(DATA_CFG, dataclasses.asdict(AugConfig())), 10)
    got = [int(t) for b in epoch(ds, 0, batch=10) for t in b["target"]]
    assert len(got) == 120 and sorted(got) == sorted(t for _, t in files)


def test_a_streamed_batch_finished_on_the_device_equals_the_workers(shards):
    from kdkit.data import batch_images

    ds = stream(shards, mixup=0.8, cutmix=1.0, reprob=0.5, repeated_aug=3)
    # batches of 7: Mixup pairs (consecutive views) split across batches, the partner sent as an extra row
    runs = []
    for on_device in (False, True):
        loader = create_loader(ds, 7, training=True, workers=2, seed=0, finish_on_device=on_device)
        seek(loader, 0)
        runs.append([(b["index"], batch_images(b, torch.device("cpu")), b) for b in loader])
    extra = 0
    for (i, x, _), (j, y, raw) in zip(*runs, strict=True):
        assert torch.equal(i, j) and torch.equal(x, y)
        assert raw["images"].dtype == torch.uint8
        extra += raw["images"].shape[0] - len(j)
    assert extra > 0
