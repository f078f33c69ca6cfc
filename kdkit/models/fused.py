"""A saved student as one plain timm model whose output is its late fusion, (class + dist) / 2, so
that `timm.create_model("local-dir:DIR", pretrained=True)` gives the fused logits with no kdkit.

- `shared` head, or a timm distilled DeiT (its own token): the saved model already is that model
  (timm's VisionTransformerDistilled averages its two heads in eval mode).
- `dual` head: both heads are linear maps of the same pooled features, so their average is one
  linear layer with the averaged weight and bias, written over the model's own classifier.
- `token` inserted into a plain class-token ViT: the same network as timm's
  VisionTransformerDistilled (class token, distillation token, patches; the token has no position
  embedding, which is a zero row in the distilled model's), so it is saved as `deit_*_distilled_*`.
- `token` inserted into a T2T-ViT: the same network as T2T-ViT built with `distilled=True` (its
  token is inserted after the position embedding, as kdkit's), saved under its own name.

Anything else is refused with the reason. Every collapse is checked against the student's fused
logits before it is returned.
"""

from __future__ import annotations

import copy
import re

import timm
import torch
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from kdkit.models.student import HEADS, eval_mode, final_linear
from kdkit.models.t2t_vit import T2TViT
from kdkit.registry import KdkitError

# largest |plain - fused| accepted, relative to the logits' scale (float32 reordering is ~1e-7)
TOLERANCE = 1e-5


def fused_timm_model(student: nn.Module, config: dict) -> tuple[dict[str, Tensor], dict, float]:
    """(state dict, config.json, check) of a plain timm model computing `student`'s fused logits.

    student: a head-wrapped saved student (kdkit.engine.run.load_saved), in eval mode.
    config: its config.json. The returned config is timm's layout (architecture, num_classes,
    label_names, model_args, pretrained_cfg) without the kdkit block, plus `kdkit_export` (where it came
    from; timm ignores it). check: the largest |plain - fused| found by check_fused. Raises KdkitError when the heads cannot be collapsed exactly.
    """
    head = HEADS.name_of(student)
    state = {k: v.detach().clone().contiguous() for k, v in student.model.state_dict().items()}
    out = {k: v for k, v in config.items() if k != "kdkit"}
    out["kdkit_export"] = {"head": "fused", "from_architecture": config["architecture"],
                           "from_head": head, "kdkit_version": config.get("kdkit", {}).get("version")}
    if head == "dual":
        _average_into_classifier(student, state, config)
    elif head == "token" and not student.native and isinstance(student.model, T2TViT):
        out["model_args"] = _as_distilled_t2t(student, state, config)
    elif head == "token" and not student.native:
        out["architecture"], out["model_args"] = _as_distilled(student, state, config)
    elif head not in ("token", "shared", "native"):  # native: timm averages its own two heads
        raise KdkitError(f"cannot collapse a {head} student into one timm head")
    return state, out, check_fused(student, state, out)


