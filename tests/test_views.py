"""Views under Mixup/CutMix: each view decoded and augmented once per batch, pairs mixed both ways,
and every view a function of (seed, epoch, view id) whatever the batch or process split."""

import numpy as np
import pytest
import torch

from kdkit.data import (
    EpochSampler,
    create_loader,
    epoch_views,
    finish_samples,
    open_dataset,
    view_settings,
    with_views,
)

NORM = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic",
        "crop_pct": 1.0}


def deit_views(repeats: int = 0) -> dict:
    return view_settings(NORM, {"scale": (0.35, 1.0), "hflip": 0.5, "color_jitter": 0.0,
                                "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0,
                                "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "label_smoothing": 0.1,
                                "repeated_aug": repeats, "interpolation": "bicubic"})


def mixed_dataset(tiny_data, repeats: int = 0):
    return with_views(open_dataset(tiny_data, "train", seed=3), deit_views(repeats), 10)


def count_calls(monkeypatch, ds) -> dict:
    calls = {"read": 0, "transform": 0}
    read, transform = ds.read, ds.transform

    def counted_read(index):
        calls["read"] += 1
        return read(index)

    def counted_transform(img):
        calls["transform"] += 1
        return transform(img)

    monkeypatch.setattr(ds, "read", counted_read)
    ds.transform = counted_transform
    return calls


def test_mixup_decodes_and_augments_each_view_once(tiny_data, monkeypatch):
    ds = mixed_dataset(tiny_data)
    calls = count_calls(monkeypatch, ds)
    loader = create_loader(ds, 16, training=True, workers=0, seed=3)
    loader.sampler.set_epoch(1)
    drawn = sum(len(b["index"]) for b in loader)
    assert drawn == 112 and calls == {"read": 112, "transform": 112}


def test_a_pair_is_mixed_both_ways_with_one_lambda(tiny_data):
    ds = mixed_dataset(tiny_data)
    ds.set_epoch(2)
    order = epoch_views(len(ds), 3, 2)
    ds.mixup = None  # the unmixed views, for reference
    plain = {v: ds.view(v) for v in order[:16].tolist()}
    ds = with_views(ds, deit_views(), 10)
    batch = finish_samples(ds.__getitems__([(2, v) for v in order[:16].tolist()]))
    for i in range(0, 16, 2):
        a, b = batch[i], batch[i + 1]
        assert ds.partner(a["index"]) == b["index"] and a["index"] % 120 != b["index"] % 120
        (xa, ta), (xb, tb) = plain[a["index"]], plain[b["index"]]
        # a' = l a + (1 - l) b and b' = l b + (1 - l) a (or a box swapped both ways): a' + b' = a + b
        assert torch.allclose(a["image"] + b["image"], xa + xb, atol=1e-5)
        assert not torch.allclose(a["image"], xa, atol=1e-3)  # really mixed
        smooth = torch.full((2, 10), 0.01)
        smooth[0, ta] += 0.9
        smooth[1, tb] += 0.9
        assert torch.allclose(a["target"] + b["target"], smooth.sum(0), atol=1e-6)
        lam = a["target"][ta].item() - 0.01 if ta != tb else None
        if lam is not None:  # one lambda for both directions
            assert b["target"][tb].item() - 0.01 == pytest.approx(lam, abs=1e-6)


def test_a_view_does_not_depend_on_the_batch_it_is_in(tiny_data):
    ds = mixed_dataset(tiny_data, repeats=3)
    for batch_size in (16, 6):
        loader = create_loader(ds, batch_size, training=True, workers=0, seed=3, repeated_aug=3)
        loader.sampler.set_epoch(1)
        got = {int(v): (x, t) for b in loader for v, x, t in zip(b["index"], b["images"], b["target"], strict=True)}
        for v in list(got)[:: len(got) // 7]:
            alone = ds[(1, v)]  # fetched alone: its partner is decoded again, the view is the same
            assert torch.equal(alone["image"], got[v][0]) and torch.equal(alone["target"], got[v][1])


def test_processes_keep_pairs_together_and_repeats_never_pair_an_image_with_itself(tiny_data):
    ds = mixed_dataset(tiny_data, repeats=3)
    ds.set_epoch(0)
    whole = [v for _, v in EpochSampler(120, 16, seed=3, repeats=3)]
    parts = [[v for _, v in EpochSampler(120, 16, seed=3, num_replicas=2, rank=r, repeats=3)] for r in (0, 1)]
    for step in range(len(whole) // 16):
        blocks = [p[step * 8:(step + 1) * 8] for p in parts]
        assert sorted(blocks[0] + blocks[1]) == sorted(whole[step * 16:(step + 1) * 16])
        for block in blocks:
            assert all(ds.partner(v) in block for v in block)
    assert all(ds.partner(v) % 120 != v % 120 for v in whole)


def test_posterize_to_zero_bits_is_black_in_kdkit_transforms_and_timm_is_left_as_it_is():
    """DeiT's inc1 RandAugment posterizes to 0 bits at magnitude 10, which recent Pillow refuses:
    kdkit's transforms give the black image the policy means; timm's own table is not patched."""
    from PIL import Image
    from timm.data import auto_augment, create_transform

    from kdkit.data.transforms import create_transforms

    assert all(auto_augment.NAME_TO_OP[n] is auto_augment.posterize
               for n in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"))
    ours = create_transforms(32, (0.5,) * 3, (0.5,) * 3, True, auto_augment="rand-m10-mstd0-inc1")
    theirs = create_transform(32, is_training=True, auto_augment="rand-m10-mstd0-inc1")

    def posterize_op(transform):
        ra = next(t for t in transform.transforms if isinstance(t, auto_augment.RandAugment))
        op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
        op.prob = 1.0
        return op

    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert not np.asarray(posterize_op(ours)(img)).any()
    with pytest.raises(ValueError):
        posterize_op(theirs)(img)
    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"] is auto_augment.posterize
