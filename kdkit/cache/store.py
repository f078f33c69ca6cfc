"""On-disk teacher outputs: a manifest (JSON) and shards of records (safetensors).

    CACHE/manifest.json                    provenance and layout (see kdkit/cache/manifest.py)
    CACHE/shards/e0003-s00012.safetensors  records [12 * shard_size, 13 * shard_size) of epoch 3

Format 3. A record is what the teacher said about one view, as log-probabilities at tau = 1
(l = z - logsumexp(z): the logits z less their log-sum-exp, which every kdkit loss ignores, since
each reads logits through a softmax, a z-score or an arg-max):

- K = C: `values`, all C log-probabilities in class order, and `top1`, the arg-max class.
- K < C: `values`, the top-K log-probabilities, sorted, and `indices`, their classes (uint8 up to
  256 classes, int16 up to 32768); `mean` and `std`, the mean and the sample standard deviation
  (divisor C - 1, as torch.std and the z-score of kdkit/losses/standardize.py) of all C
  log-probabilities; `label`, the log-probability of the record's label class (`record_labels`;
  NaN where the view has no label). The label's class itself is not stored: a reader passes it
  (the training batch carries it).

`decode_record` densifies records to (n, C) float32 log-probabilities: the stored classes (top K, and
the label where it is outside them) get their stored values; the other classes, the tail, all get
one value c, the `tail` fill:

- "mass" (default): one value c = log(M / n), M = 1 - the stored probabilities, n the tail's
  size: the tail keeps its total probability at tau = 1, spread evenly.
- "normal": the tail's values at the quantiles of a normal distribution with the tail's own mean
  and variance (known from the record's mean and std of all C values), each class placed in that
  order by a hash of the record: the densified row has the teacher's mean and standard deviation,
  so the z-score (logit standardisation) of every stored class is exact. For runs whose loss
  standardises.

Either way the tail stays below the K-th stored value, and a tie with the top-1 made by rounding is broken
toward the stored top-1: the arg-max is the teacher's top-1 exactly. What is exact and what is
approximate for K < C, with bounds: docs/cache.md.

Every shard is written whole through a temporary file and a rename, and carries in its metadata
the sha256 of its tensor bytes. A reader checks it (and the shard's layout: names, dtypes, shapes,
epoch and position) the first time it maps a shard, so a flipped byte is one clear error naming
the file, not a wrong teacher output; `verify` checks every shard at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from kdkit.files import atomic_write
from kdkit.registry import KdkitError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STATS = ("mean", "std", "label")  # per record beside the top K (K < C)
TAILS = ("mass", "normal")


def index_dtype(num_classes: int) -> torch.dtype:
    return torch.uint8 if num_classes <= 256 else torch.int16 if num_classes <= 32768 else torch.int32


def record_labels(target: Tensor) -> Tensor:
    """(B,) int64: the class whose log-probability a record keeps as its label. A (B,) target: the
    label (-1: none); a (B, C) Mixup/CutMix row: its larger weight's class, -1 for an all-zero row
    (no label). The losses' gt class (kdkit.losses.gt_index) of every labeled sample."""
    if target.ndim == 1:
        return target.long()
    return torch.where(target.sum(dim=1) > 0, target.argmax(dim=1), -1)


def encode_record(logits: Tensor, topk: int, dtype: torch.dtype, labels: Tensor | None = None) -> dict[str, Tensor]:
    """(n, C) teacher logits -> the record tensors of n records (module docstring). labels: (n,)
    each record's label class (-1: none; None: no labels at all), kept when K < C."""
    logp = logits.float().log_softmax(dim=1)
    num_classes = logp.shape[1]
    idt = index_dtype(num_classes)
    if topk >= num_classes:
        return {"values": logp.to(dtype), "top1": logp.argmax(1).to(idt)}
    values, indices = logp.topk(topk, dim=1)
    label = torch.full((logp.shape[0],), float("nan"))
    if labels is not None:
        labels = labels.long().cpu()
        has = (labels >= 0) & (labels < num_classes)
        label[has] = logp.cpu()[has, labels[has]]
    return {"values": values.to(dtype), "indices": indices.to(idt), "mean": logp.mean(1).to(dtype),
            "std": logp.std(1).to(dtype), "label": label.to(dtype)}


