"""Data: datasets from a folder, a local or hub `datasets` dataset, or the bundled CIFAR-10 sample;
timm transforms; loaders whose samples carry their index."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kdkit.data.dataset import HFImageDataset, ImageFolderDataset, SeededDataset, load_rgb
from kdkit.data.mixup import SampleMixup
from kdkit.data.sampler import EpochSampler, MixedSampler, epoch_views, mixed_epoch_views
from kdkit.data.seeding import sample_seed
from kdkit.data.transforms import ToNormalizedTensor, create_transforms, fuse_to_tensor
from kdkit.data.unlabeled import SemiSupervisedDataset, UnlabeledFolderDataset, check_readable
from kdkit.data.views import apply_views, eval_transform, is_augmented, view_settings, view_transform
from kdkit.registry import KdkitError

__all__ = [
    "EMBEDDED_SAMPLE", "EpochSampler", "HFImageDataset", "ImageFolderDataset", "MixedSampler", "SampleMixup",
    "SeededDataset", "SemiSupervisedDataset", "ToNormalizedTensor", "UnlabeledFolderDataset", "collate",
    "create_loader", "fuse_to_tensor",
    "create_transforms", "epoch_views", "eval_transform", "load_rgb", "mixed_epoch_views", "open_dataset",
    "open_unlabeled", "sample_path", "sample_seed", "apply_views", "is_augmented", "view_settings", "view_transform",
]

EMBEDDED_SAMPLE = "cifar10-sample"


EVAL_SPLITS = ("val", "validation", "test")


def sample_path() -> Path:
    """The CIFAR-10 sample bundled in the package (train/ and test/ in ImageFolder layout)."""
    return Path(__file__).resolve().parent.parent / "assets" / "cifar10_sample"


def _resolve_split(root: Path, split: str) -> Path:
    if split == "auto-eval":
        for name in EVAL_SPLITS:
            if (root / name).is_dir():
                return root / name
        if any(p.is_dir() for p in root.iterdir()) and not (root / "train").is_dir():
            return root  # a bare ImageFolder: evaluate on it
        raise KdkitError(f"{root} has no evaluation split (looked for {', '.join(EVAL_SPLITS)}/)")
    if (root / split).is_dir():
        return root / split
    raise KdkitError(f"{root} has no {split!r} split (expected {root / split}/<class>/<image>)")


def open_dataset(data: str | Path, split: str, transform: Callable | None = None,
                 classes: list[str] | None = None, seed: int = 0, strict: bool = False) -> SeededDataset:
    """Open one split of a data source.

    data: a folder with split sub-folders (train/, val|validation|test/) of class folders; a folder
      written by `datasets.save_to_disk`; "hf:NAME" for a hub dataset (needs internet); or
      "cifar10-sample" for the bundled sample. split: "train", another split name, or "auto-eval".
    """
    data = str(data)
    if data.startswith("hf:"):
        return _open_hf(data[3:], split, transform, seed, strict)
    root = sample_path() if data == EMBEDDED_SAMPLE and not Path(data).exists() else Path(data)
    if root.exists() and not root.is_dir():
        raise KdkitError(f"{root} is a file, not a data folder (expected {root}/train/<class>/<image>, a "
                         f"datasets.save_to_disk folder or hf:NAME)")
    if not root.is_dir():
        raise KdkitError(f"data directory not found: {root}")
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return _open_hf(str(root), split, transform, seed, strict, local=True)
    return ImageFolderDataset(_resolve_split(root, split), transform, classes=classes, seed=seed, strict=strict)


def _open_hf(name: str, split: str, transform, seed: int, strict: bool, local: bool = False,
             labeled: bool = True, classes: list[str] | None = None) -> HFImageDataset:
    import datasets

    try:
        # never run a dataset's loading script: datasets < 4 may run one when the argument is left unset
        # (HF_DATASETS_TRUST_REMOTE_CODE decides), False refuses it; datasets >= 4 refuses every script
        ds = datasets.load_from_disk(name) if local else datasets.load_dataset(name, trust_remote_code=False)
    except Exception as e:
        where = "from disk" if local else "from the hub (no internet?)"
        raise KdkitError(f"could not load dataset {name!r} {where}: {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split == "auto-eval":
            split = next((s for s in EVAL_SPLITS if s in ds), None) or ""
        if not labeled and split not in ds and len(names) == 1:
            split = names[0]  # unlabeled images: the only split, whatever its name
        if split not in ds:
            raise KdkitError(f"dataset {name!r} has no split {split!r}; it has {names}")
        ds = ds[split]
    return HFImageDataset(ds, transform, seed=seed, strict=strict, labeled=labeled, classes=classes)


def open_unlabeled(data: str | Path, classes: list[str], seed: int = 0, strict: bool = False) -> SeededDataset:
    """Open unlabeled images (every target -1; `classes`: the labeled data's label space).

    data: a folder of images, flat or nested at any depth (no class folders needed); a folder
      written by `datasets.save_to_disk`; or "hf:NAME". A `datasets` source gives its "train" split
      (or its only split) and needs an Image column; a label column, if any, is ignored.
    A missing or empty source, or one whose sampled images cannot be read, is a KdkitError.
    """
    data = str(data)
    if data.startswith("hf:"):
        ds = _open_hf(data[3:], "train", None, seed, strict, labeled=False, classes=classes)
    elif (Path(data) / "dataset_dict.json").is_file() or (Path(data) / "state.json").is_file():
        ds = _open_hf(data, "train", None, seed, strict, local=True, labeled=False, classes=classes)
    else:
        ds = UnlabeledFolderDataset(data, classes, seed=seed, strict=strict)
    check_readable(ds, data)
    return ds










def collate(samples: list[dict]) -> dict:
    """Stack the readable samples; count the unreadable ones under "skipped". target is (B,) int64
    class indices, or (B, K) float soft targets under Mixup/CutMix; epoch is the batch's view epoch."""
    good = [s for s in samples if s["image"] is not None]
    epoch = samples[0]["epoch"] if samples else 0
    if not good:
        return {"images": None, "target": None, "index": None, "skipped": len(samples), "epoch": epoch}
    targets = [s["target"] for s in good]
    return {
        "images": torch.stack([s["image"] for s in good]),
        "target": torch.stack(targets) if isinstance(targets[0], torch.Tensor) else torch.tensor(targets),
        "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "skipped": len(samples) - len(good),
        "epoch": epoch,
    }


def create_loader(dataset: SeededDataset, batch_size: int, *, training: bool, workers: int = 2, seed: int = 0,
                  num_replicas: int = 1, rank: int = 0, repeated_aug: int = 0, persistent_workers: bool = True,
                  prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader over one process's part of the data.

    Training: an EpochSampler whose global order depends on (seed, epoch) only (with
    `repeated_aug` > 1, each drawn image comes `repeated_aug` times in distinct views), split over
    `num_replicas` processes; `batch_size` is per process and incomplete batches are dropped.
    A SemiSupervisedDataset trains through a MixedSampler instead: every batch holds `batch_size`
    labeled views and MU * `batch_size` unlabeled ones (MU: the dataset's unlabeled_ratio).
    Evaluation: in order, every sample once (Accelerate shards it and drops the padding).
    The loader draws its workers' base seed from a private generator, not the global torch RNG:
    starting an epoch (or resuming in the middle of one) leaves the training's random stream
    (dropout, drop_path) as it was, and the views are seeded by the dataset anyway. Training
    samplers yield (epoch, view id), so `persistent_workers` (kept between epochs) need no epoch
    of their own; `prefetch_factor` batches per worker are prepared ahead.
    """
    if training and isinstance(dataset, SemiSupervisedDataset):
        # each step: batch_size labeled + MU * batch_size unlabeled views per process
        sampler = MixedSampler(dataset, batch_size * num_replicas, seed, num_replicas, rank, max(repeated_aug, 1))
        batch_size = sampler.per_process_batch
    else:
        sampler = EpochSampler(len(dataset), batch_size * num_replicas, seed, num_replicas, rank,
                               max(repeated_aug, 1)) if training else None
    workers_kwargs = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if workers else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=collate, drop_last=training, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed), **workers_kwargs)
