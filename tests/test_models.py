"""Head strategies on DeiT, ViT, Swin and ConvNet students; the teacher's normalisation bridge."""

import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from kdkit import KdkitError, StudentOut, create_student, create_teacher
from kdkit.models import Teacher, resolve_model_name
from tests.helpers import TINY_DEIT, TINY_SWIN

CASES = [
    ("deit_tiny", "token", TINY_DEIT),                      # timm's own distillation token
    ("vit_tiny_patch16_224", "token", TINY_DEIT),           # token inserted by kdkit
    ("vit_tiny_patch16_224", "dual", TINY_DEIT),
    ("swin_tiny_patch4_window7_224", "dual", TINY_SWIN),
    ("resnet10t", "dual", {}),
    ("resnet10t", "shared", {}),
]


@pytest.mark.parametrize("name, head, kwargs", CASES)
def test_heads_give_two_trainable_outputs(name, head, kwargs):
    kw = dict(kwargs)
    img, patch = kw.pop("img_size", None), kw.pop("patch_size", None)
    student = create_student(name, 7, head, img_size=img, patch_size=patch, model_kwargs=kw)
    out = student(torch.randn(4, 3, 32, 32))
    assert isinstance(out, StudentOut)
    assert out.logits.shape == out.dist_logits.shape == (4, 7)
    out.dist_logits.sum().backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    if head == "token":
        token = "model.dist_token" if name == "deit_tiny" else "dist_token"
        assert grads[token] is not None and grads[token].abs().sum() > 0
    if head == "shared":
        assert out.logits is out.dist_logits
    else:
        assert not torch.equal(out.logits, out.dist_logits)


def test_inserted_token_is_attended_by_the_class_token():
    """With the token inserted the class head's output changes (the token takes part in attention)."""
    kw = dict(depth=2, embed_dim=32, num_heads=2)
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, **kw).eval()
    student = create_student(plain, 5, "token").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, **kw)
        before.load_state_dict(plain.state_dict())
        ref = before.eval()(x)
        out = student(x)
    assert out.logits.shape == ref.shape and not torch.allclose(out.logits, ref)
    assert student.model.num_prefix_tokens == 2


def test_token_head_needs_a_class_token():
    with pytest.raises(KdkitError, match="dual"):
        create_student("resnet10t", 3, "token")


def test_auto_head_picks_token_for_vit_and_dual_for_convnet():
    assert type(create_student("deit_tiny", 3, model_kwargs=dict(depth=1, embed_dim=32, num_heads=2),
                               img_size=32, patch_size=8)).__name__ == "TokenHead"
    assert type(create_student("resnet10t", 3)).__name__ == "DualHead"


def test_short_names_resolve_and_unknown_names_suggest():
    assert resolve_model_name("deit_tiny") == "deit_tiny_distilled_patch16_224"
    assert resolve_model_name("regnety_160") == "regnety_160.deit_in1k"
    with pytest.raises(KdkitError, match="resnet50"):
        resolve_model_name("resnet5O")


def test_img_size_on_a_model_that_does_not_take_it_is_a_clear_error():
    with pytest.raises(KdkitError, match="does not accept"):
        create_student("resnet10t", 3, patch_size=4)


def test_teacher_bridge_matches_manual_renormalisation_and_resize():
    net = timm.create_model("resnet10t", num_classes=4).eval()
    t_mean, t_std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    s_mean, s_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher = Teacher(net, t_mean, t_std, (3, 48, 48), s_mean, s_std, interpolation="bilinear")
    raw = torch.rand(2, 3, 32, 32)
    student_batch = (raw - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1)
    expected_input = F.interpolate(raw, size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
    expected_input = (expected_input - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net(expected_input)
    assert torch.allclose(teacher(student_batch), expected, atol=1e-4)


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher = create_teacher(timm.create_model("resnet10t", num_classes=3), mean=(0.5,) * 3, std=(0.5,) * 3)
    teacher.train()
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher(torch.randn(2, 3, 32, 32))
    assert not out.requires_grad and out.dtype == torch.float32


def test_hub_weights_offline_fail_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KdkitError, match="pretrained weights"):
        create_teacher("resnet10t")


def test_kdkit_models_registers_the_cifar_and_t2t_models_with_timm_and_bare_kdkit_stays_light():
    """docs/cli.md: `import kdkit.models` registers them; `import kdkit` imports neither torch nor timm."""
    code = ("import sys, kdkit; assert 'torch' not in sys.modules and 'timm' not in sys.modules; "
            "import timm; assert not timm.is_model('t2t_vit_7'); import kdkit.models; "
            "print(timm.create_model('t2t_vit_7', img_size=32).num_classes, "
            "timm.create_model('resnet9_cifar_s').num_classes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1000", "10"], out  # T2T-ViT's ImageNet head, the CIFAR model's 10 classes
