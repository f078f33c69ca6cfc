"""kdkit's T2T-ViT (and CIFAR ResNet-9) speak timm's model API: forward_intermediates, features_only,
gradient checkpointing, TorchScript, set_input_size / dynamic_img_size, the optimizer hooks.
Tiny models at 32x32 (a 2x2 token grid); timm's own test suite on the full models is
bench/timm_model_tests.py (docs/results.md)."""

import copy

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from kdkit.models import create_student

K, B, DIM, DEPTH = 5, 2, 32, 3
TINY = dict(img_size=32, embed_dim=DIM, depth=DEPTH, num_heads=2, token_dim=16, num_classes=K)
# 32 -> 8 -> 4 -> 2 tokens a side (the paper's eq. 3 by hand: (32+4-7)//4+1, (8+2-3)//2+1, (4+2-3)//2+1)
GRID = 2

# the state-dict names of kdkit's first T2T-ViT (depth 1), which saved students carry
SAVED_NAMES = {
    "cls_token", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias",
    *(f"blocks.0.{n}" for n in ("attn.proj.bias", "attn.proj.weight", "attn.qkv.weight", "mlp.fc1.bias",
                                "mlp.fc1.weight", "mlp.fc2.bias", "mlp.fc2.weight", "norm1.bias", "norm1.weight",
                                "norm2.bias", "norm2.weight")),
    *(f"tokens_to_token.attention{i}.{n}" for i in (1, 2)
      for n in ("mlp.fc1.bias", "mlp.fc1.weight", "mlp.fc2.bias", "mlp.fc2.weight", "norm1.bias", "norm1.weight",
                "norm2.bias", "norm2.weight", "proj.bias", "proj.weight", "qkv.weight")),
    "tokens_to_token.project.bias", "tokens_to_token.project.weight",
}


