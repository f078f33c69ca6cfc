"""What decides a view: one flat dict of settings (size, normalisation, crop, augmentation) that
builds the transforms and Mixup/CutMix of a dataset and is recorded in a logit cache's manifest,
so a run and a cache agree on their views by comparing dicts."""

from __future__ import annotations

import copy
from collections.abc import Callable

from timm.data import Mixup

from kdkit.data.dataset import SeededDataset
from kdkit.data.mixup import SampleMixup
from kdkit.data.stream import StreamDataset
from kdkit.data.transforms import create_transforms, defer_finish
from kdkit.data.unlabeled import SemiSupervisedDataset
from kdkit.registry import KdkitError

AUG_KEYS = ("scale", "hflip", "color_jitter", "auto_augment", "reprob", "mixup", "cutmix", "mixup_prob",
            "mixup_switch_prob", "label_smoothing", "repeated_aug")
# random erasing's fill and box count (timm's --remode, --recount): recorded only where they differ
# from these, so that the caches made before they were settings keep their identity
ERASE_DEFAULTS = {"remode": "pixel", "recount": 1}
# likewise CutMix's box-size range (timm's --cutmix-minmax), recorded only when set
# settings that do not change the pixels a teacher sees (the teacher's input bridge undoes the
# student's normalisation; label smoothing only changes targets)
NOT_PIXELS = ("mean", "std", "label_smoothing")


def view_settings(data_cfg: dict, aug: dict | None = None) -> dict:
    """Training views when `aug` (AugConfig as a dict) is given, evaluation views (resize + centre
    crop) otherwise. data_cfg: a timm data config (input_size, interpolation, mean, std, crop_pct)."""
    views = {"train": aug is not None, "img_size": int(data_cfg["input_size"][-1]),
             "mean": [float(x) for x in data_cfg["mean"]], "std": [float(x) for x in data_cfg["std"]]}
    if aug is None:
        return {**views, "interpolation": data_cfg["interpolation"], "crop_pct": float(data_cfg["crop_pct"])}
    augment = {k: list(aug[k]) if isinstance(aug[k], tuple) else aug[k] for k in AUG_KEYS}
    when_set = {k: aug[k] for k, default in ERASE_DEFAULTS.items() if aug.get(k, default) != default}
    if aug.get("cutmix_minmax"):
        when_set["cutmix_minmax"] = [float(x) for x in aug["cutmix_minmax"]]
    if aug.get("crops_per_image", 0) > 1:  # likewise FKD's crops, recorded only when on
        when_set["crops_per_image"] = int(aug["crops_per_image"])
    return {**views, "interpolation": aug["interpolation"], **augment, **when_set}


def view_repeats(views: dict) -> tuple[int, bool]:
    """(views of each drawn image, whether an epoch draws every one of them) for training views:
    DeiT's repeated augmentation (`repeated_aug` R: R views of each drawn image, an epoch still as
    many views as samples) or FKD's crops (`crops_per_image` N: N views of every image, an epoch N
    times as long). Either way the repeats of an image come next to each other and are decoded once."""
    crops = int(views.get("crops_per_image", 0))
    if crops > 1:
        return crops, True
    return max(int(views.get("repeated_aug", 1)), 1), False


def is_augmented(views: dict) -> bool:
    """Whether training views differ from epoch to epoch (any random augmentation on)."""
    return views["train"] and (tuple(views["scale"]) != (1.0, 1.0) or views["hflip"] > 0 or views["color_jitter"] > 0
                               or bool(views["auto_augment"]) or views["reprob"] > 0 or mixes(views))


def mixes(views: dict) -> bool:
    """Whether training views are mixed: Mixup or CutMix alpha > 0, or a CutMix box range."""
    return views["train"] and (views["mixup"] > 0 or views["cutmix"] > 0 or bool(views.get("cutmix_minmax")))


def view_transform(views: dict) -> Callable:
    """timm's create_transform for `views`: RandomResizedCrop/flip/RandAugment/random erasing for
    training views, resize + centre crop for evaluation views; PIL image -> (3, H, W) float32."""
    v = views
    if not v["train"]:
        return create_transforms(v["img_size"], v["mean"], v["std"], False, interpolation=v["interpolation"],
                                 crop_pct=v["crop_pct"])
    return create_transforms(v["img_size"], v["mean"], v["std"], True, scale=v["scale"], hflip=v["hflip"],
                             color_jitter=v["color_jitter"], auto_augment=v["auto_augment"], reprob=v["reprob"],
                             interpolation=v["interpolation"], **{k: v.get(k, d) for k, d in ERASE_DEFAULTS.items()})


def with_views(dataset: SeededDataset, views: dict, num_classes: int, view_cycle: int = 0) -> SeededDataset:
    """A new dataset: `dataset`'s samples drawn as `views` say (transform, stopped at RawViews that
    its batches finish; repeats and, for training views, per-sample Mixup/CutMix); with
    `view_cycle` E > 0, epoch e draws the views of epoch e % E (a run replaying a cache's E epochs).
    The opened `dataset` is left as it was; the new one shares its samples (a shallow copy: nothing
    a sample read holds is copied)."""
    v = views
    mixup = SampleMixup(Mixup(mixup_alpha=v["mixup"], cutmix_alpha=v["cutmix"], prob=v["mixup_prob"],
                              cutmix_minmax=v.get("cutmix_minmax"), switch_prob=v["mixup_switch_prob"],
                              label_smoothing=v["label_smoothing"], num_classes=num_classes)) if mixes(v) else None
    repeats, every_repeat = view_repeats(v)
    if every_repeat and isinstance(dataset, StreamDataset):
        raise KdkitError(f"{dataset.source}: aug.crops_per_image needs indexed data (an epoch of every crop of every "
                         "sample): give local shards or a folder, or use aug.repeated_aug on a stream")
    if every_repeat and isinstance(dataset, SemiSupervisedDataset):
        raise KdkitError("aug.crops_per_image does not combine with unlabeled images (an epoch there is one pass "
                         "over the labeled data): use aug.repeated_aug")
    built = copy.copy(dataset)
    # the transform stops at RawViews: the batch normalises, erases and mixes (kdkit.data.batch)
    vars(built).update(transform=defer_finish(view_transform(v)), mixup=mixup, view_cycle=view_cycle,
                       repeats=repeats, every_repeat=every_repeat)  # Mixup pairs follow the sampler's order
    if hasattr(built, "_partners"):
        built._partners = {}  # pair partners depend on the repeats: the new views' own
    return built


def eval_transform(data_cfg: dict) -> Callable:
    """The evaluation transform of a timm data config (input_size, mean, std, interpolation, crop_pct)."""
    return view_transform(view_settings(data_cfg))
