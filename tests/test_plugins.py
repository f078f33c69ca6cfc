"""A loss, a logit source and a head defined outside kdkit, registered by a plugin module, train
through kdkit.distill and through the CLI (--plugin); their settings are checked by name."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.helpers import run_cli

PLUGIN = textwrap.dedent('''
    """Toy strategies: nothing of kdkit is edited to add them."""
    import torch
    from torch import nn

    from kdkit.losses import LOSSES, DistillationLoss, task_ce
    from kdkit.models import HEADS
    from kdkit.sources import LOGIT_SOURCES, LogitSource
    from kdkit.types import StudentOut


    @LOSSES.register("toy_mse")
    class ToyMSELoss(DistillationLoss):
        """CE + scale * MSE(dist head, teacher); logs what it saw of the head and of the source."""

        def __init__(self, scale: float = 1.0, task_weight: float = 0.5):
            super().__init__(task_weight=task_weight, kd_weight=1.0)
            self.scale = scale

        def forward(self, out, teacher_logits, target):
            task = task_ce(out.logits, target)
            mse = (out.dist_logits.float() - teacher_logits).pow(2).mean()
            ratio = (out.dist_logits / out.logits).mean()
            return {"loss": self.task_weight * task + self.scale * mse, "task": task.detach(),
                    "mse": mse.detach(), "teacher_mean": teacher_logits.mean(), "head_ratio": ratio.detach()}


    @LOGIT_SOURCES.register("constant")
    class ConstantLogits(LogitSource):
        """Every class gets `value`: no teacher at all."""

        def __init__(self, num_classes: int, value: float):
            super().__init__()
            self.num_classes, self.value = num_classes, value

        @classmethod
        def from_run(cls, run, value: float = 0.0):
            return cls(run.num_classes, value)

        def forward(self, batch):
            return torch.full((batch.images.shape[0], self.num_classes), self.value, device=batch.images.device)


    @HEADS.register("scaled")
    class ScaledHead(nn.Module):
        """The model's one head, and the same logits times `scale` as the distillation head."""

        def __init__(self, model: nn.Module, scale: float = 2.0):
            super().__init__()
            self.model, self.scale = model, scale

        def forward(self, x):
            logits = self.model(x)
            return StudentOut(logits, logits * self.scale)
