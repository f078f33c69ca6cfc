"""A student started from a local timm or DeiT checkpoint of another class count, image size, patch
size or token layout (`--pretrained-path FILE`, timm's flag: "load this checkpoint as if they were
the pretrained weights, with adaptation").

The file (safetensors, or a `.pth` read with `torch.load(weights_only=True)`, plain or DeiT's
`{"model": state_dict}`; its EMA weights where it has them, as timm) is read by timm's
`load_state_dict` and loaded by timm's own pretrained
route, `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=...))`: the
model family's checkpoint filter resamples the position embedding (`resample_abs_pos_embed`, prefix
tokens kept) and the patch embedding (`resample_patch_embed`) to the student's grid and patch, and
the load is strict. The model is built with the file's class count, then timm's `reset_classifier`
gives it a new classifier when the student's count differs (the same count keeps the file's).

The distillation token and head. DeiT's `main.py` refuses fine-tuning with distillation ("not yet
supported"); its `--finetune` drops `head`/`head_dist` of another shape, keeps the class and
distillation tokens' positions, interpolates the patches' and loads with `strict=False`, so a token
absent from the file stays at its random init (and a plain checkpoint's positions do not even fit a
distilled model). kdkit instead starts both from the pretrained class: the file's own distillation
token and head where it has them, else a copy of the class token (with its position embedding) and
of the class head. A plain checkpoint then feeds DeiT's distilled models (a position for the token
is inserted after the class token's, as its copy), kdkit's inserted token (which gets no position
embedding, so it starts as the class token plus its position) and the `dual` head; a distilled
checkpoint feeds a plain ViT (its token and head go to kdkit's inserted ones, its position row
dropped from the grid).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from kdkit.registry import KdkitError


@dataclass
class PretrainedLoad:
    """What loading a checkpoint did, key by key (timm state-dict names; the head's own parameters
    are named as in the head wrapper, e.g. `dist_token`, `head_dist.weight`)."""

    path: str
    loaded: list[str] = field(default_factory=list)
    resampled: dict[str, str] = field(default_factory=dict)  # key -> "old shape -> new shape"
    reset: list[str] = field(default_factory=list)
    from_class: list[str] = field(default_factory=list)  # initialised from the class token / head
    from_file_distillation: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # the file's distillation parts a student without them drops
    classes: tuple[int, int] = (0, 0)  # (file's, student's)
    extras: dict[str, Tensor] = field(default_factory=dict, repr=False)  # the file's token/head for the head wrapper

    def line(self) -> str:
        """One line for the user: counts, with the resampled, reset and copied keys named."""
        parts = [f"{len(self.loaded) + len(self.from_file_distillation)} tensors loaded"]
        if self.resampled:
            parts.append(f"{len(self.resampled)} resampled ("
                         + ", ".join(f"{k} {v}" for k, v in self.resampled.items()) + ")")
        if self.reset:
            parts.append(f"{len(self.reset)} reset ({', '.join(self.reset)}: {self.classes[0]} -> "
                         f"{self.classes[1]} classes)")
        if self.from_class:
            parts.append(f"{len(self.from_class)} from the class token and head ({', '.join(self.from_class)})")
        if self.from_file_distillation:
            parts.append(f"distillation token and head from the file ({', '.join(self.from_file_distillation)})")
        if self.unused:
            parts.append(f"not used by this head ({', '.join(self.unused)})")
        return f"pretrained weights {self.path}: " + ", ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a checkpoint file, read by timm (safetensors, or torch.load(weights_only=True):
    nothing is unpickled; `{"model": ...}`, `{"state_dict": ...}` and a `module.` prefix unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise KdkitError(f"pretrained weights not found: {path}")
    if path.stat().st_size == 0:
        raise KdkitError(f"the pretrained weights file {path} is empty (0 bytes): an interrupted copy or download?")
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as e:  # unreadable, truncated, pickled objects, not a checkpoint
        msg = " ".join(str(e).split())
        raise KdkitError(f"cannot read weights from {path}: {type(e).__name__}: {msg[:300]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise KdkitError(f"{path} holds no state dict of tensors")
    return dict(state)


def _class_count(state: dict[str, Tensor], classifiers: str | tuple[str, ...] | None) -> int:
    """The file's class count from its (first) classifier's weight; 0 when it has none (a headless file)."""
    name = classifiers if isinstance(classifiers, str) else (classifiers or ("",))[0]
    weight = state.get(f"{name}.weight")
    return int(weight.shape[0]) if weight is not None else 0


def _to_token_layout(state: dict[str, Tensor], probe: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor],
                                                                            list[str]]:
    """The file's distillation token and head laid out as the model has them (see the module
    docstring). Returns the state, the file's distillation parts for the head wrapper (`dist_token`
    as it enters the blocks, position included; `head_dist.*`), and the model keys made from the
    class token and head."""
    state, extras, made = dict(state), {}, []
    pos = state.get("pos_embed")
    with_pos = pos is not None and not getattr(probe, "no_embed_class", False)
    token_in_model = getattr(probe, "dist_token", None) is not None
    if "dist_token" not in state and token_in_model and "cls_token" in state:
        state["dist_token"] = state["cls_token"].clone()
        made.append("dist_token")
        if with_pos:  # DeiT's layout: class, distillation, patches
            state["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
            made.append("pos_embed[:, 1]")
    elif "dist_token" in state and not token_in_model:
        token = state.pop("dist_token")
        extras["dist_token"] = token + pos[:, 1:2] if with_pos else token
        if with_pos:
            state["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    head_in_model = isinstance(getattr(probe, "head_dist", None), nn.Module)
    file_head_dist = [k for k in state if k.startswith("head_dist.")]
    if not file_head_dist and head_in_model:
        for k in [k for k in state if k.startswith("head.")]:
            state[f"head_dist.{k[5:]}"] = state[k].clone()
            made.append(f"head_dist.{k[5:]}")
    elif file_head_dist and not head_in_model:
        extras.update({k: state.pop(k) for k in file_head_dist})
    return state, extras, made


def load_pretrained(create: Callable[..., nn.Module], path: str | Path,
                    num_classes: int) -> tuple[nn.Module, PretrainedLoad]:
    """Build a timm model from checkpoint `path` (see the module docstring).

    create(num_classes, **timm_kwargs) builds the model (kdkit's create_model with the student's
    name and options); it is called once on the meta device (layout only, no arithmetic; on the CPU
    for a constructor that reads tensor values) and once for real with timm's pretrained route. Returns the model with `num_classes` classes and the
    record of what was loaded, resampled, reset and copied."""
    try:
        with torch.device("meta"):
            probe = create(num_classes)
    except Exception:  # a model whose constructor reads tensor values (.item(), numpy): built for real
        probe = create(num_classes)
    classifiers = probe.pretrained_cfg.get("classifier") if getattr(probe, "pretrained_cfg", None) else None
    raw = read_state_dict(path)
    state, extras, made = _to_token_layout(raw, probe)
    k_file = _class_count(state, classifiers)
    overlay = dict(state_dict=state, num_classes=k_file)
    try:
        model = create(k_file, pretrained=True, pretrained_cfg_overlay=overlay)
    except (RuntimeError, ValueError, KeyError, AssertionError) as e:
        msg = " ".join(str(e).split())
        raise KdkitError(f"cannot load {path} into {type(probe).__name__} (not this architecture's checkpoint?): "
                         f"{type(e).__name__}: {msg[:500]}") from None
    # timm keeps the overlay in the model's config, which kdkit saves: back to the model's own
    model.pretrained_cfg = model.default_cfg = dict(probe.pretrained_cfg)
    record = PretrainedLoad(str(path), classes=(k_file, num_classes), extras=extras)
    if k_file != num_classes:
        before = set(model.state_dict())
        model.reset_classifier(num_classes)
        names = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers or ())
        record.reset = [k for k in model.state_dict() if k.startswith(tuple(f"{n}." for n in names))
                        or k not in before]
        # a native distillation head was reset too: it starts as the new class head, like the others
        made += [k for k in copy_head(getattr(model, "head", None), getattr(model, "head_dist", None), "head_dist")
                 if k not in made]
    for k, v in model.state_dict().items():
        if k in record.reset or k in made:
            continue
        old = state.get(k)
        if old is not None and old.shape != v.shape:  # the file's shape (before a token's row was added or dropped)
            record.resampled[k] = f"{'x'.join(map(str, raw.get(k, old).shape))} -> {'x'.join(map(str, v.shape))}"
        else:
            record.loaded.append(k)
    record.from_class = made
    return model, record


def copy_head(src: nn.Module | None, dst: nn.Module | None, name: str = "head_dist") -> list[str]:
    """Copy a classifier's parameters into another of the same type and shapes (a Linear, LeViT's
    NormLinear...). Returns the copied keys, prefixed with `name`; [] (nothing copied) when they differ."""
    if not isinstance(src, nn.Module) or type(src) is not type(dst):
        return []
    s, d = src.state_dict(), dst.state_dict()
    if s.keys() != d.keys() or any(s[k].shape != d[k].shape for k in s):
        return []
    dst.load_state_dict(s)
    return [f"{name}.{k}" for k in d]


def init_distillation(student: nn.Module, extras: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Start the parameters a head wrapper adds (token's inserted `dist_token` and `head_dist`, dual's
    `head_dist`) from the file's distillation token and head (`extras`, see _to_token_layout) where
    it has them and they fit, else from the pretrained class token (plus its position embedding,
    which the inserted token does not get) and class head. Returns (keys from the file, keys from
    the class token and head)."""
    own = dict(student.named_parameters(recurse=False))  # the wrapper's own, not the timm model's
    head_dist = student._modules.get("head_dist")
    m = student.model
    from_file, from_class = [], []
    with torch.no_grad():
        if "dist_token" in own:
            token = extras.get("dist_token")
            if token is not None and token.shape == own["dist_token"].shape:
                own["dist_token"].copy_(token)
                from_file.append("dist_token")
            else:
                with_pos = getattr(m, "pos_embed", None) is not None and not getattr(m, "no_embed_class", False)
                own["dist_token"].copy_(m.cls_token + (m.pos_embed[:, :1] if with_pos else 0))
                from_class.append("dist_token")
        if head_dist is not None:
            file_head = {k[len("head_dist."):]: v for k, v in extras.items() if k.startswith("head_dist.")}
            mine = head_dist.state_dict()
            if file_head.keys() == mine.keys() and all(file_head[k].shape == mine[k].shape for k in mine):
                head_dist.load_state_dict(file_head)
                from_file += [f"head_dist.{k}" for k in mine]
            else:
                from_class += copy_head(m.get_classifier(), head_dist)
    return from_file, from_class