def _average_into_classifier(student: nn.Module, state: dict[str, Tensor], config: dict) -> None:
    """Write the average of the model's classifier and the dual head into the classifier's own layers.

    The classifier maps the pooled features p (what `head_dist` reads: forward_head(pre_logits=True))
    to the logits through its final layers L_i (Linear, or 1x1 Conv2d, with a bias): one reading all
    of p, or several reading consecutive slices p_i of it (CrossViT's and EfficientViM's branch heads),
    each through an elementwise affine map z_i = s_i * p_i + t_i (identity, dropout, or an eval-mode
    BatchNorm: EfficientViT's NormLinear), the logits being sum_i w_i (W_i z_i + b_i) + c (w_i = 1
    for one layer; CrossViT averages its branches, EfficientViM weighs them). With the dual head
    d = W_d p + b_d, the fused logits (y + d) / 2 are the classifier's own with

        W_i' = (W_i + W_d,i diag(1 / s_i) / w_i) / 2
        b_i' = (b_i + (b_d - sum_j W_d,j (t_j / s_j) - c) / sum_j w_j) / 2.

    s_i, t_i, w_i and c are measured through the model on a random batch (forward hooks on the L_i;
    w_i by moving b_i), in float64; check_fused then compares the result with the student's fused logits.
    """
    model, dist = student.model, student.head_dist
    if getattr(student, "plain", False):  # a module of the user's: the dual head averages into its final Linear
        found = final_linear(model)
        cls = found[1] if found else None
        if not isinstance(cls, nn.Linear) or cls.bias is None or cls.weight.shape != dist.weight.shape:
            raise KdkitError(f"the dual head of {type(model).__name__} cannot be collapsed into its classifier "
                             f"({type(cls).__name__}, not a linear layer with a bias on the pooled features): "
                             f"export ONNX instead (kdkit export RUN --format onnx)")
        name = next(n for n, m in model.named_modules() if m is cls)
        state[f"{name}.weight"] = ((cls.weight + dist.weight) / 2).detach().contiguous()
        state[f"{name}.bias"] = ((cls.bias + dist.bias) / 2).detach().contiguous()
        return
    cls = model.get_classifier() if hasattr(model, "get_classifier") else None

    def refuse(why: str) -> KdkitError:
        return KdkitError(f"the dual head of {type(model).__name__} cannot be collapsed into its classifier ({why}): "
                          f"export ONNX instead (kdkit export RUN --format onnx)")

    layers = [m for m in cls.modules() if isinstance(m, (nn.Linear, nn.Conv2d))] if isinstance(cls, nn.Module) else []
    if not layers:
        raise refuse(f"{type(cls).__name__}, with no linear layer")
    if any(m.bias is None for m in layers):
        raise refuse("a classifier layer without a bias")
    if any(isinstance(m, nn.Conv2d) and (m.kernel_size != (1, 1) or m.groups != 1) for m in layers):
        raise refuse("a convolution wider than 1x1")
    dims = [m.in_features if isinstance(m, nn.Linear) else m.in_channels for m in layers]
    if sum(dims) != dist.in_features:
        raise refuse(f"its layers read {sum(dims)} features, the pooled features are {dist.in_features}")
    p, y, z, w = _measure_classifier(model, layers, config["pretrained_cfg"]["input_size"], refuse)
    wd, bd = dist.weight.detach().double(), dist.bias.detach().double()
    scales, shifts, lo = [], [], 0
    for i, d in enumerate(dims):
        s_i, t_i = _elementwise_affine(p[:, lo:lo + d], z[i], refuse)
        scales.append(s_i)
        shifts.append(t_i)
        lo += d
    own = sum(w[i] * (z[i] @ _matrix(m).T + m.bias.detach().double()) for i, m in enumerate(layers))
    c = (y - own).mean(0)
    if not torch.allclose(y - own, c.expand_as(y), atol=1e-5 * max(1.0, y.abs().max().item())):
        raise refuse("its logits are not a weighted sum of its layers' outputs")
    slices = torch.split(wd, dims, dim=1)
    shift = bd - c - sum(sl @ (t / s) for sl, s, t in zip(slices, scales, shifts, strict=True))
    names = {id(m): n for n, m in model.named_modules()}
    for m, sl, s_i, w_i in zip(layers, slices, scales, w, strict=True):
        weight = (_matrix(m) + sl / s_i[None, :] / w_i) / 2
        bias = (m.bias.detach().double() + shift / sum(w)) / 2
        state[f"{names[id(m)]}.weight"] = weight.reshape(m.weight.shape).to(m.weight.dtype).contiguous()
        state[f"{names[id(m)]}.bias"] = bias.to(m.bias.dtype).contiguous()


def _matrix(layer: nn.Module) -> Tensor:
    """A Linear's or 1x1 Conv2d's weight as a (out, in) float64 matrix."""
    return layer.weight.detach().double().reshape(layer.weight.shape[0], -1)


def _measure_classifier(model: nn.Module, layers: list[nn.Module], input_size: list[int],
                        refuse) -> tuple[Tensor, Tensor, list[Tensor], list[float]]:
    """On a fixed random batch: the pooled features p (B, D), the logits y (B, K) and each layer's
    input z_i (B, D_i), in float64; and each layer's weight w_i in the logits (moving its bias by 1
    moves every logit by w_i)."""
    x = torch.randn(16, *input_size, generator=torch.Generator().manual_seed(0))
    seen: dict = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, args[0].detach().flatten(1)))
             for i, m in enumerate(layers)]
    weights = []
    try:
        # eval mode: inference's normalisation, and no running statistic moved by the random batch
        with torch.no_grad(), torch.random.fork_rng(devices=[]), eval_mode(model):
            feats = model.forward_features(x)
            p = model.forward_head(feats, pre_logits=True).double()
            y = model.forward_head(feats).double()
            if p.ndim != 2:
                raise refuse(f"pooled features of shape {tuple(p.shape)}")
            z = [seen[i].double() for i in range(len(layers))]
            for m in layers:
                m.bias.add_(1.0)
                try:
                    moved = model.forward_head(feats).double() - y
                finally:
                    m.bias.sub_(1.0)
                w_i = moved.mean().item()
                tol = 1e-5 * max(1.0, y.abs().max().item())  # float32 logits, moved by 1
                if abs(w_i) < 1e-6 or not torch.allclose(moved, torch.full_like(moved, w_i), atol=tol):
                    raise refuse("its layers' outputs are not summed into the logits")
                weights.append(w_i)
    except KeyError:
        raise refuse("a classifier layer is not run by forward_head") from None
    finally:
        for h in hooks:
            h.remove()
    return p, y, z, weights


