"""The batch finishes the views (normalise, random erasing, Mixup/CutMix) in a loader worker or on
the training device; either way the pixels are, bit for bit, those of timm's own per-image code:
the transform run whole (timm's RandomErasing inside it) under each view's seed, then timm's Mixup
on each pair [a, b] under the pair's seed."""

import pytest
import torch
from timm.data import Mixup

from kdkit.data import (
    batch_images,
    collate,
    create_loader,
    epoch_views,
    finish_batch,
    open_dataset,
    view_settings,
    with_views,
)
from kdkit.data.dataset import SeededDataset
from kdkit.data.seeding import AUGMENT, MIX, run_seeded, sample_seed
from kdkit.data.transforms import RawView, create_transforms

NORM = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "interpolation": "bicubic", "crop_pct": 1.0}


def views(**aug) -> dict:
    base = {"scale": (0.08, 1.0), "hflip": 0.5, "color_jitter": 0.3, "auto_augment": "rand-m9-mstd0.5-inc1",
            "reprob": 0.5, "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
            "label_smoothing": 0.1, "repeated_aug": 3, "interpolation": "bicubic"}
    return view_settings(NORM, {**base, **aug})


def timm_reference(ds: SeededDataset, v: dict, epoch: int, pairs: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    """Each view of `pairs` as timm's code makes it: the float transform with timm's RandomErasing
    in it, seeded per view, then timm's Mixup (mode batch) on [a, b] seeded per pair."""
    transform = create_transforms(v["img_size"], v["mean"], v["std"], True, scale=v["scale"], hflip=v["hflip"],
                                  color_jitter=v["color_jitter"], auto_augment=v["auto_augment"],
                                  reprob=v["reprob"], interpolation=v["interpolation"],
                                  remode=v.get("remode", "pixel"), recount=v.get("recount", 1))
    mixup = Mixup(mixup_alpha=v["mixup"], cutmix_alpha=v["cutmix"], prob=v["mixup_prob"],
                  switch_prob=v["mixup_switch_prob"], label_smoothing=v["label_smoothing"], num_classes=10)
    out = {}
    for a, b in pairs:
        xs = [run_seeded(transform, sample_seed(ds.seed, epoch, w, AUGMENT), ds.decode(w % len(ds))[0]) for w in (a, b)]
        labels = torch.tensor([ds.decode(a % len(ds))[1], ds.decode(b % len(ds))[1]])
        x, _ = run_seeded(mixup, sample_seed(ds.seed, epoch, a, MIX), torch.stack(xs), labels)
        out[a], out[b] = x[0], x[1]
    return out


@pytest.mark.parametrize("aug", [{}, {"remode": "rand", "recount": 3, "mixup_switch_prob": 0.0},
                                 {"remode": "const", "mixup_switch_prob": 1.0, "repeated_aug": 0}])
def test_finished_batches_are_timms_pixels_in_the_workers_and_on_the_device(tiny_data, aug):
    v = views(**aug)
    ds = with_views(open_dataset(tiny_data, "train", seed=7), v, 10)
    assert type(ds.transform.transforms[-1]).__name__ == "RecordErasing"
    order = epoch_views(len(ds), 7, 1, repeats=max(v["repeated_aug"], 1))[:40].tolist()
    reference = timm_reference(ds, v, 1, [(min(p), max(p)) for p in zip(ds.partners(order, 1), order, strict=True)])
    erased = mixed = 0
    for finish_on_device in (False, True):
        # batches of 7: pairs split across batches too (the partner then travels as an extra row)
        loader = create_loader(ds, 7, training=True, workers=0, seed=7, finish_on_device=finish_on_device)
        loader.sampler.set_epoch(1)
        for raw in loader:
            images = batch_images(raw, torch.device("cpu"))
            if finish_on_device:  # the GPU's schedule (whole-batch steps), here on the CPU: the same values
                assert torch.equal(finish_batch(raw["images"], raw["finish"], by_row=False), images)
            assert images.dtype == torch.float32 and images.shape[0] == len(raw["index"])
            if finish_on_device:
                assert raw["images"].dtype == torch.uint8 and raw["images"].shape[0] >= len(raw["index"])
                erased += len(raw["finish"]["erase"])
                mixed += len(raw["finish"]["mix"])
            for view, x in zip(raw["index"].tolist(), images, strict=True):
                if view in reference:
                    assert torch.equal(x, reference[view]), view
    assert erased > 5 and mixed > 20  # the cases really ran


def test_a_collated_batch_sends_uint8_pixels_and_a_plan_that_pickles(tiny_data):
    import pickle

    ds = with_views(open_dataset(tiny_data, "train", seed=1), views(), 10)
    raw = collate(ds.__getitems__([(0, v) for v in epoch_views(len(ds), 1, 0, repeats=3)[:9].tolist()]),
                  finish=False)
    assert raw["images"].dtype == torch.uint8 and raw["images"].shape[0] == 10  # 9 views + 1 partner
    again = pickle.loads(pickle.dumps(raw))
    assert torch.equal(batch_images(again, torch.device("cpu")), collate(
        ds.__getitems__([(0, v) for v in epoch_views(len(ds), 1, 0, repeats=3)[:9].tolist()]))["images"])
    assert isinstance(ds.__getitems__([(0, 0)])[0]["image"], RawView)


def test_training_on_batches_finished_in_make_batch_equals_training_on_the_workers(tiny_data):
    """The trainer's GPU path (uint8 batches finished by make_batch) run on the CPU: the same weights,
    bit for bit, as batches finished in the loader's workers."""
    import timm.optim

    from kdkit import DistillationStep, create_loss, create_student, fit
    from kdkit.engine.loop import LoopSettings

    weights = []
    for finish_on_device in (False, True):
        torch.manual_seed(0)
        student = create_student("deit_tiny", 10, "token", img_size=32, patch_size=8,
                                 model_kwargs=dict(depth=1, embed_dim=32, num_heads=2))
        ds = with_views(open_dataset(tiny_data, "train", seed=0), views(), 10)
        loader = create_loader(ds, 16, training=True, workers=2, seed=0, finish_on_device=finish_on_device)
        optimizer = timm.optim.create_optimizer_v2(student, "adamw", lr=1e-3)
        fit(student, DistillationStep(create_loss("none")), loader, optimizer, epochs=1,
            settings=LoopSettings(progress=False))
        weights.append({k: v.clone() for k, v in student.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
