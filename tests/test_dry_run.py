"""`kdkit distill --dry-run`: the plan's figures, computed here independently, and nothing written."""

from __future__ import annotations

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from kdkit.cli.common import RUN_FLAGS  # noqa: F401  (the CLI's tables are importable without torch work)
from kdkit.config import load_recipe
from kdkit.engine.plan import plan
from tests.helpers import run_cli

KW = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def _flops(model, size):
    """torch's own counter on timm's unfused attention (explicit Q K^T and A V matmuls, which it counts
    on any device), so that attention is in the count independently of kdkit's kernel formulas."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    with FlopCounterMode(display=False) as c, torch.inference_mode():
        model.eval()(torch.zeros(1, *size))
    return c.get_total_flops()


def test_plan_reports_models_cost_and_cache_size(tiny_data, teacher_dir):
    r = load_recipe(None, {"model": {"student": "deit_tiny", "img_size": 32, "patch_size": 8, "kwargs": KW,
                                     "teacher": "resnet10t", "teacher_weights": str(teacher_dir)},
                           "data": {"path": str(tiny_data), "batch_size": 16, "workers": 0},
                           "optim": {"epochs": 7}, "run": {"progress": False}})
    p = plan(r)
    student = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32, patch_size=8, **KW)
    assert p["student"]["params"] == sum(x.numel() for x in student.parameters())
    assert p["student"]["flops_per_image"] == _flops(student, (3, 32, 32))
    teacher = timm.create_model("resnet10t", num_classes=10)
    (t,) = p["teachers"]
    assert t["params"] == sum(x.numel() for x in teacher.parameters())
    assert t["flops_per_image"] == _flops(teacher, (3, 32, 32))
    share = t["flops_per_image"] / (t["flops_per_image"] + 3 * p["student"]["flops_per_image"])
    assert abs(p["teacher_share_of_step"] - share) < 1e-12
    # 120 images x 7 epochs, each record 10 float16 values + a uint8 top-1 index
    assert p["cache_records_per_epoch"] == 120 and p["cache_bytes"] == 120 * 7 * (10 * 2 + 1)
    assert p["teacher_check"]["num_classes"] == 10


def test_dry_run_writes_nothing(tiny_data, teacher_dir, tmp_path, capsys):
    assert run_cli("distill", "--dry-run", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--student",
                   "deit_tiny", "--img-size", "32", "--patch-size", "8", "--set",
                   "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--data", tiny_data, "--workers", "0",
                   "--batch-size", "16", "--output", tmp_path, "--name", "dry") == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "teacher's share" in out and "kdkit cache" in out
    assert list(tmp_path.iterdir()) == []
