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
import itertools
import json
import shutil
import tarfile
from collections.abc import Callable, Iterable, Iterator
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


def dataset_rows(ds: SeededDataset) -> Iterator[tuple[bytes, str, int]]:
    """(encoded image, extension, class) of every sample of `ds`, in order."""
    for i in range(len(ds)):
        data, ext = ds.encoded(i)
        yield data, ext, int(ds.targets[i])


def write_split(rows: Iterable[tuple[bytes, str, int]], folder: Path, split: str, shard_size: int, max_side: int = 0,
                quality: int = 90, progress: Callable[[int], None] | None = None) -> dict:
    """Write `rows` ((encoded image, extension, class), in order) as `folder/SPLIT-NNNNNN.tar` shards
    of `shard_size` samples, with their indexes. `rows` may be a stream (one pass, nothing held).
    Returns timm's split info: {"name", "filenames", "shard_lengths", "num_samples"}."""
    filenames, lengths, rows, index = [], [], iter(rows), 0
    while True:
        first = next(rows, None)
        if first is None:
            break
        name = f"{split}-{len(filenames):06d}.tar"
        count = 0
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for data, ext, target in itertools.chain([first], itertools.islice(rows, shard_size - 1)):
                if max_side:
                    data, ext = capped(data, ext, max_side, quality)
                if ext not in IMAGE_KEYS:
                    raise KdkitError(f"sample {index} of split {split!r}: a .{ext} image has no webdataset image key")
                key = f"{index:08d}"
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.{TARGET_KEY}", str(int(target)).encode())
                count += 1
                index += 1
                if progress:
                    progress(1)
        write_index(folder / name, scan_shard(folder / name, IMAGE_KEYS, TARGET_KEY), IMAGE_KEYS, TARGET_KEY)
        filenames.append(name)
        lengths.append(count)
    return {"name": split, "filenames": filenames, "shard_lengths": lengths, "num_samples": sum(lengths)}


def write_shards(splits: dict[str, SeededDataset | Iterable[tuple[bytes, str, int]]], out: str | Path,
                 shard_size: int = 10_000, max_side: int = 0, quality: int = 90,
                 progress: Callable[[int], None] | None = None, classes: list[str] | None = None) -> Path:
    """Write each split of `splits` (name -> a dataset, or a stream of (encoded image, extension,
    class) rows; all in one label space, `classes` or the first dataset's) into the new folder
    `out`, with an `_info.json`. The folder appears complete or not at all; an existing `out` is
    refused. Returns `out`."""
    out = Path(out)
    if out.exists():
        raise KdkitError(f"{out} exists: kdkit shards writes a new folder (remove it or choose another --out)")
    if shard_size < 1 or max_side < 0 or not 1 <= quality <= 100:
        raise KdkitError("--shard-size must be >= 1, --max-size >= 0 and --quality in 1..100")
    if classes is None:
        classes = next(s.classes for s in splits.values() if isinstance(s, SeededDataset))

    def write(tmp: Path) -> None:
        info = {"name": out.name, "classes": list(classes), "splits": {}}
        for split, source in splits.items():
            rows = dataset_rows(source) if isinstance(source, SeededDataset) else source
            info["splits"][split] = write_split(rows, Path(tmp), split, shard_size, max_side, quality, progress)
        (Path(tmp) / "_info.json").write_text(json.dumps(info, indent=1) + "\n")

    return atomic_folder(out, write)


def copy_shards(urls: list[str], out: str | Path, progress: Callable[[int], None] | None = None) -> Path:
    """Copy remote shards (http(s), s3, gs, pipe: URLs, as webdataset opens them) into the new
    folder `out` under their file names, with their indexes, so they are read by index like local
    shards. The folder appears complete or not at all."""
    import webdataset as wds

    out = Path(out)
    if out.exists():
        raise KdkitError(f"{out} exists: kdkit shards writes a new folder (remove it or choose another --out)")
    names = [u.rstrip("/").rpartition("/")[2].split("?")[0] for u in urls]
    if len(set(names)) != len(names) or not all(n.endswith(".tar") for n in names):
        raise KdkitError("the URLs must name distinct .tar files (their names are kept)")

    def write(tmp: Path) -> None:
        for url, name in zip(urls, names, strict=True):
            try:
                with wds.gopen(url, "rb") as src, open(Path(tmp) / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except Exception as e:
                raise KdkitError(f"could not read {url}: {type(e).__name__}: {str(e)[:200]}") from None
            shard = Path(tmp) / name
            write_index(shard, scan_shard(shard, IMAGE_KEYS, TARGET_KEY), IMAGE_KEYS, TARGET_KEY)
            if progress:
                progress(1)

    return atomic_folder(out, write)


def index_shards(shards: list[Path], input_key: str | None = None, target_key: str | None = None) -> list[Path]:
    """Write the index of each existing shard beside it (what opening them would otherwise scan)."""
    from kdkit.data.shards import input_keys_of

    keys, target = input_keys_of(input_key), target_key or TARGET_KEY
    return [write_index(s, scan_shard(s, keys, target), keys, target) for s in shards]


def hf_stream_rows(name: str, split: str, input_key: str | None = None, target_key: str | None = None,
                   classes: list[str] | None = None) -> tuple[list[str], Iterator[tuple[bytes, str, int]]]:
    """A Hub dataset's split streamed (`datasets.load_dataset(..., streaming=True)`: nothing is
    downloaded ahead or converted) as (encoded image, extension, class) rows, with its label space.
    String labels need `classes` (a class map): a stream cannot list them before it ends."""
    import datasets
    from datasets import ClassLabel
    from datasets import Image as HFImage

    from kdkit.data.dataset import LABEL_KEYS

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
    label = feats.get(label_key)
    if classes is None:
        if not isinstance(label, ClassLabel):
            raise KdkitError(f"{name!r}: the label column {label_key!r} is not a ClassLabel, so a stream cannot "
                             f"know the classes before its end: give them with --class-map")
        classes = list(label.names)
    lookup = {c: i for i, c in enumerate(classes)}
    if isinstance(feats.get(image_key), HFImage):
        ds = ds.cast_column(image_key, HFImage(decode=False))

    def rows() -> Iterator[tuple[bytes, str, int]]:
        for row in ds:
            raw, y = row[image_key], row[label_key]
            if isinstance(raw, dict):
                data = raw.get("bytes") or Path(raw["path"]).read_bytes()
            else:  # a decoded image (a column that is not an Image feature)
                buf = io.BytesIO()
                raw.save(buf, "PNG")
                data = buf.getvalue()
            kind = Image.open(io.BytesIO(data)).format or "PNG"
            target = lookup.get(y) if isinstance(y, str) else int(y)
            if target is None or not 0 <= target < len(classes):
                raise KdkitError(f"{name!r}: label {y!r} is outside the {len(classes)} classes of the label space")
            yield data, {"JPEG": "jpg"}.get(kind, kind.lower()), target

    return classes, rows()
