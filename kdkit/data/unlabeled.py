"""Unlabeled images for semi-supervised distillation: a folder of images without class folders,
and the combined dataset whose view ids cover the labeled samples, then the unlabeled ones, so that
every view of either kind is still a function of (seed, epoch, view id)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from kdkit.data.dataset import (
    IMG_EXTENSIONS,
    PathTable,
    SeededDataset,
    is_image_file,
    load_rgb,
    read_image_file,
)
from kdkit.data.sampler import mixed_epoch_views
from kdkit.registry import KdkitError


class UnlabeledFolderDataset(SeededDataset):
    """Every image under `root`, flat or nested at any depth (no class folders needed), target -1.

    Files are listed in sorted path order (sub-folders in name order), so sample indices do not
    depend on the file system. `classes` is the label space of the labeled data the images join.
    Files without an image extension and hidden files or folders are ignored and counted. A missing folder, one that cannot be
    listed, or one without any image file is a KdkitError.
    """

    def __init__(self, root: str | Path, classes: list[str], transform: Callable | None = None, seed: int = 0,
                 strict: bool = False):
        super().__init__(transform, seed, strict)
        self.root, self.classes = Path(root), list(classes)
        if not self.root.is_dir():
            raise KdkitError(f"unlabeled data not found: {self.root} (expected a folder of images, a "
                             f"datasets.save_to_disk folder or hf:NAME)")

        def fail(e: OSError) -> None:
            raise KdkitError(f"cannot list the unlabeled folder {e.filename}: {e.strerror}")

        self.ignored_files = 0

        def images():
            for folder, subfolders, files in os.walk(self.root, onerror=fail):
                subfolders.sort()
                for name in sorted(files):
                    path = os.path.join(folder, name)
                    if is_image_file(path, self.root):
                        yield path, -1
                    else:
                        self.ignored_files += 1

        self.samples = PathTable(self.root, images())  # NumPy arrays: loader workers share them
        if not len(self.samples):
            raise KdkitError(f"no images found in the unlabeled folder {self.root} "
                             f"(looked for {', '.join(IMG_EXTENSIONS)} at any depth)")
        self.targets = self.samples.targets

    def issues(self) -> dict:
        return {"ignored_files": self.ignored_files}

    def fingerprint(self) -> str:
        """sha256 over the (relative path, size) of every file, in order."""
        h = hashlib.sha256()
        for i in range(len(self.samples)):
            rel = self.samples.relpath(i)
            h.update(f"{rel}|{os.path.getsize(os.path.join(self.root, rel))}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[Image.Image, int]:
        return read_image_file(self.samples[index][0]), -1

    def describe(self, index: int) -> str:
        return self.samples[index][0]


def check_readable(dataset: SeededDataset, source: str, probes: int = 8) -> None:
    """Raise KdkitError when none of `probes` evenly spaced samples can be read as an image (a folder
    of broken files would otherwise train on the labeled part alone, silently). Some unreadable
    images are fine: they are skipped and counted during training, like labeled ones."""
    n = len(dataset)
    count = min(probes, n)
    picks = sorted({i * n // count for i in range(count)})
    first = None
    for i in picks:
        try:
            load_rgb(dataset.read(i)[0])
            return
        except Exception as e:  # any decoder error means "unreadable", as in SeededDataset.view
            first = first or f"{dataset.describe(i)}: {type(e).__name__}: {e}"
    raise KdkitError(f"the unlabeled data {source} is unreadable: none of {len(picks)} sampled images could be "
                     f"read ({first})")


class SemiSupervisedDataset(SeededDataset):
    """Labeled samples then unlabeled ones, as one dataset: sample i < N_l is labeled sample i,
    sample N_l + j is unlabeled sample j (target -1). View id v shows sample v % (N_l + N_u), so
    every view of either kind has its own id and is seeded by (seed, epoch, v); with the same seed a
    labeled view is the one a labeled-only run draws.

    ratio (MU, > 0): unlabeled images per labeled one in every step; an epoch (one pass over the
    labeled data) draws floor(MU * N_l) unlabeled views at most (see data/sampler.py).
    Under Mixup/CutMix a view's partner comes from its own pool (`epoch_orders`), so an unlabeled image is never
    mixed into a labeled target (unlabeled targets become all-zero rows, which the label loss skips).
    The views (transform, Mixup/CutMix) are those set on this dataset; the parts only read images.
    """

    def __init__(self, labeled: SeededDataset, unlabeled: SeededDataset, ratio: float = 1.0):
        super().__init__(labeled.transform, labeled.seed, labeled.strict)
        if not ratio > 0:
            raise KdkitError(f"unlabeled_ratio must be > 0, got {ratio}")
        self.labeled, self.unlabeled, self.unlabeled_ratio = labeled, unlabeled, float(ratio)
        self.num_labeled = len(labeled)
        self.classes = labeled.classes

    def __len__(self) -> int:
        return self.num_labeled + len(self.unlabeled)

    def read(self, index: int) -> tuple[Image.Image, int]:
        if index < self.num_labeled:
            return self.labeled.read(index)
        return self.unlabeled.read(index - self.num_labeled)[0], -1

    def describe(self, index: int) -> str:
        if index < self.num_labeled:
            return self.labeled.describe(index)
        return self.unlabeled.describe(index - self.num_labeled)

    def issues(self) -> dict:
        return {**self.labeled.issues(), "unlabeled": self.unlabeled.issues()}

    def epoch_orders(self, epoch: int) -> list[torch.Tensor]:
        # two pools: labeled views pair with labeled ones, unlabeled with unlabeled
        return list(mixed_epoch_views(self.num_labeled, len(self.unlabeled), self.unlabeled_ratio, self.seed, epoch,
                                      self.repeats))
