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
from tests.helpers import ONE_EPOCH, TINY_RESNET_ARGS, TINY_VIT_ARGS, run_cli


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




@pytest.fixture(scope="session")
def tiny_runs(tiny_data, teacher_dir, tmp_path_factory) -> dict[str, Path]:
    """Finished one-epoch runs through the real CLI, trained once for the export, card and push tests:
    native (timm's distilled DeiT, its own token), inserted (kdkit's token in a plain DeiT), dual
    (a ResNet with two linear heads), single (supervised, one head) and cached (the native run's
    student distilled from a `kdkit cache` of the same teacher)."""
    out = tmp_path_factory.mktemp("tiny_runs")
    teacher = ["--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--preset", "none"]
    common = ["--data", tiny_data, *ONE_EPOCH, "--output", out]
    students = {"native": ["--student", "deit_tiny", *TINY_VIT_ARGS],
                "inserted": ["--student", "deit_tiny_patch16_224", "--head", "token", *TINY_VIT_ARGS],
                "dual": ["--student", "resnet10t", "--head", "dual", *TINY_RESNET_ARGS]}
    for name, student in students.items():
        assert run_cli("distill", *teacher, *student, *common, "--name", name) == 0
    assert run_cli("train", "--model", "resnet10t", *TINY_RESNET_ARGS, *common, "--name", "single") == 0
    assert run_cli("cache", *teacher, *students["native"], *common[:-2], "--out", out / "cache") == 0
    assert run_cli("distill", "--logit-cache", out / "cache", "--preset", "none", *students["native"], *common,
                   "--name", "cached") == 0
    return {name: out / name for name in (*students, "single", "cached", "cache")}
