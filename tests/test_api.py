"""The Python API with custom nn.Modules, and the step contract with Mixup/CutMix."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from timm.data import Mixup
from torch import nn

import kdkit
from kdkit import (
    Batch,
    DistillationStep,
    StudentOut,
    create_loss,
    create_student,
    create_teacher,
    load_recipe,
)
from tests.helpers import TinyConvNet

SMALL = dict(epochs=1, img_size=32, batch_size=16, workers=0, warmup_epochs=0, progress=False)
SMALL_FLAGS = ["--epochs", "1", "--img-size", "32", "--batch-size", "16", "--workers", "0", "--set",
               "optim.warmup_epochs=0", "--no-progress"]


def cli_recipe(verb: str, *argv: str) -> dict:
    """The recipe the CLI resolves for `kdkit VERB ARGV`, as the run would record it."""
    from importlib import import_module

    from kdkit.cli import build_parser
    from kdkit.cli.common import recipe_from_args

    flags = import_module(f"kdkit.cli.{verb}").FLAGS
    extra = {"loss.kind": "none"} if verb == "train" else None
    return json.loads(json.dumps(recipe_from_args(build_parser().parse_args([verb, *argv]), flags, extra).to_dict()))


def recorded(run_dir) -> dict:
    """The run's RUN/recipe.toml, read back as a whole recipe (TOML has no None: unset keys are left out)."""
    return json.loads(json.dumps(load_recipe(run_dir / "recipe.toml").to_dict()))


