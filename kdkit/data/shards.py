"""Webdataset tar shards read by index: the samples `KEY.jpg` + `KEY.cls` that timm's `wds/` reader,
webdataset and the Hub's `-wds` datasets use, addressable by sample index so that every guarantee of
a folder (exact replay, logit caches, mid-epoch and elastic resume) holds on shards too.

An index lists, per shard, each sample's image member (byte offset, size) and its class; it is built
by scanning the tar headers once (the images themselves are not read), or read from the
`NAME.tar.idx.npz` file that `kdkit shards` writes beside each shard (checked against the shard's
size). The whole index lives in a few NumPy arrays (20 bytes a sample), not Python lists: loader
workers forked from the main process share its pages instead of copying them on read.
Reading a sample is one `os.pread` of its bytes from a per-process cache of open files.

Splits are named as timm names them (`--train-split`, `--val-split`): a brace pattern of shard files
relative to the data folder (`train-{000000..000146}.tar`), a split of the folder's `_info.json`
(timm's and the Hub's `-wds` layout: splits -> filenames), or a bare name `S` matching `S-*.tar`,
`S_*.tar` or `S/*.tar`. Remote URL patterns are streamed instead (kdkit/data/stream.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from kdkit.data.dataset import SeededDataset
from kdkit.registry import KdkitError

# timm's wds reader defaults (input_key 'jpg;png;webp', target_key 'cls'), plus the other image types
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
TARGET_KEY = "cls"
INDEX_SUFFIX = ".idx.npz"
INDEX_FORMAT = 1
URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "pipe:", "hf://")
OPEN_FILES = 64  # shards kept open per process (a pread each sample; reopened after a fork)


def is_url(spec: str) -> bool:
    return spec.startswith(URL_SCHEMES)


def expand_pattern(pattern: str) -> list[str]:
    """A brace pattern (`a-{000..009}.tar`, several joined by `::` as webdataset allows) as a list."""
    from braceexpand import braceexpand

    return [name for part in pattern.split("::") for name in braceexpand(part)]


def split_shards(root: Path, split: str) -> list[Path] | None:
    """The shard files of `split` under `root`, or None when `split` names no shards there (the
    caller then looks for a split folder). See the module docstring for the three spellings."""
    if ".tar" in split or "{" in split:
        files = [root / name for name in expand_pattern(split.split("|")[0])]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise KdkitError(f"split {split!r}: {len(missing)} of {len(files)} shards not found, e.g. {missing[0]}")
        return files
    for info_name in ("_info.json", "info.json"):
        info = root / info_name
        if info.is_file():
            try:
                splits = json.loads(info.read_text()).get("splits", {})
            except (OSError, ValueError, AttributeError) as e:
                raise KdkitError(f"{info} is not a readable JSON info file: {e}") from None
            if split in splits:
                return split_shards(root, "::".join(splits[split]["filenames"]))
    found = sorted(root.glob(f"{split}-*.tar")) or sorted(root.glob(f"{split}_*.tar")) or sorted(
        (root / split).glob("*.tar") if (root / split).is_dir() else [])
    return found or None


def has_shards(root: Path) -> bool:
    """Whether `root` holds tar shards (directly, or an `_info.json` naming splits)."""
    return any(root.glob("*.tar")) or (root / "_info.json").is_file()


def _key_ext(name: str) -> tuple[str, str]:
    # webdataset's convention: the key is the path up to the first dot of the file name
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower() if dot else ""


def scan_shard(path: Path, input_keys: tuple[str, ...], target_key: str) -> dict[str, np.ndarray]:
    """Index one shard by reading its tar headers (and each sample's small label member): per
    sample, in the shard's order, the image member's data offset and size, and the class.

    Returns {"offset": (N,) int64, "size": (N,) int64, "target": (N,) int64} (-1: no label member).
    A sample without an image member under `input_keys` is left out (as webdataset's decoders do).
    """
    samples: OrderedDict[str, dict[str, tarfile.TarInfo]] = OrderedDict()
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed: random access needs byte offsets
            for m in tar:
                if m.isfile():
                    key, ext = _key_ext(m.name)
                    samples.setdefault(key, {})[ext] = m
    except (tarfile.TarError, OSError) as e:
        raise KdkitError(f"{path} is not a readable uncompressed tar shard: {type(e).__name__}: {e}") from None
    offsets, sizes, targets = [], [], []
    with open(path, "rb") as f:
        for key, members in samples.items():
            image = next((members[k] for k in input_keys if k in members), None)
            if image is None:
                continue
            offsets.append(image.offset_data)
            sizes.append(image.size)
            label = members.get(target_key)
            if label is None:
                targets.append(-1)
                continue
            f.seek(label.offset_data)
            text = f.read(label.size).strip()
            try:
                targets.append(int(text))
            except ValueError:
                raise KdkitError(f"{path}: {key}.{target_key} holds {text[:40]!r}, not a class index") from None
    return {"offset": np.asarray(offsets, np.int64), "size": np.asarray(sizes, np.int64),
            "target": np.asarray(targets, np.int64)}


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name + INDEX_SUFFIX)


def write_index(shard: Path, index: dict[str, np.ndarray], input_keys: tuple[str, ...], target_key: str) -> Path:
    """Write `shard`'s index beside it (atomically: a temporary file renamed when complete)."""
    meta = {"format": INDEX_FORMAT, "shard_size": shard.stat().st_size, "input_keys": list(input_keys),
            "target_key": target_key}
    out = index_path(shard)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **index)
    os.replace(tmp, out)
    return out


def read_index(shard: Path, input_keys: tuple[str, ...], target_key: str) -> dict[str, np.ndarray] | None:
    """The index stored beside `shard`, or None when there is none or it is for another shard size
    or other keys (the shard is then scanned)."""
    path = index_path(shard)
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes())
            stored = {k: z[k] for k in ("offset", "size", "target")}
    except (OSError, ValueError, KeyError):
        return None
    if (meta.get("format") != INDEX_FORMAT or meta.get("shard_size") != shard.stat().st_size
            or tuple(meta.get("input_keys", ())) != tuple(input_keys) or meta.get("target_key") != target_key):
        return None
    return stored


