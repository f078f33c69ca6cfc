"""Views finished on the training device against views finished by the loader worker.

    python bench/finish_on_device.py [--images 512] [--batch 256] [--size 224] [--json PATH]

kdkit's loader stops a view at uint8 pixels and finishes whole batches (normalise, random erasing,
Mixup/CutMix: kdkit.data.batch). On a CUDA device the trainer finishes them there (data.prefetcher).
This bench draws the same batches of DeiT's training views (RandAugment, erasing 0.25 pixel, Mixup
0.8 / CutMix 1.0, 3 repeats) from --images upscaled CIFAR-10 JPEGs (bench/data_pipeline.py's 224
set, made once under its cache) twice: finished on the CPU and finished on the device (CUDA if
present, else the CPU: then the two must be bit-identical). Reported: the largest absolute and
ulp-scaled difference, the share of bit-identical values, and the time to finish one batch on
each side (median of the batches, the device synchronised). Prints a table and JSON; writes --json
(default bench/results/finish_on_device.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, kdkit_source  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data", default="", help="an image folder with train/ (default: bench/data_pipeline.py's "
                   "224 px set of --images upscaled CIFAR-10 JPEGs, made once under its cache)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=6, help="batches compared (each timed on both sides)")
    p.add_argument("--json", default="bench/results/finish_on_device.json")
    args = p.parse_args()

    import data_pipeline as dp
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from kdkit.data import batch_images, create_loader, open_dataset, view_settings, with_views

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(args.data) if args.data else None
    if root is None:
        cache = Path(dp.os.environ.get("KDKIT_BENCH_CACHE", "~/.cache/kdkit-bench")).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        root = dp.prepared(cache, dp.unpacked_cifar(cache, dp.TARBALL), 224, args.images)
    data_cfg = {"input_size": (3, args.size, args.size), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
                "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0}
    ds = open_dataset(root, "train", seed=0)
    ds = with_views(ds, view_settings(data_cfg, dp.aug_config(dp.DEIT_AUG, 3)), len(ds.classes))
    # the trainer's loader on a GPU: uint8 batches and their plan (kdkit.data.batch.collate)
    loader = create_loader(ds, args.batch, training=True, workers=0, seed=0, finish_on_device=True)
    loader.sampler.set_epoch(0)
    worst, worst_rel, same, total, cpu_s, dev_s = 0.0, 0.0, 0, 0, [], []
    for i, raw in enumerate(loader):
        if i >= args.batches:
            break
        start = time.perf_counter()
        on_cpu = batch_images(raw, torch.device("cpu"))
        cpu_s.append(time.perf_counter() - start)
        if device.type == "cuda":
            raw = {**raw, "images": raw["images"].pin_memory()}
            torch.cuda.synchronize()
        start = time.perf_counter()
        on_device = batch_images(raw, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dev_s.append(time.perf_counter() - start)
        on_device = on_device.cpu()
        diff = (on_device - on_cpu).abs()
        worst = max(worst, diff.max().item())
        worst_rel = max(worst_rel, (diff / (torch.finfo(torch.float32).eps * on_cpu.abs().clamp_min(1e-3))).max().item())
        same += (on_device == on_cpu).sum().item()
        total += on_cpu.numel()
    if not cpu_s:
        sys.exit(f"error: {len(ds)} images make no batch of {args.batch}")
    res = {"bench": "finish_on_device", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "cpu_model": cpu_model(), "kdkit": kdkit_source(), "command": "python " + " ".join(sys.argv),
           "args": vars(args), "data": str(root), "batches": len(cpu_s), "max_abs_diff": worst,
           "max_diff_over_eps_x": worst_rel, "bit_identical_share": same / total,
           "finish_ms_cpu_median": 1e3 * statistics.median(cpu_s),
           "finish_ms_device_median": 1e3 * statistics.median(dev_s)}
    t = Table(title=f"finishing batches of {args.batch} views of {args.size} px: CPU ({res['cpu_model']}, one "
                    f"process) against {res['device']}")
    for col in ("max |diff|", "max |diff| / (eps |x|)", "bit-identical", "CPU ms/batch", "device ms/batch"):
        t.add_column(col, justify="right")
    t.add_row(f"{worst:.2e}", f"{worst_rel:.2f}", f"{100 * res['bit_identical_share']:.4f}%",
              f"{res['finish_ms_cpu_median']:.1f}", f"{res['finish_ms_device_median']:.2f}")
    Console().print(t)
    print(json.dumps(res))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