def test_distill_custom_modules_in_one_call(tiny_data, tmp_path):
    student, teacher = TinyConvNet(), TinyConvNet()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = kdkit.distill(student, teacher, str(tiny_data), head="shared", loss="soft", tau=2.0, **SMALL,
                           output=str(tmp_path), name="api")
    # a trained copy comes back, of the user's own class; the modules passed are unchanged
    assert type(result.model) is TinyConvNet and result.model is not student
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())
    assert result.summary["eval"]["n"] == 60 and result.summary["conventions"]["tau"] == 2.0
    assert result.run_dir == tmp_path / "api" and "model" not in result.summary
    reloaded = TinyConvNet()
    reloaded.load_state_dict(load_file(tmp_path / "api" / "student" / "model.safetensors"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.model.eval()(x), reloaded.eval()(x))
    # the CLI's defaults: `kdkit distill` with the same settings resolves the same recipe (preset deit)
    cli = cli_recipe("distill", "--data", str(tiny_data), "--head", "shared", "--loss", "soft", "--set",
                     "loss.tau=2.0", *SMALL_FLAGS, "--output", str(tmp_path), "--name", "api")
    assert recorded(tmp_path / "api") == cli and cli["preset"] == "deit"


@pytest.mark.parametrize("head", ["auto", "shared"])  # auto: dual (README's example names dual itself)
def test_a_plain_module_student_serves_every_head_it_can(head, tiny_data, teacher_dir, tmp_path):
    """A plain nn.Module (no timm forward_head): `dual` adds a classifier on the input of its final
    nn.Linear (what `auto` picks), `shared` uses its own; the returned module computes the fused
    logits, (class + dist) / 2, recomputed here from the saved weights."""
    student = TinyConvNet()
    result = kdkit.distill(student, "resnet10t", tiny_data, teacher_weights=str(teacher_dir), head=head,
                           preset="none", **SMALL, output=str(tmp_path), name=head)
    folder = tmp_path / head / "student"
    config = json.loads((folder / "config.json").read_text())
    assert config["kdkit"]["head"] == ("shared" if head == "shared" else "dual")
    body = TinyConvNet()
    body.load_state_dict(load_file(folder / "model.safetensors"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        feats = body.body(x)
        want = body.fc(feats)
        if head != "shared":
            extra = load_file(folder / "kdkit_head.safetensors")
            want = (want + feats @ extra["head_dist.weight"].T + extra["head_dist.bias"]) / 2
        got = result.model.eval()(x)
    assert type(result.model) is TinyConvNet and torch.allclose(got, want, atol=1e-5)
    assert (head == "shared") == torch.equal(result.model.fc.weight, body.fc.weight)


class NotLastLinear(TinyConvNet):
    def forward(self, x):
        return self.fc(self.body(x)) * 2


@pytest.mark.parametrize(("head", "module", "message"), [
    ("token", TinyConvNet, "head 'token' needs a ViT with a class token"),
    ("native", TinyConvNet, "head 'native' needs a model with its own distillation head"),
    ("dual", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
     "head 'dual' needs timm's forward_features/forward_head or a final nn.Linear"),
    ("dual", NotLastLinear, "the module's output is not that layer's output: use head 'shared'"),
])
def test_a_head_that_cannot_serve_a_plain_module_is_one_line(head, module, message, tiny_data, tmp_path):
    with pytest.raises(kdkit.KdkitError, match=re.escape(message)):
        kdkit.distill(module(), TinyConvNet(), tiny_data, head=head, preset="none", **SMALL, output=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


class RecordingSource:
    def __init__(self, teacher):
        self.teacher, self.seen = teacher, []

    def __call__(self, batch: Batch):
        self.seen.append(batch.images.clone())
        return self.teacher(batch.images)


def test_teacher_sees_the_mixed_batch_and_task_term_takes_soft_targets():
    torch.manual_seed(0)
    student = create_student(TinyConvNet(4), 4, "shared")
    source = RecordingSource(create_teacher(TinyConvNet(4)))
    step = DistillationStep(create_loss("hard", task_weight=0.5, kd_weight=0.5), source)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.0, num_classes=4)
    xm, ym = mixup(x.clone(), y)
    assert ym.shape == (8, 4) and not torch.equal(xm, x)
    out = step(student, Batch(xm, ym, torch.arange(8)))
    assert torch.equal(source.seen[0], xm)
    logits = student(xm).logits
    t = source.teacher(xm)
    expected = 0.5 * -(ym * logits.log_softmax(1)).sum(1).mean() + 0.5 * nn.functional.cross_entropy(
        logits, t.argmax(1))
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert isinstance(out.out, StudentOut) and set(out.terms) == {"task", "kd"}


@pytest.mark.parametrize(("student", "head"), [("deit_tiny_patch16_224", "token"), ("deit_tiny", "auto"),
                                               ("resnet10t", "dual")])
def test_a_timm_student_comes_back_as_one_plain_timm_model_with_its_heads_fused(student, head, tiny_data, teacher_dir,
                                                                                 tmp_path):
    """kdkit's inserted token becomes timm's distilled DeiT, a distilled DeiT stays one (timm fuses its
    heads), a dual head is averaged into the classifier: each gives the late fusion of the saved
    student, rebuilt in its head strategy from the run's folder."""
    from kdkit.models import load_saved

    kwargs = {"channels": [8, 16, 32, 64], "stem_width": 8} if student == "resnet10t" else \
        {"depth": 2, "embed_dim": 32, "num_heads": 2}
    patch = {} if student == "resnet10t" else {"patch_size": 8}
    result = kdkit.distill(student, "resnet10t", tiny_data, teacher_weights=str(teacher_dir), head=head,
                           preset="none", kwargs=kwargs, **patch, **SMALL, output=str(tmp_path), name="t")
    saved, _, _ = load_saved(tmp_path / "t" / "student")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = saved.eval()(x).fused
        got = result.model.eval()(x)
    assert isinstance(got, torch.Tensor) and torch.allclose(got, want, atol=1e-5)
    expected = {"resnet10t": "ResNet"}.get(student, "VisionTransformerDistilled")
    assert type(result.model).__name__ == expected and not any(isinstance(m, kdkit.TokenHead | kdkit.DualHead)
                                                             for m in result.model.modules())
    result.model.train()
    with torch.no_grad():  # one tensor in training mode too: no pair of heads left to the caller
        assert isinstance(result.model(x), torch.Tensor)
