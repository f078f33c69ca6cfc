"""Student head strategies: how a student yields a class head and a distillation head.

- `token`: DeiT's distillation token. timm's distilled DeiTs use their own token and `head_dist`;
  any other timm ViT with a class token gets a learned token inserted after the class token
  (before the blocks, so it attends and is attended like DeiT's) and a linear `head_dist`.
- `dual`: a second linear head on the pooled features, for Swin, ConvNets and anything without a
  class token; on a plain nn.Module (no timm forward_head), the input of its final nn.Linear.
- `shared`: one head carries both losses (the paper's "usual" distillation); any classifier.
- `native`: the model's own distillation head, where timm has one (`set_distilled_training`:
  LeViT, DeiT distilled); `auto` picks it for such models that are not token ViTs (for DeiT's
  distilled models `token` already is their own token and `head_dist`).

Every head is an nn.Module whose forward returns StudentOut(logits, dist_logits, features, tokens):
both heads' (B, K) logits, and where the model exposes them the pooled pre-logit features (B, D)
and a ViT's patch tokens (B, N, D), for feature distillation. A new head is a class and one
registry line: `@HEADS.register("mine") class MyHead(nn.Module)` whose constructor takes the timm
`model` first (its other arguments come from the recipe's `model.head_args`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from timm.models import group_parameters
from timm.optim import auto_group_layers
from torch import Tensor, nn

from kdkit.registry import KdkitError, Registry
from kdkit.types import StudentOut

HEADS: Registry[type[nn.Module]] = Registry("student head")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block (inference's normalisation and dropout; no BatchNorm
    running statistic moved), its own training mode restored after, also on an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def token_refusal(model: nn.Module) -> str | None:
    """Why kdkit's `token` head cannot take `model` (a sentence ending in the head to use), or None.

    The token is inserted by a forward pre-hook on the ViT's `patch_drop` module (after the position
    embedding, before the blocks), so the model needs a class token and that module; a ViT whose
    layers fix their prefix-token count when built (rotary position embeddings, Eva's) or that
    resamples its position table by that count at every forward (dynamic_img_size) cannot take one
    more token."""
    name = type(model).__name__
    if getattr(model, "dist_token", None) is not None:
        return None  # its own token (timm's distilled DeiT)
    other = "native" if _has_native_distillation(model) else "dual"
    if getattr(model, "cls_token", None) is None:
        return f"{name} has no class token: use head '{other}'"
    if not isinstance(getattr(model, "patch_drop", None), nn.Module) or getattr(model, "rope", None) is not None:
        return (f"{name} has a class token, but not the layout of timm's VisionTransformer family that the token "
                f"is inserted into: use head '{other}'")
    if getattr(model, "dynamic_img_size", False):
        return f"{name} takes any image size (dynamic_img_size), which the token does not: use head '{other}'"
    return None


def _has_native_distillation(model: nn.Module) -> bool:
    # PiT's non-distilled models have set_distilled_training and a head_dist of None
    return hasattr(model, "set_distilled_training") and getattr(model, "head_dist", None) is not None


def _patch_tokens(model: nn.Module, feats: Tensor) -> Tensor | None:
    """(B, N, D) patch tokens of a ViT's forward_features output, prefix tokens dropped; None otherwise."""
    n = getattr(model, "num_prefix_tokens", None)
    return feats[:, n:] if n is not None and feats.ndim == 3 else None


def num_pooled_features(model: nn.Module) -> int:
    """D of a timm model's pooled pre-logit features (forward_head(pre_logits=True)): its
    head_hidden_size where a head layer widens them, else num_features."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


class _Wrapped(nn.Module):
    """Re-exposes the timm model's optimizer hooks, which the wrapper would otherwise hide from
    timm's `create_optimizer_v2` (no-decay list, layer-wise lr decay) and gradient checkpointing."""

    model: nn.Module

    def __init__(self):
        super().__init__()
        # trainable modules a loss adds (feature projections): StudentOut -> Tensor, run on every
        # forward so that DDP syncs them; checkpointed, never saved with the student
        self.adapters = nn.ModuleDict()

    def forward(self, x: Tensor) -> StudentOut:
        out = self.forward_heads(x)
        out.adapted = {name: adapter(out) for name, adapter in self.adapters.items()}
        return out

    def forward_heads(self, x: Tensor) -> StudentOut:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        own = {"dist_token"} if "dist_token" in self._parameters else set()
        return own | {f"model.{n}" for n in getattr(self.model, "no_weight_decay", set)()}

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """The wrapped model's layer ids (resolved exactly as timm would on it bare, dict or callable
        matcher); the inserted `dist_token` joins the class token, other own params (`head_dist`) the last layer."""
        m = self.model
        layers = (group_parameters(m, m.group_matcher(coarse=coarse), reverse=True)
                  if hasattr(m, "group_matcher") else auto_group_layers(m))
        last, stem = max(layers.values(), default=0), layers.get("cls_token", 0)

        def matcher(name: str) -> int:
            if name.startswith("model."):
                return layers.get(name[len("model."):], last)
            return stem if name == "dist_token" else last

        return matcher

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(enable)
        elif enable:
            raise KdkitError(f"{type(self.model).__name__} does not support gradient checkpointing")


@HEADS.register("token")
class TokenHead(_Wrapped):
    """DeiT distillation token on a timm ViT. `model` keeps its timm structure and state-dict names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        refusal = token_refusal(model)
        if refusal:
            raise KdkitError(f"head 'token' needs a ViT with a class token; {refusal}")
        self.model = model
        self.native = getattr(model, "dist_token", None) is not None
        if not self.native:
            dim, k = model.embed_dim, model.num_classes
            self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.dist_token, std=0.02)
            self.head_dist = nn.Linear(dim, k)
            # Insert the token between the position embedding and the blocks; pooling and patch
            # dropout then skip it like any other prefix token.
            model.num_prefix_tokens += 1
            model.patch_drop.register_forward_pre_hook(self._insert_token)

    def _insert_token(self, _module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x = args[0]
        token = self.dist_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return (torch.cat([x[:, :1], token, x[:, 1:]], dim=1), *args[1:])

    def forward_heads(self, x: Tensor) -> StudentOut:
        m = self.model
        feats = m.forward_features(x)
        head_dist = m.head_dist if self.native else self.head_dist
        if self.native:
            logits = m.head(m.head_drop(feats[:, 0]))
        else:
            logits = m.forward_head(feats)
        return StudentOut(logits, head_dist(m.head_drop(feats[:, 1])), feats[:, 0], _patch_tokens(m, feats))


def final_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(name, module) of a model's classifier: timm's get_classifier(), else its last registered
    nn.Linear (a plain module's `fc`); None when it has none."""
    get = getattr(model, "get_classifier", None)
    found = get() if callable(get) else next((m for m in reversed(list(model.modules()))
                                                if isinstance(m, nn.Linear)), None)
    if not isinstance(found, nn.Linear):
        return None
    return next(n for n, m in model.named_modules() if m is found), found


@HEADS.register("dual")
class DualHead(_Wrapped):
    """A second linear classifier on the model's pooled features: timm's `forward_head(pre_logits=True)`,
    or for a plain nn.Module (no forward_head) the input of its final nn.Linear, whose output must be
    the module's output (checked on every forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "dist_token", None) is not None:
            raise KdkitError("this model has a distillation token: use head 'token'")
        if _has_native_distillation(model):
            raise KdkitError(f"{type(model).__name__} has its own distillation head: use head 'native'")
        self.model = model
        self.plain = not hasattr(model, "forward_head")
        if self.plain:
            found = final_linear(model)
            if found is None:
                raise KdkitError(f"head 'dual' needs timm's forward_features/forward_head or a final nn.Linear "
                                 f"classifier; {type(model).__name__} has neither: use head 'shared'")
            self.classifier = found[0]
            self.head_dist = nn.Linear(found[1].in_features, found[1].out_features)
        else:
            self.head_dist = nn.Linear(num_pooled_features(model), model.num_classes)

    def forward_heads(self, x: Tensor) -> StudentOut:
        if self.plain:
            return self._forward_plain(x)
        feats = self.model.forward_features(x)
        # The class head goes through the model's own forward_head (which may scale or normalise).
        logits = self.model.forward_head(feats)
        pooled = self.model.forward_head(feats, pre_logits=True)
        return StudentOut(logits, self.head_dist(pooled), pooled, _patch_tokens(self.model, feats))

    def _forward_plain(self, x: Tensor) -> StudentOut:
        seen: list[tuple[Tensor, Tensor]] = []
        hook = self.model.get_submodule(self.classifier).register_forward_hook(
            lambda _m, args, out: seen.append((args[0], out)))
        try:
            logits = self.model(x)
        finally:
            hook.remove()
        if len(seen) != 1 or seen[0][1] is not logits:
            raise KdkitError(f"head 'dual' takes the input of {type(self.model).__name__}.{self.classifier} as its "
                             f"features, but the module's output is not that layer's output: use head 'shared'")
        pooled = seen[0][0]
        return StudentOut(logits, self.head_dist(pooled), pooled)


@HEADS.register("shared")
class SharedHead(_Wrapped):
    """The model's own classifier carries both the label and the teacher term."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "dist_token", None) is not None:
            raise KdkitError("this model has a distillation token: use head 'token' or a non-distilled model")
        if _has_native_distillation(model):
            raise KdkitError(f"{type(model).__name__} has its own distillation head: use head 'native'")
        self.model = model

    def forward_heads(self, x: Tensor) -> StudentOut:
        m = self.model
        if not hasattr(m, "forward_head"):  # any classifier
            logits = m(x)
            return StudentOut(logits, logits)
        feats = m.forward_features(x)
        logits = m.forward_head(feats)
        return StudentOut(logits, logits, m.forward_head(feats, pre_logits=True), _patch_tokens(m, feats))


@HEADS.register("native")
class NativeHead(_Wrapped):
    """The model's own distillation head (timm's `set_distilled_training`: LeViT, DeiT distilled):
    its `head` is the class head and its `head_dist` the distillation head, both trained; nothing is
    added, so the saved student is plain timm, whose inference averages the two (late fusion)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not _has_native_distillation(model):
            raise KdkitError(f"head 'native' needs a model with its own distillation head (set_distilled_training: "
                             f"LeViT, DeiT distilled); {type(model).__name__} has none: use head 'auto'")
        self.model = model
        model.set_distilled_training(True)

    def forward_heads(self, x: Tensor) -> StudentOut:
        m = self.model
        feats = m.forward_features(x)
        # timm returns both heads only in training mode; the flag of the top module alone decides
        # it (dropout and norms keep their own mode), so evaluation sees both heads too
        was, m.training = m.training, True
        try:
            logits, dist = m.forward_head(feats)
        finally:
            m.training = was
        return StudentOut(logits, dist, m.forward_head(feats, pre_logits=True), _patch_tokens(m, feats))


def default_head(model: nn.Module) -> str:
    """`token` for ViTs that take one (DeiT's distilled ones use their own; see token_refusal),
    `native` for other models with their own distillation head (LeViT), `dual` for the rest that
    have pooled features (timm's forward_head, or a plain module's final nn.Linear), `shared` otherwise."""
    if token_refusal(model) is None:
        return "token"
    if _has_native_distillation(model):
        return "native"
    return "dual" if hasattr(model, "forward_head") or final_linear(model) is not None else "shared"


def wrap_student(model: nn.Module, head: str = "auto", settings: dict | None = None) -> nn.Module:
    """Wrap any classifier `model` (timm-style: forward_features/forward_head) in a head strategy;
    `settings` are the head's own constructor arguments (model.head_args)."""
    head = default_head(model) if head == "auto" else head
    return HEADS.create(head, settings, model=model)
