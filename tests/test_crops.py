"""FKD's crops (`aug.crops_per_image` N): every image N times an epoch, its N views next to each
other and decoded once, an epoch N times as long; cached and live runs agree, and what cannot hold
is refused. Also: a run replaying a cache's E epochs draws the order of epoch e mod E."""

from collections import Counter

import pytest
import torch

from kdkit.data import (
    EpochSampler,
    SemiSupervisedDataset,
    create_loader,
    epoch_views,
    open_dataset,
    open_unlabeled,
    view_settings,
    with_views,
)
from kdkit.registry import KdkitError
from tests.helpers import cli_error, common, distill, run_cli, teacher_args

NORM = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic",
        "crop_pct": 1.0}


def crop_views(crops: int, mixup: float = 0.0) -> dict:
    return view_settings(NORM, {"scale": (0.35, 1.0), "hflip": 0.5, "color_jitter": 0.0, "auto_augment": "",
                                "reprob": 0.0, "mixup": mixup, "cutmix": 0.0, "mixup_prob": 1.0,
                                "mixup_switch_prob": 0.5, "label_smoothing": 0.0, "repeated_aug": 0,
                                "crops_per_image": crops, "interpolation": "bicubic"})


def test_an_fkd_epoch_draws_every_crop_of_every_image_in_adjacent_groups():
    n, crops = 11, 3
    order = epoch_views(n, seed=5, epoch=2, repeats=crops, every_repeat=True).tolist()
    assert len(order) == len(set(order)) == n * crops
    assert set(order) == {i + r * n for i in range(n) for r in range(crops)}
    assert Counter(v % n for v in order) == {i: crops for i in range(n)}
    # the crops of an image lie within one group of 2 x crops positions (A B A B A B), never a pair with itself
    for start in range(0, (n // 2) * 2 * crops, 2 * crops):
        group = order[start:start + 2 * crops]
        assert len({v % n for v in group}) == 2
        assert all(group[i] % n != group[i + 1] % n for i in range(0, len(group), 2))
    # DeiT's epoch of repeats is the first n views of the same order
    assert epoch_views(n, seed=5, epoch=2, repeats=crops).tolist() == order[:n]


def test_crops_are_decoded_once_and_equal_the_views_fetched_alone(tiny_data, monkeypatch):
    ds = with_views(open_dataset(tiny_data, "train", seed=3), crop_views(3), 10)
    reads = Counter()
    read = ds.read
    monkeypatch.setattr(ds, "read", lambda i: (reads.update([i]), read(i))[1])
    loader = create_loader(ds, 12, training=True, workers=0, seed=3)
    loader.sampler.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 120 * 3 // 12  # an epoch of every crop of the 120 images
    views = [int(v) for b in batches for v in b["index"]]
    assert sorted(views) == list(range(360))
    assert reads == {i: 1 for i in range(120)}  # one decode per image, however many crops
    for b in batches[::7]:
        for v, x in zip(b["index"].tolist(), b["images"], strict=True):
            alone = ds[(1, v)]["image"]
            assert torch.equal(alone, x)
    crops = [x for b in batches for v, x in zip(b["index"].tolist(), b["images"], strict=True) if v % 120 == 0]
    assert len(crops) == 3 and not torch.equal(crops[0], crops[1])  # three different crops of image 0


def test_mixup_under_crops_pairs_two_images_and_a_view_is_independent_of_its_batch(tiny_data):
    ds = with_views(open_dataset(tiny_data, "train", seed=3), crop_views(2, mixup=0.8), 10)
    got = {}
    for batch_size in (8, 4):
        loader = create_loader(ds, batch_size, training=True, workers=0, seed=3)
        loader.sampler.set_epoch(0)
        for b in loader:
            for v, x in zip(b["index"].tolist(), b["images"], strict=True):
                assert v not in got or torch.equal(got[v], x)
                got[v] = x
    assert len(got) == 240 and all(ds.partner(v) % 120 != v % 120 for v in got)


def test_a_cycled_replay_draws_the_order_of_the_epoch_it_replays():
    plain = [v for _, v in EpochSampler(40, 8, seed=1, repeats=3)]
    sampler = EpochSampler(40, 8, seed=1, repeats=3, view_cycle=2)
    sampler.set_epoch(4)
    assert [v for _, v in sampler] == plain  # epoch 4 of a 2-epoch cycle is epoch 0
    assert set(epoch_views(40, 1, 4, 3).tolist()) != set(plain)  # which views an epoch of repeats draws changes


def test_crops_distil_live_and_from_a_cache_alike(tiny_data, teacher_dir, tmp_path, capsys):
    args = [*common(tiny_data, epochs=1), *teacher_args(teacher_dir), "--crops-per-image", "2"]
    live = distill(tmp_path, "live", *args, "--loss", "soft", "--tau", "2")
    plain = distill(tmp_path, "plain", *common(tiny_data, epochs=1), *teacher_args(teacher_dir), "--loss", "soft",
                    "--tau", "2")
    assert (len(live), len(plain)) == (2 * 120 // 16, 120 // 16)  # an epoch of 240 crops, of 120 images
    assert run_cli("cache", *args, "--dtype", "float32", "--out", tmp_path / "c") == 0
    cached = distill(tmp_path, "cached", *args, "--logit-cache", tmp_path / "c", "--loss", "soft", "--tau", "2")
    assert len(cached) == len(live)
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 for a, b in zip(live, cached, strict=True))
    # a cache of DeiT's epoch does not hold an epoch of crops: refused, not misread
    assert run_cli("cache", *common(tiny_data, epochs=1), *teacher_args(teacher_dir), "--dtype", "float32",
                   "--out", tmp_path / "deit") == 0
    capsys.readouterr()
    assert run_cli("distill", *args, "--logit-cache", tmp_path / "deit", "--output", tmp_path / "runs",
                   "--name", "refused") == 2
    err = capsys.readouterr().err
    assert "does not match this run" in err and "crops_per_image" in err, err


def test_crops_refuse_what_cannot_hold_in_one_line(tiny_data, capsys):
    line = cli_error(capsys, "train", "--model", "resnet10t", "--data", tiny_data, "--crops-per-image", "3",
                     "--repeated-aug", "3")
    assert "aug.crops_per_image 3 and aug.repeated_aug 3 both repeat images: choose one" in line


def test_crops_refuse_a_stream_and_unlabeled_images(tiny_data, tmp_path):
    assert run_cli("shards", tiny_data, "--out", tmp_path / "wds", "--shard-size", "40") == 0
    stream = open_dataset(f"pipe:cat {tmp_path / 'wds'}", "train-{000000..000002}.tar|120")
    with pytest.raises(KdkitError, match="crops_per_image needs indexed data"):
        with_views(stream, crop_views(2), 10)
    labeled = open_dataset(tiny_data, "train", seed=3)
    semi = SemiSupervisedDataset(labeled, open_unlabeled(tiny_data / "test", labeled.classes, seed=3), 1.0)
    with pytest.raises(KdkitError, match="does not combine with unlabeled images"):
        with_views(semi, crop_views(2), 10)
    assert with_views(semi, crop_views(0), 10).repeats == 1  # without crops, as before


def test_a_cache_of_repeats_replays_in_a_cycle(tiny_data, teacher_dir, tmp_path):
    """DeiT's repeats draw another subset of view ids every epoch: epoch 1 of a run cycling a
    one-epoch cache must draw epoch 0's, as the cache holds no others."""
    args = [*common(tiny_data, epochs=1), *teacher_args(teacher_dir), "--repeated-aug", "3"]
    assert run_cli("cache", *args, "--dtype", "float32", "--out", tmp_path / "c") == 0
    two = [a if a != "1" or args[i - 1] != "--epochs" else "2" for i, a in enumerate(args)]
    steps = distill(tmp_path, "cycled", *two, "--logit-cache", tmp_path / "c", "--logit-cache-cycle", "--loss", "soft")
    assert len(steps) == 2 * (120 // 16)
