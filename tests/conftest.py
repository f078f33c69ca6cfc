"""Shared fixtures: tiny real timm models and a small real CIFAR-10 slice from the bundled sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

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


def steps(run_dir: Path) -> dict[tuple[int, int], dict]:
    """Per-step records of metrics.jsonl by (epoch, step), without the timing."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("images_per_s", None)
        if "eval" in rec:
            rec["eval"].pop("images_per_s")
        out[(rec["epoch"], rec.get("step", "eval"))] = rec
    return out


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = steps(run_dir), steps(reference)
    assert list(got) == list(want)  # every step once, in order: nothing repeated, nothing missing
    for key in want:
        assert got[key] == want[key], key
    for folder in ("student", "student_ema"):
        a, b = load_file(run_dir / folder / "model.safetensors"), load_file(reference / folder / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


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


TINY_VIT_ARGS = ["--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--img-size", "32", "--patch-size", "8"]
TINY_RESNET_ARGS = ["--set", "model.kwargs={channels=[8, 16, 32, 64], stem_width=8}", "--img-size", "32"]
ONE_EPOCH = ["--epochs", "1", "--batch-size", "16", "--workers", "0", "--no-progress", "--seed", "0",
             "--set", "optim.warmup_epochs=0"]


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