''')

TINY = {"img_size": 32, "patch_size": 8, "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "kdkit_toy_strategies.py"
    path.write_text(PLUGIN)
    from kdkit.plugins import load_plugins

    load_plugins([str(path)])
    return path


def _steps(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "step" in x]


def test_toy_strategies_train_through_the_python_api(plugin, tiny_data, tmp_path):
    import kdkit

    result = kdkit.distill("deit_tiny_patch16_224", "", str(tiny_data), loss="toy_mse", args={"scale": 0.25},
                           head="scaled", head_args={"scale": 3.0}, logit_source="constant", logit_source_args={"value": 1.5},
                           epochs=1, batch_size=16, workers=0, progress=False, warmup_epochs=0, output=str(tmp_path),
                           name="api", preset="none", **TINY)
    summary = result.summary
    steps = _steps(tmp_path / "api")
    assert steps and all(x["teacher_mean"] == 1.5 for x in steps)  # the source's value reached the loss
    assert all(x["head_ratio"] == pytest.approx(3.0, rel=1e-5) for x in steps)  # the head's own setting
    assert summary["conventions"] == {"loss": "toy_mse", "scale": 0.25, "task_weight": 0.5}
    assert json.loads((tmp_path / "api" / "student" / "config.json").read_text())["kdkit"]["head"] == "scaled"
    # a plugin's head has no plain-module form: Result.model gives its fused logits, (L + 3 L) / 2
    import timm
    import torch

    plain = timm.create_model(f"local-dir:{tmp_path / 'api' / 'student'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(result.model(x), 2 * plain(x), atol=1e-5)
    # the loss term is the formula's: MSE of the distillation head against the constant 1.5 is >= 0, and
    # loss = 0.5 * task + 0.25 * mse on every logged step
    for x in steps:
        assert x["loss"] == pytest.approx(0.5 * x["task"] + 0.25 * x["mse"], rel=1e-5)


def test_toy_strategies_train_through_the_cli(plugin, tiny_data, tmp_path):
    args = ["distill", "--plugin", str(plugin), "--student", "deit_tiny_patch16_224", "--img-size", "32",
            "--patch-size", "8", "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--data", tiny_data,
            "--loss", "toy_mse", "--set", "loss.args={scale=0.5}", "--head", "scaled", "--set",
            "model.logit_source=constant", "--set", "model.logit_source_args={value=-2.0}", "--preset", "none", "--epochs", "1",
            "--batch-size", "16", "--workers", "0", "--no-progress", "--set", "optim.warmup_epochs=0",
            "--output", tmp_path, "--name", "cli"]
    assert run_cli(*args) == 0
    steps = _steps(tmp_path / "cli")
    assert all(x["teacher_mean"] == -2.0 for x in steps)
    assert all(x["head_ratio"] == pytest.approx(2.0, rel=1e-5) for x in steps)  # ScaledHead's default


@pytest.mark.parametrize("setting, match", [
    ("loss.args={scael=0.5}", "loss 'toy_mse'.scael. Did you mean 'scale'"),
    ("model.head_args={sclae=1.0}", "student head 'scaled'.sclae. Did you mean 'scale'"),
    ("model.logit_source_args={valeu=1.0}", "logit source 'constant'.valeu. Did you mean 'value'"),
])
def test_a_misspelt_strategy_setting_is_one_clear_error(plugin, tiny_data, tmp_path, capsys, setting, match):
    args = ["distill", "--plugin", str(plugin), "--student", "deit_tiny_patch16_224", "--img-size", "32",
            "--patch-size", "8", "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--data", tiny_data,
            "--loss", "toy_mse", "--head", "scaled", "--set", "model.logit_source=constant", "--set", setting,
            "--epochs", "1", "--workers", "0", "--no-progress", "--output", tmp_path, "--name", "bad"]
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_a_plugin_that_does_not_import_is_one_clear_error(tmp_path, capsys):
    assert run_cli("recipes", "--plugin", str(tmp_path / "missing.py")) == 2
    assert "cannot import plugin" in capsys.readouterr().err


def test_the_loss_example_in_the_docs_trains(tiny_data, teacher_dir, tmp_path):
    """docs/concepts.md's example of a new loss, as written there, through --plugin."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "concepts.md").read_text()
    block = doc.split("A new loss, complete")[1].split("```python\n")[1].split("```")[0]
    assert len(block.strip().splitlines()) < 30
    (tmp_path / "kdkit_doc_cosine_loss.py").write_text(block)
    args = ["distill", "--plugin", tmp_path / "kdkit_doc_cosine_loss.py", "--loss", "cosine", "--set",
            "loss.args={margin=0.05}", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--student",
            "deit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--set",
            "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--data", tiny_data, "--preset", "none",
            "--epochs", "1", "--batch-size", "16", "--workers", "0", "--no-progress", "--set",
            "optim.warmup_epochs=0", "--set", "aug.mixup=0.8", "--output", tmp_path, "--name", "cos"]
    assert run_cli(*args) == 0
    summary = json.loads((tmp_path / "cos" / "summary.json").read_text())
    assert summary["conventions"] == {"loss": "cosine", "margin": 0.05, "task_weight": 0.5, "kd_weight": 0.5,
                                      "tau": 1.0, "label_smoothing": 0.0}
    steps = _steps(tmp_path / "cos")
    assert steps and all(0.0 <= x["kd"] <= 1.0 for x in steps)  # 1 - cos of two distributions, less the margin


SOURCE_PLUGIN = textwrap.dedent('''
    """A logit source written outside kdkit: the run's teacher, its logits scaled by `scale`."""
    from kdkit.sources import LOGIT_SOURCES, LogitSource


    @LOGIT_SOURCES.register("scaled_teacher")
    class ScaledTeacher(LogitSource):
        def __init__(self, teacher, scale: float):
            super().__init__()
            self.inner, self.scale = teacher, scale  # no attribute name the engine could guess

        @classmethod
        def from_run(cls, run, scale: float = 2.0):
            (teacher,) = run.teachers()
            return cls(teacher, scale)

        def forward(self, batch):
            return self.inner(batch.images) * self.scale

        def teachers(self):
            return [self.inner]

        def describe(self):
            return {"source": "scaled_teacher", "scale": self.scale}

        def feature_size(self):
            return self.inner.num_features

        def features(self, batch):
            return self.inner.forward_features(batch.images)