def t2t(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("t2t_vit_7", **{**TINY, **kwargs}).eval()


def block_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output as forward hooks see it, (B, 1 + N, DIM)."""
    seen = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: seen.append(out)) for b in model.blocks]
    with torch.no_grad():
        model.forward_features(x)
    for h in hooks:
        h.remove()
    return seen


def count_calls(module: nn.Module) -> list[int]:
    """A list that grows by one each time `module` starts a forward. A pre-hook: a checkpointed
    recomputation stops once it has what the backward needs, before the forward hooks would run."""
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def as_map(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, C) block output -> (B, C, GRID, GRID) map of its patch tokens, row-major."""
    patches = tokens[:, 1:]
    return torch.stack([patches[:, r * GRID:(r + 1) * GRID] for r in range(GRID)], dim=1).permute(0, 3, 1, 2)


def test_forward_intermediates_are_the_blocks_outputs_and_end_at_forward_features():
    model = t2t()
    x = torch.randn(B, 3, 32, 32)
    blocks = block_outputs(model, x)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        features = model.forward_features(x)
        nlc = model.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        with_prefix = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True, intermediates_only=True)
    assert len(inter) == DEPTH and all(t.shape == (B, DIM, GRID, GRID) for t in inter)
    for got, block in zip(inter, blocks, strict=True):
        torch.testing.assert_close(got, as_map(block), rtol=0, atol=0)
    torch.testing.assert_close(final, features, rtol=0, atol=0)
    assert [t.shape for t in nlc] == [(B, GRID * GRID, DIM)] * 2
    torch.testing.assert_close(nlc[1], blocks[-1][:, 1:], rtol=0, atol=0)
    # the last block's output after the final norm: forward_features' patch tokens, as a map
    assert len(normed) == 1
    torch.testing.assert_close(normed[0], as_map(features), rtol=1e-6, atol=1e-6)
    (tokens, prefix), = with_prefix
    torch.testing.assert_close(prefix, blocks[1][:, :1], rtol=0, atol=0)
    torch.testing.assert_close(tokens, as_map(blocks[1]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_stop_early_and_pruning_keep_the_taps():
    model = t2t()
    x = torch.randn(B, 3, 32, 32)
    blocks = block_outputs(model, x)
    calls = count_calls(model.blocks[2])
    with torch.no_grad():
        final, (tap,) = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert not calls  # block 2 never ran
    torch.testing.assert_close(tap, as_map(blocks[1]), rtol=0, atol=0)
    torch.testing.assert_close(final, model.norm(blocks[1]), rtol=0, atol=0)

    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([1], prune_norm=True) == [1]
    assert len(pruned.blocks) == 2 and isinstance(pruned.norm, nn.Identity)
    assert pruned.num_classes == 0 and pruned.global_pool == "" and isinstance(pruned.head, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_features(x), blocks[1], rtol=0, atol=0)
        assert pruned(x).shape == (B, 1 + GRID * GRID, DIM)  # no pooling, no head: the tokens


def test_features_only_gives_the_last_blocks_as_maps():
    torch.manual_seed(0)
    feats = timm.create_model("t2t_vit_7", features_only=True, **TINY).eval()
    assert feats.feature_info.channels() == [DIM] * 3  # timm's ViT default: the last 3 blocks
    assert feats.feature_info.reduction() == [32 // GRID] * 3
    assert feats.feature_info.module_name() == [f"blocks.{i}" for i in range(DEPTH - 3, DEPTH)]
    reference = t2t()  # same seed: the same weights
    x = torch.randn(B, 3, 32, 32)
    blocks = block_outputs(reference, x)
    with torch.no_grad():
        outs = feats(x)
    assert len(outs) == 3
    for out, block in zip(outs, blocks[-3:], strict=True):
        torch.testing.assert_close(out, as_map(block), rtol=0, atol=0)

    first = timm.create_model("t2t_vit_7", features_only=True, out_indices=(0,), **TINY)
    assert len(first.model.blocks) == 1 and first.feature_info.module_name() == ["blocks.0"]
    assert [o.shape for o in first(x)] == [(B, DIM, GRID, GRID)]


@pytest.mark.parametrize("drop_path", [0.0, 0.2])
def test_grad_checkpointing_recomputes_blocks_with_equal_outputs_and_gradients(drop_path):
    x = torch.randn(B, 3, 32, 32)
    runs = []
    for enable in (False, True):
        model = t2t(drop_path_rate=drop_path, learned_pos=True).train()
        model.set_grad_checkpointing(enable)
        block_calls, t2t_calls = count_calls(model.blocks[0]), count_calls(model.tokens_to_token.attention1)
        torch.manual_seed(1)  # the same drop-path draws
        out = model(x)
        _, inter = model.forward_intermediates(x, indices=[0])
        (out.square().mean() + inter[0].mean()).backward()
        calls = {"block": len(block_calls), "t2t": len(t2t_calls)}
        runs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}, calls))
    (out0, grads0, calls0), (out1, grads1, calls1) = runs
    # without checkpointing each forward runs a layer once; with it, once more in the backward pass
    assert calls0 == {"block": 2, "t2t": 2} and calls1 == {"block": 4, "t2t": 4}
    torch.testing.assert_close(out1, out0, rtol=1e-6, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for n, g in grads0.items():
        assert g is not None, n
        torch.testing.assert_close(grads1[n], g, rtol=1e-6, atol=1e-6, msg=n)


def test_torchscript_gives_the_same_logits_and_features():
    model = t2t()
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-6, atol=1e-6)
        # features_only: TorchScript compiles forward_intermediates (FeatureGetterNet's forward calls it)
        torch.manual_seed(0)
        feats = timm.create_model("t2t_vit_7", features_only=True, out_indices=(0, 2), **TINY).eval()
        want = [as_map(b) for b in block_outputs(model, x)]
        got = torch.jit.script(feats)(x)
    assert len(got) == 2
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[2], rtol=1e-6, atol=1e-6)


def test_state_dict_names_are_unchanged_and_the_fixed_table_is_a_buffer():
    model = timm.create_model("t2t_vit_7", **{**TINY, "depth": 1})
    assert set(model.state_dict()) == SAVED_NAMES
    assert "pos_embed" in dict(model.named_buffers()) and "pos_embed" not in dict(model.named_parameters())
    assert model.no_weight_decay() == {"cls_token"}
    learned = timm.create_model("t2t_vit_7", **{**TINY, "depth": 1}, learned_pos=True)
    assert set(learned.state_dict()) == SAVED_NAMES and "pos_embed" in dict(learned.named_parameters())
    assert learned.no_weight_decay() == {"cls_token", "pos_embed"}
    # a state dict in the saved layout loads, the fixed table included
    state = {n: torch.full_like(t, 0.5) for n, t in learned.state_dict().items()}
    model.load_state_dict(state)
    torch.testing.assert_close(model.pos_embed, torch.full((1, 1 + GRID * GRID, DIM), 0.5))


