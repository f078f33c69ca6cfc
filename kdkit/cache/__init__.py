"""Teacher outputs computed once and read back: `write_cache` runs the teacher over every view a
run will draw; `LogitCache` looks records up by (epoch, view id) for `teachers.CachedLogits`.
Records and what they keep: kdkit/cache/store.py and docs/cache.md."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from kdkit.cache.manifest import FORMAT, MODES, build_manifest, data_identity, differences, weights_sha256
from kdkit.cache.store import (
    TAILS,
    LogitStore,
    decode_record,
    encode_record,
    read_manifest,
    record_bytes,
    record_labels,
)
from kdkit.data.sampler import epoch_views, mixed_epoch_views
from kdkit.data.views import view_repeats
from kdkit.registry import KdkitError

# keys a run must share with the cache it reads
RUN_KEYS = ("format", "data.classes", "data.num_samples", "data.fingerprint", "views", "seed", "repeats",
            "unlabeled.num_samples", "unlabeled.fingerprint", "unlabeled_ratio")


def replay_cycle(manifest: dict, run_epochs: int, cycle: bool) -> int:
    """The view cycle of a run reading the cache of `manifest`: its epochs when the run asks to replay
    them (`cycle`, model.logit_cache_cycle) and has more epochs than a replay cache holds, so that
    epoch e draws the views of epoch e % E; else 0 (every epoch its own views)."""
    return manifest["epochs"] if cycle and manifest["mode"] == "replay" and run_epochs > manifest["epochs"] else 0


class LogitCache:
    """A finished cache folder, read-only (`partial=True`: one still being written).

    lookup(epoch, views, labels, tail) -> (B, C) float32 teacher log-probabilities of those view
    ids in that epoch, densified (store.decode_record) with the views' label classes; a fixed cache ignores
    the epoch and the repeat (one record per image).
    A cache of another format is refused, with the command that rewrites it.
    A cache written with unlabeled images covers the combined dataset (data/unlabeled.py): labeled
    view ids, then unlabeled ones.

    Opening checks that every shard the manifest promises is on disk (a missing one is a KdkitError
    before a run writes anything); each shard's sha256 is checked the first time a lookup maps it
    (`check_shards=False` skips that, for benchmarks). An epoch or view id outside the cache is a
    KdkitError naming it.
    """

    def __init__(self, root: str | Path, partial: bool = False, check_shards: bool = True):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if self.manifest.get("format") != FORMAT:
            raise KdkitError(f"the logit cache {self.root} is in format {self.manifest.get('format')!r}, which this "
                             f"kdkit does not read (it reads {FORMAT!r}): rewrite it by running its `kdkit cache ... "
                             f"--out {self.root}` again with --overwrite")
        self.store = LogitStore(self.root, self.manifest, check=check_shards)
        self._sorted: dict[int, Tensor] = {}
        if not partial and (missing := self.store.missing()):
            total = len(self.store.all_shards())
            raise KdkitError(f"the logit cache {self.root} is incomplete: {len(missing)} of {total} shards missing "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): rerun the same "
                             f"`kdkit cache` to compute them")

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def epochs(self) -> int:
        return self.manifest["epochs"]

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    def views_of_epoch(self, epoch: int) -> Tensor:
        """The view ids stored for `epoch`, in storage order (sorted), (records_per_epoch,)."""
        m = self.manifest
        if m["mode"] == "fixed" or not self._drawn():
            return torch.arange(m["records_per_epoch"])
        if epoch not in self._sorted:
            if m.get("unlabeled"):
                views = torch.cat(mixed_epoch_views(m["data"]["num_samples"], m["unlabeled"]["num_samples"],
                                                    m["unlabeled_ratio"], m["seed"], epoch, m["repeats"]))
            else:
                views = epoch_views(m["data"]["num_samples"], m["seed"], epoch, m["repeats"],
                                    every_repeat=view_repeats(m["views"])[1])
            self._sorted[epoch] = views.sort().values
        return self._sorted[epoch]

    def _drawn(self) -> bool:
        """Whether an epoch's stored view ids are drawn by the sampler (not simply 0..records - 1)."""
        return self.manifest["repeats"] > 1 or bool(self.manifest.get("unlabeled"))

    def positions(self, epoch: int, views: Tensor) -> Tensor:
        """Storage positions of `views` (view ids) in `epoch`'s records; views the cache does not
        hold are a KdkitError naming one."""
        views = views.cpu().long()
        m = self.manifest
        if views.numel() and views.min() < 0:
            raise KdkitError(f"view id {views.min().item()} is negative: not a view of the cache {self.root}")
        if self.mode == "fixed":
            return views % m["records_per_epoch"]  # view id = sample + repeat * N: one record per sample
        if not 0 <= epoch < self.epochs:
            raise KdkitError(f"the cache holds epochs 0-{self.epochs - 1}, not epoch {epoch}")
        if not self._drawn():
            if views.numel() and views.max() >= m["records_per_epoch"]:
                raise KdkitError(f"view id {views.max().item()} is outside the cache {self.root} (view ids "
                                 f"0-{m['records_per_epoch'] - 1}): a cache of other data or sampler settings?")
            return views
        stored = self.views_of_epoch(epoch)
        pos = torch.searchsorted(stored, views).clamp_max(len(stored) - 1)
        found = stored[pos] == views
        if not bool(found.all()):
            raise KdkitError(f"view id {views[~found][0].item()} is not among the cache's views of epoch {epoch}: "
                             f"other sampler settings?")
        return pos

    def lookup(self, epoch: int, views: Tensor, labels: Tensor | None = None, tail: str = "mass") -> Tensor:
        """(B, C) float32 log-probabilities of the (B,) view ids `views` in `epoch`. labels: (B,) the
        views' label classes (store.record_labels; None: the stored label is left out); tail: the
        fill of the classes a top-K record does not hold ("mass" or "normal", see store.decode_record)."""
        return self.store.rows(0 if self.mode == "fixed" else epoch, self.positions(epoch, views), labels, tail)

    def records(self, epoch: int, views: Tensor) -> dict[str, Tensor]:
        """The stored record tensors of the (B,) view ids `views` in `epoch` (not densified)."""
        return self.store.records(0 if self.mode == "fixed" else epoch, self.positions(epoch, views))

    def check_run(self, expected: dict) -> None:
        """Refuse with every difference named when the run's manifest does not match the cache's."""
        keys = RUN_KEYS if self.mode == "replay" else tuple(k for k in RUN_KEYS if k not in ("seed", "repeats"))
        if self.mode == "fixed":
            keys = tuple(k for k in keys if k != "views")
        diffs = differences(self.manifest, expected, keys)
        name = expected.get("teacher", {}).get("name")
        if name and name != self.manifest["teacher"]["name"]:
            diffs.insert(0, f"teacher: cache {self.manifest['teacher']['name']!r}, run {name!r}")
        sha = expected.get("teacher", {}).get("weights_sha256")
        if sha and sha != self.manifest["teacher"]["weights_sha256"]:
            diffs.insert(0, "teacher weights: the run's teacher weights differ from the cache's (sha256)")
        if diffs:
            raise KdkitError(f"the logit cache {self.root} does not match this run: " + "; ".join(diffs))


__all__ = ["FORMAT", "MODES", "TAILS", "LogitCache", "LogitStore", "build_manifest", "data_identity", "decode_record",
           "differences", "encode_record", "read_manifest", "record_bytes", "record_labels", "replay_cycle",
           "weights_sha256"]
