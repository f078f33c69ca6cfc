"""timm's optimizer factory sees through the head wrappers: no-decay list and layer-wise lr decay."""

import pytest
import timm
from timm.optim import create_optimizer_v2
from torch import nn

from kdkit import KdkitError
from kdkit.models.student import SharedHead, wrap_student
from tests.helpers import TINY_SWIN

TINY_VIT = dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=10)

CASES = [
    ("deit_tiny_patch16_224", TINY_VIT, "token"),  # kdkit inserts dist_token and head_dist
    ("deit_tiny_distilled_patch16_224", TINY_VIT, "token"),  # timm's own token and head_dist
    ("swin_tiny_patch4_window7_224", dict(TINY_SWIN, num_classes=10), "dual"),
    ("resnet10t", dict(num_classes=10), "dual"),
    ("resnet10t", dict(num_classes=10), "shared"),
]


def groups(model: nn.Module, **kw) -> dict[str, tuple[float, float]]:
    """name -> (weight_decay, lr_scale) as timm's create_optimizer_v2 assigns them."""
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, **kw)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"], g.get("lr_scale", 1.0)) for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("layer_decay", [None, 0.75])
@pytest.mark.parametrize("name, kwargs, head", CASES)
def test_wrapped_param_groups_match_the_bare_model(name, kwargs, head, layer_decay):
    wrapped = wrap_student(timm.create_model(name, pretrained=False, **kwargs), head)
    bare = timm.create_model(name, pretrained=False, **kwargs)
    want, got = groups(bare, layer_decay=layer_decay), groups(wrapped, layer_decay=layer_decay)
    own = {n for n in got if not n.startswith("model.")}
    assert set(got) == {f"model.{n}" for n in want} | own
    for n, wd_scale in want.items():
        assert got[f"model.{n}"] == wd_scale, n
    cls_head = bare.pretrained_cfg["classifier"]
    assert own == ({"dist_token", "head_dist.weight", "head_dist.bias"} if name == "deit_tiny_patch16_224"
                   else {"head_dist.weight", "head_dist.bias"} if head == "dual" else set())
    for suffix in ("weight", "bias"):
        if f"head_dist.{suffix}" in own:
            assert got[f"head_dist.{suffix}"] == want[f"{cls_head}.{suffix}"]
    if "dist_token" in own:
        assert got["dist_token"] == (0.0, want["cls_token"][1])


def test_token_vit_plain_facts():
    """depth 2 gives layers stem, block 0, block 1 + norm, head: lr scales 0.75**3 .. 1."""
    wrapped = wrap_student(timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY_VIT), "token")
    plain, ld = groups(wrapped), groups(wrapped, layer_decay=0.75)
    for n in ("model.pos_embed", "model.cls_token", "dist_token", "model.blocks.0.norm1.weight", "head_dist.bias"):
        assert plain[n][0] == ld[n][0] == 0.0, n
    for n in ("model.patch_embed.proj.weight", "model.blocks.1.mlp.fc1.weight", "head_dist.weight"):
        assert plain[n][0] == ld[n][0] == 0.05, n
    scales = {"model.cls_token": 0.75**3, "dist_token": 0.75**3, "model.pos_embed": 0.75**3,
              "model.blocks.0.attn.qkv.weight": 0.75**2, "model.blocks.1.attn.qkv.weight": 0.75,
              "model.norm.weight": 0.75, "model.head.weight": 1.0, "head_dist.weight": 1.0, "head_dist.bias": 1.0}
    for n, s in scales.items():
        assert ld[n][1] == pytest.approx(s), n
    assert wrapped.no_weight_decay() >= {"model.pos_embed", "model.cls_token", "dist_token"}


def test_swin_relative_position_tables_are_not_decayed():
    wrapped = wrap_student(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **TINY_SWIN), "dual")
    tables = [n for n, _ in wrapped.named_parameters() if "relative_position_bias_table" in n]
    got = groups(wrapped)
    assert tables and all(got[n][0] == 0.0 for n in tables)


def test_grad_checkpointing_is_forwarded():
    wrapped = wrap_student(timm.create_model("resnet10t", pretrained=False, num_classes=10), "dual")
    wrapped.set_grad_checkpointing()
    assert wrapped.model.grad_checkpointing is True
    wrapped.set_grad_checkpointing(False)
    assert wrapped.model.grad_checkpointing is False
    with pytest.raises(KdkitError, match="gradient checkpointing"):
        SharedHead(nn.Linear(2, 2)).set_grad_checkpointing()
    SharedHead(nn.Linear(2, 2)).set_grad_checkpointing(False)  # nothing to turn off


def test_layer_decay_without_a_group_matcher_matches_timm_fallback():
    """A non-timm model: timm's fallback grouping (by pretrained_cfg's classifier) survives the wrapper."""
    bare = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    bare.pretrained_cfg = {"classifier": "1"}
    want, got = groups(bare, layer_decay=0.75), groups(SharedHead(bare), layer_decay=0.75)
    assert want["0.weight"][1] == 0.75 and want["1.weight"][1] == 1.0
    assert {n: got[f"model.{n}"] for n in want} == want
