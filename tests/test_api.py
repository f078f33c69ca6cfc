"""The Python API with custom nn.Modules, and the step contract with Mixup/CutMix."""

import torch
from timm.data import Mixup
from torch import nn

import kdkit
from kdkit import Batch, DistillationStep, StudentOut, create_loss, create_student, create_teacher


class TinyConvNet(nn.Module):
    """A user's own classifier: no timm, just forward."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def test_distill_custom_modules_in_one_call(tiny_data, tmp_path):
    student, teacher = TinyConvNet(), TinyConvNet()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = kdkit.distill(student, teacher, str(tiny_data), head="shared", loss="soft", tau=2.0, epochs=1,
                           img_size=32, batch_size=16, workers=0, warmup_epochs=0, output=str(tmp_path),
                           name="api", progress=False)
    assert result["model"].model is student
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert result["eval"]["n"] == 60 and result["conventions"]["tau"] == 2.0
    assert (tmp_path / "api" / "student" / "model.safetensors").is_file()


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
