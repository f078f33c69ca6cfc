"""Data given as Python objects (the Python API): a map-style torch Dataset, a DataLoader over one,
a Hugging Face `datasets.Dataset` or `DatasetDict`, each opened as a SeededDataset, so that a run
from an object keeps what a run from a folder has: views seeded by (seed, epoch, index), the
same order whatever the batch size, processes or workers, mid-epoch resume, and a fingerprint of
the content for the logit cache's and the run's records.

What kdkit cannot replay is refused with one line: an IterableDataset (or a DataLoader over one,
or a streamed `datasets.IterableDataset`) draws its own order, and a DataLoader with a sampler of
its own (weighted, say) decides which samples an epoch holds; kdkit would silently change either.
A DataLoader over a map-style dataset gives its dataset; kdkit draws the order (its own seeded
sampler replaces the loader's shuffling), and the API takes the loader's batch size and workers
(`loader_settings`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

from kdkit.console import console
from kdkit.data.dataset import HFImageDataset, SeededDataset, hf_split
from kdkit.data.seeding import run_seeded
from kdkit.registry import KdkitError

ITERABLE = ("draws its own order, which kdkit can neither seed, replay nor resume: give a map-style Dataset "
            "(__len__ and __getitem__), or write the data as shards (`kdkit shards`) and pass the folder")


def is_data_object(data: object) -> bool:
    """Whether `data` is a data object this module opens (anything but a path)."""
    return not isinstance(data, str | os.PathLike)


def describe_object(data: object) -> str:
    """A short label for a data object, recorded as the recipe's data.path (e.g. "<torch Dataset CIFAR10>")."""
    kind = ("DataLoader" if isinstance(data, DataLoader) else "datasets DatasetDict" if _is_hf_dict(data)
            else "datasets Dataset" if _is_hf(data) else "torch Dataset")
    inner = data.dataset if isinstance(data, DataLoader) else data
    return f"<{kind} {type(inner).__name__}>"


def loader_settings(loader: DataLoader, processes: int = 1) -> dict:
    """The recipe settings a DataLoader carries: its batch size (per process, as in a DDP script:
    times `processes`) and its workers."""
    settings: dict = {"workers": loader.num_workers}
    if loader.batch_size is not None:
        settings["batch_size"] = loader.batch_size * processes
    return settings


def _is_hf(data: object) -> bool:
    return type(data).__module__.startswith("datasets.") and type(data).__name__ == "Dataset"


def _is_hf_dict(data: object) -> bool:
    return type(data).__module__.startswith("datasets.") and type(data).__name__ == "DatasetDict"


def open_object(data: object, split: str, transform: Callable | None = None, classes: list[str] | None = None,
                seed: int = 0, strict: bool = False, *, input_key: str | None = None,
                target_key: str | None = None) -> SeededDataset:
    """A SeededDataset over a data object (see the module docstring). `split` picks a DatasetDict's
    split ("auto-eval": val, validation or test); a single dataset is its own every split."""
    if isinstance(data, DataLoader):
        data = dataset_of_loader(data)
    if type(data).__module__.startswith("datasets.") and "Iterable" in type(data).__name__:
        raise KdkitError(f"a streamed datasets.{type(data).__name__} {ITERABLE}")
    if isinstance(data, IterableDataset):
        raise KdkitError(f"the {type(data).__name__} is an IterableDataset: it {ITERABLE}")
    if _is_hf_dict(data):
        data = hf_split(data, split, "the DatasetDict")
    if _is_hf(data):
        if data.format.get("type") is not None:
            console.print(f"note: the datasets.Dataset's format ({data.format['type']}) is set aside: kdkit reads "
                          f"its images and applies the recipe's transforms")
            data = data.with_format(None)
        return HFImageDataset(data, transform, image_key=input_key, label_key=target_key, seed=seed, strict=strict,
                              classes=classes)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return TorchImageDataset(data, transform, classes, seed, strict)
    raise KdkitError(f"data: expected a path, a torch Dataset, a DataLoader or a datasets Dataset/DatasetDict, "
                     f"got {type(data).__name__}")


def dataset_of_loader(loader: DataLoader) -> Dataset:
    """The map-style dataset of a DataLoader whose order kdkit may draw itself; one whose sampler or
    batch sampler is its own, or whose dataset is iterable, is refused with one line."""
    if isinstance(loader.dataset, IterableDataset):
        raise KdkitError(f"the DataLoader reads an IterableDataset ({type(loader.dataset).__name__}), which "
                         f"{ITERABLE}")
    sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
    own = loader.batch_sampler is not None and type(loader.batch_sampler).__name__ != "BatchSampler"
    if own or not isinstance(sampler, RandomSampler | SequentialSampler):
        what = type(loader.batch_sampler if own else sampler).__name__
        raise KdkitError(f"the DataLoader's {what} decides which samples an epoch draws, which kdkit cannot "
                         f"reproduce (it draws a seeded order of every sample, replayable and resumable): pass "
                         f"loader.dataset instead")
    return loader.dataset


