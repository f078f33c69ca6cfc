"""Shared fixtures: tiny real timm models and a small real CIFAR-10 slice from the bundled sample."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kdkit.data import sample_path

TINY_DEIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
TINY_SWIN = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """12 training and 6 test images per class, copied from the bundled sample (ImageFolder layout)."""
    root = tmp_path_factory.mktemp("tiny_cifar")
    for split, n in (("train", 12), ("test", 6)):
        for cls_dir in sorted((sample_path() / split).iterdir()):
            dst = root / split / cls_dir.name
            dst.mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    return root


def run_cli(*argv: str) -> int:
    from kdkit.cli import main

    return main([str(a) for a in argv])
