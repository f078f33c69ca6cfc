"""Labeled image datasets whose samples carry their index and whose augmentation is a function of
(seed, epoch, index): the same view can be replayed (logit caches), resumed, or drawn by any
number of processes. Unreadable images are skipped and counted, or fail under `strict`."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from kdkit.registry import KdkitError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_rgb(path_or_image: str | Path | Image.Image) -> Image.Image:
    """Open an image as RGB: EXIF rotation applied; grayscale, palette, RGBA, CMYK, 16-bit converted.

    16-bit images map 0..65535 onto 0..255 (never stretched per image, which would turn a dark
    image bright); 32-bit integer ("I") images are read as 16-bit when a value exceeds 255.
    """
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            scale = 257.0 if img.mode != "I" or arr.max() > 255 else 1.0
            img = Image.fromarray(np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


# independent random streams drawn from one (seed, epoch, index)
AUGMENT, MIX, ORDER, PARTNER, UNLABELED_ORDER = 0, 1, 2, 3, 4


def sample_seed(seed: int, epoch: int, index: int, stream: int = AUGMENT) -> int:
    """A 32-bit seed that depends only on (run seed, epoch, view index, stream); all non-negative."""
    return int(np.random.SeedSequence([seed, epoch, index, stream]).generate_state(1)[0])


class SeededDataset(Dataset):
    """Base class: subclasses list their samples and read one raw (PIL image, label) pair.

    __getitem__(v) takes a view id v (sample v % len, repeat v // len; see data/sampler.py) and
    returns dict(image=(3, H, W) tensor or None if unreadable, target=int (-1 when unlabeled) or a
    (K,) soft target under Mixup/CutMix, index=v, epoch=the view epoch). The transform runs under
    python/numpy/torch RNGs seeded from (seed, view epoch, v), and Mixup/CutMix (`mixup`, a
    SampleMixup) pairs samples by a seeded order: a view never depends on worker count, batch size
    or process count. With `view_cycle` E > 0, epoch e draws the views of epoch e % E.
    """

    classes: list[str]

    def __init__(self, transform: Callable | None = None, seed: int = 0, strict: bool = False):
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.strict = strict
        self.mixup = None
        self.view_cycle = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch % self.view_cycle if self.view_cycle else epoch

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"sample {index}"

    def issues(self) -> dict:
        """What the scan of the data found besides readable samples (for the run summary)."""
        return {}

    def view(self, view: int) -> tuple[torch.Tensor | None, int]:
        """The augmented image of view `view` in the current epoch (None if unreadable) and its label."""
        index = view % len(self)
        try:
            img, target = self.read(index)
            img = load_rgb(img)
        except Exception as e:
            if self.strict:
                raise KdkitError(f"unreadable image {self.describe(index)}: {type(e).__name__}: {e}") from None
            return None, -1
        if self.transform is not None:
            img = self._seeded(self.transform, img, sample_seed(self.seed, self.epoch, view))
        return img, target

    def partner(self, view: int) -> int:
        """The sample that view `view` is mixed with under Mixup/CutMix (seen in its own first view)."""
        return self.mixup.partner(self.seed, self.epoch, view % len(self), len(self))

    def __getitem__(self, view: int) -> dict:
        img, target = self.view(view)
        if self.mixup is not None and img is not None:
            other, other_target = self.view(self.partner(view))
            img, target = self.mixup(img, target, other, other_target, sample_seed(self.seed, self.epoch, view, MIX))
        return {"image": img, "target": target, "index": view, "epoch": self.epoch}

    @staticmethod
    def _seeded(transform: Callable, img: Image.Image, seed: int) -> torch.Tensor:
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def read_image_file(path: str | Path) -> Image.Image:
    """A PIL image decoded from `path` now (so the file is closed and a broken one fails here)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img


class ImageFolderDataset(SeededDataset):
    """An ImageFolder directory (root/<class>/<image>), scanned with torchvision's helpers.

    `classes` may be given to fix the label space (so train and eval splits agree). Empty class
    folders are kept as classes with no samples and listed by `issues()`, or are an error under
    `strict`; files without an image extension are ignored and counted.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, classes: list[str] | None = None,
                 seed: int = 0, strict: bool = False):
        super().__init__(transform, seed, strict)
        from torchvision.datasets.folder import find_classes, make_dataset

        self.root = Path(root)
        if not self.root.is_dir():
            raise KdkitError(f"data directory not found: {self.root}")
        if classes is None:
            try:
                classes, _ = find_classes(str(self.root))
            except FileNotFoundError:
                raise KdkitError(f"no class folders in {self.root} (expected {self.root}/<class>/<image>)") from None
        self.classes = list(classes)
        mapping = {c: i for i, c in enumerate(self.classes)}
        present = {p.name for p in self.root.iterdir() if p.is_dir()}
        unknown = sorted(present - set(self.classes))
        if unknown:
            raise KdkitError(f"{self.root} has class folders the label space lacks: {unknown[:5]}")
        self.ignored_files = 0

        def is_image(path: str) -> bool:
            ok = path.lower().endswith(IMG_EXTENSIONS)
            self.ignored_files += not ok
            return ok

        self.samples = make_dataset(str(self.root), {c: i for c, i in mapping.items() if c in present},
                                    is_valid_file=is_image, allow_empty=True)
        if not self.samples:
            raise KdkitError(f"no images found in {self.root} (looked for {', '.join(IMG_EXTENSIONS)})")
        self.targets = [t for _, t in self.samples]
        counts = np.bincount(self.targets, minlength=len(self.classes))
        self.empty_classes = [c for c in sorted(present) if counts[mapping[c]] == 0]
        if strict and self.empty_classes:
            raise KdkitError(f"{self.root} has class folders without images: {self.empty_classes[:5]} "
                             f"(without --strict they stay classes with no samples)")

    def issues(self) -> dict:
        return {"empty_classes": self.empty_classes, "ignored_files": self.ignored_files}

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return read_image_file(path), target

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])


class HFImageDataset(SeededDataset):
    """A Hugging Face `datasets` split with an Image column and a ClassLabel (or int) column.

    labeled=False reads the Image column only (any label column is ignored): every target is -1 and
    `classes` is the given label space (that of the labeled data the images join).
    """

    def __init__(self, ds, transform: Callable | None = None, image_key: str | None = None,
                 label_key: str | None = None, seed: int = 0, strict: bool = False, labeled: bool = True,
                 classes: list[str] | None = None):
        super().__init__(transform, seed, strict)
        from datasets import ClassLabel
        from datasets import Image as HFImage

        feats = ds.features
        self.image_key = image_key or next((k for k, f in feats.items() if isinstance(f, HFImage)), None)
        self.label_key = (label_key or next((k for k, f in feats.items() if isinstance(f, ClassLabel)), None)
                          if labeled else None)
        if self.image_key is None or (labeled and self.label_key is None):
            needs = "an Image and a ClassLabel column" if labeled else "an Image column"
            raise KdkitError(f"dataset needs {needs}; it has {dict(feats)}")
        self.ds = ds
        if len(ds) == 0:
            raise KdkitError("the dataset split is empty")
        if not labeled:
            self.classes, self.targets = list(classes or []), [-1] * len(ds)
            return
        label = feats[self.label_key]
        self.classes = list(label.names) if isinstance(label, ClassLabel) else [
            str(i) for i in range(max(ds[self.label_key]) + 1)]
        self.targets = list(ds[self.label_key])

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, index: int) -> tuple[Image.Image, int]:
        row = self.ds[index]
        return row[self.image_key], int(row[self.label_key]) if self.label_key else -1
