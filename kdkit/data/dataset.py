"""Labeled image datasets whose samples carry their index and whose augmentation is a function of
(seed, epoch, index): the same view can be replayed (logit caches), resumed, or drawn by any
number of processes. Unreadable images are skipped and counted, or fail under `strict`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from kdkit.data.sampler import epoch_views, pair_partners
from kdkit.data.seeding import AUGMENT, MIX, run_seeded, sample_seed
from kdkit.registry import KdkitError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_rgb(path_or_image: str | Path | Image.Image) -> Image.Image:
    """Open an image as RGB: EXIF rotation applied; grayscale, palette, RGBA, CMYK, 16-bit converted.

    16-bit images map 0..65535 onto 0..255 (never stretched per image, which would turn a dark
    image bright); 32-bit integer ("I") images are read as 16-bit when a value exceeds 255.
    """
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    if img.mode == "RGB" and "exif" not in img.info:
        return img  # the common case (an RGB JPEG without EXIF): nothing to rotate or convert
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


ViewKey = int | tuple[int, int]  # a view id (in the dataset's current epoch), or (epoch, view id)


class SeededDataset(Dataset):
    """Base class: subclasses list their samples and read one raw (PIL image, label) pair.

    A key is a view id v (sample v % len, repeat v // len; see data/sampler.py) in the current
    epoch (`set_epoch`), or an (epoch, v) pair, as the training samplers yield them so that
    persistent loader workers need no epoch of their own. Each key gives dict(image=(3, H, W)
    tensor or None if unreadable, target=int (-1 when unlabeled) or a (K,) soft target under
    Mixup/CutMix, index=v, epoch=the view epoch). The transform runs under random streams seeded
    from (seed, view epoch, v), and Mixup/CutMix (`mixup`, a SampleMixup) mixes the two views of a
    pair of positions of the epoch's global order (`epoch_orders`, `pair_partners`) in both
    directions: a view never depends on worker count, batch size or process count. A batch that
    holds both views of a pair (the samplers keep pairs together) decodes and augments each once.
    With `view_cycle` E > 0, epoch e draws the views of epoch e % E.
    """

    classes: list[str]

    def __init__(self, transform: Callable | None = None, seed: int = 0, strict: bool = False):
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.strict = strict
        self.mixup = None
        self.repeats = 1  # repeated augmentation of the training order (pairs of views follow it)
        self.view_cycle = 0
        self._partners: dict[int, tuple[Tensor, Tensor]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.view_epoch(epoch)

    def view_epoch(self, epoch: int) -> int:
        return epoch % self.view_cycle if self.view_cycle else epoch

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"sample {index}"

    def issues(self) -> dict:
        """What the scan of the data found besides readable samples (for the run summary)."""
        return {}

    def epoch_orders(self, epoch: int) -> list[Tensor]:
        """The global orders of view ids the training sampler draws in view epoch `epoch`, one per
        pool whose views pair among themselves under Mixup/CutMix."""
        return [epoch_views(len(self), self.seed, epoch, self.repeats)]

    def view(self, view: int, epoch: int | None = None) -> tuple[torch.Tensor | None, int]:
        """The augmented image of view `view` in view epoch `epoch` (default: the current one;
        None if unreadable) and its label."""
        epoch = self.epoch if epoch is None else epoch
        index = view % len(self)
        try:
            img, target = self.read(index)
            img = load_rgb(img)
        except Exception as e:
            if self.strict:
                raise KdkitError(f"unreadable image {self.describe(index)}: {type(e).__name__}: {e}") from None
            return None, -1
        if self.transform is not None:
            img = run_seeded(self.transform, sample_seed(self.seed, epoch, view, AUGMENT), img)
        return img, target

    def partners(self, views: list[int], epoch: int | None = None) -> list[int]:
        """The view each of `views` is mixed with under Mixup/CutMix in view epoch `epoch`: the other
        view of its pair of positions; itself (unmixed) for a view the epoch does not draw."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._partners:
            self._partners[epoch] = pair_partners(self.epoch_orders(epoch))
            while len(self._partners) > 2:
                del self._partners[next(iter(self._partners))]
        stored, partner = self._partners[epoch]
        v = torch.tensor(views, dtype=torch.long)
        i = torch.searchsorted(stored, v).clamp_max(len(stored) - 1)
        return torch.where(stored[i] == v, partner[i], v).tolist()

    def partner(self, view: int) -> int:
        return self.partners([view])[0]

    def __getitem__(self, key: ViewKey) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[ViewKey]) -> list[dict]:
        """The samples of `keys` (DataLoader's batched fetch); each view is decoded and augmented
        once per call, however many pairs it takes part in."""
        keyed = [(self.view_epoch(k[0]), k[1]) if isinstance(k, tuple) else (self.epoch, int(k)) for k in keys]
        views: dict[tuple[int, int], tuple[Tensor | None, int]] = {}

        def view(e: int, v: int) -> tuple[Tensor | None, int]:
            if (e, v) not in views:
                views[e, v] = self.view(v, e)
            return views[e, v]

        if self.mixup is None:
            return [_sample(*view(e, v), v, e) for e, v in keyed]
        mixed: dict[tuple[int, int], tuple[Tensor | None, Tensor]] = {}
        for e in {e for e, _ in keyed}:
            mine = [v for ee, v in keyed if ee == e]
            for v, w in zip(mine, self.partners(mine, e), strict=True):
                if (e, v) in mixed:
                    continue
                a, b = min(v, w), max(v, w)
                (xa, ya), (xb, yb) = self.mixup(*view(e, a), *view(e, b), sample_seed(self.seed, e, a, MIX))
                mixed[e, a], mixed[e, b] = (xa, ya), (xb, yb)
        return [_sample(*mixed[e, v], v, e) for e, v in keyed]


def _sample(image: Tensor | None, target: int | Tensor, view: int, epoch: int) -> dict:
    return {"image": image, "target": target, "index": view, "epoch": epoch}


def is_hidden(name: str) -> bool:
    """A hidden file or folder name (.x.jpg, macOS's ._x.jpg, .ipynb_checkpoints)."""
    return name.startswith(".")


def is_image_file(path: str | Path, root: str | Path) -> bool:
    """Whether a file under `root` is read as an image: an image extension, and neither it nor a
    folder between it and `root` hidden."""
    return str(path).lower().endswith(IMG_EXTENSIONS) and not any(
        is_hidden(part) for part in Path(path).relative_to(root).parts)


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
        from torchvision.datasets.folder import make_dataset

        self.root = Path(root)
        if not self.root.is_dir():
            raise KdkitError(f"data directory not found: {self.root}")
        # hidden folders (.ipynb_checkpoints, .git) are not classes
        present = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not is_hidden(e.name))
        if classes is None:
            if not present:
                raise KdkitError(f"no class folders in {self.root} (expected {self.root}/<class>/<image>)")
            classes = present
        self.classes = list(classes)
        mapping = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(present) - set(self.classes))
        if unknown:
            raise KdkitError(f"{self.root} has class folders the label space lacks: {unknown[:5]}")
        self.ignored_files = 0

        def is_image(path: str) -> bool:
            ok = is_image_file(path, self.root)  # the rest is ignored and counted
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
                             f"(without --strict they stay classes with no samples, with a warning)")

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
