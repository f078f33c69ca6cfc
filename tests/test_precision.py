"""Precision: Accelerate's own resolution by default (launcher, environment), the command line or
recipe wins over it, the teacher follows the run, and the run records what it used."""

import json

import torch

from kdkit.config import load_recipe
from kdkit.engine.build import build_teacher, make_accelerator
from tests.helpers import TINY_DEIT, run_cli


def distill_args(tiny_data, teacher_dir, tmp_path, name: str) -> list:
    return ["distill", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--student", "deit_tiny",
            "--img-size", "32", "--patch-size", "8", "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}",
            "--data", tiny_data, "--epochs", "1", "--batch-size", "40", "--workers", "0", "--no-progress",
            "--preset", "none", "--set", "optim.warmup_epochs=0", "--output", tmp_path, "--name", name]


def test_the_launchers_precision_is_used_unless_the_recipe_says_otherwise(tiny_data, teacher_dir, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert run_cli(*distill_args(tiny_data, teacher_dir, tmp_path, "env")) == 0
    assert json.loads((tmp_path / "env" / "summary.json").read_text())["precision"] == "bf16"
    assert run_cli(*distill_args(tiny_data, teacher_dir, tmp_path, "cli"), "--precision", "no") == 0
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["precision"] == "no"


def test_the_teacher_runs_in_the_runs_precision(teacher_dir, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    r = load_recipe(None, {"model": {"teacher": "resnet10t", "teacher_weights": str(teacher_dir),
                                     "kwargs": TINY_DEIT}})
    cfg = {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    teacher = build_teacher(r, None, 10, cfg, make_accelerator(r))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = teacher.model(x * teacher.scale + teacher.shift)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = teacher.model(x * teacher.scale + teacher.shift).float()
    got = teacher(x)
    assert torch.allclose(got, half, atol=1e-6) and not torch.allclose(got, full, atol=1e-4)
    r = load_recipe(None, {"model": {"teacher": "resnet10t", "teacher_weights": str(teacher_dir)},
                           "run": {"precision": "no"}})
    assert torch.allclose(build_teacher(r, None, 10, cfg, make_accelerator(r))(x), full, atol=1e-5)


def test_an_unknown_precision_is_one_line_naming_the_valid_ones(tiny_data, teacher_dir, tmp_path, capsys):
    assert run_cli(*distill_args(tiny_data, teacher_dir, tmp_path, "bad"), "--precision", "bf61") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bf16" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "bad").exists()
