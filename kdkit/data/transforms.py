"""The image transforms: timm's create_transform for training and evaluation views, with ToTensor and
Normalize fused into one contiguous step, and timm's RandAugment posterize fixed for recent Pillow
(in kdkit's transforms only). `defer_finish` stops such a transform at uint8 pixels (a RawView) whose
normalisation and random erasing a batch applies later, in a loader worker or on the training device
(kdkit.data.batch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment as _auto_augment
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing


def posterize_keep_zero_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits kept giving the all-black image. timm's "inc1" RandAugment
    (DeiT's rand-m9-mstd0.5-inc1) keeps 0 bits at its top magnitude; recent Pillow refuses
    posterize(0), where older Pillow returned the black image the policy means."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _auto_augment.posterize(img, bits_to_keep, **kwargs)


def fix_posterize(transform: Callable) -> Callable:
    """Give the posterize ops of the RandAugment/AutoAugment/AugMix steps of a timm transform
    posterize_keep_zero_bits: these ops only, in this transform only (timm's NAME_TO_OP, which
    every other transform of the process reads, is left as timm has it)."""
    for step in getattr(transform, "transforms", None) or []:
        policy = getattr(step, "policy", None)  # AutoAugment: sub-policies of ops
        ops = [op for sub in policy for op in sub] if policy else getattr(step, "ops", None) or []
        for op in ops:
            if isinstance(op, _auto_augment.AugmentOp) and op.name.startswith("Posterize"):
                op.aug_fn = posterize_keep_zero_bits
    return transform


def create_transforms(img_size: int, mean: tuple[float, ...], std: tuple[float, ...], is_training: bool,
                      scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5, color_jitter: float = 0.0,
                      auto_augment: str = "", reprob: float = 0.0, interpolation: str = "bicubic",
                      crop_pct: float | None = None, remode: str = "pixel", recount: int = 1) -> Callable:
    """timm's create_transform: RandomResizedCrop/flip/RandAugment/random erasing (reprob, with
    timm's remode fill and up to recount boxes) when training, resize + centre crop otherwise."""
    if is_training:
        t = create_transform(img_size, is_training=True, scale=tuple(scale), hflip=hflip,
                             color_jitter=color_jitter or None, auto_augment=auto_augment or None,
                             re_prob=reprob, re_mode=remode, re_count=recount, interpolation=interpolation,
                             mean=mean, std=std)
    else:
        t = create_transform(img_size, is_training=False, interpolation=interpolation, mean=mean, std=std,
                             crop_pct=crop_pct if crop_pct is not None else (1.0 if img_size <= 64 else 0.875))
    return fuse_to_tensor(fix_posterize(t), mean, std)

def chw_pixels(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) uint8: a strided view of a fresh (H, W, 3) array."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


class ToNormalizedTensor:
    """PIL RGB image -> (3, H, W) float32 (x / 255 - mean) / std, in one pass over the pixels:
    timm's ToTensor + Normalize, which cost more than the crop and flip of a small image."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(-1, 1, 1)
        self.shift = (-mean_t / std_t).view(-1, 1, 1)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = chw_pixels(img)
        # written into a contiguous tensor: random erasing and the batch's stack are faster on it
        return torch.addcmul(self.shift, x, self.scale, out=torch.empty(x.shape, dtype=torch.float32))

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean}, std={self.std})"

def fuse_to_tensor(transform: Callable, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """Replace the ToTensor + Normalize steps of a timm transform with one ToNormalizedTensor."""
    steps = getattr(transform, "transforms", None)
    names = [type(t).__name__ for t in steps or []]
    for i in range(len(names) - 1):
        if names[i] in ("MaybeToTensor", "ToTensor") and names[i + 1] == "Normalize":
            steps[i : i + 2] = [ToNormalizedTensor(mean, std)]
            break
    return transform


Erase = tuple[int, int, int, int, torch.Tensor]  # (top, bottom, left, right, fill (3, h, w) or (3, 1, 1))


@dataclass(frozen=True)
class RawView:
    """A view stopped before its last steps: pixels (3, H, W) uint8 (strided), the normalisation that turns
    them into the view (`norm`), and the random erasing boxes drawn for it, in order (`erase`:
    rows top:bottom, columns left:right filled with a float32 fill in normalised units).
    kdkit.data.batch.finish_batch finishes a batch of them: normalise, erase, then Mixup/CutMix."""

    pixels: torch.Tensor
    norm: ToNormalizedTensor
    erase: tuple[Erase, ...] = ()


class ToRawView:
    """PIL RGB image -> RawView: ToNormalizedTensor's pixels, kept as (3, H, W) uint8."""

    def __init__(self, norm: ToNormalizedTensor):
        self.norm = norm

    def __call__(self, img: Image.Image) -> RawView:
        # left strided: the batch's stack is its one copy (as timm's fast_collate)
        return RawView(chw_pixels(img), self.norm)

    def __repr__(self) -> str:
        return f"ToRawView(mean={self.norm.mean}, std={self.norm.std})"


class _Boxes:
    """Stands in for an image tensor in timm's RandomErasing._erase: keeps each box and fill written."""

    def __init__(self):
        self.boxes: list[Erase] = []

    def __setitem__(self, key: tuple[slice, slice, slice], fill: torch.Tensor) -> None:
        _, rows, cols = key
        self.boxes.append((rows.start, rows.stop, cols.start, cols.stop, fill))


class RecordErasing:
    """timm's RandomErasing on a RawView: the same random draws in the same order (timm's own code
    runs, on a stand-in that records what it would write), its boxes and fills kept for the batch
    to write after normalising."""

    def __init__(self, erasing: RandomErasing):
        self.erasing = erasing

    def __call__(self, view: RawView) -> RawView:
        boxes = _Boxes()
        self.erasing._erase(boxes, *view.pixels.shape, torch.float32)
        return replace(view, erase=view.erase + tuple(boxes.boxes)) if boxes.boxes else view

    def __repr__(self) -> str:
        return f"RecordErasing({self.erasing!r})"


def defer_finish(transform: Callable) -> Callable:
    """A kdkit transform (its steps ending in ToNormalizedTensor, then optionally timm's
    RandomErasing on CPU) stopped at RawViews: the same pixels once a batch finishes them. Any other
    transform is returned as it is (its views come finished)."""
    steps = getattr(transform, "transforms", None) or []
    i = next((i for i, t in enumerate(steps) if isinstance(t, ToNormalizedTensor)), None)
    if i is None:
        return transform
    tail = steps[i + 1:]
    if any(not isinstance(t, RandomErasing) or t.device != "cpu" for t in tail):
        return transform
    steps[i:] = [ToRawView(steps[i]), *(RecordErasing(t) for t in tail)]
    return transform