def to_rgb_image(image: object) -> Image.Image:
    """A dataset's image as a PIL image: PIL as is; a (C, H, W) or (H, W) tensor, uint8, or float in
    [0, 1] (ToTensor's, converted back exactly: round(x * 255)); an (H, W, C) or (H, W) uint8 array."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        if t.is_floating_point():
            if t.numel() and not (t.min() >= 0 and t.max() <= 1):
                raise KdkitError(f"the dataset gives float images with values in [{t.min():.3g}, {t.max():.3g}], "
                                 f"not [0, 1]: normalised tensors; give kdkit the raw images (PIL, uint8, or "
                                 f"ToTensor's [0, 1]): it normalises them for the student itself")
            t = (t * 255).round().to(torch.uint8)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise KdkitError(f"the dataset gives {image.dtype} arrays: give uint8 images (H, W, C), PIL images or "
                             f"tensors")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    raise KdkitError(f"the dataset gives images of type {type(image).__name__}: expected PIL images, tensors or "
                     f"uint8 arrays")


def _label(value: object) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise KdkitError(f"the dataset gives a label of type {type(value).__name__}: expected a class index (int)")
    return int(value)


class TorchImageDataset(SeededDataset):
    """A map-style torch Dataset whose items are (image, class) pairs, as a SeededDataset.

    image: see `to_rgb_image`; class: an int (a 0-d tensor or NumPy integer too). The dataset must
    give its raw images: kdkit applies the recipe's transforms, seeded per view. One that augments
    itself (sample 0 read twice under two seeds differs) is refused, as is one that gives
    normalised tensors: either would break the run's views and their replay.

    classes: the label space, else the dataset's own `classes` (torchvision's), else "0".."K-1"
    (K = the largest label + 1). The labels come from the dataset's `targets` (torchvision's) when
    it has them, else from one read of every sample, now.
    fingerprint(): for a torchvision folder dataset (`samples`: (path, class) pairs under `root`),
    sha256 over each file's path under the root, size and class: the folder's own fingerprint
    (ImageFolderDataset's), so that a logit cache written from the folder serves it; otherwise over
    every sample's pixels and class (one more read of the dataset, when the run records it).
    """

    def __init__(self, dataset: Dataset, transform: Callable | None = None, classes: list[str] | None = None,
                 seed: int = 0, strict: bool = False):
        super().__init__(transform, seed, strict)
        self.dataset = dataset
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise KdkitError(f"the {type(dataset).__name__} is empty")
        first, again = (np.asarray(run_seeded(self._pixels, s, 0)) for s in (1, 2))
        if first.shape != again.shape or not np.array_equal(first, again):
            raise KdkitError(f"the {type(dataset).__name__} gives another image each time sample 0 is read: it "
                             f"augments itself; give kdkit the raw images (transform=None): kdkit applies the "
                             f"recipe's augmentation, seeded, so that every view can be replayed")
        self.targets = self._targets(dataset, n)
        own = getattr(dataset, "classes", None)
        if classes is None and isinstance(own, list | tuple) and all(isinstance(c, str) for c in own) and own:
            classes = list(own)
        top = int(self.targets.max())
        self.classes = list(classes) if classes is not None else [str(i) for i in range(top + 1)]
        if self.targets.min() < 0 or top >= len(self.classes):
            raise KdkitError(f"the {type(dataset).__name__} has class {top} (or a negative one), outside the "
                             f"{len(self.classes)} classes of the label space")

    def _pixels(self, index: int) -> Image.Image:
        return to_rgb_image(self._item(index)[0])

    def _item(self, index: int) -> tuple[object, object]:
        item = self.dataset[index]
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise KdkitError(f"the {type(self.dataset).__name__} gives {type(item).__name__} items: expected "
                             f"(image, class) pairs")
        return item[0], item[1]

    def _targets(self, dataset: Dataset, n: int) -> np.ndarray:
        own = getattr(dataset, "targets", None)
        if own is not None and len(own) == n:
            return np.asarray([_label(t) for t in own], np.int64)
        if n > 10_000:
            console.print(f"note: reading the {n} samples' labels (give the dataset a `targets` list, as "
                          f"torchvision's have, to skip this)")
        return np.fromiter((_label(self._item(i)[1]) for i in range(n)), np.int64, n)

    def __len__(self) -> int:
        return len(self.targets)

    def read(self, index: int) -> tuple[Image.Image, int]:
        image, _ = self._item(index)
        return to_rgb_image(image), int(self.targets[index])

    def describe(self, index: int) -> str:
        return f"sample {index} of the {type(self.dataset).__name__}"

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        samples = getattr(self.dataset, "samples", None)
        if isinstance(samples, list) and len(samples) == len(self) and all(
                isinstance(s, tuple | list) and len(s) == 2 and isinstance(s[0], str) for s in samples[:1]):
            root = getattr(self.dataset, "root", None)
            for (path, _), target in zip(samples, self.targets, strict=True):
                name = os.path.relpath(path, root) if root else path
                h.update(f"{name}|{os.path.getsize(path)}|{int(target)}\n".encode())
            return h.hexdigest()
        for i in range(len(self)):
            img = np.asarray(self.read(i)[0])
            h.update(f"{img.shape}|{img.dtype}|{int(self.targets[i])}\n".encode())
            h.update(np.ascontiguousarray(img).tobytes())
        return h.hexdigest()
