"""From drawn samples to a batch: the samples' pixels stacked, then their views' last steps over the
whole batch (normalise, random erasing, Mixup/CutMix), in the loader worker (`collate`) or on the
training device (`collate(..., finish=False)`, then `finish_batch` there: timm's prefetcher habit,
with erasing and the mixing moved as well). Both give the same pixels: each step is the same
elementwise float32 arithmetic as timm's per-image code, so on the CPU they are bit for bit those of
timm's ToTensor + Normalize, RandomErasing and Mixup applied view by view."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import default_collate, get_worker_info

from kdkit.data.mixup import Mixing
from kdkit.data.transforms import RawView


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An empty tensor, in shared memory inside a loader worker (so that sending it copies nothing,
    as default_collate does), in the heap otherwise."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).resize_(shape)


def plan_batch(images: list, mixings: list[Mixing | None], send: bool = False) -> tuple[Tensor, dict]:
    """(R, 3, H, W) pixels and the plan that finishes them into the batch's B = len(images) views.

    images: RawViews (uint8, normalised and erased by the plan) or finished (3, H, W) tensors;
    mixings: how each is mixed. The partners of the batch's views are its own rows; a partner
    outside the batch (its pair split by a batch boundary) is appended as an extra row. The plan:
    rows B; shift, scale (3,) (for RawViews); erase (E, 5) [row, top, bottom, left, right] with
    erase_fill (all fills, flat) and erase_shape (E, 3); mix (M, 6) [row, partner row, top, bottom,
    left, right] (box -1: blend) with mix_weight (M, 2) float32 [λ, 1 - λ] (1 - λ taken in double,
    as timm does). send: the pixels leave the loader worker unfinished (stacked into shared memory)."""
    rows = {id(x): r for r, x in enumerate(images)}
    order = list(images)
    for m in mixings:
        if m is not None and id(m.partner) not in rows:
            rows[id(m.partner)] = len(order)
            order.append(m.partner)
    raw = isinstance(order[0], RawView)
    stacked = [x.pixels for x in order] if raw else order
    # into shared memory inside a worker when they leave it as they are (finished views, or sent)
    pixels = default_collate(stacked) if send or not raw else torch.stack(stacked)
    plan: dict = {"rows": len(images)}
    if raw:
        norm = order[0].norm
        plan.update(shift=norm.shift.view(-1), scale=norm.scale.view(-1))
        erases = [(r, *box) for r, x in enumerate(order) for box in x.erase]
        plan["erase"] = torch.tensor([e[:5] for e in erases], dtype=torch.long).view(-1, 5)
        plan["erase_shape"] = torch.tensor([tuple(e[5].shape) for e in erases], dtype=torch.long).view(-1, 3)
        plan["erase_fill"] = torch.cat([e[5].reshape(-1) for e in erases]) if erases else torch.zeros(0)
    mixed = [(r, m) for r, m in enumerate(mixings) if m is not None]
    plan["mix"] = torch.tensor([(r, rows[id(m.partner)], *(m.box or (-1, -1, -1, -1))) for r, m in mixed],
                               dtype=torch.long).view(-1, 6)
    plan["mix_weight"] = torch.tensor([(m.lam, 1.0 - m.lam) for _, m in mixed], dtype=torch.float32).view(-1, 2)
    return pixels, plan


def finish_batch(pixels: Tensor, plan: dict, device: torch.device | None = None, by_row: bool | None = None) -> Tensor:
    """The (B, 3, H, W) float32 views of a planned batch (plan_batch), computed on `device` (default:
    where `pixels` are; in a loader worker, into shared memory). by_row: each step row by row, in
    place (default: on the CPU), else over the whole batch at once (the same values either way)."""
    device = pixels.device if device is None else device
    pixels = pixels.to(device, non_blocking=True)
    # On the CPU each step runs row by row, in place: a broadcast over the batch there is twice as slow,
    # and whole-batch temporaries fault in fresh pages. On a GPU one kernel serves the batch. Either
    # way every value is the same float32 arithmetic.
    by_row = device.type == "cpu" if by_row is None else by_row
    # normalise: (x / 255 - mean) / std as one multiply-add per pixel (ToNormalizedTensor's)
    if "shift" in plan:
        shift, scale = plan["shift"].to(device).view(-1, 1, 1), plan["scale"].to(device).view(-1, 1, 1)
        if by_row:
            x = _shared_empty(tuple(pixels.shape), torch.float32) if device.type == "cpu" else torch.empty_like(
                pixels, dtype=torch.float32)
            for r in range(len(pixels)):
                torch.addcmul(shift, pixels[r], scale, out=x[r])
        else:
            x = torch.addcmul(shift, pixels, scale)
        # random erasing: each box's fill written in, in the order drawn
        fills = plan["erase_fill"].to(device, non_blocking=True)
        at = 0
        for (r, top, bottom, left, right), shape in zip(plan["erase"].tolist(), plan["erase_shape"].tolist(),
                                                        strict=True):
            n = shape[0] * shape[1] * shape[2]
            x[r, :, top:bottom, left:right] = fills[at:at + n].view(shape)
            at += n
    else:
        x = pixels  # finished views, stacked into a tensor of the batch's own
    # Mixup/CutMix: x_r λ + x_p (1 - λ), or the partner's box; what is read from a partner is taken
    # before any row is written
    mix, weights = plan["mix"].tolist(), plan["mix_weight"].tolist()
    blend = {k for k, m in enumerate(mix) if m[2] < 0}
    if blend and not by_row:
        at = sorted(blend)
        rows, partners = plan["mix"][at, 0].to(device), plan["mix"][at, 1].to(device)
        w = plan["mix_weight"][at].to(device).view(-1, 2, 1, 1, 1)
        x[rows] = x[rows] * w[:, 0] + x[partners] * w[:, 1]
        blend = set()
    taken = {}
    for k, (_, p, top, bottom, left, right) in enumerate(mix):
        if top >= 0:
            taken[k] = x[p, :, top:bottom, left:right].clone()
        elif k in blend:
            taken[k] = x[p] * weights[k][1]
    for k, part in taken.items():
        r, _, top, bottom, left, right = mix[k]
        if top < 0:
            x[r].mul_(weights[k][0]).add_(part)
        else:
            x[r, :, top:bottom, left:right] = part
    return x[:plan["rows"]]


def collate(samples: list[dict], finish: bool = True) -> dict:
    """Stack the readable samples; count the unreadable ones under "skipped" and name them under
    "skipped_names" (their paths, or shard members). target is (B,) int64 class indices, or (B, K)
    float soft targets under Mixup/CutMix; epoch is the batch's view epoch. images: the (B, 3, H, W)
    float32 views; with finish False, the (R, 3, H, W) pixels of plan_batch instead (R >= B), and
    "finish" holds the plan, for finish_batch on the training device."""
    good = [s for s in samples if s["image"] is not None]
    epoch = samples[0]["epoch"] if samples else 0
    names = [s.get("source") or f"sample {s['index']}" for s in samples if s["image"] is None]
    if not good:
        return {"images": None, "target": None, "index": None, "skipped": len(samples), "skipped_names": names,
                "epoch": epoch}
    targets = [s["target"] for s in good]
    pixels, plan = plan_batch([s["image"] for s in good], [s.get("mix") for s in good], send=not finish)
    batch = {
        "images": finish_batch(pixels, plan) if finish else pixels,
        "target": default_collate(targets) if isinstance(targets[0], torch.Tensor) else torch.tensor(targets),
        "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "skipped": len(samples) - len(good),
        "skipped_names": names,
        "epoch": epoch,
    }
    return batch if finish else {**batch, "finish": plan}


def batch_images(raw: dict, device: torch.device) -> Tensor:
    """A collated batch's (B, 3, H, W) views on `device`: finished there if the collate left them
    unfinished (raw["finish"]), moved there otherwise."""
    if "finish" in raw:
        return finish_batch(raw["images"], raw["finish"], device)
    return raw["images"].to(device, non_blocking=True)


def finish_samples(samples: list[dict]) -> list[dict]:
    """Drawn samples (a dataset's __getitems__) with their views finished one by one: the images the
    loader's batches hold, for code that reads samples without a loader."""
    out = []
    for s in samples:
        sample = {k: v for k, v in s.items() if k != "mix"}
        if isinstance(s["image"], RawView) or s.get("mix") is not None:  # else: nothing left to do
            pixels, plan = plan_batch([s["image"]], [s.get("mix")])
            sample["image"] = finish_batch(pixels, plan)[0]
        out.append(sample)
    return out