def decode_record(record: dict[str, Tensor], num_classes: int, labels: Tensor | None = None,
           tail: str = "mass") -> Tensor:
    """Record tensors of n records -> (n, C) float32 log-probabilities (module docstring).

    labels: (n,) the label class of each record (-1: none), where its stored label goes; None
    leaves the label out (its class is then in the tail). tail: "mass" or "normal", the tail's fill.
    K = C records are returned as stored (labels and tail do not apply)."""
    if tail not in TAILS:
        raise KdkitError(f"unknown cache tail fill {tail!r}: {', '.join(TAILS)}")
    values = record["values"].float()
    if "top1" in record:  # all classes, in class order
        full, top1 = values.clone(), record["top1"].long()
        rows = torch.arange(full.shape[0])
        best = full.amax(1)
        tied = full[rows, top1] < best  # rounding made another class reach the top-1's value
        full[rows[tied], top1[tied]] = torch.nextafter(best[tied], torch.full_like(best[tied], float("inf")))
        return full
    n, topk = values.shape
    values = values.clone()
    if topk > 1:  # sorted, so only the stored runner-up can tie the top-1 after rounding
        second = values[:, 1]
        tied = values[:, 0] <= second
        values[tied, 0] = torch.nextafter(second[tied], torch.full_like(second[tied], float("inf")))
    indices = record["indices"].long()
    rows = torch.arange(n)
    extra = torch.zeros(n, dtype=torch.bool)  # records whose label is stored outside their top K
    label = record["label"].float() if "label" in record else torch.full((n,), float("nan"))
    if labels is not None:
        labels = labels.long().cpu()
        known = (labels >= 0) & (labels < num_classes) & label.isfinite()
        in_top = (indices == labels.clamp(0, num_classes - 1)[:, None]).any(dim=1)
        extra = known & ~in_top
    stored = torch.cat([values, torch.where(extra, label, float("nan"))[:, None]], dim=1)  # (n, K + 1), NaN: none
    kept = stored.isfinite()
    mask = torch.zeros(n, num_classes, dtype=torch.bool).scatter_(1, indices, True)
    if labels is not None:
        mask[rows[extra], labels[extra]] = True
    # strictly below every stored top-K value, so that the arg-max stays the stored top-1
    upper = torch.nextafter(values[:, -1], torch.full((n,), -float("inf")))
    if tail == "mass":
        size = (num_classes - kept.sum(dim=1)).clamp_min(1)  # the tail's size
        left = 1.0 - torch.where(kept, stored.exp(), 0.0).sum(dim=1)
        fill = torch.minimum((left.clamp_min(1e-12) / size).log(), upper)
        full = fill[:, None].expand(-1, num_classes).contiguous()
    else:
        full = _normal_tail(stored, kept, mask, record["mean"], record["std"], upper)
    full.scatter_(1, indices, values)
    if labels is not None:
        full[rows[extra], labels[extra]] = label[extra]
    return full


CAP_WINDOW = 64  # the most top quantiles `_normal_tail` sets to the cap (beyond it the tail is clipped)


