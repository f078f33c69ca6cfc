"""Write a data source as webdataset tar shards: `SPLIT-000000.tar`, ... holding `KEY.jpg` (or the
image's own format) and `KEY.cls` (the class index as text), the layout timm's `wds/` reader, the
Hub's `-wds` datasets and webdataset itself read; plus an `_info.json` (timm's split info, and the
class names) and each shard's index (`NAME.tar.idx.npz`, kdkit/data/shards.py) so kdkit opens the
shards without scanning them.

Images are copied byte for byte (a run from the shards equals the run from the folder), unless
`max_side` caps their long side: an image larger than that is resized (Lanczos, as FFCV caps
ImageNet at 256-512 px to cut decode time) and re-encoded as JPEG at `quality`.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from kdkit.data.dataset import SeededDataset, load_rgb
from kdkit.data.shards import IMAGE_KEYS, TARGET_KEY, scan_shard, write_index
from kdkit.files import atomic_folder
from kdkit.registry import KdkitError

MTIME = 0  # fixed member times: the same data gives the same shard bytes


def capped(data: bytes, ext: str, max_side: int, quality: int) -> tuple[bytes, str]:
    """The image re-encoded with its long side at most `max_side` (unchanged when already within)."""
    img = Image.open(io.BytesIO(data))
    if max(img.size) <= max_side:
        return data, ext
    img = load_rgb(img)
    scale = max_side / max(img.size)
    img = img.resize((max(round(img.width * scale), 1), max(round(img.height * scale), 1)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), "jpg"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), MTIME, 0o444, "kdkit", "kdkit"
    tar.addfile(info, io.BytesIO(data))


def write_split(ds: SeededDataset, folder: Path, split: str, shard_size: int, max_side: int = 0, quality: int = 90,
                progress: Callable[[int], None] | None = None) -> dict:
    """Write `ds` in order as `folder/SPLIT-NNNNNN.tar` shards of `shard_size` samples, with their
    indexes. Returns timm's split info: {"name", "filenames", "shard_lengths", "num_samples"}."""
    filenames, lengths = [], []
    for first in range(0, len(ds), shard_size):
        name = f"{split}-{len(filenames):06d}.tar"
        count = 0
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(first, min(first + shard_size, len(ds))):
                data, ext = ds.encoded(i)
                if max_side:
                    data, ext = capped(data, ext, max_side, quality)
                if ext not in IMAGE_KEYS:
                    raise KdkitError(f"{ds.describe(i)}: a .{ext} image has no webdataset image key")
                key = f"{i:08d}"
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.{TARGET_KEY}", str(int(ds.targets[i])).encode())
                count += 1
                if progress:
                    progress(1)
        write_index(folder / name, scan_shard(folder / name, IMAGE_KEYS, TARGET_KEY), IMAGE_KEYS, TARGET_KEY)
        filenames.append(name)
        lengths.append(count)
    return {"name": split, "filenames": filenames, "shard_lengths": lengths, "num_samples": sum(lengths)}


def write_shards(splits: dict[str, SeededDataset], out: str | Path, shard_size: int = 10_000, max_side: int = 0,
                 quality: int = 90, progress: Callable[[int], None] | None = None) -> Path:
    """Write each split of `splits` (name -> dataset, all in one label space) into the new folder
    `out`, with an `_info.json`. The folder appears complete or not at all; an existing `out` is
    refused. Returns `out`."""
    out = Path(out)
    if out.exists():
        raise KdkitError(f"{out} exists: kdkit shards writes a new folder (remove it or choose another --out)")
    if shard_size < 1 or max_side < 0 or not 1 <= quality <= 100:
        raise KdkitError("--shard-size must be >= 1, --max-size >= 0 and --quality in 1..100")
    classes = next(iter(splits.values())).classes

    def write(tmp: Path) -> None:
        info = {"name": out.name, "classes": list(classes), "splits": {}}
        for split, ds in splits.items():
            info["splits"][split] = write_split(ds, Path(tmp), split, shard_size, max_side, quality, progress)
        (Path(tmp) / "_info.json").write_text(json.dumps(info, indent=1) + "\n")

    return atomic_folder(out, write)


def index_shards(shards: list[Path], input_key: str | None = None, target_key: str | None = None) -> list[Path]:
    """Write the index of each existing shard beside it (what opening them would otherwise scan)."""
    from kdkit.data.shards import input_keys_of

    keys, target = input_keys_of(input_key), target_key or TARGET_KEY
    return [write_index(s, scan_shard(s, keys, target), keys, target) for s in shards]
