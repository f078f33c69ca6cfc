"""The model table of the DeiT paper (Table 1): parameters, FLOPs per image, inference throughput.

FLOPs are counted on one image by kdkit.models.flops (matrix products, convolutions and
attention, fused kernels included), where one multiply-add is 2 FLOPs. The DeiT and T2T-ViT
papers and timm's tables report multiply-adds under the name "FLOPs": compare those with `gmacs`
(= gflops / 2): DeiT-Ti 1.25 (timm's table 1.26, the paper 1.3), Swin-T 4.49 (paper 4.5),
ResNet-50 4.09 (timm 4.1).

Throughput is images per second of inference (eval mode, `torch.inference_mode`, bf16 autocast on
CUDA) at the largest batch that fits, as in the DeiT paper: the batch doubles from 8 up to a cap
(1024 on CUDA, 64 on CPU so it finishes quickly) until CUDA runs out of memory. Warm-up passes are
excluded (3 passes on CUDA, 1 on CPU; plus the batch search's own passes); the result is the
median over timed passes (10 on CUDA, 3 on CPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from kdkit.models import create_model, model_data_config
from kdkit.models.flops import count_flops, count_params
from kdkit.models.student import eval_mode
from kdkit.registry import KdkitError

CUDA_BATCH_CAP, CPU_BATCH_CAP, FIRST_BATCH = 1024, 64, 8


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one synchronised forward pass."""
    _sync(x.device)
    start = time.perf_counter()
    with torch.inference_mode(), _autocast(x.device):
        model(x)
    _sync(x.device)
    return time.perf_counter() - start


def largest_batch(fits: Callable[[int], bool], cap: int, first: int = FIRST_BATCH) -> int:
    """The largest power-of-two batch up to `cap` for which `fits(batch)` holds, doubling from
    `first` (halving below it when even `first` does not fit)."""
    best, batch = 0, min(first, cap)
    while batch <= cap and fits(batch):
        best, batch = batch, batch * 2
    while not best and batch > 1:
        batch //= 2
        best = batch if fits(batch) else 0
    if not best:
        raise KdkitError("the model does not fit in memory even at batch 1")
    return best


def _fits(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> Callable[[int], bool]:
    """fits(batch): whether one forward pass at `batch` runs without CUDA running out of memory."""
    def fits(batch: int) -> bool:
        try:
            _forward(model, torch.randn(batch, *input_shape, device=device))
            return True
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return False

    return fits


def throughput(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, device: torch.device,
               warmup: int = 1, repeats: int = 3) -> float:
    """Images per second: batch_size / median seconds of `repeats` timed forward passes, after
    `warmup` untimed ones (kernel selection, allocator, caches)."""
    x = torch.randn(batch_size, *input_shape, device=device)
    for _ in range(warmup):
        _forward(model, x)
    seconds = [_forward(model, x) for _ in range(max(repeats, 1))]
    return batch_size / statistics.median(seconds)


def benchmark_model(model: str | nn.Module, img_size: int | None = None, batch_size: int | None = None,
                    num_classes: int = 1000, device: str | torch.device | None = None, warmup: int | None = None,
                    repeats: int | None = None, input_shape: tuple[int, ...] | None = None) -> dict:
    """One row of the table for a kdkit/timm model name (built without pretrained weights) or a module.

    img_size: input side (default: the model's pretrained config, 224 for most). input_shape: the
    per-sample input of a module that takes no images, e.g. (in_features,). batch_size None: the
    largest that fits (see largest_batch). warmup/repeats None: 3/10 on CUDA, 1/3 on CPU. Returns model, params,
    gflops (2 FLOPs per multiply-add), gmacs, input_shape, batch_size, images_per_s, device, dtype.
    """

    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise KdkitError(f"unknown device {device!r} (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdkitError("CUDA was asked for but no CUDA device is available")
    name = model if isinstance(model, str) else type(model).__name__
    net = create_model(model, num_classes, img_size=img_size) if isinstance(model, str) else model
    if input_shape is None:
        base = tuple(model_data_config(net)["input_size"]) if getattr(net, "pretrained_cfg", None) else (3, 224, 224)
        input_shape = (base[0], img_size, img_size) if img_size else base
    cuda = device.type == "cuda"
    warmup = (3 if cuda else 1) if warmup is None else warmup
    repeats = (10 if cuda else 3) if repeats is None else repeats
    net = net.to(device)
    with eval_mode(net):  # a model passed in keeps its own training mode
        flops = count_flops(net, input_shape, device)
        if batch_size is None:
            # Only CUDA runs out of memory; the CPU batch is a modest cap so the table comes quickly.
            batch_size = largest_batch(_fits(net, input_shape, device), CUDA_BATCH_CAP) if cuda else CPU_BATCH_CAP
        ips = throughput(net, input_shape, batch_size, device, warmup, repeats)
    return {"model": name, "params": count_params(net), "gflops": flops / 1e9, "gmacs": flops / 2e9,
            "input_shape": list(input_shape), "batch_size": batch_size, "images_per_s": ips,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "dtype": "bfloat16" if cuda else "float32"}


def benchmark(models: list[str], img_size: int | None = None, batch_size: int | None = None,
              num_classes: int = 1000, device: str | None = None, warmup: int | None = None,
              repeats: int | None = None) -> list[dict]:
    """benchmark_model for each name, one at a time (freeing GPU memory in between)."""
    rows = []
    for name in models:
        rows.append(benchmark_model(name, img_size, batch_size, num_classes, device, warmup, repeats))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows
