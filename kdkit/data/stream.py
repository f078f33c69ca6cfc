"""Streamed data: remote tar shards (a URL pattern, read with webdataset) or a Hub dataset with
`streaming=True`, where no sample can be read by index. What still holds, and what does not:

- A view is a function of (seed, epoch, the sample's key, repeat): the same view of the same
  sample gets the same pixels whatever the batch size, processes or workers (as for indexed data).
- Which samples a step draws, and so the Mixup/CutMix partner of a view, follow the stream: the
  epoch's shard order (seeded by seed and epoch), each of the P x W readers (processes x loader
  workers) taking every (P x W)-th shard, and a seeded shuffle buffer. A run is reproducible
  bit for bit for the same processes, workers and batch size; with others it draws other batches.
- Resume: at any step with the same processes and workers (each reader skips the samples it had
  delivered, reading but not decoding them); at an epoch's start with any. A mid-epoch checkpoint
  resumed under another process or worker count is refused.
- Refused: the logit cache (records are addressed by sample position), unlabeled data beside a
  stream, and evaluating a stream over several processes (evaluate from local shards or a folder).
- An epoch is `num_samples` views (timm's `|N` suffix of the split, the `_info.json` beside the
  shards, or the Hub's split info); readers cycle their shards to fill it, so every process takes
  the same number of steps. Fewer shards than readers makes readers share shards (a warning).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from kdkit.data.dataset import load_rgb
from kdkit.data.seeding import AUGMENT, MIX, ORDER, run_seeded, sample_seed
from kdkit.data.shards import IMAGE_KEYS, TARGET_KEY, expand_pattern, input_keys_of
from kdkit.registry import KdkitError

SHUFFLE_BUFFER = 2048  # samples (encoded) held per reader, as timm's wds reader's initial buffer
Raw = tuple[str, bytes, int]  # (key, encoded image, class)


def key_id(key: str) -> int:
    """A sample's stable 60-bit id from its key (what a sample index is for indexed data); its
    views are key_id * 8 + repeat, within int64."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 4


class TarUrls:
    """Remote (or local) tar shards read front to back by webdataset's tar iterator."""

    def __init__(self, urls: list[str], input_key: str | None, target_key: str | None):
        self.urls, self.keys, self.target_key = urls, input_keys_of(input_key), target_key or TARGET_KEY

    def __len__(self) -> int:
        return len(self.urls)

    def read(self, shard: int) -> Iterator[Raw]:
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

        for s in group_by_keys(tar_file_expander(url_opener([{"url": self.urls[shard]}]))):
            ext = next((k for k in self.keys if k in s), None)
            if ext is None:
                continue
            label = s.get(self.target_key)
            yield f"{self.urls[shard]}/{s['__key__']}", s[ext], int(label) if label is not None else -1


