"""The order in which an epoch's views are drawn: a function of (seed, epoch) only, split over
processes so that one global batch holds the same views whatever the number of processes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from kdkit.data.dataset import ORDER, sample_seed


def epoch_views(num_samples: int, seed: int, epoch: int, repeats: int = 1, shuffle: bool = True) -> torch.Tensor:
    """The global order of an epoch's view ids, (num_samples,) int64.

    A view id is `index + r * num_samples` for the r-th repeat of sample `index`, so repeated
    augmentation (DeiT's RASampler: each drawn image `repeats` times, in a differently augmented
    view) draws distinct views; an epoch still draws `num_samples` views, as in DeiT.
    """
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, 0, ORDER))
    order = torch.randperm(num_samples, generator=g) if shuffle else torch.arange(num_samples)
    if repeats > 1:
        order = (order.repeat_interleave(repeats) + num_samples * torch.arange(repeats).repeat(num_samples))
        order = order[:num_samples]
    return order


class EpochSampler(Sampler[int]):
    """Process `rank` of `num_replicas` draws views rank, rank + num_replicas, ... of the epoch's
    global order (`epoch_views`): with a per-process batch of B / num_replicas, step s of every
    process together covers global positions [s * B, (s + 1) * B), as a single process would.

    set_epoch(epoch, start) re-seeds the order and skips the first `start` views of this process
    (resuming mid-epoch without reading the skipped images).
    """

    def __init__(self, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, repeats: int = 1,
                 shuffle: bool = True):
        self.num_samples, self.seed, self.repeats, self.shuffle = num_samples, seed, repeats, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_samples // self.num_replicas - self.start

    def __iter__(self) -> Iterator[int]:
        order = epoch_views(self.num_samples, self.seed, self.epoch, self.repeats, self.shuffle)
        mine = order[: len(order) // self.num_replicas * self.num_replicas][self.rank :: self.num_replicas]
        return iter(mine[self.start :].tolist())