def input_keys_of(input_key: str | None) -> tuple[str, ...]:
    """timm's `--input-key` for shards ('jpg;png;webp': the first present wins), as a tuple."""
    return tuple(k.strip().lower() for k in input_key.split(";") if k.strip()) if input_key else IMAGE_KEYS


class TarShardDataset(SeededDataset):
    """The samples of a list of local tar shards, in shard order then tar order, read by index.

    classes: the label space (class i = classes[i]); default: the `classes` of the folder's
    `_info.json` if it lists them, else "0".."C-1" for the largest class index seen.
    input_key / target_key: timm's names (default 'jpg;jpeg;png;webp;...' and 'cls').
    """

    def __init__(self, shards: list[Path], transform: Callable | None = None, classes: list[str] | None = None,
                 seed: int = 0, strict: bool = False, input_key: str | None = None, target_key: str | None = None,
                 labeled: bool = True):
        super().__init__(transform, seed, strict)
        if not shards:
            raise KdkitError("no tar shards given")
        self.shards = [Path(s).resolve() for s in shards]
        keys, target_key = input_keys_of(input_key), target_key or TARGET_KEY
        parts = [read_index(s, keys, target_key) or scan_shard(s, keys, target_key) for s in self.shards]
        self.shard_sizes = [s.stat().st_size for s in self.shards]
        counts = np.array([len(p["offset"]) for p in parts], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # sample i lies in shard searchsorted(starts, i)
        self.offsets = np.concatenate([p["offset"] for p in parts])
        self.sizes = np.concatenate([p["size"] for p in parts])
        self.targets = np.concatenate([p["target"] for p in parts]) if labeled else np.full(len(self.offsets), -1)
        if len(self.offsets) == 0:
            raise KdkitError(f"no samples with an image member ({', '.join(keys)}) in {len(self.shards)} shards, "
                             f"e.g. {self.shards[0]}")
        if labeled and (self.targets < 0).any():
            i = int(np.argmax(self.targets < 0))
            raise KdkitError(f"{self.describe(i)} has no .{target_key} label member (--target-key names it)")
        self.classes = list(classes) if classes is not None else [str(c) for c in range(int(self.targets.max()) + 1)]
        if labeled and self.targets.max() >= len(self.classes):
            raise KdkitError(f"{self.describe(int(self.targets.argmax()))} has class {int(self.targets.max())}, "
                             f"outside the {len(self.classes)} classes of the label space")
        self._files: dict[int, io.BufferedReader] = {}  # open shards, closed when dropped
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.offsets)

    def _shard_of(self, index: int) -> int:
        return int(np.searchsorted(self.starts, index, side="right")) - 1

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked loader worker: open its own files (a shared offset is harmless
            self._files, self._pid = {}, os.getpid()  # with pread, but the parent may close its own)
        f = self._files.pop(shard, None)
        if f is None:
            if len(self._files) >= OPEN_FILES:
                self._files.pop(next(iter(self._files))).close()
            f = open(self.shards[shard], "rb")  # noqa: SIM115 (kept open: one pread per sample)
        self._files[shard] = f  # most recently used last
        return f.fileno()

    def read_bytes(self, index: int) -> bytes:
        data = os.pread(self._fd(self._shard_of(index)), int(self.sizes[index]), int(self.offsets[index]))
        if len(data) != self.sizes[index]:
            raise OSError(f"short read ({len(data)} of {self.sizes[index]} bytes): the shard was truncated")
        return data

    def encoded(self, index: int) -> tuple[bytes, str]:
        return self.read_bytes(index), self.describe(index).rpartition(".")[2].lower()

    def read(self, index: int) -> tuple[Image.Image, int]:
        img = Image.open(io.BytesIO(self.read_bytes(index)))
        img.load()
        return img, int(self.targets[index])

    def describe(self, index: int) -> str:
        shard = self._shard_of(index)
        offset = int(self.offsets[index])
        try:  # the member's tar header is the 512 bytes before its data
            name = tarfile.TarInfo.frombuf(os.pread(self._fd(shard), 512, offset - 512), "utf-8", "surrogateescape").name
        except (OSError, tarfile.TarError):
            name = f"byte {offset}"
        return f"{self.shards[shard]}:{name}"

    def fingerprint(self) -> str:
        """sha256 over each shard's name, size and sample count, and the class of every sample."""
        h = hashlib.sha256()
        for shard, size, n in zip(self.shards, self.shard_sizes, np.diff(self.starts), strict=True):
            h.update(f"{shard.name}|{size}|{int(n)}\n".encode())
        h.update(self.targets.astype("<i8").tobytes())
        return h.hexdigest()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}  # descriptors are per process
        return state
