"""A cache's provenance: what produced its records (teacher, data, views, seed) and how they are
stored. A run builds the same dict for itself; `differences` names every key on which they differ."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import timm
import torch
from torch import Tensor, nn

from kdkit.cache.store import STATS
from kdkit.data.dataset import SeededDataset
from kdkit.data.sampler import unlabeled_per_epoch, views_per_epoch
from kdkit.data.views import NOT_PIXELS, view_repeats
from kdkit.version import __version__

FORMAT = "kdkit-logits/3"  # 3: K < C records keep the mean, std and label of all C (2: cheap view seeds)
MODES = ("replay", "fixed")


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes, in name order)."""
    return state_sha256(model.state_dict())


def state_sha256(state: Mapping[str, Tensor]) -> str:
    """sha256 over a state dict (names, dtypes, shapes and bytes, in name order): a model's, or the
    tensors of a weights file holding it (the same hash)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_identity(dataset: SeededDataset, source: str, split: str) -> dict:
    """Where the data came from and a fingerprint of its content (the dataset's own: the sorted
    (path, size, label) list of a folder, the shards and labels of tar shards, the `datasets`
    fingerprint of a hub/disk dataset)."""
    return {"source": source, "split": split, "num_samples": len(dataset), "classes": list(dataset.classes),
            "fingerprint": dataset.fingerprint()}


def build_manifest(*, mode: str, teacher: dict, data: dict, views: dict, seed: int, epochs: int, topk: int,
                   dtype: str, shard_size: int, unlabeled: dict | None = None,
                   unlabeled_ratio: float | None = None) -> dict:
    """The manifest of a cache (or the one a run expects). teacher: {"name", "weights_sha256"};
    data: data_identity(...) of the labeled data; views: kdkit.data.views.view_settings(...);
    unlabeled: data_identity(...) of the unlabeled images (None: none) and unlabeled_ratio their MU.

    Records per epoch: the labeled views an epoch draws (one per sample; with FKD's crops, every
    crop of every sample), plus with unlabeled images every one of them (fixed) or the
    floor(MU * N_l) unlabeled views an epoch draws (replay; see data/sampler.py)."""
    num_classes = len(data["classes"])
    fixed = mode == "fixed"
    repeats, every_repeat = (1, False) if fixed else view_repeats(views)
    records = views_per_epoch(data["num_samples"], repeats, every_repeat)
    if unlabeled is not None:
        records += unlabeled["num_samples"] if fixed else unlabeled_per_epoch(data["num_samples"], unlabeled_ratio)
    k = min(topk, num_classes) if topk > 0 else num_classes
    return {"format": FORMAT, "mode": mode, "teacher": teacher, "data": data, "views": views,
            "seed": None if fixed else seed, "epochs": 1 if fixed else epochs,
            "repeats": repeats,
            "unlabeled": unlabeled, "unlabeled_ratio": None if fixed or unlabeled is None else float(unlabeled_ratio),
            "topk": k, "dtype": dtype, "values": "log_softmax", "stats": list(STATS) if k < num_classes else [],
            "num_classes": num_classes, "records_per_epoch": records, "shard_size": shard_size,
            "versions": {"kdkit": __version__, "timm": timm.__version__, "torch": torch.__version__}}


def differences(cache: dict, run: dict, keys: tuple[str, ...]) -> list[str]:
    """Human-readable differences between two manifests on `keys` (dotted paths allowed)."""
    out = []
    for key in keys:
        a, b = _get(cache, key), _get(run, key)
        if key == "views":
            a = {k: v for k, v in (a or {}).items() if k not in NOT_PIXELS}
            b = {k: v for k, v in (b or {}).items() if k not in NOT_PIXELS}
            out += [f"views.{k}: cache {a.get(k)!r}, run {b.get(k)!r}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif key == "data.classes" and a != b:
            added, removed = sorted(set(b) - set(a)), sorted(set(a) - set(b))
            out.append(f"classes: cache has {len(a)}, the data has {len(b)}"
                       + (f" (added {added[:5]})" if added else "") + (f" (removed {removed[:5]})" if removed else "")
                       + ("" if added or removed else " (other order)"))
        elif a != b:
            out.append(f"{key}: cache {_short(a)}, run {_short(b)}")
    return out


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."
