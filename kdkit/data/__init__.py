"""Data: datasets from a folder, a local or hub `datasets` dataset, or the bundled CIFAR-10 sample;
timm transforms; loaders whose samples carry their index."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kdkit.data.batch import batch_images, collate, finish_batch, finish_samples, plan_batch
from kdkit.data.dataset import (
    EVAL_SPLITS,
    HFImageDataset,
    ImageFolderDataset,
    SeededDataset,
    hf_split,
    load_rgb,
)
from kdkit.data.mixup import SampleMixup
from kdkit.data.objects import (
    TorchImageDataset,
    describe_object,
    is_data_object,
    loader_settings,
    open_object,
)
from kdkit.data.sampler import EpochSampler, MixedSampler, epoch_views, mixed_epoch_views
from kdkit.data.seeding import sample_seed
from kdkit.data.shards import TarShardDataset, is_url, split_shards
from kdkit.data.stream import StreamDataset, open_hub_stream, open_url_stream
from kdkit.data.transforms import ToNormalizedTensor, create_transforms, fuse_to_tensor
from kdkit.data.unlabeled import SemiSupervisedDataset, UnlabeledFolderDataset, check_readable
from kdkit.data.views import eval_transform, is_augmented, view_settings, view_transform, with_views
from kdkit.data.workers import start_worker
from kdkit.registry import KdkitError

__all__ = [
    "EMBEDDED_SAMPLE", "EpochSampler", "HFImageDataset", "ImageFolderDataset", "MixedSampler", "SampleMixup",
    "SeededDataset", "SemiSupervisedDataset", "StreamDataset", "TarShardDataset", "TorchImageDataset", "read_class_map",
    "ToNormalizedTensor", "UnlabeledFolderDataset", "collate", "describe_object", "is_data_object", "loader_settings",
    "NAMED_SKIPS", "create_loader", "fuse_to_tensor", "note_skipped", "start_worker",
    "create_transforms", "epoch_views", "batch_images", "finish_batch", "finish_samples", "plan_batch",
    "eval_transform", "load_rgb", "mixed_epoch_views", "open_dataset",
    "open_unlabeled", "sample_path", "sample_seed", "is_augmented", "view_settings", "view_transform", "with_views",
]

EMBEDDED_SAMPLE = "cifar10-sample"


def sample_path() -> Path:
    """The CIFAR-10 sample bundled in the package (train/ and test/ in ImageFolder layout)."""
    return Path(__file__).resolve().parent.parent / "assets" / "cifar10_sample"


def read_class_map(path: str | Path) -> list[str]:
    """A class map as timm reads one: a text file of class names, one a line (line i = class i;
    blank lines skipped). The names fix the label space: its order and size."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise KdkitError(f"cannot read the class map {path}: {e}") from None
    if not names:
        raise KdkitError(f"the class map {path} lists no class")
    if len(set(names)) != len(names):
        raise KdkitError(f"the class map {path} lists a class twice: {sorted({n for n in names if names.count(n) > 1})[:3]}")
    return names


def _split_source(root: Path, split: str) -> Path | list[Path] | None:
    """What `split` names under `root`: a class-folder root (Path), a list of tar shards, or None."""
    shards = split_shards(root, split) if ".tar" in split or "{" in split else None
    if shards is not None:
        return shards
    if (root / split).is_dir():
        inner = sorted((root / split).glob("*.tar"))
        return inner or root / split
    return split_shards(root, split)


def _resolve_split(root: Path, split: str) -> Path | list[Path]:
    if split == "auto-eval":
        for name in EVAL_SPLITS:
            found = _split_source(root, name)
            if found is not None:
                return found
        if any(p.is_dir() for p in root.iterdir()) and not (root / "train").is_dir():
            return root  # a bare ImageFolder: evaluate on it
        raise KdkitError(f"{root} has no evaluation split (looked for {', '.join(EVAL_SPLITS)}/ and their shards): "
                         f"name it with --val-split")
    found = _split_source(root, split)
    if found is None:
        raise KdkitError(f"{root} has no {split!r} split (expected {root / split}/<class>/<image>, "
                         f"{split}-*.tar shards, a brace pattern such as '{split}-{{000000..000009}}.tar' or "
                         f"an _info.json naming the split)")
    return found