class HubStream:
    """A Hub dataset's split with streaming=True, read shard by shard (`IterableDataset.shard`)."""

    def __init__(self, ds, image_key: str, label_key: str, classes: list[str]):
        self.ds, self.image_key, self.label_key = ds, image_key, label_key
        self.lookup = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return self.ds.n_shards

    def read(self, shard: int) -> Iterator[Raw]:
        for i, row in enumerate(self.ds.shard(num_shards=len(self), index=shard, contiguous=True)):
            raw, y = row[self.image_key], row[self.label_key]
            if not isinstance(raw, dict):  # a decoded image (the column is not an Image feature)
                data = _png(raw)
            elif raw.get("bytes"):
                data = raw["bytes"]
            else:
                with open(raw["path"], "rb") as f:
                    data = f.read()
            yield f"{shard}/{i}", data, self.lookup.get(y, -1) if isinstance(y, str) else int(y)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class StreamDataset(IterableDataset):
    """A streamed split (see the module docstring). `shards`: TarUrls or HubStream; num_samples: the
    views of an epoch. Training readers are planned by `reader` (kdkit.data.create_loader does);
    iterating the dataset itself gives every sample once, in shard order (evaluation).

    transform / mixup / repeats: as on a SeededDataset (kdkit.data.with_views gives a copy with them).
    """

    def __init__(self, shards, num_samples: int, classes: list[str], source: str, transform: Callable | None = None,
                 seed: int = 0, strict: bool = False):
        if num_samples < 1:
            raise KdkitError(f"{source}: the number of samples of a stream is not known: give it as timm does, "
                             f"a split spelled 'NAME|N' (e.g. 'train-{{0000..0146}}.tar|1281167')")
        self.shards, self.num_samples, self.classes, self.source = shards, num_samples, list(classes), source
        self.transform, self.seed, self.strict = transform, seed, strict
        self.mixup, self.repeats, self.view_cycle = None, 1, 0
        self.epoch, self.start, self.plan = 0, 0, None

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw epoch `epoch` from its step `start` (read by the readers a loader starts next)."""
        self.epoch, self.start = epoch, start

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.source}|{self.num_samples}|{len(self.shards)}".encode()).hexdigest()

    def issues(self) -> dict:
        return {}

    def _decode(self, raw: Raw) -> tuple[Image.Image | None, int]:
        key, data, target = raw
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            return load_rgb(img), target
        except Exception as e:
            if self.strict:
                raise KdkitError(f"unreadable image {key}: {type(e).__name__}: {e}") from None
            return None, -1

    def _augment(self, decoded, view: int, epoch: int):
        img, target = decoded
        if img is not None and self.transform is not None:
            img = run_seeded(self.transform, sample_seed(self.seed, epoch, view, AUGMENT), img)
        return img, target

    def _samples(self, reader: int, readers: int, epoch: int, shuffle: bool) -> Iterator[Raw]:
        """Reader `reader`'s samples: every readers-th shard of the epoch's order, cycled, through a
        seeded shuffle buffer (training), or its shards once in order (shuffle False)."""
        n = len(self.shards)
        for cycle in range(1 << 30) if shuffle else range(1):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(
                sample_seed(self.seed, epoch, cycle, ORDER))).tolist() if shuffle else list(range(n))
            mine = [order[(reader + k * readers) % n] for k in range(max(-(-n // readers), 1))] if shuffle \
                else order[reader::readers]
            stream = (raw for shard in mine for raw in self.shards.read(shard))
            yield from _shuffled(stream, sample_seed(self.seed, epoch, reader * 1_000_003 + cycle, MIX)) \
                if shuffle else stream

    def _views(self, raws: Iterator[Raw], epoch: int, count: int, skip: int) -> Iterator[dict]:
        """`count` views after the first `skip` (read, not decoded): `repeats` views of each sample,
        Mixup/CutMix over consecutive pairs of views."""
        def flat() -> Iterator[tuple[int, Raw]]:
            # two samples at a time, their repeats interleaved (A B A B ...): a Mixup pair is never
            # one image twice, and a sample's repeats come within four views of each other
            for a in raws:
                b = next(raws, None)
                for r in range(self.repeats):
                    for raw in (a,) if b is None else (a, b):
                        yield key_id(raw[0]) * 8 + r, raw  # ids of up to 8 repeats stay distinct

        views, decoded, done = flat(), {}, 0
        while done < skip + count:
            pair = [next(views), next(views)] if self.mixup is not None else [next(views)]
            if done + len(pair) <= skip:
                done += len(pair)
                continue
            out = []
            for v, raw in pair:
                if raw[0] not in decoded:  # one decode for the repeats of a sample (the last two kept)
                    decoded = {**dict(list(decoded.items())[-1:]), raw[0]: self._decode(raw)}
                out.append(self._augment(decoded[raw[0]], v, epoch))
            mixings = [None] * len(out)
            if self.mixup is not None:
                (xa, ya), (xb, yb) = out
                (ya, ma), (yb, mb) = self.mixup(xa, ya, xb, yb,
                                                sample_seed(self.seed, epoch, min(pair[0][0], pair[1][0]), MIX))
                out, mixings = [(xa, ya), (xb, yb)], [ma, mb]
            for (v, raw), (img, target), mixing in zip(pair, out, mixings, strict=True):
                if done >= skip and done < skip + count:
                    yield {"image": img, "target": target, "index": v, "epoch": epoch, "mix": mixing,
                           "source": None if img is not None else f"{self.source}: {raw[0]}"}
                done += 1

    def plan_readers(self, batch_size: int, num_replicas: int, rank: int) -> StreamPart:
        """Process `rank`'s part of the training stream, in batches of `batch_size`."""
        return StreamPart(self, batch_size, num_replicas, rank)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info else (0, 1)
        for raw in self._samples(w, workers, 0, shuffle=False):
            img, target = self._augment(self._decode(raw), key_id(raw[0]), 0)
            yield {"image": img, "target": target, "index": key_id(raw[0]), "epoch": 0,
                   "source": None if img is not None else f"{self.source}: {raw[0]}"}


