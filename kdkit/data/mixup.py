"""Mixup/CutMix per pair of views: timm's own `Mixup` draws, for the two views of a pair of
positions of the epoch's order, one λ and one CutMix box, applied in both directions (as timm's
`mode="pair"` mixes x_i with x_j and x_j with x_i), so a mixed view depends on (seed, epoch, view
id) only, never on which batch the pair lands in. A teacher's answer for a mixed view can then be
cached and replayed. The pixels are mixed by the batch (kdkit.data.batch.finish_batch), after
normalisation and random erasing, in a loader worker or on the training device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

from kdkit.data.seeding import run_seeded


@dataclass(frozen=True)
class Mixing:
    """How a view is mixed with its pair's other view, `partner` (a RawView or a (3, H, W) tensor:
    the very object its own sample holds): blended as λ view + (1 - λ) partner, or, under CutMix,
    the partner's pixels pasted into rows top:bottom, columns left:right (`box`)."""

    partner: Any
    lam: float
    box: tuple[int, int, int, int] | None = None


def view_size(image: Any) -> tuple[int, int]:
    """(H, W) of a RawView or a (3, H, W) tensor."""
    return tuple(getattr(image, "pixels", image).shape[-2:])


class SampleMixup:
    """Mix views a and b of a pair with one λ (and one CutMix box, one mixup/cutmix switch) drawn
    under random streams seeded by the pair's seed: a' = λ a + (1 - λ) b, b' = λ b + (1 - λ) a.

    mixup: a timm `Mixup` (mode "batch"), whose draws for the 2-image batch [a, b] are used; its
    flip partners are exactly the pair. Targets come back as (K,) float soft labels (label
    smoothing included); an unlabeled view (target -1) in a pair gives all-zero rows, which the
    label loss skips. An unreadable view (None) and its partner come back unmixed.
    """

    def __init__(self, mixup: Mixup):
        if mixup.mode != "batch":
            raise ValueError("SampleMixup draws one λ per pair of views: use Mixup(mode='batch')")
        self.mixup = mixup

    @property
    def num_classes(self) -> int:
        return self.mixup.num_classes

    def _draw(self, size: tuple[int, int]) -> tuple[float, tuple[int, int, int, int] | None]:
        # timm's Mixup._mix_batch, its draws only
        lam, use_cutmix = self.mixup._params_per_batch()
        if lam == 1.0 or not use_cutmix:
            return lam, None
        box, lam = cutmix_bbox_and_lam((2, 3, *size), lam, ratio_minmax=self.mixup.cutmix_minmax,
                                       correct_lam=self.mixup.correct_lam)
        return lam, tuple(int(x) for x in box)

    def __call__(self, a: Any, a_target: int, b: Any, b_target: int, seed: int) -> tuple[
            tuple[torch.Tensor, Mixing | None], tuple[torch.Tensor, Mixing | None]]:
        """(((K,) target of a', how a is mixed), ((K,) target of b', how b is mixed)); the Mixings
        are None for a pair left unmixed (λ = 1, or an unreadable view)."""
        labels = torch.tensor([max(a_target, 0), max(b_target, 0)])
        labeled = float(a_target >= 0 and b_target >= 0)
        if a is None or b is None:
            y = mixup_target(labels, self.num_classes, 1.0, self.mixup.label_smoothing)
            return (y[0] * (a_target >= 0), None), (y[1] * (b_target >= 0), None)
        lam, box = run_seeded(self._draw, seed, view_size(a))
        y = mixup_target(labels, self.num_classes, lam, self.mixup.label_smoothing) * labeled
        if lam == 1.0:
            return (y[0], None), (y[1], None)
        return (y[0], Mixing(b, lam, box)), (y[1], Mixing(a, lam, box))