def _elementwise_affine(p: Tensor, z: Tensor, refuse) -> tuple[Tensor, Tensor]:
    """(s, t) with z = s * p + t per feature, fitted over the batch; a refusal when z is not such a map of p."""
    pm, zm = p.mean(0), z.mean(0)
    var = ((p - pm) ** 2).mean(0)
    flat = var < 1e-12  # a feature constant over the batch: any s fits, 1 is chosen
    s = torch.where(flat, torch.ones_like(var), ((p - pm) * (z - zm)).mean(0) / var.clamp_min(1e-12))
    t = zm - s * pm
    if not torch.allclose(s * p + t, z, atol=1e-5 * max(1.0, z.abs().max().item())) or (s.abs() < 1e-6).any():
        raise refuse("its layers do not read the pooled features through an elementwise affine map")
    return s, t


def _as_distilled(student: nn.Module, state: dict[str, Tensor], config: dict) -> tuple[str, dict]:
    """Turn a ViT with kdkit's inserted token into timm's distilled DeiT: its architecture name and
    the model_args that rebuild it; `state` gains dist_token, head_dist and the token's position row."""
    vit = student.model
    reasons = []
    if type(vit) is not VisionTransformer:
        reasons.append(f"it is a {type(vit).__name__}, not timm's VisionTransformer")
    else:
        if vit.global_pool != "token":
            reasons.append(f"it pools with {vit.global_pool!r}, not its class token")
        if vit.num_reg_tokens:
            reasons.append(f"it has {vit.num_reg_tokens} register tokens")
        if not isinstance(vit.fc_norm, nn.Identity) or vit.attn_pool is not None:
            reasons.append("its head has an fc_norm or attention pooling")
        if vit.pos_embed is None:
            reasons.append("it has no learned position embedding")
        elif vit.no_embed_class:  # timm's distilled DeiT sizes its position table for the prefix tokens too
            reasons.append("its class token has no position embedding (no_embed_class)")
    if reasons:
        raise KdkitError(f"the inserted distillation token of {config['architecture']} cannot be collapsed into "
                         f"timm's distilled DeiT ({'; '.join(reasons)}); only a plain class-token ViT can: export "
                         f"ONNX instead (kdkit export RUN --format onnx --head fused)")
    block = vit.blocks[0]
    derived = {
        "img_size": list(vit.patch_embed.img_size), "patch_size": list(vit.patch_embed.patch_size),
        "in_chans": vit.patch_embed.proj.in_channels, "embed_dim": vit.embed_dim, "depth": len(vit.blocks),
        "num_heads": block.attn.num_heads, "mlp_ratio": block.mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None, "qk_norm": not isinstance(block.attn.q_norm, nn.Identity),
        "init_values": 1e-5 if isinstance(block.ls1, LayerScale) else None,  # the value is in the weights
        "pre_norm": not isinstance(vit.norm_pre, nn.Identity),
        "final_norm": not isinstance(vit.norm, nn.Identity), "class_token": True, "global_pool": "token",
    }
    state["dist_token"] = student.dist_token.detach().clone()
    state["head_dist.weight"] = student.head_dist.weight.detach().clone()
    state["head_dist.bias"] = student.head_dist.bias.detach().clone()
    pos = state["pos_embed"]  # position rows: class token, then the distillation token (zero), then patches
    state["pos_embed"] = torch.cat([pos[:, :1], torch.zeros_like(pos[:, :1]), pos[:, 1:]], dim=1).contiguous()
    m = re.fullmatch(r"deit_(tiny|small|base)_patch16_(224|384)", config["architecture"].split(".")[0])
    name = f"deit_{m[1]}_distilled_patch16_{m[2]}" if m else "deit_tiny_distilled_patch16_224"
    # the architecture name only picks timm's distilled class: every size is in model_args
    return name, {**config.get("model_args", {}), **derived}


