"""The order in which an epoch's views are drawn: a function of (seed, epoch) only, split over
processes so that one global batch holds the same views whatever the number of processes. With
unlabeled data (data/unlabeled.py), every step holds B labeled and MU * B unlabeled views.

Positions 2i and 2i + 1 of an epoch's order form a pair that Mixup/CutMix mixes in both
directions (`pair_partners`); every process takes a contiguous block of each global batch, so a
pair stays in one process's batch whenever that batch is even, and its two views are decoded once."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from kdkit.data.seeding import ORDER, UNLABELED_ORDER, sample_seed
from kdkit.registry import KdkitError


def view_epoch(epoch: int, view_cycle: int = 0) -> int:
    """The epoch whose views (and order) epoch `epoch` draws: itself, or with `view_cycle` E > 0 (a
    run replaying a cache's E epochs) epoch `epoch` mod E."""
    return epoch % view_cycle if view_cycle else epoch


def views_per_epoch(num_samples: int, repeats: int = 1, every_repeat: bool = False) -> int:
    """How many views an epoch draws: `num_samples` (DeiT's repeated augmentation keeps the epoch's
    length), or every repeat of every sample (FKD's crops: `repeats` x `num_samples`)."""
    return num_samples * repeats if every_repeat else num_samples


def epoch_views(num_samples: int, seed: int, epoch: int, repeats: int = 1, shuffle: bool = True,
                every_repeat: bool = False) -> torch.Tensor:
    """The global order of an epoch's view ids, (views_per_epoch(...),) int64.

    A view id is `index + r * num_samples` for the r-th repeat of sample `index`, so repeated
    augmentation (DeiT's RASampler: each drawn image `repeats` times, in a differently augmented
    view) draws distinct views; an epoch still draws `num_samples` views, as in DeiT, or with
    `every_repeat` all `repeats` views of every sample (FKD's several crops of each image, an epoch
    `repeats` times longer). Repeats come a pair at a time (A B A B A B ...), so the two views of a
    Mixup pair are never one image, and a batch holding an image's repeats decodes it once.
    """
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, 0, ORDER))
    order = torch.randperm(num_samples, generator=g) if shuffle else torch.arange(num_samples)
    if repeats > 1:
        even = num_samples // 2 * 2
        offsets = num_samples * torch.arange(repeats)
        pairs = order[:even].view(-1, 1, 2) + offsets.view(1, -1, 1)
        rest = order[even:].view(-1, 1) + offsets.view(1, -1)
        order = torch.cat([pairs.reshape(-1), rest.reshape(-1)])[:views_per_epoch(num_samples, repeats, every_repeat)]
    return order


def pair_partners(orders: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup pairs of the given orders: position 2i with 2i + 1 (an odd last position with itself).
    Returns (sorted view ids, the partner of each), for lookup by searchsorted."""
    views, partners = [], []
    for order in orders:
        position = torch.arange(len(order)) ^ 1
        position[position >= len(order)] = len(order) - 1
        views.append(order)
        partners.append(order[position])
    views, partners = torch.cat(views), torch.cat(partners)
    stored, perm = views.sort()
    return stored, partners[perm]


def split_steps(order: torch.Tensor, batch_size: int, num_replicas: int, rank: int) -> torch.Tensor:
    """Process `rank`'s views of `order`: its contiguous block of batch_size / num_replicas views in
    every full global batch of `batch_size` (a partial last batch is dropped), flattened."""
    steps = len(order) // batch_size
    return order[: steps * batch_size].view(steps, num_replicas, batch_size // num_replicas)[:, rank].reshape(-1)


class EpochSampler(Sampler[tuple[int, int]]):
    """Process `rank` of `num_replicas` draws its block of every global batch of `batch_size`
    (global) views of the epoch's order (`epoch_views`, with `repeats` and `every_repeat` as
    there): step s of every process together covers global positions [s * B, (s + 1) * B), as a
    single process would. Yields (epoch, view id). With `view_cycle` E > 0 (a run replaying a
    cache's E epochs), epoch e draws the order of epoch e % E, so it draws the views the cache holds.

    set_epoch(epoch, start) re-seeds the order and skips the first `start` views of this process
    (resuming mid-epoch without reading the skipped images).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 repeats: int = 1, shuffle: bool = True, *, every_repeat: bool = False, view_cycle: int = 0):
        if batch_size % num_replicas:
            raise KdkitError(f"batch_size {batch_size} is not divisible by {num_replicas} processes")
        self.num_samples, self.batch_size, self.seed, self.repeats = num_samples, batch_size, seed, repeats
        self.num_replicas, self.rank, self.shuffle = num_replicas, rank, shuffle
        self.every_repeat, self.view_cycle = every_repeat, view_cycle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        views = views_per_epoch(self.num_samples, self.repeats, self.every_repeat)
        return views // self.batch_size * (self.batch_size // self.num_replicas) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_views(self.num_samples, self.seed, view_epoch(self.epoch, self.view_cycle), self.repeats,
                            self.shuffle, self.every_repeat)
        mine = split_steps(order, self.batch_size, self.num_replicas, self.rank)
        return ((self.epoch, v) for v in mine[self.start :].tolist())


def unlabeled_per_epoch(num_labeled: int, ratio: float) -> int:
    """Unlabeled views an epoch (one pass over the labeled data) draws at most: floor(MU * N_l)."""
    return math.floor(ratio * num_labeled + 1e-9)