def _normal_tail(stored: Tensor, kept: Tensor, mask: Tensor, mean: Tensor, std: Tensor, upper: Tensor) -> Tensor:
    """(n, C) float32 rows whose tail (where `mask` is False) holds n_t values at the normal
    quantiles (i + 1/2) / n_t, i = 0 .. n_t - 1, scaled to the tail's mean and variance, which the
    record's mean and std of all C values and its stored values determine. Where the top of that
    scale would pass `upper`, the fewest top quantiles (up to CAP_WINDOW) are set to `upper` and
    the others rescaled to keep the mean and variance. Each class's place in the order comes from
    a hash of the record's values and the class index: the same record always gets the same tail,
    and no class is favoured across records. The rows then have the teacher's mean and standard
    deviation."""
    n, c = mask.shape
    size = c - kept.sum(dim=1)  # the tail's size, (n,)
    width = int(size.max())
    mu, sigma = mean.double(), std.double()
    dev = torch.where(kept, stored.double() - mu[:, None], 0.0)
    # in deviations from the mean, so that a float16 mean does not cancel away the tail's variance
    off = dev.sum(dim=1)  # the stored values' sum of (s - mean): the tail's is -off
    nt = size.clamp_min(1).double()
    tail_mean = mu - off / nt
    tail_var = (((c - 1) * sigma.square() - dev.square().sum(dim=1)) / nt - (off / nt).square()).clamp_min(0.0)
    # the standard normal quantiles of each tail size (mean 0, variance 1), ascending, and their running sums
    sizes, which = size.unique(return_inverse=True)
    r = torch.arange(width, dtype=torch.float64)
    table = torch.stack([torch.where(r < k, torch.special.ndtri(((r + 0.5) / max(k, 1)).clamp(max=1 - 1e-12)), 0.0)
                         for k in sizes.tolist()])
    table = table / (table.square().sum(dim=1, keepdim=True) / sizes.clamp_min(1)[:, None]).sqrt().clamp_min(1e-12)
    sums, squares_sum = table.cumsum(dim=1), table.square().cumsum(dim=1)
    # with the f smallest quantiles free (a + b q) and the rest at the cap, the a, b that keep the
    # tail's sum and sum of squares; the largest f (the fewest capped) whose free values stay under it
    top = upper.double()[:, None]
    f = (size[:, None] - torch.arange(min(CAP_WINDOW, width))).clamp_min(1)  # (n, J): candidates, largest first
    capped, row = nt[:, None] - f, which[:, None]
    total = nt[:, None] * tail_mean[:, None] - capped * top
    squares = nt[:, None] * (tail_var + tail_mean.square())[:, None] - capped * top.square()
    s1, s2, last = sums[row, f - 1], squares_sum[row, f - 1], table[row, f - 1]
    spread = (squares - total.square() / f) / (s2 - s1.square() / f).clamp_min(1e-12)
    b = spread.clamp_min(0.0).sqrt()
    a = (total - b * s1) / f
    ok = (spread >= 0) & (a + b * last <= top + 1e-9 * top.abs().clamp_min(1))
    pick = torch.where(ok.any(dim=1), ok.double().argmax(dim=1), 0)[:, None]  # the first ok: the largest f
    free, a, b, top = f.gather(1, pick), a.gather(1, pick).float(), b.gather(1, pick).float(), top.float()
    vals = torch.where(torch.arange(width) < free, a + b * table.float()[which], top)
    vals = torch.minimum(vals, top)  # (n, width): the tail's values, ascending
    # the tail classes in an order drawn from the record: the keys (A j + B) mod P, P a prime above
    # C, are distinct for the C classes; A and B come from the record's values
    seed = (stored.nan_to_num(0.0).double() * 1024).round().long().sum(dim=1).abs()
    prime = next(x for x in range(c + 1, 2 * c + 3) if all(x % d for d in range(2, int(x ** 0.5) + 1)))
    step, shift = 1 + seed % (prime - 1), (seed // prime) % prime
    key = (step[:, None] * torch.arange(c) + shift[:, None]) % prime
    order = key.masked_fill(mask, prime).argsort(dim=1)[:, :width]  # the stored classes last
    return torch.empty(n, c).scatter_(1, order, vals)  # stored classes: overwritten by the caller


def record_bytes(topk: int, num_classes: int, dtype: str) -> int:
    """Bytes on disk per record, headers aside: K = C, C values and the top-1 index; K < C, K values
    and K indices, then the mean, std and label value."""
    value = DTYPES[dtype].itemsize
    idx = index_dtype(num_classes).itemsize
    return num_classes * value + idx if topk >= num_classes else topk * (value + idx) + len(STATS) * value


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 over the tensors' names and bytes, in name order (a shard's "sha256" metadata)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        # hashed in place (a memory-mapped shard is paged in once, not copied)
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


_NUMPY = {"F16": np.float16, "BF16": np.int16, "F32": np.float32, "U8": np.uint8, "I16": np.int16,
          "I32": np.int32}


