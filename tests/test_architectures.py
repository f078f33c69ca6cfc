"""Every architecture family of the DeiT/T2T comparisons, tiny, at 32x32: as a student under each
head strategy that fits it (one hard-distillation step), and as a frozen teacher."""

import pytest
import timm
import torch

from kdkit import KdkitError
from kdkit.losses import create_loss
from kdkit.models import create_model, create_student, create_teacher
from kdkit.models.t2t_vit import soft_split_size
from tests.helpers import TINY_DEIT, TINY_SWIN

K, B = 5, 4
TINY_T2T = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, token_dim=16)
TINY_PIT = dict(img_size=32, base_dims=(8, 8, 8), depth=(1, 1, 1), heads=(1, 2, 2))

# name -> (timm name, tiny kwargs, head strategies that fit it)
ARCHS = {
    "vit": ("vit_tiny_patch16_224", TINY_DEIT, ("token", "dual", "shared")),
    "deit": ("deit_tiny_patch16_224", TINY_DEIT, ("token", "dual", "shared")),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", TINY_DEIT, ("token",)),
    "swin": ("swin_tiny_patch4_window7_224", TINY_SWIN, ("dual", "shared")),
    "pvt_v2": ("pvt_v2_b0", dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2)),
               ("dual", "shared")),
    "cait": ("cait_xxs24_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, depth_token_only=1,
                                    num_heads=2), ("dual", "shared")),
    "t2t_vit": ("t2t_vit_7", TINY_T2T, ("token", "dual", "shared")),
    # w0/wa/wm chosen so that the 4 blocks fall into RegNet's 4 stages (widths 8, 16, 32, 64)
    "regnety": ("regnety_002", dict(depth=4, w0=8, wa=13.6, wm=2.0, group_size=8), ("dual", "shared")),
    "resnet": ("resnet10t", dict(channels=(8, 16, 32, 64), stem_width=8), ("dual", "shared")),
    # timm's efficientnet_b0 fixes its channel multiplier; test_efficientnet is the same
    # EfficientNet class (depthwise-separable + inverted-residual blocks with SE) at a tiny width.
    "efficientnet": ("test_efficientnet", {}, ("dual", "shared")),
    # PiT has set_distilled_training, but a distillation head only in its distilled models
    "pit": ("pit_ti_224", TINY_PIT, ("dual", "shared")),
    "pit_distilled": ("pit_ti_distilled_224", TINY_PIT, ("native",)),
}
ALL_HEADS = ("token", "dual", "shared")
STUDENT_CASES = [(a, h) for a, (_, _, heads) in ARCHS.items() for h in heads]
UNFIT_CASES = [(a, h) for a, (_, _, heads) in ARCHS.items() for h in ALL_HEADS if h not in heads]


def build(arch: str) -> torch.nn.Module:
    name, kwargs, _ = ARCHS[arch]
    return create_model(name, K, **kwargs)


def tiny_teacher():
    """A frozen tiny ResNet teacher at 32x32."""
    return create_teacher(create_model("resnet10t", K, channels=(8, 16, 32, 64), stem_width=8),
                          input_size=(3, 32, 32))


@pytest.mark.parametrize("arch, head", STUDENT_CASES)
def test_student_takes_one_hard_distillation_step(arch, head):
    teacher = tiny_teacher()
    student = create_student(build(arch), K, head)
    student.train()
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, K, (B,))
    t_logits = teacher(x)
    out = student(x)
    assert out.logits.shape == out.dist_logits.shape == t_logits.shape == (B, K)
    terms = create_loss("hard", task_weight=0.5, kd_weight=0.5)(out, t_logits, y)
    assert torch.isfinite(terms["loss"]) and terms["loss"].ndim == 0
    terms["loss"].backward()

    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable), \
        [n for n, p in trainable if p.grad is None]
    # The gradient reaches the input end of the network and both heads.
    first_name, first = trainable[0]
    assert first.grad.abs().sum() > 0, first_name
    grads = dict(trainable)
    class_head = student.model.get_classifier()
    class_head = class_head[0] if isinstance(class_head, tuple) else class_head  # distilled DeiT: (head, head_dist)
    assert class_head.weight.grad.abs().sum() > 0
    if head == "token":
        token = "model.dist_token" if arch == "deit_distilled" else "dist_token"
        assert grads[token].grad.abs().sum() > 0
    if head == "shared":
        assert out.logits is out.dist_logits
    else:
        dist_head = student.model.head_dist if head in ("native", "token") and "distilled" in arch else student.head_dist
        assert dist_head.weight.grad.abs().sum() > 0
        assert not torch.equal(out.logits, out.dist_logits)
    # Nothing flows into the teacher, and training the student leaves it frozen.
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not t_logits.requires_grad
    teacher.train()
    assert not any(m.training for m in teacher.modules())


