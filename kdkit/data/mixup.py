"""Mixup/CutMix per pair of views: timm's own `Mixup` applied to the two views of a pair of
positions of the epoch's order, in both directions (as timm's `mode="pair"` mixes x_i with x_j
and x_j with x_i), so a mixed view depends on (seed, epoch, view id) only, never on which batch
the pair lands in. A teacher's answer for a mixed view can then be cached and replayed."""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from kdkit.data.seeding import run_seeded

Sample = tuple[torch.Tensor | None, int]


class SampleMixup:
    """Mix views a and b of a pair with one λ (and one CutMix box, one mixup/cutmix switch) drawn
    under random streams seeded by the pair's seed: a' = λ a + (1 - λ) b, b' = λ b + (1 - λ) a.

    mixup: a timm `Mixup` (mode "batch"), applied to the 2-image batch [a, b]; its flip partners
    are exactly the pair. Targets come back as (K,) float soft labels (label smoothing included);
    an unlabeled view (target -1) in a pair gives all-zero rows, which the label loss skips. An
    unreadable view (None) stays None, and its partner comes back unmixed.
    """

    def __init__(self, mixup: Mixup):
        if mixup.mode != "batch":
            raise ValueError("SampleMixup draws one λ per pair of views: use Mixup(mode='batch')")
        self.mixup = mixup

    @property
    def num_classes(self) -> int:
        return self.mixup.num_classes

    def _unmixed(self, image: torch.Tensor | None, target: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        y = mixup_target(torch.tensor([max(target, 0)]), self.num_classes, 1.0, self.mixup.label_smoothing)[0]
        return image, y * (target >= 0)

    def __call__(self, a: torch.Tensor | None, a_target: int, b: torch.Tensor | None, b_target: int,
                 seed: int) -> tuple[tuple[torch.Tensor | None, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]:
        """((3, H, W) a', (K,) target of a'), ((3, H, W) b', (K,) target of b')."""
        if a is None or b is None:
            return self._unmixed(a, a_target), self._unmixed(b, b_target)
        labels = torch.tensor([max(a_target, 0), max(b_target, 0)])
        x, y = run_seeded(self.mixup, seed, torch.stack([a, b]), labels)
        labeled = float(a_target >= 0 and b_target >= 0)
        return (x[0], y[0] * labeled), (x[1], y[1] * labeled)