def mmap_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors file's tensors as read-only views of a memory map, and its metadata.
    (safetensors' own loader copies every tensor into memory; a cache only needs the rows it gathers.)"""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    meta = header.pop("__metadata__", None) or {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + size
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memory: never written, decode_record() copies
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            arr = data[base + lo:base + hi].view(_NUMPY[info["dtype"]]).reshape(info["shape"])
            t = torch.from_numpy(arr)
            out[name] = t.view(torch.bfloat16) if info["dtype"] == "BF16" else t
    return out, meta


class ManifestMismatch(KdkitError):
    """Intact shards (their checksums hold) that the manifest does not describe: it was edited."""


class LogitStore:
    """The shards of one cache folder: paths, atomic writes, memory-mapped reads, checks.

    Reads keep the memory maps of the last two epochs' shards open. With `check` (default), the
    first read of each shard by this store verifies its sha256 and layout; a shard that fails is a
    KdkitError naming the file and `kdkit cache --verify`. A shard mapped again later (evicted, or a
    cycled epoch) is not hashed again.
    """

    def __init__(self, root: str | Path, manifest: dict, check: bool = True):
        self.root, self.manifest = Path(root), manifest
        self.num_classes = manifest["num_classes"]
        self.shard_size = manifest["shard_size"]
        self.check = check
        self._loaded: OrderedDict[tuple[int, int], dict[str, Tensor]] = OrderedDict()
        self._checked: set[tuple[int, int]] = set()
        self.keep = 2 * self.shards_per_epoch()  # an epoch's shuffled batches touch all of its shards

    def path(self, epoch: int, shard: int) -> Path:
        return self.root / "shards" / f"e{epoch:04d}-s{shard:05d}.safetensors"

    def shards_per_epoch(self) -> int:
        return -(-self.manifest["records_per_epoch"] // self.shard_size)

    def all_shards(self) -> list[tuple[int, int]]:
        return [(e, s) for e in range(self.manifest["epochs"]) for s in range(self.shards_per_epoch())]

    def missing_shards(self) -> list[tuple[int, int]]:
        """(epoch, shard) of the shards the manifest promises that are not in CACHE/shards/ (one listing)."""
        try:
            present = {e.name for e in os.scandir(self.root / "shards") if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        return [(e, s) for e, s in self.all_shards() if self.path(e, s).name not in present]

    def missing(self) -> list[str]:
        """File names of the missing shards (missing_shards)."""
        return [self.path(e, s).name for e, s in self.missing_shards()]

    def write(self, epoch: int, shard: int, record: dict[str, Tensor]) -> None:
        meta = {"epoch": str(epoch), "shard": str(shard), "sha256": tensors_sha256(record)}
        try:
            atomic_write(self.path(epoch, shard), lambda tmp: save_file(record, tmp, metadata=meta))
        except OSError as e:
            raise KdkitError(f"could not write cache shard {self.path(epoch, shard)}: {e}") from None

    def read(self, epoch: int, shard: int, check: bool = False) -> dict[str, Tensor]:
        """The record tensors of one shard, memory-mapped (rows are paged in when gathered). The
        layout (tensor names, dtypes, shapes, the epoch and shard in its metadata) is always checked;
        `check` verifies the shard's sha256 too."""
        path = self.path(epoch, shard)
        if not path.is_file():
            raise KdkitError(f"cache shard missing: {path} (resume the cache: rerun the same `kdkit cache`)")
        try:
            record, meta = mmap_safetensors(path)
        except Exception as e:
            raise self.corrupt(path, f"unreadable: {type(e).__name__}: {str(e)[:200]}") from None
        problem = self.layout_problem(epoch, shard, record, meta)
        intact = meta.get("sha256") == tensors_sha256(record) if problem or check else True
        placed = (meta.get("epoch"), meta.get("shard")) == (str(epoch), str(shard))
        if problem and intact and placed:  # the shard is as written, in its place: the manifest is what changed
            raise ManifestMismatch(f"the manifest of cache {self.root} does not describe its shards ({path.name}: "
                                   f"{problem}), which are intact as written: manifest.json was edited after the "
                                   f"cache was written (or the shards come from another cache); restore it, or "
                                   f"rewrite the cache with `kdkit cache ... --overwrite`")
        if problem is None and not intact:
            problem = "its checksum does not match its contents"
        if problem:
            raise self.corrupt(path, problem)
        return record

    def layout_problem(self, epoch: int, shard: int, record: dict[str, Tensor], meta: dict) -> str | None:
        """What is wrong with a shard's tensors or metadata for its place in this cache (None: nothing)."""
        m = self.manifest
        rows = min(self.shard_size, m["records_per_epoch"] - shard * self.shard_size)
        idt = index_dtype(self.num_classes)
        if m["topk"] >= self.num_classes:
            want = {"values": ((rows, self.num_classes), DTYPES[m["dtype"]]), "top1": ((rows,), idt)}
        else:
            want = {"values": ((rows, m["topk"]), DTYPES[m["dtype"]]), "indices": ((rows, m["topk"]), idt),
                    **{name: ((rows,), DTYPES[m["dtype"]]) for name in STATS}}
        if set(record) != set(want):
            return f"it holds tensors {sorted(record)}, expected {sorted(want)}"
        for name, (shape, dtype) in want.items():
            t = record[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                return f"{name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}"
        if (meta.get("epoch"), meta.get("shard")) != (str(epoch), str(shard)):
            return f"its metadata says epoch {meta.get('epoch')}, shard {meta.get('shard')}"
        return None

    def corrupt(self, path: Path, why: str) -> KdkitError:
        return KdkitError(f"cache shard {path} is corrupt ({why}): run `kdkit cache --verify {self.root}` to "
                          f"check every shard, then delete the bad ones and rerun the same `kdkit cache` to "
                          f"recompute them")

    def records(self, epoch: int, positions: Tensor) -> dict[str, Tensor]:
        """The record tensors (as stored) of the records at `positions` of `epoch`: positions in
        [0, records_per_epoch), epoch in [0, epochs); others are a KdkitError."""
        records = self.manifest["records_per_epoch"]
        if not 0 <= epoch < self.manifest["epochs"]:
            raise KdkitError(f"the cache {self.root} holds epochs 0-{self.manifest['epochs'] - 1}, not epoch {epoch}")
        if positions.numel() and (positions.min() < 0 or positions.max() >= records):
            bad = positions[(positions < 0) | (positions >= records)][0].item()
            raise KdkitError(f"record {bad} is outside the cache {self.root} ({records} records per epoch): "
                             f"a cache of other data?")
        shard_of, row_of = positions // self.shard_size, positions % self.shard_size
        gathered: dict[str, Tensor] = {}
        for shard in shard_of.unique().tolist():
            key = (epoch, shard)
            if key not in self._loaded:
                self._loaded[key] = self.read(epoch, shard, check=self.check and key not in self._checked)
                self._checked.add(key)
                if len(self._loaded) > self.keep:
                    self._loaded.popitem(last=False)
            mask = shard_of == shard
            for name, t in self._loaded[key].items():
                if name not in gathered:
                    gathered[name] = torch.empty((positions.shape[0], *t.shape[1:]), dtype=t.dtype)
                gathered[name][mask] = t[row_of[mask]]
        return gathered

    def rows(self, epoch: int, positions: Tensor, labels: Tensor | None = None, tail: str = "mass") -> Tensor:
        """(n, C) log-probabilities of the records at `positions` of `epoch` (see `records`),
        densified by `decode_record` with the records' label classes `labels` and the `tail` fill."""
        return decode_record(self.records(epoch, positions), self.num_classes, labels, tail)

    def verify(self) -> dict[str, list[str]]:
        """Check every shard the manifest promises: returns {"missing": [...], "corrupt": [...],
        "not_in_manifest": [...]} (the last: intact shards an edited manifest does not describe)."""
        problems: dict[str, list[str]] = {"missing": [], "corrupt": [], "not_in_manifest": []}
        for epoch, shard in self.all_shards():
            path = self.path(epoch, shard)
            if not path.is_file():
                problems["missing"].append(path.name)
                continue
            try:
                self.read(epoch, shard, check=True)
            except ManifestMismatch:
                problems["not_in_manifest"].append(path.name)
            except KdkitError:
                problems["corrupt"].append(path.name)
        return problems


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise KdkitError(f"not a kdkit logit cache (no manifest.json): {root}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KdkitError(f"unreadable cache manifest {path}: {e}") from None