@pytest.mark.parametrize("arch, head", UNFIT_CASES)
def test_heads_that_do_not_fit_are_clear_errors(arch, head):
    with pytest.raises(KdkitError, match="use head|needs"):
        create_student(build(arch), K, head)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_serves_as_frozen_teacher(arch):
    model = build(arch)
    reference = build(arch)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    teacher = create_teacher(model, input_size=(3, 32, 32))
    # With the student normalised like the teacher, the bridge is the identity.
    teacher.set_student_normalization(teacher.mean, teacher.std)
    buffers = {n: b.clone() for n, b in teacher.named_buffers()}
    teacher.train()  # a caller switching modes must not unfreeze it (BatchNorm, dropout)
    x = torch.randn(B, 3, 32, 32)
    logits = teacher(x)
    assert logits.shape == (B, K) and logits.dtype == torch.float32
    assert not logits.requires_grad and not logits.is_inference()
    assert not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(x), rtol=1e-4, atol=1e-5)
    for n, b in teacher.named_buffers():
        if n in buffers:  # BatchNorm running statistics do not move
            assert torch.equal(b, buffers[n]), n


@pytest.mark.parametrize("img, sides", [(224, (56, 28, 14)), (32, (8, 4, 2))])
def test_t2t_soft_split_token_counts_follow_the_paper(img, sides):
    """Eq. 3 of the paper, l_o = floor((h + 2p - k) / (k - o)) + 1 with stride s = k - o, by hand:
    224: (224 + 4 - 7) // 4 + 1 = 56, (56 + 2 - 3) // 2 + 1 = 28, (28 + 2 - 3) // 2 + 1 = 14;
    32:  (32 + 4 - 7) // 4 + 1 = 8,   (8 + 2 - 3) // 2 + 1 = 4,   (4 + 2 - 3) // 2 + 1 = 2."""
    model = timm.create_model("t2t_vit_7", num_classes=K, **{**TINY_T2T, "img_size": img}).eval()
    t2t = model.tokens_to_token
    x = torch.randn(1, 3, img, img)
    split0 = t2t.soft_split0(x)
    assert split0.shape == (1, 3 * 7 * 7, sides[0] ** 2)
    tokens = t2t(x)
    assert tokens.shape == (1, sides[2] ** 2, 32)
    assert model.num_patches == sides[2] ** 2 and model.pos_embed.shape == (1, 1 + sides[2] ** 2, 32)
    assert [soft_split_size(n, k, s, p) for n, (k, s, p) in zip((img, *sides[:2]), ((7, 4, 2), (3, 2, 1), (3, 2, 1)),
                                                                  strict=True)] == list(sides)
    with torch.no_grad():
        assert model.forward_features(x).shape == (1, 1 + sides[2] ** 2, 32)


def test_t2t_vit_14_builds_through_timm_and_matches_the_paper_size():
    """timm.create_model by name, at 32x32 with 10 classes; the 1000-class model has the paper's
    21.5M parameters (T2T-ViT_t-14, Table 6)."""
    model = timm.create_model("t2t_vit_14", num_classes=10, img_size=32, drop_path_rate=0.1)
    assert model.num_patches == 4 and model.global_pool == "token" and model.num_features == 384
    assert model.pretrained_cfg["architecture"] == "t2t_vit_14"
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with torch.device("meta"):
        full = timm.create_model("t2t_vit_14")
    assert round(sum(p.numel() for p in full.parameters()) / 1e6, 1) == 21.5
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3


def test_t2t_fixed_sinusoidal_position_embedding_is_not_trained():
    model = timm.create_model("t2t_vit_7", num_classes=K, **TINY_T2T)
    assert not model.pos_embed.requires_grad and model.cls_token.requires_grad
    pe = model.pos_embed[0]
    torch.testing.assert_close(pe[0, 0::2], torch.zeros(16))  # position 0: sin 0 = 0, cos 0 = 1
    torch.testing.assert_close(pe[0, 1::2], torch.ones(16))
    torch.testing.assert_close(pe[3, 0], torch.sin(torch.tensor(3.0)))
    learned = timm.create_model("t2t_vit_7", num_classes=K, learned_pos=True, **TINY_T2T)
    assert learned.pos_embed.requires_grad


@pytest.mark.parametrize("name, kwargs, auto, token_says", [
    # timm resamples a dynamic ViT's position table by its prefix-token count at every forward
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                                  dynamic_img_size=True), "dual", "dynamic_img_size.*use head 'dual'"),
    # Eva's rotary embedding is built for its own prefix tokens; it has no patch-dropout module to hook
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=1), "dual", "not the layout.*use head 'dual'"),
    # a model with its own distillation head is pointed to it, not to dual (which refuses it)
    # (its attention is built for 224 px)
    ("efficientformerv2_s0", dict(img_size=224, depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32)), "native",
     "no class token: use head 'native'"),
])
def test_the_automatic_head_takes_a_head_that_fits_and_token_says_which(name, kwargs, auto, token_says):
    student = create_student(create_model(name, K, **kwargs), K, "auto")
    assert type(student).__name__.lower().startswith(auto)
    out = student.train()(torch.randn(2, 3, kwargs.get("img_size", 32), kwargs.get("img_size", 32)))
    (out.logits.sum() + out.dist_logits.sum()).backward()
    with pytest.raises(KdkitError, match=token_says):
        create_student(create_model(name, K, **kwargs), K, "token")