def _groups(model: nn.Module) -> dict[str, tuple[float, float]]:
    """name -> (weight_decay, lr_scale) as timm's optimizer factory assigns them with layer decay."""
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"], g["lr_scale"]) for g in opt.param_groups for p in g["params"]}


def test_optimizer_hooks_group_and_decay_as_timm_vit():
    """Layer-wise lr decay and the no-decay list as timm gives its own ViT of the same depth."""
    got = _groups(t2t(learned_pos=True))
    vit = _groups(timm.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=DIM, depth=DEPTH,
                                    num_heads=2, qkv_bias=False, num_classes=K))
    assert got["cls_token"] == got["pos_embed"] == vit["cls_token"] == vit["pos_embed"]
    assert got["cls_token"] == (0.0, 0.5 ** (DEPTH + 1))  # the embedding: the lowest layer, not decayed
    assert got["tokens_to_token.attention1.qkv.weight"] == vit["patch_embed.proj.weight"]
    assert got["tokens_to_token.project.bias"] == vit["patch_embed.proj.bias"]
    common = [n for n in vit if n.startswith(("blocks.", "norm.", "head."))]
    assert len(common) > 10 and all(got[n] == vit[n] for n in common), [n for n in common if got[n] != vit[n]]
    assert set(got) - set(vit) == {n for n in got if n.startswith("tokens_to_token.")}


def test_classifier_and_pooling():
    model = t2t()
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 0])
        torch.testing.assert_close(model(x), model.head(feats[:, 0]))
        model.reset_classifier(3, "avg")
        assert model.get_classifier().out_features == 3 and model(x).shape == (B, 3)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1))
        model.reset_classifier(0, "max")
        torch.testing.assert_close(model(x), feats[:, 1:].amax(1))
    assert not model.head.training
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "catavgmax")
    # a new head follows the model's dtype and mode
    model = t2t().to(torch.float64)
    model.reset_classifier(4)
    assert model.head.weight.dtype == torch.float64 and not model.head.training


def test_set_input_size_and_dynamic_img_size_resample_the_position_embedding():
    x64 = torch.randn(1, 3, 64, 48)  # -> 4x3 tokens
    model = t2t()
    with pytest.raises(AssertionError, match="dynamic_img_size"):
        model(x64)
    dynamic = t2t(dynamic_img_size=True)
    resized = t2t()
    resized.set_input_size((64, 48))
    assert resized.num_patches == 12 and resized.pos_embed.shape == (1, 13, DIM)
    assert "pos_embed" in dict(resized.named_buffers())
    # the class token's entry is kept, the grid's resampled (bicubic, timm's resample_abs_pos_embed)
    torch.testing.assert_close(resized.pos_embed[:, 0], model.pos_embed[:, 0])
    grid = model.pos_embed[:, 1:].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(4, 3), mode="bicubic", antialias=True)
    torch.testing.assert_close(resized.pos_embed[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 12, DIM))
    with torch.no_grad():
        out = resized(x64)
        torch.testing.assert_close(dynamic(x64), out)
        x32 = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(dynamic(x32), model(x32))
    assert out.shape == (1, K)
    learned = t2t(learned_pos=True)
    learned.requires_grad_(False)
    learned.set_input_size(64)
    assert isinstance(learned.pos_embed, nn.Parameter) and not learned.pos_embed.requires_grad


def test_intermediates_under_kdkit_token_head_drop_both_prefix_tokens():
    """kdkit's `token` head inserts a distillation token after the class token (2 prefix tokens)."""
    student = create_student(t2t(), K, "token").eval()
    model = student.model
    x = torch.randn(B, 3, 32, 32)
    blocks = block_outputs(model, x)
    assert blocks[0].shape == (B, 2 + GRID * GRID, DIM)
    with torch.no_grad():
        (tap,) = model.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(tap, blocks[-1][:, 2:], rtol=0, atol=0)
    torch.testing.assert_close(pooled, model.norm(blocks[-1])[:, 0])


def test_fx_trace_matches_eager():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = t2t()
    x = torch.randn(B, 3, 32, 32)
    fx = create_feature_extractor(model, return_nodes={"blocks.1": "b1", "head": "logits"})
    with torch.no_grad():
        out = fx(x)
        torch.testing.assert_close(out["logits"], model(x))
        torch.testing.assert_close(out["b1"], block_outputs(model, x)[1])


