"""Shared fixtures: tiny real timm models and a small real CIFAR-10 slice from the bundled sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

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


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A random resnet10t for 10 classes at 32x32, saved as a timm folder (config.json + safetensors).
    Its classifier is scaled up so that its logits are apart like a trained teacher's: an untrained
    one has near-ties (top-2 gaps of 1e-7) that the float noise of batched inference can flip."""
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    model = timm.create_model("resnet10t", num_classes=10)
    with torch.no_grad():
        model.fc.weight.mul_(50)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "model.safetensors")
    cfg = {"architecture": "resnet10t", "num_classes": 10,
           "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                              "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 10}}
    (root / "config.json").write_text(json.dumps(cfg))
    return root
