"""Data-pipeline throughput per core: kdkit's training loader against timm's stock pipeline.

    python bench/data_pipeline.py [--settings 32 224] [--rounds 3] [--images N] [--json PATH]

Both pipelines run in this one process, one after the other, with no loader workers
(num_workers=0) and one torch thread (--threads), so samples/s is the rate of one core. After a
short warm-up (--warmup batches of each), every round times one pass of each pipeline (a whole
epoch, or --batches batches), the order alternating from round to round (kdkit first in even
rounds, timm first in odd ones) so that drift of a shared machine falls on both. Reported per
pipeline: median, min and max samples/s over rounds (samples = batches x batch size, incomplete
batches dropped by both), and kdkit / timm as the ratio of medians and the median of the
per-round ratios.

Settings:
  32   CIFAR-10 JPEGs (32x32) from /work/shared/data/cifar10-jpg.tar.gz, the first --images training
       images (class-balanced); RandomResizedCrop(32, scale 0.35-1) + hflip 0.5, bicubic.
  224ra  the 224 setting with DeiT's 3 repeats: timm's RepeatAugSampler against kdkit's sampler
       (repeats of an image in one batch decoded once), kdkit also from tar shards of the same files.
  224ra-photo  224ra on files with Gaussian texture (sigma 26) as large as ImageNet's (~110 KB).
  224  --images-224 CIFAR-10 training images upscaled (bicubic) to 500x375 and saved as JPEG quality
       90 (ImageNet-sized files); DeiT's augmentation: RandomResizedCrop(224, scale 0.08-1),
       hflip 0.5, RandAugment rand-m9-mstd0.5-inc1, color jitter 0.3 (timm turns it off under
       RandAugment, in both pipelines), random erasing 0.25 (pixel), bicubic; Mixup 0.8 / CutMix
       1.0, prob 1, switch 0.5, label smoothing 0.1.

timm: torchvision ImageFolder + timm.data.create_transform(...), DataLoader(batch 64, shuffle,
drop_last), and for 224 timm's Mixup on each collated batch as timm's train.py applies it (its
time counts): train.py's CPU path (--no-prefetcher). At 224 px also timm-prefetcher: the CPU's share
of train.py's default GPU path (uint8 batches, FastCollateMixup in the collate; normalisation and
random erasing left to the GPU, untimed), the baseline a GPU user's loader is up against, and
kdkit-prefetcher: kdkit's loader as it trains on a GPU (uint8 batches; normalisation, erasing and
Mixup/CutMix left to the GPU, untimed). kdkit: open_dataset + with_views(view_settings(data_cfg,
AugConfig)) + create_loader;
each epoch is entered the trainer's way (kdkit.engine.checkpoint.seek: sampler and dataset epoch).
Note: recent Pillow refuses posterize(0), which DeiT's inc1 RandAugment asks for at its top
magnitude; kdkit's transforms give those ops the black image the policy means
(kdkit.data.transforms.fix_posterize), and timm's pipeline here gets the same fix.

Data is prepared once under --cache-dir (default $KDKIT_BENCH_CACHE or ~/.cache/kdkit-bench) and
reused. Prints a table and JSON (stdout); writes --json (default bench/results/data_pipeline.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, kdkit_source  # noqa: E402

TARBALL = Path("/work/shared/data/cifar10-jpg.tar.gz")
BATCH = 64
UPSCALED = (500, 375)  # width x height, an ImageNet-typical 4:3 image
JPEG_QUALITY = 90
DEIT_AUG = dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25,
                mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1)
SETTINGS = {
    "32": {"size": 32, "aug": dict(scale=(0.35, 1.0), hflip=0.5)},
    "224": {"size": 224, "aug": DEIT_AUG},
    # DeiT's whole recipe: its augmentation and 3 repeats (timm: RepeatAugSampler, each repeat decoded
    # again; kdkit: EpochSampler, the repeats in one batch decoded once); kdkit from the folder and
    # from tar shards written from it
    "224ra": {"size": 224, "aug": DEIT_AUG, "repeats": 3, "shards": True},
    # the same on files as large as ImageNet's (~110 KB a JPEG; the smooth upscaled files above are
    # ~17 KB, and decoding cost grows with the entropy-coded bytes): Gaussian texture, sigma 26
    "224ra-photo": {"size": 224, "aug": DEIT_AUG, "repeats": 3, "shards": True, "noise": 26.0},
}


# --- data -------------------------------------------------------------------------------------------

def unpacked_cifar(cache: Path, tarball: Path) -> Path:
    """cifar10/ (train/ and test/ of class folders), unpacked once under `cache` (into a temporary
    folder first, renamed when complete, so an interrupted unpack is never taken for a finished one)."""
    root = cache / "cifar10"
    if (root / "train").is_dir():
        return root
    if not tarball.is_file():
        sys.exit(f"error: {tarball} not found (the CIFAR-10 JPEG tarball; pass --tarball)")
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache, prefix=".unpack-") as tmp:
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        if not (Path(tmp) / "cifar10" / "train").is_dir():
            sys.exit(f"error: {tarball} has no cifar10/train/ folder")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(Path(tmp) / "cifar10", root)
    print(f"unpacked {tarball} into {cache} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return root


def balanced_files(train: Path, n: int) -> list[tuple[str, Path]]:
    """n files, class-balanced: the first n // C (sorted) of each of the C class folders, one more
    in the first n % C classes; as (class, path) pairs."""
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    picked = []
    for i, c in enumerate(classes):
        want = n // len(classes) + (i < n % len(classes))
        files = sorted((train / c).iterdir())[:want]
        if len(files) < want:
            sys.exit(f"error: {train / c} has {len(files)} images, fewer than the {want} asked for")
        picked += [(c, f) for f in files]
    return picked


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _upscale(job: tuple[Path, Path, float]) -> None:
    src, dst, noise = job
    with Image.open(src) as img:
        img = img.convert("RGB").resize(UPSCALED, Image.BICUBIC)
    if noise:  # texture, so that a file is as large (and as costly to decode) as an ImageNet photo
        import zlib

        import numpy as np

        a = np.asarray(img, np.float32) + np.random.default_rng(zlib.crc32(dst.name.encode())).normal(0, noise, (
            UPSCALED[1], UPSCALED[0], 3))
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    img.save(dst, "JPEG", quality=JPEG_QUALITY)


def prepared(cache: Path, cifar: Path, size: int, n: int, noise: float = 0.0) -> Path:
    """An ImageFolder root (ROOT/train/<class>/*.jpg) of n class-balanced CIFAR-10 training images:
    the 32x32 files themselves (size <= 64, hard links) or 500x375 upscaled JPEGs (size 224);
    built in a temporary folder and renamed when complete, then reused."""
    tag = f"cifar10-{n}" if size <= 64 else f"cifar10-{n}-{UPSCALED[0]}x{UPSCALED[1]}-q{JPEG_QUALITY}" + (
        f"-noise{noise:g}" if noise else "")
    root = cache / tag
    if (root / "train").is_dir():
        return root
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{tag}-") as tmp:
        jobs = []
        for c, src in balanced_files(cifar / "train", n):
            (Path(tmp) / "train" / c).mkdir(parents=True, exist_ok=True)
            jobs.append((src, Path(tmp) / "train" / c / src.name, noise))
        if size <= 64:
            for src, dst, _ in jobs:
                _link(src, dst)
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max(min(os.cpu_count() or 1, 16), 1)) as pool:
                list(pool.map(_upscale, jobs, chunksize=16))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
        os.chmod(root, 0o755)  # mkdtemp made it private
        Path(tmp).mkdir()  # for TemporaryDirectory's own clean-up
    print(f"prepared {len(jobs)} images in {root} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return root


# --- the two pipelines ------------------------------------------------------------------------------

def aug_config(aug: dict, repeats: int = 0) -> dict:
    """kdkit's AugConfig for these settings, as the dict view_settings takes."""
    from kdkit.config import AugConfig

    return dataclasses.asdict(AugConfig(**aug, repeated_aug=repeats, interpolation="bicubic"))


def sharded(cache: Path, root: Path) -> Path:
    """`root`'s training images written once as tar shards (kdkit shards: the same bytes), reused."""
    out = cache / f"{root.name}-wds"
    if not (out / "_info.json").is_file():
        from kdkit.data import open_dataset
        from kdkit.data.shard_writer import write_shards

        write_shards({"train": open_dataset(root, "train")}, out, shard_size=256)
    return out


class KdkitPipeline:
    name = "kdkit"
    finish_on_device = False

    def __init__(self, root: Path, size: int, aug: dict, repeats: int = 0):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        from kdkit.data import create_loader, open_dataset, view_settings, with_views

        self.ds = open_dataset(root, "train", seed=0)
        data_cfg = {"input_size": (3, size, size), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
                    "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0}
        self.views = view_settings(data_cfg, aug_config(aug, repeats))
        self.ds = with_views(self.ds, self.views, len(self.ds.classes))
        on_device = {"finish_on_device": True} if self.finish_on_device else {}  # (older kdkit: no such option)
        self.loader = create_loader(self.ds, BATCH, training=True, workers=0, seed=0, repeated_aug=repeats,
                                    **on_device)
        self.epoch = 0

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch (the next one) of (images, target) batches, entered as the trainer enters it."""
        try:
            from kdkit.data.sampler import seek
        except ImportError:  # the trainer's helper moved: do what it did
            def seek(loader, epoch, step=0):
                loader.sampler.set_epoch(epoch)
                loader.dataset.set_epoch(epoch)
        seek(self.loader, self.epoch)
        self.epoch += 1
        for raw in self.loader:
            if raw["images"] is not None:
                yield raw["images"], raw["target"]

    def describe(self) -> dict:
        return {"views": self.views, "samples": len(self.ds), "batches_per_epoch": len(self.loader),
                "source": type(self.ds).__name__}


class KdkitShardsPipeline(KdkitPipeline):
    name = "kdkit-shards"


class KdkitPrefetcherPipeline(KdkitPipeline):
    """kdkit's loader as it runs for training on a GPU (data.prefetcher, the default there): uint8
    batches and a plan, which the GPU finishes (normalise, erase, Mixup/CutMix: untimed here, as
    timm-prefetcher's normalising and erasing)."""

    name = "kdkit-prefetcher"
    finish_on_device = True


class KdkitShardsPrefetcherPipeline(KdkitPrefetcherPipeline):
    name = "kdkit-shards-prefetcher"


class TimmPipeline:
    name = "timm"

    def __init__(self, root: Path, size: int, aug: dict, repeats: int = 0):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        from kdkit.data.transforms import fix_posterize

        self.settings = dict(input_size=size, is_training=True, scale=tuple(aug["scale"]), hflip=aug["hflip"],
                             color_jitter=aug.get("color_jitter") or None, auto_augment=aug.get("auto_augment") or None,
                             re_prob=aug.get("reprob", 0.0), re_mode="pixel", interpolation="bicubic",
                             mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        # Pillow >= 10 refuses inc1's posterize to 0 bits: timm's pipeline gets kdkit's fix of that op
        self.ds = ImageFolder(str(root / "train"), transform=fix_posterize(create_transform(**self.settings)))
        self.sampler = None
        if repeats > 1:  # timm's train.py with --aug-repeats: its RASampler, one process
            from timm.data.distributed_sampler import RepeatAugSampler

            self.sampler = RepeatAugSampler(self.ds, num_replicas=1, rank=0, num_repeats=repeats)
        self.loader = DataLoader(self.ds, batch_size=BATCH, shuffle=self.sampler is None, sampler=self.sampler,
                                 drop_last=True, num_workers=0, pin_memory=torch.cuda.is_available(),
                                 generator=torch.Generator().manual_seed(0))
        self.epoch = 0
        self.mixup = None
        if aug.get("mixup", 0) > 0 or aug.get("cutmix", 0) > 0:
            self.mixup = Mixup(mixup_alpha=aug["mixup"], cutmix_alpha=aug["cutmix"], prob=aug["mixup_prob"],
                               switch_prob=aug["mixup_switch_prob"], mode="batch",
                               label_smoothing=aug["label_smoothing"], num_classes=len(self.ds.classes))

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for images, target in self.loader:
            if self.mixup is not None:
                images, target = self.mixup(images, target)
            yield images, target

    def describe(self) -> dict:
        s = {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings.items()}
        return {"create_transform": s, "mixup": self.mixup is not None, "samples": len(self.ds),
                "batches_per_epoch": len(self.loader), "sampler": type(self.sampler).__name__}


class TimmPrefetcherPipeline(TimmPipeline):
    """timm's GPU pipeline, the CPU's share of it: train.py's default --prefetcher path. The
    transform stops at uint8 arrays (create_transform(use_prefetcher=True)), batches are collated
    as uint8 with Mixup/CutMix done in the collate (FastCollateMixup, as train.py builds it), and
    normalisation and random erasing run on the GPU (PrefetchLoader), so they are not timed here.
    Repeats: RepeatAugSampler, each repeat decoded again."""

    name = "timm-prefetcher"

    def __init__(self, root: Path, size: int, aug: dict, repeats: int = 0):
        from timm.data import FastCollateMixup, create_transform
        from timm.data.loader import fast_collate
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        from kdkit.data.transforms import fix_posterize

        super().__init__(root, size, aug, repeats)
        self.settings = {**self.settings, "use_prefetcher": True}
        self.ds = ImageFolder(str(root / "train"), transform=fix_posterize(create_transform(**self.settings)))
        collate = fast_collate
        if self.mixup is not None:
            collate = FastCollateMixup(mixup_alpha=aug["mixup"], cutmix_alpha=aug["cutmix"], prob=aug["mixup_prob"],
                                       switch_prob=aug["mixup_switch_prob"], label_smoothing=aug["label_smoothing"],
                                       num_classes=len(self.ds.classes))
            self.mixup = None  # done in the collate
        if self.sampler is not None:
            from timm.data.distributed_sampler import RepeatAugSampler

            self.sampler = RepeatAugSampler(self.ds, num_replicas=1, rank=0, num_repeats=repeats)
        self.loader = DataLoader(self.ds, batch_size=BATCH, shuffle=self.sampler is None, sampler=self.sampler,
                                 drop_last=True, num_workers=0, collate_fn=collate,
                                 generator=torch.Generator().manual_seed(0))


def timed_pass(pipe, max_batches: int) -> tuple[float, int, tuple]:
    """(seconds, samples) of one epoch of `pipe` (or its first max_batches batches) and the first
    batch's (image shape, target shape)."""
    samples, shapes = 0, ()
    start = time.perf_counter()
    for i, (images, target) in enumerate(pipe.batches()):
        samples += images.shape[0]
        if not shapes:
            shapes = (tuple(images.shape), tuple(target.shape))
        if max_batches and i + 1 >= max_batches:
            break
    return time.perf_counter() - start, samples, shapes


def warm_up(pipe, batches: int) -> None:
    for i, _ in enumerate(pipe.batches()):
        if i + 1 >= batches:
            break


def measure(name: str, root: Path, size: int, aug: dict, rounds: int, warmup: int, batches: int,
            log: Callable[[str], None], repeats: int = 0, shards: Path | None = None) -> dict:
    torch.manual_seed(0)
    pipes = [KdkitPipeline(root, size, aug, repeats), TimmPipeline(root, size, aug, repeats)]
    if shards is not None:
        pipes.insert(1, KdkitShardsPipeline(shards, size, aug, repeats))
    if size >= 224:  # what GPU training asks of the CPU (normalisation and erasing, for kdkit also mixing, on the GPU)
        pipes.append(TimmPrefetcherPipeline(root, size, aug, repeats))
        pipes.insert(-2, KdkitPrefetcherPipeline(root, size, aug, repeats))
        if shards is not None:
            pipes.insert(-2, KdkitShardsPrefetcherPipeline(shards, size, aug, repeats))
    for p in pipes:
        warm_up(p, warmup)
    rates: dict[str, list[float]] = {p.name: [] for p in pipes}
    seconds: dict[str, list[float]] = {p.name: [] for p in pipes}
    shapes: dict[str, list] = {}
    samples_per_pass: dict[str, int] = {}
    for r in range(rounds):
        for p in pipes if r % 2 == 0 else pipes[::-1]:
            s, n, shp = timed_pass(p, batches)
            if n == 0:
                sys.exit(f"error: the {p.name} pipeline delivered no batch of {BATCH} (too few images?)")
            rates[p.name].append(n / s)
            seconds[p.name].append(s)
            shapes[p.name], samples_per_pass[p.name] = [list(x) for x in shp], n
            log(f"  [{name} px] round {r + 1}/{rounds} {p.name:5s}: {n} samples in {s:.2f} s = {n / s:,.1f} /s")
    stats = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
             for k, v in rates.items()}
    paired = {p.name: [a / b for a, b in zip(rates[p.name], rates["timm"], strict=True)] for p in pipes}
    return {"img_size": size, "images": len(pipes[0].ds), "batch_size": BATCH, "samples_per_pass": samples_per_pass,
            "warmup_batches": warmup, "rounds": rounds, "repeats": repeats, "samples_per_s": stats,
            "seconds": seconds, "ratio_kdkit_over_timm": stats["kdkit"]["median"] / stats["timm"]["median"],
            "ratio_paired_median": statistics.median(paired["kdkit"]), "ratio_paired": paired["kdkit"],
            "ratios_over_timm": {k: {"of_medians": stats[k]["median"] / stats["timm"]["median"],
                                     "paired_median": statistics.median(v)} for k, v in paired.items()},
            **({"kdkit_over_timm_prefetcher": {
                k: statistics.median(a / b for a, b in zip(rates[k], rates["timm-prefetcher"], strict=True))
                for k in rates if k.startswith("kdkit")}} if "timm-prefetcher" in rates else {}),
            "batch_shapes": shapes, **{p.name: p.describe() for p in pipes}}


# --- report -----------------------------------------------------------------------------------------

def machine(threads: int) -> dict:
    import timm
    import torchvision

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable,
            "loadavg_at_start": load, "torch_threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "torchvision": torchvision.__version__, "pillow": Image.__version__}





def table(results: dict) -> Table:
    t = Table(title=f"data pipeline, samples/s on one core (batch {BATCH}, num_workers=0)")
    for col in ("setting", "pipeline", "median", "min", "max", "kdkit / timm", "kdkit / timm-prefetcher (paired)"):
        t.add_column(col, justify="left" if col in ("setting", "pipeline") else "right")
    for name, res in results.items():
        s = res["samples_per_s"]
        over_prefetcher = res.get("kdkit_over_timm_prefetcher", {})
        for i, p in enumerate(s):
            r = res["ratios_over_timm"][p]
            ratio = f"{r['of_medians']:.3f} (paired {r['paired_median']:.3f})" if p != "timm" else ""
            t.add_row(f"{name} px ({res['images']} img)" if i == 0 else "", p, f"{s[p]['median']:,.1f}",
                      f"{s[p]['min']:,.1f}", f"{s[p]['max']:,.1f}", ratio,
                      f"{over_prefetcher[p]:.3f}" if p in over_prefetcher else "")
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["32", "224"], choices=list(SETTINGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=5000, help="training images for the 32 px setting")
    p.add_argument("--images-224", type=int, default=512, help="upscaled images for the 224 px setting")
    p.add_argument("--batches", type=int, default=0, help="batches per timed pass (0: a whole epoch)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches of each pipeline first")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: per core)")
    p.add_argument("--cache-dir", default=os.environ.get("KDKIT_BENCH_CACHE", "~/.cache/kdkit-bench"))
    p.add_argument("--tarball", default=str(TARBALL))
    p.add_argument("--json", default="bench/results/data_pipeline.json")
    p.add_argument("--label", default="", help="a note stored in the JSON (e.g. which kdkit this measures)")
    args = p.parse_args()
    if args.rounds < 1 or args.images < BATCH or args.images_224 < BATCH:
        sys.exit(f"error: --rounds must be >= 1 and --images/--images-224 >= {BATCH}")
    torch.set_num_threads(args.threads)
    err = Console(stderr=True)
    cache = Path(args.cache_dir).expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "kdkit-bench"
        cache.mkdir(parents=True, exist_ok=True)
    info = machine(args.threads)
    cifar = unpacked_cifar(cache, Path(args.tarball))
    import kdkit.data  # noqa: F401  (its Posterize fix applies to both pipelines: see the docstring)

    results = {}
    start = time.perf_counter()
    for name in args.settings:
        cfg = SETTINGS[name]
        n = args.images if cfg["size"] <= 64 else args.images_224
        root = prepared(cache, cifar, cfg["size"], n, cfg.get("noise", 0.0))
        results[name] = measure(name, root, cfg["size"], cfg["aug"], args.rounds, args.warmup, args.batches,
                                lambda s: err.print(s, highlight=False), cfg.get("repeats", 0),
                                sharded(cache, root) if cfg.get("shards") else None)
        results[name]["data"] = str(root)
        files = list((root / "train").rglob("*.jpg"))
        results[name]["mean_file_kb"] = sum(f.stat().st_size for f in files) / len(files) / 1024
    info["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = {"bench": "data_pipeline", "label": args.label, "kdkit": kdkit_source(), "machine": info, "seconds": time.perf_counter() - start,
           "command": "python bench/data_pipeline.py " + " ".join(sys.argv[1:]),
           "args": vars(args), "settings": results}
    Console(width=120).print(table(results))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
