"""Webdataset tar shards and `datasets` label columns as data sources: read by index, in the
folder's order, so that a run from shards equals the run from the folder they were written from."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdkit.data import finish_samples, open_dataset
from kdkit.data.dataset import SeededDataset
from tests.helpers import assert_same_run, run_cli


@pytest.fixture(scope="module")
def shards(tiny_data, tmp_path_factory) -> Path:
    """tiny_data written by `kdkit shards`: train (120 samples) in shards of 50, test as val."""
    out = tmp_path_factory.mktemp("wds") / "tiny-wds"
    assert run_cli("shards", tiny_data, "--out", out, "--shard-size", "50", "--json") == 0
    return out


def folder_samples(root: Path) -> list[tuple[bytes, int]]:
    """(file bytes, class index) of an ImageFolder split, in sorted class then file order."""
    classes = sorted(p.name for p in root.iterdir())
    return [(f.read_bytes(), i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]


def test_shards_hold_the_folder_bytes_and_labels_in_order_under_every_split_spelling(shards, tiny_data):
    want = folder_samples(tiny_data / "train")
    assert sorted(p.name for p in shards.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar",
                                                                   "train-000002.tar"]
    spellings = ["train", "train-{000000..000002}.tar", "train-000000.tar::train-{000001..000002}.tar"]
    for split in spellings:
        ds = open_dataset(shards, split)
        assert [(ds.read_bytes(i), int(ds.targets[i])) for i in range(len(ds))] == want, split
        assert ds.classes == sorted(p.name for p in (tiny_data / "train").iterdir())  # from _info.json
    single = open_dataset(shards / "train-000001.tar", "train")
    assert [single.read_bytes(i) for i in range(len(single))] == [b for b, _ in want[50:100]]
    val = open_dataset(shards, "auto-eval")
    assert [(val.read_bytes(i), int(val.targets[i])) for i in range(len(val))] == folder_samples(tiny_data / "test")


def test_an_index_is_used_when_it_matches_and_a_scan_gives_the_same_index(shards, tmp_path):
    indexed = open_dataset(shards, "train")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in shards.glob("train-*.tar"):  # no index files, no _info.json: scanned, classes "0".."9"
        (copy / f.name).write_bytes(f.read_bytes())
    scanned = open_dataset(copy, "train")
    assert np.array_equal(scanned.offsets, indexed.offsets) and np.array_equal(scanned.targets, indexed.targets)
    assert scanned.classes == [str(i) for i in range(10)]
    stale = shards / "train-000000.tar.idx.npz"
    (copy / stale.name).write_bytes(stale.read_bytes())
    with open(copy / "train-000000.tar", "ab") as f:  # the shard changed after its index was written
        f.write(b"\0" * 10240)
    assert np.array_equal(open_dataset(copy, "train").offsets, indexed.offsets)  # rescanned, not trusted


def test_webdataset_and_timm_read_the_shards_kdkit_writes(shards, tiny_data):
    import webdataset as wds
    from timm.data import create_dataset

    want = folder_samples(tiny_data / "train")
    urls = [str(p) for p in sorted(shards.glob("train-*.tar"))]
    got = [(s["jpg"], int(s["cls"])) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert got == want
    ds = create_dataset("wds/tiny", root=str(shards), split="train", is_training=False, batch_size=1)
    labels = sorted(int(t) for _, t in ds)
    assert labels == sorted(t for _, t in want)


def test_a_run_from_shards_equals_the_run_from_their_folder_bit_for_bit(shards, tiny_data, teacher_dir, tmp_path):
    from tests.helpers import distill_args

    folder, sharded = tmp_path / "folder", tmp_path / "sharded"
    assert run_cli(*distill_args(teacher_dir, tiny_data, folder)) == 0
    args = distill_args(teacher_dir, shards, sharded)
    args[args.index("--workers") + 1] = "2"  # and loader workers do not change a view
    assert run_cli(*args) == 0
    assert_same_run(sharded, folder)


def test_a_killed_run_on_shards_resumes_mid_epoch_to_the_uninterrupted_run(shards, teacher_dir, tmp_path):
    from tests.helpers import distill_args

    reference, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_cli(*distill_args(teacher_dir, shards, reference)) == 0
    proc = subprocess.Popen([sys.executable, "-m", "kdkit", *map(str, distill_args(teacher_dir, shards, killed))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = killed / "metrics.jsonl", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count('"step"') > 3:  # mid first epoch (7 steps)
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run_cli("distill", "--resume", killed, "--no-progress", "--workers", "0") == 0
    assert_same_run(killed, reference)


def test_a_cache_written_from_shards_replays_the_live_teacher_of_the_folder_run(shards, tiny_data, teacher_dir,
                                                                                 tmp_path):
    from tests.helpers import common, distill, teacher_args

    live = distill(tmp_path, "live", *common(tiny_data, epochs=2), *teacher_args(teacher_dir), "--loss", "soft",
                   "--tau", "2")
    assert run_cli("cache", *common(shards, epochs=2), *teacher_args(teacher_dir), "--dtype", "float32",
                   "--out", tmp_path / "c") == 0
    cached = distill(tmp_path, "cached", *common(shards, epochs=2), "--logit-cache", tmp_path / "c", "--loss", "soft",
                     "--tau", "2")
    assert len(cached) == len(live) == 14
    for a, b in zip(live, cached, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["kd"] - b["kd"]) <= 1e-5, a["step"]
    # the folder's cache is not the shards' data: refused, naming the fingerprint
    assert run_cli("distill", *common(tiny_data, epochs=2), "--logit-cache", tmp_path / "c", "--output",
                   tmp_path / "runs", "--name", "mismatch") == 2


def _hf_dataset(tiny_data: Path, labels: str):
    import datasets

    rows = [(Image.open(io.BytesIO(b)).convert("RGB"), t) for b, t in folder_samples(tiny_data / "train")]
    names = sorted(p.name for p in (tiny_data / "train").iterdir())
    column = [t if labels == "int" else names[t] for _, t in rows]
    feats = datasets.Features({"img": datasets.Image(), "y": datasets.Value("int64" if labels == "int" else "string")})
    return datasets.Dataset.from_dict({"img": [r for r, _ in rows], "y": column}, features=feats), names


@pytest.mark.parametrize("labels", ["int", "str"])
def test_a_saved_datasets_split_with_an_integer_or_string_label_column(tiny_data, tmp_path, labels):
    import datasets

    ds, names = _hf_dataset(tiny_data, labels)
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(20))}).save_to_disk(tmp_path / "hf")
    with pytest.raises(Exception, match="label column"):
        open_dataset(tmp_path / "hf", "train")  # neither 'img' nor 'y' is a name kdkit guesses
    opened = open_dataset(tmp_path / "hf", "train", input_key="img", target_key="y")
    want = [t for _, t in folder_samples(tiny_data / "train")]
    assert opened.targets.tolist() == want
    assert opened.classes == (names if labels == "str" else [str(i) for i in range(10)])
    (tmp_path / "classes.txt").write_text("\n".join(reversed(names)) + "\n")
    if labels == "str":  # a class map fixes the order: class i is line i
        mapped = open_dataset(tmp_path / "hf", "train", input_key="img", target_key="y",
                              class_map=tmp_path / "classes.txt")
        assert mapped.targets.tolist() == [9 - t for t in want]
    val = open_dataset(tmp_path / "hf", "auto-eval", classes=opened.classes, input_key="img", target_key="y")
    assert len(val) == 20
    out = tmp_path / "runs"
    assert run_cli("train", "--model", "resnet10t", "--data", tmp_path / "hf", "--input-key", "img", "--target-key",
                   "y", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--no-progress", "--img-size", "32",
                   "--output", out, "--name", "hf", "--set", "model.kwargs={channels=[8, 16, 32, 64], stem_width=8}",
                   "--set", "optim.warmup_epochs=0") == 0


def test_class_map_fixes_a_folder_label_space_and_refuses_an_unknown_folder(tiny_data, tmp_path):
    names = sorted(p.name for p in (tiny_data / "train").iterdir())
    (tmp_path / "map.txt").write_text("\n".join(reversed(names)))
    ds = open_dataset(tiny_data, "train", class_map=tmp_path / "map.txt")
    assert ds.classes == names[::-1]
    assert ds.targets.tolist() == [9 - t for _, t in folder_samples(tiny_data / "train")]
    (tmp_path / "short.txt").write_text("\n".join(names[:5]))
    with pytest.raises(Exception, match="label space lacks"):
        open_dataset(tiny_data, "train", class_map=tmp_path / "short.txt")


class CountingReads(SeededDataset):
    """Wraps a dataset and counts its reads (decodes)."""

    def __init__(self, inner: SeededDataset):
        super().__init__(inner.transform, inner.seed)
        self.inner, self.classes, self.reads = inner, inner.classes, 0

    def __len__(self) -> int:
        return len(self.inner)

    def read(self, index: int):
        self.reads += 1
        return self.inner.read(index)


def test_the_repeats_of_an_image_in_a_batch_are_decoded_once_with_the_same_pixels(tiny_data):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from kdkit.config import AugConfig
    from kdkit.data import epoch_views, view_settings, with_views

    data_cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
                "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0}
    aug = AugConfig(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, repeated_aug=3)
    ds = with_views(CountingReads(open_dataset(tiny_data, "train", seed=5)), view_settings(
        data_cfg, dataclasses.asdict(aug)), 10)
    batch = epoch_views(len(ds), 5, 0, repeats=3)[:24].tolist()  # 4 pairs of images x 3 repeats
    samples = finish_samples(ds.__getitems__([(0, v) for v in batch]))
    assert ds.reads == len({v % len(ds) for v in batch}) == 8
    # the same views one at a time (a decode each, no sharing): identical pixels and targets
    ref = CountingReads(open_dataset(tiny_data, "train", seed=5))
    ref = with_views(ref, view_settings(data_cfg, dataclasses.asdict(aug)), 10)
    for v, s in zip(batch, samples, strict=True):
        one = ref[(0, v)]
        assert torch.equal(one["image"], s["image"]) and torch.equal(one["target"], s["target"])
    assert ref.reads == 2 * len(batch)  # alone, each view and its Mixup partner are decoded every time


def test_remote_urls_and_missing_shards_are_one_line_refusals(shards, tmp_path):
    assert run_cli("distill", "--data", "https://example.com/wds", "--train-split", "train-{0..9}.tar",
                   "--output", tmp_path, "--student", "resnet10t", "--teacher", "resnet10t") == 2
    assert not any(tmp_path.iterdir())
    with pytest.raises(Exception, match="2 of 4 shards not found"):
        open_dataset(shards, "train-{000001..000004}.tar")


def test_remote_shards_are_copied_and_indexed_and_a_hub_stream_written_as_shards(shards, tiny_data, tmp_path,
                                                                                 monkeypatch):
    import datasets

    # a URL pattern, opened by webdataset's gopen (pipe: here: no network in the tests)
    urls = f"pipe:cat {shards}/train-{{000000..000002}}.tar"
    assert run_cli("shards", urls, "--out", tmp_path / "copied", "--json") == 0
    copied, original = open_dataset(tmp_path / "copied", "train"), open_dataset(shards, "train")
    assert [copied.read_bytes(i) for i in range(len(copied))] == [original.read_bytes(i) for i in range(120)]
    assert (tmp_path / "copied" / "train-000001.tar.idx.npz").is_file()
    # a Hub dataset streamed (datasets' streaming=True on local parquet files) straight into shards
    names = sorted(p.name for p in (tiny_data / "train").iterdir())
    want = folder_samples(tiny_data / "train")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in want],
                                "label": [t for _, t in want]}, features=feats).to_parquet(hub / "train-0.parquet")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert run_cli("shards", f"hf:{hub.parent}", "--streaming", "--out", tmp_path / "streamed", "--shard-size", "64",
                   "--json") == 0
    streamed = open_dataset(tmp_path / "streamed", "train")
    assert [(streamed.read_bytes(i), int(streamed.targets[i])) for i in range(len(streamed))] == want
    assert streamed.classes == names
    assert run_cli("shards", f"hf:{hub.parent}", "--streaming", "--out", tmp_path / "streamed") == 2  # exists


def test_symlinks_are_followed_once_and_dangling_ones_skipped_and_named(tiny_data, tmp_path, teacher_dir):
    import json
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    cat = root / "train" / "cat"
    (cat / "loop").symlink_to(cat)  # a loop: without care, every cat image counts 41 times
    (root / "train" / "dog" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    ds = open_dataset(root, "train")
    assert len(ds) == 120  # each image once
    assert ds.issues()["dangling_links"] == [str(root / "train" / "dog" / "gone.jpg")]
    assert ds.issues()["folders_reached_again"] == [str(cat / "loop")]
    with pytest.raises(Exception, match="point to nothing"):
        open_dataset(root, "train", strict=True)
    out = tmp_path / "runs"
    assert run_cli("train", "--model", "resnet10t", "--data", root, "--epochs", "1", "--batch-size", "16",
                   "--workers", "0", "--no-progress", "--img-size", "32", "--output", out, "--name", "links",
                   "--set", "model.kwargs={channels=[8, 16, 32, 64], stem_width=8}") == 0
    summary = json.loads((out / "links" / "summary.json").read_text())
    assert summary["data"]["train"]["dangling_links"] == [str(root / "train" / "dog" / "gone.jpg")]