def test_resnet9_intermediates_and_features_only():
    torch.manual_seed(0)
    model = timm.create_model("resnet9_cifar_s", num_classes=K).eval()
    x = torch.randn(B, 3, 32, 32)
    seen = {}
    for i in (0, 2, 3, 5):  # the prep conv, the stage ends
        model.features[i].register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        features = model.forward_features(x)
    assert [tuple(t.shape) for t in inter] == [(B, 32, 32, 32), (B, 64, 16, 16), (B, 128, 8, 8), (B, 256, 4, 4)]
    for got, i in zip(inter, (0, 2, 3, 5), strict=True):
        torch.testing.assert_close(got, seen[i], rtol=0, atol=0)
    torch.testing.assert_close(final, features, rtol=0, atol=0)
    # the logits: Page's 1/8 on the linear layer over the global max-pool
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.fc(features.amax((2, 3))) / 8)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), features.amax((2, 3)))
    for feature_cls in ("list", "getter"):
        torch.manual_seed(0)
        feats = timm.create_model("resnet9_cifar_s", features_only=True, feature_cls=feature_cls).eval()
        assert feats.feature_info.channels() == [32, 64, 128, 256]
        assert feats.feature_info.reduction() == [1, 2, 4, 8]
        with torch.no_grad():
            for got, want in zip(feats(x), inter, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError):
        timm.create_model("resnet9_cifar_s", not_a_model_arg=1)


def test_resnet9_grad_checkpointing_and_torchscript():
    x = torch.randn(B, 3, 32, 32)
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("resnet9_cifar_s", num_classes=K).train()
        model.set_grad_checkpointing(enable)
        calls = count_calls(model.features[2])
        model(x).sum().backward()
        assert len(calls) == 1 + enable
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-6, atol=1e-6, msg=n)
    plain = timm.create_model("resnet9_cifar_s", num_classes=K).eval()  # no hooks: TorchScript compiles those
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(plain)(x), model.eval()(x), rtol=1e-6, atol=1e-6)


def test_t2t_layer_attention_is_single_head_attention_on_the_token_sequence():
    """The T2T layer's attention, written out on (B, N, d) tensors as the paper's single head:
    softmax(q k^T / sqrt(d)) v, its residual the value path; the 4-D layout torch's ONNX exporter takes
    must not change it (1e-5)."""
    from kdkit.models.t2t_vit import T2TLayer

    torch.manual_seed(0)
    layer = T2TLayer(27, 16).eval()
    x = torch.randn(3, 10, 27)
    with torch.no_grad():
        q, k, v = layer.qkv(layer.norm1(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / 16 ** 0.5, dim=-1) @ v
        y = v + layer.proj(attn)
        want = y + layer.mlp(layer.norm2(y))
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)


def test_a_distilled_t2t_is_the_token_student_as_one_timm_model():
    """T2T-ViT(distilled=True) has kdkit's token where the `token` head inserts it (after the position
    embedding, no position of its own): with the student's weights, timm's distilled API gives the
    student's two heads in distilled training and their average otherwise."""
    student = create_student(t2t(), K, "token").eval()
    with torch.no_grad():
        for p in (student.dist_token, student.head_dist.weight, student.head_dist.bias):
            p.normal_(0, 0.5)
    distilled = t2t(distilled=True)
    state = {**student.model.state_dict(), "dist_token": student.dist_token,
             **{f"head_dist.{k}": v for k, v in student.head_dist.state_dict().items()}}
    distilled.load_state_dict(state, strict=True)
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        out = student(x)
        torch.testing.assert_close(distilled(x), (out.logits + out.dist_logits) / 2, atol=1e-6, rtol=0)
        distilled.set_distilled_training(True)
        cls, dist = distilled.train()(x)
        torch.testing.assert_close(cls, out.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(dist, out.dist_logits, atol=1e-6, rtol=0)
    assert distilled.num_prefix_tokens == 2 and "dist_token" in distilled.no_weight_decay()
    with pytest.raises(ValueError, match="global_pool 'token'"):
        t2t(distilled=True, global_pool="avg")
    with pytest.raises(ValueError, match="distilled=True"):
        t2t().set_distilled_training(True)