def unlabeled_views(num_labeled: int, num_unlabeled: int, count: int, seed: int, epoch: int) -> torch.Tensor:
    """The `count` unlabeled view ids epoch `epoch` draws, in order, (count,) int64.

    The unlabeled images form one stream that continues across epochs: its pass q visits them in a
    permutation seeded by (seed, q), and epoch e takes stream positions [e * count, (e + 1) * count).
    Unlabeled sample j has view id N_l + j; an image the epoch draws again (the stream wrapped
    within it) gets the next repeat's id, N_l + j + r * (N_l + N_u), so an epoch's view ids are distinct.
    """
    total = num_labeled + num_unlabeled
    position = torch.arange(epoch * count, (epoch + 1) * count)
    passes = position // num_unlabeled
    sample = torch.empty(count, dtype=torch.long)
    for q in passes.unique().tolist():
        g = torch.Generator().manual_seed(sample_seed(seed, q, 0, UNLABELED_ORDER))
        here = passes == q
        sample[here] = torch.randperm(num_unlabeled, generator=g)[position[here] % num_unlabeled]
    return num_labeled + sample + (passes - passes[:1]) * total


def mixed_epoch_views(num_labeled: int, num_unlabeled: int, ratio: float, seed: int, epoch: int,
                      repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """An epoch's global orders over labeled + unlabeled data: ((N_l,) labeled view ids, as
    `epoch_views` with repeat r of sample i at i + r * (N_l + N_u); (floor(MU * N_l),) unlabeled
    view ids, as `unlabeled_views`; repeated augmentation applies to the labeled part only)."""
    total = num_labeled + num_unlabeled
    labeled = epoch_views(num_labeled, seed, epoch, repeats)
    labeled = labeled % num_labeled + labeled // num_labeled * total
    return labeled, unlabeled_views(num_labeled, num_unlabeled, unlabeled_per_epoch(num_labeled, ratio), seed, epoch)


class MixedSampler(Sampler[tuple[int, int]]):
    """Steps of `batch_size` labeled views then MU * `batch_size` unlabeled views (global counts),
    over a SemiSupervisedDataset; an epoch is N_l // batch_size steps (`mixed_epoch_views`).

    Process `rank` of `num_replicas` takes, in every step, its contiguous block of the step's
    labeled slice (as EpochSampler does) and likewise of its unlabeled slice; it yields
    (epoch, view id): with a per-process batch of (B + MU * B) / num_replicas, the processes
    together draw the very views one process would. set_epoch(epoch, start) skips the first
    `start` views of this process (resuming mid-epoch; a multiple of the per-process batch).
    When the dataset replays cached epochs (`view_cycle` E), epoch e draws epoch e % E's views.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 repeats: int = 1):
        unlabeled = dataset.unlabeled_ratio * batch_size
        if abs(unlabeled - round(unlabeled)) > 1e-9 or round(unlabeled) < 1:
            raise KdkitError(f"unlabeled_ratio {dataset.unlabeled_ratio} x batch_size {batch_size} must be a whole "
                             f"number of unlabeled images per step (>= 1)")
        self.unlabeled_batch = round(unlabeled)
        for name, n in (("batch_size", batch_size), ("unlabeled images per step", self.unlabeled_batch)):
            if n % num_replicas:
                raise KdkitError(f"{name} {n} is not divisible by {num_replicas} processes")
        self.dataset, self.batch_size, self.seed, self.repeats = dataset, batch_size, seed, repeats
        self.num_replicas, self.rank = num_replicas, rank
        self.steps = dataset.num_labeled // batch_size
        self.epoch, self.start = 0, 0

    @property
    def per_process_batch(self) -> int:
        return (self.batch_size + self.unlabeled_batch) // self.num_replicas

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps * self.per_process_batch - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        ds = self.dataset
        labeled, unlabeled = mixed_epoch_views(ds.num_labeled, len(ds.unlabeled), ds.unlabeled_ratio, self.seed,
                                               ds.view_epoch(self.epoch), self.repeats)
        b, u, p, r = self.batch_size, self.unlabeled_batch, self.num_replicas, self.rank
        labeled = labeled[: self.steps * b].view(self.steps, p, b // p)[:, r]
        unlabeled = unlabeled[: self.steps * u].view(self.steps, p, u // p)[:, r]
        mine = torch.cat([labeled, unlabeled], dim=1).reshape(-1)
        return ((self.epoch, v) for v in mine[self.start :].tolist())


def seek(loader: DataLoader, epoch: int, step: int = 0) -> None:
    """Point a training loader at batch `step` of `epoch` without reading the batches before it
    (kdkit's EpochSampler skips them; views depend on (seed, epoch, view id) only; a stream's
    readers skip the samples they had delivered)."""
    started = False
    for part in (loader.sampler, loader.dataset):  # whichever decides the order: sampler, or stream
        set_epoch = getattr(part, "set_epoch", None)
        if set_epoch is None:
            continue
        if "start" in inspect.signature(set_epoch).parameters:
            set_epoch(epoch, step * loader.batch_size)
            started = True
        else:
            set_epoch(epoch)
    if step and not started:
        raise KdkitError("resuming in the middle of an epoch needs a sampler whose set_epoch(epoch, start) "
                         "skips samples, such as kdkit's EpochSampler (kdkit.data.create_loader)")
