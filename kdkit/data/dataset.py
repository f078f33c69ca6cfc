"""Labeled image datasets whose samples carry their index and whose augmentation is a function of
(seed, epoch, index): the same view can be replayed (logit caches), resumed, or drawn by any
number of processes. Unreadable images are skipped and counted, or fail under `strict`."""

from __future__ import annotations

import array
import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from kdkit.data.batch import finish_samples
from kdkit.data.mixup import Mixing
from kdkit.data.sampler import epoch_views, pair_partners, view_epoch
from kdkit.data.seeding import AUGMENT, MIX, run_seeded, sample_seed
from kdkit.registry import KdkitError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_rgb(path_or_image: str | Path | Image.Image) -> Image.Image:
    """Open an image as RGB: EXIF rotation applied; grayscale, palette, RGBA, CMYK, 16-bit converted.

    16-bit images map 0..65535 onto 0..255 (never stretched per image, which would turn a dark
    image bright); 32-bit integer ("I") images are read as 16-bit when a value exceeds 255.
    """
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    if img.mode == "RGB" and "exif" not in img.info:
        return img  # the common case (an RGB JPEG without EXIF): nothing to rotate or convert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            scale = 257.0 if img.mode != "I" or arr.max() > 255 else 1.0
            img = Image.fromarray(np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


ViewKey = int | tuple[int, int]  # a view id (in the dataset's current epoch), or (epoch, view id)


class SeededDataset(Dataset):
    """Base class: subclasses list their samples and read one raw (PIL image, label) pair.

    A key is a view id v (sample v % len, repeat v // len; see data/sampler.py) in the current
    epoch (`set_epoch`), or an (epoch, v) pair, as the training samplers yield them so that
    persistent loader workers need no epoch of their own. Each key gives dict(image=(3, H, W)
    tensor or None if unreadable, target=int (-1 when unlabeled) or a (K,) soft target under
    Mixup/CutMix, index=v, epoch=the view epoch). The transform runs under random streams seeded
    from (seed, view epoch, v), and Mixup/CutMix (`mixup`, a SampleMixup) mixes the two views of a
    pair of positions of the epoch's global order (`epoch_orders`, `pair_partners`) in both
    directions: a view never depends on worker count, batch size or process count. A batch that
    holds both views of a pair (the samplers keep pairs together) decodes and augments each once.
    With `view_cycle` E > 0, epoch e draws the views of epoch e % E.
    """

    classes: list[str]

    def __init__(self, transform: Callable | None = None, seed: int = 0, strict: bool = False):
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.strict = strict
        self.mixup = None
        self.repeats = 1  # repeated augmentation of the training order (pairs of views follow it)
        self.every_repeat = False  # an epoch draws every repeat of every sample (FKD's crops), not N views
        self.view_cycle = 0
        self._partners: dict[int, tuple[Tensor, Tensor]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.view_epoch(epoch)

    def view_epoch(self, epoch: int) -> int:
        return view_epoch(epoch, self.view_cycle)

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"sample {index}"

    def encoded(self, index: int) -> tuple[bytes, str]:
        """Sample `index`'s image as stored (encoded bytes, extension such as "jpg"), for writing it
        elsewhere unchanged (kdkit shards). Sources that hold decoded images re-encode them as PNG."""
        buf = io.BytesIO()
        self.read(index)[0].save(buf, "PNG")
        return buf.getvalue(), "png"

    def issues(self) -> dict:
        """What the scan of the data found besides readable samples (for the run summary)."""
        return {}

    def fingerprint(self) -> str:
        """A sha256 of the content, recorded in caches and run summaries (subclasses hash what they
        read; this default only knows the class and the length)."""
        return hashlib.sha256(f"{type(self).__name__}|{len(self)}".encode()).hexdigest()

    def epoch_orders(self, epoch: int) -> list[Tensor]:
        """The global orders of view ids the training sampler draws in view epoch `epoch`, one per
        pool whose views pair among themselves under Mixup/CutMix."""
        return [epoch_views(len(self), self.seed, epoch, self.repeats, every_repeat=self.every_repeat)]

    def decode(self, index: int) -> tuple[Image.Image | None, int]:
        """Sample `index` as an RGB image (None if unreadable, unless `strict`) and its label."""
        try:
            img, target = self.read(index)
            return load_rgb(img), target
        except Exception as e:
            if self.strict:
                raise KdkitError(f"unreadable image {self.describe(index)}: {type(e).__name__}: {e}") from None
            return None, -1

    def augment(self, decoded: tuple[Image.Image | None, int], view: int, epoch: int) -> tuple[Any, int]:
        """View `view` of view epoch `epoch` of a decoded sample: the transform under the view's seed
        (a kdkit transform gives a RawView, which a batch finishes; kdkit.data.batch). The decoded
        image is not modified (timm's transforms return new images), so the repeats of one image can
        share one decode."""
        img, target = decoded
        if img is not None and self.transform is not None:
            img = run_seeded(self.transform, sample_seed(self.seed, epoch, view, AUGMENT), img)
        return img, target

    def view(self, view: int, epoch: int | None = None) -> tuple[torch.Tensor | None, int]:
        """The augmented image of view `view` in view epoch `epoch` (default: the current one;
        None if unreadable), unmixed and finished, and its label."""
        img, target = self.augment(self.decode(view % len(self)), view, self.epoch if epoch is None else epoch)
        if img is None:
            return None, target
        return finish_samples([{"image": img}])[0]["image"], target

    def partners(self, views: list[int], epoch: int | None = None) -> list[int]:
        """The view each of `views` is mixed with under Mixup/CutMix in view epoch `epoch`: the other
        view of its pair of positions; itself (unmixed) for a view the epoch does not draw."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._partners:
            self._partners[epoch] = pair_partners(self.epoch_orders(epoch))
            while len(self._partners) > 2:
                del self._partners[next(iter(self._partners))]
        stored, partner = self._partners[epoch]
        v = torch.tensor(views, dtype=torch.long)
        i = torch.searchsorted(stored, v).clamp_max(len(stored) - 1)
        return torch.where(stored[i] == v, partner[i], v).tolist()

    def partner(self, view: int) -> int:
        return self.partners([view])[0]

    def __getitem__(self, key: ViewKey) -> dict:
        """One sample, its view finished (mixed with its partner under Mixup/CutMix)."""
        return finish_samples(self.__getitems__([key]))[0]

    def __getitems__(self, keys: list[ViewKey]) -> list[dict]:
        """The drawn samples of `keys` (DataLoader's batched fetch; kdkit.data.batch.collate finishes
        their views, finish_samples one by one): image a RawView (or the transform's output), "mix"
        how it is mixed with its pair's other view. Each image is decoded once per call, however many
        of its repeats (views) the call holds, and each view augmented once, however many pairs it
        takes part in: the repeats of repeated augmentation, which the samplers place next to each
        other, cost one decode (FKD's several crops of one decoded image)."""
        keyed = [(self.view_epoch(k[0]), k[1]) if isinstance(k, tuple) else (self.epoch, int(k)) for k in keys]
        views: dict[tuple[int, int], tuple[Any, int]] = {}
        decoded: dict[int, tuple[Image.Image | None, int]] = {}

        def view(e: int, v: int) -> tuple[Any, int]:
            if (e, v) not in views:
                index = v % len(self)
                if index not in decoded:
                    decoded[index] = self.decode(index)
                views[e, v] = self.augment(decoded[index], v, e)
            return views[e, v]

        if self.mixup is None:
            return [self._sample(*view(e, v), v, e) for e, v in keyed]
        mixed: dict[tuple[int, int], tuple[Tensor, Mixing | None]] = {}
        for e in {e for e, _ in keyed}:
            mine = [v for ee, v in keyed if ee == e]
            for v, w in zip(mine, self.partners(mine, e), strict=True):
                if (e, v) in mixed:
                    continue
                a, b = min(v, w), max(v, w)
                mixed[e, a], mixed[e, b] = self.mixup(*view(e, a), *view(e, b), sample_seed(self.seed, e, a, MIX))
        return [{**self._sample(view(e, v)[0], mixed[e, v][0], v, e), "mix": mixed[e, v][1]} for e, v in keyed]

    def _sample(self, image: Tensor | None, target: int | Tensor, view: int, epoch: int) -> dict:
        """A sample dict; an unreadable one (image None) names its source (`describe`) for the summary."""
        source = self.describe(view % len(self)) if image is None else None
        return {"image": image, "target": target, "index": view, "epoch": epoch, "source": source}


def is_hidden(name: str) -> bool:
    """A hidden file or folder name (.x.jpg, macOS's ._x.jpg, .ipynb_checkpoints)."""
    return name.startswith(".")


def is_image_file(path: str | Path, root: str | Path) -> bool:
    """Whether a file under `root` is read as an image: an image extension, and neither it nor a
    folder between it and `root` hidden."""
    path = str(path)
    return path.lower().endswith(IMG_EXTENSIONS) and not any(
        is_hidden(part) for part in relative_to(path, str(root)).split(os.sep))


def relative_to(path: str, root: str) -> str:
    """`path` relative to `root`, by its prefix where it has one (a string slice: listing 1.28M
    files, os.path.relpath's normalisation costs more than the listing)."""
    prefix = root.rstrip(os.sep) + os.sep
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)


def read_image_file(path: str | Path) -> Image.Image:
    """A PIL image decoded from `path` now (so the file is closed and a broken one fails here)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img


class PathTable:
    """A folder's (path, class) pairs as NumPy arrays: the paths relative to `root` in one UTF-8
    buffer with end offsets, the classes in an int64 array. A list of 1.28M path strings is 1.28M
    objects whose reference counts every forked loader worker writes on read, copying their pages
    (timm's and torchvision's folder readers grow per worker that way); these arrays are read only.
    Indexing gives (absolute path, class); iterating gives the pairs in order."""

    def __init__(self, root: Path, pairs: Iterable[tuple[str, int]]):
        self.root = str(root)
        # filled pair by pair: no list of 1.28M tuples, even for a moment (its freed pages would be
        # written, so copied, by every forked worker that allocates into them)
        blob, ends, targets = bytearray(), array.array("q"), array.array("q")
        for path, target in pairs:
            blob += relative_to(path, self.root).encode("utf-8", "surrogateescape")
            ends.append(len(blob))
            targets.append(target)
        self.blob = np.frombuffer(blob, np.uint8)
        self.ends = np.frombuffer(ends, np.int64)
        self.targets = np.frombuffer(targets, np.int64)

    def __len__(self) -> int:
        return len(self.ends)

    def relpath(self, index: int) -> str:
        start = int(self.ends[index - 1]) if index else 0
        return self.blob[start : int(self.ends[index])].tobytes().decode("utf-8", "surrogateescape")

    def __getitem__(self, index: int) -> tuple[str, int]:
        return os.path.join(self.root, self.relpath(index)), int(self.targets[index])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def list_images(root: Path, class_to_idx: dict[str, int], is_image: Callable[[str], bool]) -> tuple[
        PathTable, list[str], list[str]]:
    """(path, class) of every image under root/<class>/, in torchvision's make_dataset order (class
    names sorted, then folders, then files), as a PathTable, following symlinks once: a folder
    reached again (a symlink loop, or two links to one folder) is not entered again, and a link to
    nothing is left out. Returns (samples, folders not entered again, dangling links)."""
    repeated: list[str] = []
    dangling: list[str] = []
    return PathTable(root, _walk_images(root, class_to_idx, is_image, repeated, dangling)), repeated, dangling


def _walk_images(root: Path, class_to_idx: dict[str, int], is_image: Callable[[str], bool], repeated: list[str],
                 dangling: list[str]) -> Iterator[tuple[str, int]]:
    for name in sorted(class_to_idx):
        top = root / name
        if not top.is_dir():
            continue
        seen: set[tuple[int, int]] = set()
        walked, stack = [], [str(top)]
        while stack:  # top-down, subfolders in sorted order: os.walk(followlinks=True)'s visits
            folder = stack.pop()
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                repeated.append(folder)
                continue
            seen.add((st.st_dev, st.st_ino))
            files, subfolders = [], []
            try:
                with os.scandir(folder) as entries:
                    for e in entries:  # the entry's type comes with the listing: no stat per regular file
                        (subfolders if e.is_dir() else files).append((e.name, e.is_symlink()))
            except OSError:  # unreadable folder: skipped, as os.walk skips it
                continue
            walked.append((folder, files))
            stack.extend(os.path.join(folder, d) for d, _ in sorted(subfolders, reverse=True))
        for folder, files in sorted(walked):
            for file, link in sorted(files):
                path = os.path.join(folder, file)
                if link and not os.path.exists(path):  # only a link can point at nothing
                    dangling.append(path)
                elif is_image(path):
                    yield path, class_to_idx[name]


class ImageFolderDataset(SeededDataset):
    """An ImageFolder directory (root/<class>/<image>), listed in torchvision's order (list_images).

    `classes` may be given to fix the label space (so train and eval splits agree). Empty class
    folders are kept as classes with no samples and listed by `issues()`, or are an error under
    `strict`; files without an image extension are ignored and counted; symlinks are followed once
    (folders reached again and dangling links are named by `issues()`, dangling links are an
    error under `strict`). The samples are held in a PathTable (NumPy arrays, shared by loader
    workers without copies).
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, classes: list[str] | None = None,
                 seed: int = 0, strict: bool = False):
        super().__init__(transform, seed, strict)
        self.root = Path(root)
        if not self.root.is_dir():
            raise KdkitError(f"data directory not found: {self.root}")
        # hidden folders (.ipynb_checkpoints, .git) are not classes
        present = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not is_hidden(e.name))
        if classes is None:
            if not present:
                raise KdkitError(f"no class folders in {self.root} (expected {self.root}/<class>/<image>)")
            classes = present
        self.classes = list(classes)
        mapping = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(present) - set(self.classes))
        if unknown:
            raise KdkitError(f"{self.root} has class folders the label space lacks: {unknown[:5]}")
        self.ignored_files = 0

        def is_image(path: str) -> bool:
            ok = is_image_file(path, self.root)  # the rest is ignored and counted
            self.ignored_files += not ok
            return ok

        self.samples, self.repeated_folders, self.dangling_links = list_images(
            self.root, {c: i for c, i in mapping.items() if c in present}, is_image)
        if strict and self.dangling_links:
            raise KdkitError(f"{len(self.dangling_links)} symlinks point to nothing, e.g. {self.dangling_links[0]}")
        if not len(self.samples):
            raise KdkitError(f"no images found in {self.root} (looked for {', '.join(IMG_EXTENSIONS)})")
        self.targets = self.samples.targets
        counts = np.bincount(self.targets, minlength=len(self.classes))
        self.empty_classes = [c for c in sorted(present) if counts[mapping[c]] == 0]
        if strict and self.empty_classes:
            raise KdkitError(f"{self.root} has class folders without images: {self.empty_classes[:5]} "
                             f"(without --strict they stay classes with no samples, with a warning)")

    def issues(self) -> dict:
        found = {"empty_classes": self.empty_classes, "ignored_files": self.ignored_files}
        if self.dangling_links:  # listed in the run summary, each by name
            found["dangling_links"] = self.dangling_links
        if self.repeated_folders:
            found["folders_reached_again"] = self.repeated_folders
        return found

    def fingerprint(self) -> str:
        """sha256 over the (relative path, size, class) of every file, in order."""
        h = hashlib.sha256()
        for i in range(len(self.samples)):
            rel = self.samples.relpath(i)
            h.update(f"{rel}|{os.path.getsize(os.path.join(self.root, rel))}|{int(self.targets[i])}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return read_image_file(path), target

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    def encoded(self, index: int) -> tuple[bytes, str]:
        path = self.samples[index][0]
        with open(path, "rb") as f:
            return f.read(), path.rpartition(".")[2].lower()


EVAL_SPLITS = ("val", "validation", "test")  # the names an evaluation split goes by, in the order tried


def hf_split(ds, split: str, what: str, labeled: bool = True):
    """Split `split` of a DatasetDict ("auto-eval": the first of val, validation, test it has; for
    unlabeled images, its only split whatever its name). `what` names it in the error."""
    names = list(ds)
    if split == "auto-eval":
        split = next((s for s in EVAL_SPLITS if s in ds), None) or ""
    if not labeled and split not in ds and len(names) == 1:
        split = names[0]  # unlabeled images: the only split, whatever its name
    if split not in ds:
        raise KdkitError(f"{what} has no split {split!r}; it has {names}")
    return ds[split]


# the label column names tried when neither a ClassLabel column nor --target-key names one
LABEL_KEYS = ("label", "labels", "cls", "class", "target", "fine_label")


class HFImageDataset(SeededDataset):
    """A Hugging Face `datasets` split with an Image column and a label column: a ClassLabel, or
    integer or string values (timm's `--input-key` / `--target-key` name them; default: the Image
    column, then the ClassLabel column or the first of LABEL_KEYS present).

    classes: the label space. Default: the ClassLabel's names; for integers "0".."C-1" (C = the
    largest + 1); for strings the sorted distinct values. Given (the training split's, or a
    `--class-map`), integer labels index it and string labels are looked up in it.
    labeled=False reads the Image column only (any label column is ignored): every target is -1.
    """

    def __init__(self, ds, transform: Callable | None = None, image_key: str | None = None,
                 label_key: str | None = None, seed: int = 0, strict: bool = False, labeled: bool = True,
                 classes: list[str] | None = None):
        super().__init__(transform, seed, strict)
        from datasets import ClassLabel
        from datasets import Image as HFImage

        feats = ds.features
        for key, what in ((image_key, "--input-key"), (label_key if labeled else None, "--target-key")):
            if key and key not in feats:
                raise KdkitError(f"{what} {key!r} is not a column of the dataset; it has {list(feats)}")
        self.image_key = image_key or next((k for k, f in feats.items() if isinstance(f, HFImage)), None)
        self.label_key = None
        if labeled:
            self.label_key = label_key or next((k for k, f in feats.items() if isinstance(f, ClassLabel)), None) \
                or next((k for k in LABEL_KEYS if k in feats), None)
        if self.image_key is None or (labeled and self.label_key is None):
            needs = "an Image column and a label column (--input-key / --target-key name them)" if labeled \
                else "an Image column (--input-key names it)"
            raise KdkitError(f"dataset needs {needs}; it has {dict(feats)}")
        self.ds = ds
        if len(ds) == 0:
            raise KdkitError("the dataset split is empty")
        if not labeled:
            self.classes, self.targets = list(classes or []), np.full(len(ds), -1, np.int64)
            return
        self.classes, self.targets = label_space(ds[self.label_key], feats[self.label_key], classes, self.label_key)

    def fingerprint(self) -> str:
        return hashlib.sha256(str(getattr(self.ds, "_fingerprint", "")).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, index: int) -> tuple[Image.Image, int]:
        return self.ds[index][self.image_key], int(self.targets[index])

    def encoded(self, index: int) -> tuple[bytes, str]:
        from datasets import Image as HFImage

        # the column's stored bytes (an undecoded view of the same table: no copy)
        raw = self.ds.cast_column(self.image_key, HFImage(decode=False))[index][self.image_key] \
            if isinstance(self.ds.features[self.image_key], HFImage) else None
        if raw and raw.get("bytes"):
            kind = Image.open(io.BytesIO(raw["bytes"])).format or "PNG"
            return raw["bytes"], {"JPEG": "jpg"}.get(kind, kind.lower())
        return super().encoded(index)


def label_space(values, feature, classes: list[str] | None, key: str) -> tuple[list[str], np.ndarray]:
    """(classes, (N,) int64 targets) of a label column: see HFImageDataset for the rules."""
    from datasets import ClassLabel

    names = list(feature.names) if isinstance(feature, ClassLabel) else None
    values = list(values)
    if values and isinstance(values[0], str):
        classes = list(classes) if classes is not None else sorted(set(values))
        lookup = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(values) - set(lookup))
        if unknown:
            raise KdkitError(f"label column {key!r} has classes outside the label space: {unknown[:5]}")
        return classes, np.fromiter((lookup[v] for v in values), np.int64, len(values))
    try:
        targets = np.asarray(values, np.int64)
    except (TypeError, ValueError):
        raise KdkitError(f"label column {key!r} holds neither class indices nor class names") from None
    classes = list(classes) if classes is not None else names or [str(i) for i in range(int(targets.max()) + 1)]
    if targets.min() < 0 or targets.max() >= len(classes):
        raise KdkitError(f"label column {key!r} has class index {int(targets.max())} (or a negative one), "
                         f"outside the {len(classes)} classes of the label space")
    return classes, targets