def open_dataset(data: str | Path | object, split: str, transform: Callable | None = None,
                 classes: list[str] | None = None, seed: int = 0, strict: bool = False, *,
                 input_key: str | None = None, target_key: str | None = None,
                 class_map: str | Path | None = None, streaming: bool = False) -> SeededDataset | StreamDataset:
    """Open one split of a data source.

    data: a folder with split sub-folders (train/, val|validation|test/) of class folders; a folder
      of webdataset tar shards (`KEY.jpg` + `KEY.cls`, as timm and the Hub's -wds datasets write
      them) or one .tar file; a folder written by `datasets.save_to_disk`; "hf:NAME" for a hub
      dataset (needs internet); or "cifar10-sample" for the bundled sample. Or a Python object: a
      map-style torch Dataset of (image, class) pairs, a DataLoader over one, a `datasets.Dataset`
      or `DatasetDict` (kdkit/data/objects.py: what each keeps, and what is refused).
    split: a split name ("train", "val", ...), "auto-eval" (val, validation or test), or for
      shards a brace pattern relative to the folder ('train-{000000..000146}.tar'), as timm's
      --train-split / --val-split take them.
    classes: the label space (the training split's, for an evaluation split); class_map: a file
      of class names, one a line, that fixes it instead (timm's --class-map).
    input_key / target_key: the image and label members of a shard sample or columns of a
      `datasets` dataset (timm's names; default: jpg/png/... and cls, or the Image and label columns).
    streaming: stream "hf:NAME" (datasets' streaming=True) instead of downloading it first. Shards
      at URLs (https://, s3://, pipe:, ...) are always streamed. A stream is a StreamDataset
      (kdkit/data/stream.py: what it guarantees, and what it refuses), not a SeededDataset.
    """
    if class_map and classes is None:
        classes = read_class_map(class_map)
    if is_data_object(data):
        return open_object(data, split, transform, classes, seed, strict, input_key=input_key, target_key=target_key)
    data = str(data)
    keys = {"input_key": input_key, "target_key": target_key}
    if data.startswith("hf:") and streaming:
        if split == "auto-eval":
            split = "validation"
        return open_hub_stream(data[3:], split, classes, seed, strict, **keys)
    if data.startswith("hf:"):
        return _open_hf(data[3:], split, transform, seed, strict, classes=classes, **keys)
    if is_url(data) or is_url(split):
        if split == "auto-eval":
            split = "validation"  # the Hub's -wds name; other names with --val-split
        return open_url_stream(split, data if is_url(data) else "", classes, seed, strict,
                               **keys)
    root = sample_path() if data == EMBEDDED_SAMPLE and not Path(data).exists() else Path(data)
    if root.is_file() and root.suffix == ".tar":
        return TarShardDataset([root], transform, classes, seed, strict, **keys)
    if root.exists() and not root.is_dir():
        raise KdkitError(f"{root} is a file, not a data folder (expected {root}/train/<class>/<image>, tar "
                         f"shards, a datasets.save_to_disk folder or hf:NAME)")
    if not root.is_dir():
        raise KdkitError(f"data directory not found: {root}")
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return _open_hf(str(root), split, transform, seed, strict, local=True, classes=classes, **keys)
    source = _resolve_split(root, split)
    if isinstance(source, list):
        if classes is None:
            classes = _info_classes(root)
        return TarShardDataset(source, transform, classes, seed, strict, **keys)
    return ImageFolderDataset(source, transform, classes=classes, seed=seed, strict=strict)