def plain_model(student: nn.Module, config: dict) -> nn.Module:
    """`student` (head-wrapped, trained) as one plain module whose forward gives its fused logits,
    (B, K), checked against them on a random batch of config's input size (a new module: the
    student is left as it is). A single head: the model itself (a copy). `dual`: a copy with the
    two heads averaged into its classifier. timm's own distillation head (`native`, a distilled
    DeiT's token): a copy, which timm fuses. kdkit's inserted token: timm's distilled DeiT
    (fused_timm_model). config: the student's config.json (run's student/ folder)."""
    head = HEADS.name_of(student)
    if head == "token" and not student.native:
        state, out, _ = fused_timm_model(student, config)
        model = timm.create_model(out["architecture"], num_classes=out["num_classes"], **out.get("model_args", {}))
        model.load_state_dict(state)
        model.to(next(student.parameters()).device)
    elif head in ("dual", "shared", "token", "native"):
        model = copy.deepcopy(student.model)
        if head == "dual":
            state = dict(model.state_dict())
            _average_into_classifier(student, state, config)
            model.load_state_dict(state)
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(False)  # timm's distilled models: the average of both heads
    else:
        raise KdkitError(f"cannot collapse a {head} student into one plain module")
    x = torch.randn(2, *config["pretrained_cfg"]["input_size"], generator=torch.Generator().manual_seed(0))
    x = x.to(next(student.parameters()).device)
    with torch.no_grad(), eval_mode(student):
        want, got = student(x).fused, model.eval()(x)
    if not (got - want).abs().max().item() <= TOLERANCE * max(1.0, want.abs().max().item()):
        raise KdkitError(f"the plain {type(model).__name__} differs from the student's fused logits")
    return model


def _as_distilled_t2t(student: nn.Module, state: dict[str, Tensor], config: dict) -> dict:
    """The model_args of a T2T-ViT with kdkit's inserted token as T2T-ViT(distilled=True); `state`
    gains dist_token and head_dist (the position table is unchanged: the token has no row in it)."""
    t2t = student.model
    if t2t.global_pool != "token":
        raise KdkitError(f"the inserted distillation token of {config['architecture']} cannot be collapsed into a "
                         f"distilled T2T-ViT (it pools with {t2t.global_pool!r}; the distilled model reads its class "
                         f"token): export ONNX instead (kdkit export RUN --format onnx --head fused)")
    state["dist_token"] = student.dist_token.detach().clone()
    state["head_dist.weight"] = student.head_dist.weight.detach().clone()
    state["head_dist.bias"] = student.head_dist.bias.detach().clone()
    return {**config.get("model_args", {}), "distilled": True}


def needs_kdkit(architecture: str) -> bool:
    """Whether timm knows `architecture` only once kdkit is imported (kdkit's CIFAR models, T2T-ViT)."""
    name = architecture.split(".")[0]
    return timm.is_model(name) and timm.models.model_entrypoint(name).__module__.startswith("kdkit.")


def check_fused(student: nn.Module, state: dict[str, Tensor], config: dict) -> float:
    """Build `config` with plain timm, load `state` (strict) and compare its logits with the student's
    fused ones on a fixed random batch. Returns the largest difference; raises KdkitError past TOLERANCE."""
    try:
        with torch.random.fork_rng(devices=[]):
            plain = timm.create_model(config["architecture"], num_classes=config["num_classes"],
                                      **config.get("model_args", {}))
        plain.load_state_dict(state, strict=True)
    except Exception as e:
        raise KdkitError(f"plain timm cannot rebuild the collapsed {config['architecture']}: "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    device = next(student.parameters()).device
    x = torch.randn(2, *config["pretrained_cfg"]["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = student.eval()(x.to(device)).fused.cpu(), plain.eval()(x)
    diff = (got - want).abs().max().item()
    if not diff <= TOLERANCE * max(1.0, want.abs().max().item()):
        raise KdkitError(f"the collapsed {config['architecture']} differs from the student's fused logits by "
                         f"{diff:.3g}: it cannot be exported as one timm head; export ONNX instead")
    return diff