''')


def test_a_plugin_source_is_planned_and_feeds_a_feature_loss(tiny_data, teacher_dir, tmp_path):
    """The engine asks the source for its teachers and feature size through LogitSource's methods:
    `kdkit plan` prices and times the plugin's teacher, a feature loss sizes its projection with it."""
    import timm
    import torch

    from kdkit.config import load_recipe
    from kdkit.engine.build import build_run
    from kdkit.engine.plan import plan_cache
    from kdkit.engine.step import DistillationStep, make_batch
    from kdkit.plugins import load_plugins

    path = tmp_path / "kdkit_toy_scaled_source.py"
    path.write_text(SOURCE_PLUGIN)
    load_plugins([str(path)])
    r = load_recipe(None, {"model": {"student": "deit_tiny_patch16_224", "head": "token", **TINY,
                                     "teacher": "resnet10t", "teacher_weights": str(teacher_dir),
                                     "logit_source": "scaled_teacher", "logit_source_args": {"scale": 3.0}},
                           "loss": {"kind": "feature"}, "data": {"path": str(tiny_data), "batch_size": 16,
                                                                "workers": 0},
                           "optim": {"epochs": 1}, "run": {"progress": False}, "preset": "none"})
    report = plan_cache(r, steps=1, out=tmp_path)
    teacher = timm.create_model("resnet10t", num_classes=10)
    (t,) = report["teachers"]
    assert t["params"] == sum(x.numel() for x in teacher.parameters())
    assert report["logit_source"] == "ScaledTeacher" and report["measured"]["teacher"] > 0
    parts = build_run(r, "distill")
    assert parts.student.adapters["features"].proj.in_features == 32  # the student's embedding
    assert parts.student.adapters["features"].proj.out_features == teacher.num_features  # resnet10t's 512
    batch = make_batch(next(iter(parts.train_loader)), torch.device("cpu"))
    out = DistillationStep(parts.loss, parts.logits)(parts.student, batch)
    assert torch.isfinite(out.terms["feature"]) and out.terms["feature"] > 0


def test_the_logit_source_example_in_the_docs_trains_and_plans(tiny_data, teacher_dir, tmp_path, capsys):
    """docs/concepts.md's example of a new logit source, as written there, through --plugin: the run
    checks its teacher, records its describe(), and the dry run prices its teacher."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "concepts.md").read_text()
    block = doc.split("A new logit source, complete")[1].split("```python\n")[1].split("```")[0]
    assert len(block.strip().splitlines()) < 30
    (tmp_path / "kdkit_doc_scaled_source.py").write_text(block)
    args = ["distill", "--plugin", tmp_path / "kdkit_doc_scaled_source.py", "--logit-source", "scaled", "--set",
            "model.logit_source_args={scale=0.5}", "--teacher", "resnet10t", "--teacher-weights", teacher_dir,
            "--student", "deit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--set",
            "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--data", tiny_data, "--preset", "none",
            "--loss", "soft", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--no-progress", "--set",
            "optim.warmup_epochs=0", "--output", tmp_path]
    assert run_cli(*args, "--name", "scaled") == 0
    summary = json.loads((tmp_path / "scaled" / "summary.json").read_text())
    assert summary["logits"] == {"source": "scaled", "scale": 0.5}
    test_images = sum(1 for _ in (tiny_data / "test").rglob("*.*"))
    assert summary["teacher_check"]["images"] == test_images == 60  # its teachers() were checked
    capsys.readouterr()
    assert run_cli(*args, "--name", "dry", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "resnet10t" in out and "teacher's share" in out
    assert not (tmp_path / "dry").exists()