def _info_classes(root: Path) -> list[str] | None:
    """The class names an _info.json of a shard folder lists (`kdkit shards` writes them), if any."""
    import json

    info = root / "_info.json"
    try:
        names = json.loads(info.read_text()).get("classes") if info.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _open_hf(name: str, split: str, transform, seed: int, strict: bool, local: bool = False,
             labeled: bool = True, classes: list[str] | None = None, input_key: str | None = None,
             target_key: str | None = None) -> HFImageDataset:
    import datasets

    try:
        # never run a dataset's loading script: datasets < 4 may run one when the argument is left unset
        # (HF_DATASETS_TRUST_REMOTE_CODE decides), False refuses it; datasets >= 4 refuses every script
        ds = datasets.load_from_disk(name) if local else datasets.load_dataset(name, trust_remote_code=False)
    except Exception as e:
        where = "from disk" if local else "from the hub (no internet?)"
        raise KdkitError(f"could not load dataset {name!r} {where}: {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = hf_split(ds, split, f"dataset {name!r}", labeled)
    return HFImageDataset(ds, transform, image_key=input_key, label_key=target_key, seed=seed, strict=strict,
                          labeled=labeled, classes=classes)


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


NAMED_SKIPS = 1000  # unreadable images named per process and run (all are counted)


def note_skipped(names: list[str], new: list[str]) -> list[str]:
    """`names` with those of `new` not in it yet appended, up to NAMED_SKIPS (a new list)."""
    out = list(names)
    for name in new:
        if len(out) >= NAMED_SKIPS:
            break
        if name not in out:
            out.append(name)
    return out


def create_loader(dataset: SeededDataset, batch_size: int, *, training: bool, workers: int = 2, seed: int = 0,
                  num_replicas: int = 1, rank: int = 0, repeated_aug: int | None = None, persistent_workers: bool = True,
                  prefetch_factor: int = 2, finish_on_device: bool = False) -> DataLoader:
    """A DataLoader over one process's part of the data.

    Training: an EpochSampler whose global order depends on (seed, epoch) only (each drawn image
    comes as many times as the dataset's views say, `dataset.repeats`, in distinct views; an
    explicit `repeated_aug` > 1 overrides it; see kdkit.data.with_views), split over
    `num_replicas` processes; `batch_size` is per process and incomplete batches are dropped.
    A SemiSupervisedDataset trains through a MixedSampler instead: every batch holds `batch_size`
    labeled views and MU * `batch_size` unlabeled ones (MU: the dataset's unlabeled_ratio).
    Evaluation: in order, every sample once (Accelerate shards it and drops the padding).
    The loader draws its workers' base seed from a private generator, not the global torch RNG:
    starting an epoch (or resuming in the middle of one) leaves the training's random stream
    (dropout, drop_path) as it was, and the views are seeded by the dataset anyway. Training
    samplers yield (epoch, view id), so `persistent_workers` (kept between epochs) need no epoch
    of their own; `prefetch_factor` batches per worker are prepared ahead. Workers die with their
    process, and leave what they inherit out of the garbage collector's reach
    (kdkit.data.workers.start_worker). With `finish_on_device` the batches hold uint8 pixels and a
    plan (kdkit.data.batch.collate), which `batch_images` finishes on the training device: the
    workers then neither normalise, erase nor mix (timm's prefetcher on a GPU), and move a quarter
    of the bytes.
    """
    collate_fn = partial(collate, finish=not finish_on_device)
    if isinstance(dataset, StreamDataset):
        # a stream: readers (processes x workers) plan their own shards; workers are started anew
        # each epoch, so that they read the epoch (and resume step) seek() gave the dataset
        part = dataset.plan_readers(batch_size, num_replicas, rank) if training else dataset
        return DataLoader(part, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn, drop_last=training,
                          pin_memory=torch.cuda.is_available(), worker_init_fn=start_worker,
                          **({"prefetch_factor": prefetch_factor} if workers else {}))
    repeats = dataset.repeats if repeated_aug is None else max(repeated_aug, 1)
    if training and isinstance(dataset, SemiSupervisedDataset):
        # each step: batch_size labeled + MU * batch_size unlabeled views per process
        sampler = MixedSampler(dataset, batch_size * num_replicas, seed, num_replicas, rank, repeats)
        batch_size = sampler.per_process_batch
    else:
        sampler = EpochSampler(len(dataset), batch_size * num_replicas, seed, num_replicas, rank, repeats,
                               every_repeat=dataset.every_repeat, view_cycle=dataset.view_cycle) if training else None
    workers_kwargs = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if workers else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=collate_fn, drop_last=training, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=start_worker, **workers_kwargs)