class StreamPart(IterableDataset):
    """Process `rank`'s training stream: per epoch, len(self) views in batches of `batch_size` (its
    part of the global batch), `steps` batches split over its W loader workers as the DataLoader
    collects them (round robin), each worker reading its own shards."""

    def __init__(self, stream: StreamDataset, batch_size: int, num_replicas: int, rank: int):
        self.stream, self.batch_size, self.num_replicas, self.rank = stream, batch_size, num_replicas, rank
        self.steps = stream.num_samples // (batch_size * num_replicas)

    def __len__(self) -> int:
        """The views left in the epoch (from the step seek() resumed it at)."""
        return (self.steps - self.stream.start // self.batch_size) * self.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.stream.set_epoch(epoch, start)

    def __iter__(self) -> Iterator[dict]:
        s, info = self.stream, get_worker_info()
        w, workers = (info.id, info.num_workers) if info else (0, 1)
        if len(s.shards) < self.num_replicas * workers and w == 0 and self.rank == 0:
            warnings.warn(f"{s.source}: {len(s.shards)} shards for {self.num_replicas * workers} readers: readers "
                          f"share shards, and samples repeat within an epoch", stacklevel=1)
        # batch j of the epoch is read by role j % W; the DataLoader takes worker k % W's batch at its k-th
        # step, so after a resume at step S worker w plays role (S + w) % W
        started = s.start // self.batch_size
        role = (w + started) % workers
        remaining, done = len(range(started + w, self.steps, workers)), len(range(role, started, workers))
        raws = s._samples(self.rank * workers + role, self.num_replicas * workers, s.epoch, shuffle=True)
        yield from s._views(raws, s.epoch, remaining * self.batch_size, done * self.batch_size)


def _shuffled(items: Iterator[Raw], seed: int, size: int = SHUFFLE_BUFFER) -> Iterator[Raw]:
    """A seeded shuffle buffer (as webdataset's shuffle): a deterministic order for one seed."""
    g = torch.Generator().manual_seed(seed)
    buffer: list[Raw] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(torch.randint(size, (1,), generator=g))
        buffer[j], item = item, buffer[j]
        yield item
    while buffer:
        yield buffer.pop(int(torch.randint(len(buffer), (1,), generator=g)))


def open_url_stream(pattern: str, root: str, classes: list[str] | None, seed: int, strict: bool,
                    input_key: str | None, target_key: str | None) -> StreamDataset:
    """Shards at URLs (timm's spelling: 'BASE/train-{0000..0146}.tar|N', N samples; or a split
    named in BASE/_info.json) as a StreamDataset."""
    import webdataset as wds

    spec, _, count = pattern.partition("|")
    if root.startswith(("http://", "https://")):  # one line in seconds, not curl's minutes of retries
        from kdkit.network import reachable

        why = reachable(root)
        if why is not None:
            raise KdkitError(f"{root} cannot be reached ({why}): check the address and the network, or copy the "
                             f"shards with `kdkit shards URL --out DIR` where it can be reached")
    info: dict = {}
    try:
        with wds.gopen(f"{root.rstrip('/')}/_info.json", "rb") as f:
            info = json.load(f)
    except Exception:  # no info file: the split must carry |N
        info = {}
    if ".tar" not in spec and "{" not in spec:
        split = info.get("splits", {}).get(spec)
        if split is None:
            raise KdkitError(f"{root}: no _info.json naming split {spec!r}: give the split as shards with their "
                             f"count, e.g. '{spec}-{{000000..000009}}.tar|N'")
        spec, count = "::".join(split["filenames"]), count or split["num_samples"]
    names = expand_pattern(spec)
    if not count:  # a pattern without |N: the shard lengths of the _info.json splits (as timm reads them)
        lengths = {f: n for sp in info.get("splits", {}).values()
                   for f, n in zip(sp.get("filenames", ()), sp.get("shard_lengths", ()), strict=False)}
        count = sum(lengths[n] for n in names) if all(n in lengths for n in names) else 0
    urls = [u if "://" in u or u.startswith("pipe:") else f"{root.rstrip('/')}/{u}" for u in names]
    classes = classes or info.get("classes")
    if not classes:
        raise KdkitError(f"{root}: a stream cannot list its classes before its end: give them with --class-map")
    return StreamDataset(TarUrls(urls, input_key, target_key), int(count or 0), classes, pattern, seed=seed,
                         strict=strict)


def open_hub_stream(name: str, split: str, classes: list[str] | None, seed: int, strict: bool,
                    input_key: str | None, target_key: str | None) -> StreamDataset:
    """A Hub dataset's split with streaming=True as a StreamDataset."""
    import datasets
    from datasets import ClassLabel
    from datasets import Image as HFImage

    from kdkit.data.dataset import LABEL_KEYS

    split, _, count = split.partition("|")
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True, trust_remote_code=False)
    except Exception as e:
        raise KdkitError(f"could not stream split {split!r} of {name!r}: {type(e).__name__}: {str(e)[:200]}") from None
    feats = ds.features or {}
    image_key = input_key or next((k for k, f in feats.items() if isinstance(f, HFImage)), None)
    label_key = target_key or next((k for k, f in feats.items() if isinstance(f, ClassLabel)), None) \
        or next((k for k in LABEL_KEYS if k in feats), None)
    if image_key is None or label_key is None:
        raise KdkitError(f"{name!r} needs an Image column and a label column (--input-key / --target-key name "
                         f"them); it has {list(feats)}")
    if classes is None:
        if not isinstance(feats.get(label_key), ClassLabel):
            raise KdkitError(f"{name!r}: the label column {label_key!r} is not a ClassLabel: a stream cannot list "
                             f"its classes before its end: give them with --class-map")
        classes = list(feats[label_key].names)
    if isinstance(feats.get(image_key), HFImage):
        ds = ds.cast_column(image_key, HFImage(decode=False))
    splits = getattr(ds.info, "splits", None) or {}
    known = splits[split].num_examples if split in splits else 0
    return StreamDataset(HubStream(ds, image_key, label_key, classes), int(count or known or 0), classes,
                         f"hf:{name}:{split}", seed=seed, strict=strict)


__all__ = ["IMAGE_KEYS", "StreamDataset", "StreamPart", "key_id", "open_hub_stream", "open_url_stream"]
