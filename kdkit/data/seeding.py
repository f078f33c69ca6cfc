"""Seeds of views: one 32-bit seed per (run seed, epoch, view id, stream), and a transform run
under it. Cheap on purpose: a view is seeded for every sample of every epoch, so the cost is
paid millions of times (a SeedSequence plus torch.manual_seed cost ~150 us a sample on the CUDA
build of torch; this costs a few)."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import get_worker_info

# independent random streams drawn from one (seed, epoch, index)
AUGMENT, MIX, ORDER, UNLABELED_ORDER = 0, 1, 2, 4  # (3 was the partner order of an earlier pairing)

_MASK = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int, stream: int = AUGMENT) -> int:
    """A 32-bit seed that depends only on (run seed, epoch, view index, stream); all non-negative.

    splitmix64's finaliser over the four values in turn: distinct inputs give unrelated seeds.
    """
    h = 0x9E3779B97F4A7C15
    for x in (seed, epoch, index, stream):
        h = ((h ^ (x & _MASK)) * 0xBF58476D1CE4E5B9) & _MASK
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK
        h ^= h >> 29
    return h & 0xFFFFFFFF


def run_seeded(fn: Callable, seed: int, *args):
    """fn(*args) with Python's, NumPy's and torch's CPU random streams seeded by `seed` (timm's
    transforms draw from all three). torch's generator is put back afterwards in the main process,
    so loading data with no workers never moves the training's random stream (dropout,
    drop_path). Python's and NumPy's global streams are left reseeded: training draws from
    neither, and saving NumPy's state costs ~60 us, more than the whole seeding."""
    generator = torch.random.default_generator  # the CPU generator only: no CUDA seeding per sample
    random.seed(seed)
    np.random.seed(seed)
    if get_worker_info() is not None:
        generator.manual_seed(seed)
        return fn(*args)
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return fn(*args)
    finally:
        generator.set_state(state)
