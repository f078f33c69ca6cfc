"""Mixup/CutMix per sample: timm's own `Mixup` applied to a sample and a partner drawn from the
epoch's seeded order, so a mixed view depends on (seed, epoch, view id) only, never on which
batch the sample lands in. A teacher's answer for a mixed view can then be cached and replayed."""

from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from kdkit.data.dataset import PARTNER, sample_seed


class SampleMixup:
    """Mix view `v` of an epoch with a partner: the next sample in a seeded cyclic order of the
    dataset (never itself when there are two or more samples), seen in the partner's own view.

    mixup: a timm `Mixup` (mode "batch"); its λ, CutMix box and mixup/cutmix switch are drawn under
    numpy seeded by (seed, epoch, v). Targets come back as (K,) float soft labels (label smoothing
    included); an unlabeled sample (target -1) or partner gives an all-zero row, which the label
    loss skips.
    """

    def __init__(self, mixup: Mixup):
        if mixup.mode != "batch":
            raise ValueError("SampleMixup draws one λ per sample pair: use Mixup(mode='batch')")
        self.mixup = mixup
        # the epoch's orders, newest last: two pools (labeled, unlabeled) pair within themselves
        self._orders: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_classes(self) -> int:
        return self.mixup.num_classes

    def partner(self, seed: int, epoch: int, index: int, num_samples: int) -> int:
        """The sample index that `index` is mixed with in this epoch, among `num_samples` samples."""
        key = (seed, epoch, num_samples)
        if key not in self._orders:
            g = torch.Generator().manual_seed(sample_seed(seed, epoch, 0, PARTNER))
            order = torch.randperm(num_samples, generator=g)
            position = torch.empty_like(order)
            position[order] = torch.arange(num_samples)
            self._orders[key] = (order, position)
            while len(self._orders) > 2:
                del self._orders[next(iter(self._orders))]
        order, position = self._orders[key]
        return int(order[(position[index] + 1) % num_samples])

    def __call__(self, image: torch.Tensor | None, target: int, other: torch.Tensor | None, other_target: int,
                 seed: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Mix (image, target) with (other, other_target) under numpy seeded by `seed`; `other` None
        leaves the sample unmixed. Returns ((3, H, W) image, (K,) soft target)."""
        labels = torch.tensor([max(target, 0), max(other_target, 0)])
        if other is None:
            y = mixup_target(labels[:1], self.num_classes, 1.0, self.mixup.label_smoothing)[0]
            return image, y * (target >= 0)
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            x, y = self.mixup(torch.stack([image, other]), labels)
        finally:
            np.random.set_state(state)
        return x[0], y[0] * (target >= 0 and other_target >= 0)
