"""Weight selection: a student initialised with a subset of the weights of a larger pretrained model
of the same family (Xu, Chen, Vishniakov, Yin, Shen, Darrell, Liu and Liu, ICLR 2024, "Initializing
Models with Larger Ones"; authors' code: github.com/OscarXZQ/weight-selection, `weight_selection.py`).
`--init-from MODEL_OR_FILE` (recipe key `model.init_from`).

Three steps, as the paper and its code:

1. Layer selection (`layers`, recipe key `model.init_from_layers`). "first" (the default): the
   student's layer i is the larger model's layer i, in every numbered stack (`blocks.i` of a ViT,
   `stages.s.blocks.i` of a ConvNeXt, `layerS.i` of a ResNet: the first N of each stage). First-N
   is the paper's choice (it keeps the larger model's early layers together, as they were trained
   to follow one another), and the authors' code gets it by taking the student's own key names from
   the larger state dict. "uniform": the student's i-th of n layers is the larger model's
   `idx(N, n)[i]`-th of N (the same spacing as for channels, below), the alternative the paper
   compares first-N with.
2. Component mapping: a student tensor takes the tensor of the same name (after the layer mapping).
   The classifier is not selected (the authors skip every `head` key): it keeps its random
   initialisation, whatever the class counts. A token layout that differs (a plain ViT's weights
   for DeiT's distilled model, or the reverse) is adapted as `--pretrained-path` adapts it
   (models/pretrained.py: the distillation token and its position from the class token's), and a
   position embedding on another grid, or a patch embedding of another patch size, is resampled
   with timm's `resample_abs_pos_embed` / `resample_patch_embed`, as timm's checkpoint filter does.
3. Element selection, uniform ("evenly spaced") in every dimension: for a dimension of N elements
   in the larger tensor and n <= N in the student's,

       idx(N, n) = [0, s, 2s, ..., (n - 1) s]          with s = N / n, when n divides N
       idx(N, n) = round(linspace(0, N - 1, n))         otherwise (both ends kept)

   and student[i, j, ...] = larger[idx(N0, n0)[i], idx(N1, n1)[j], ...]. The same (N, n) gives the
   same indices everywhere, so the residual stream's channels are selected consistently across
   layers (the paper's "consistency"). A ViT's qkv rows (3 D) then keep q, k and v apart whenever
   3 D / 3 d is an integer step; kernels' spatial dimensions must match (a 7x7 kernel is not
   "selected" into a 3x3 one: another architecture, refused).

Refused, each in one line: a larger model of another family (a student tensor with no counterpart,
or of another rank or kernel size), and a smaller one (any dimension, or any stack, shorter than
the student's). A hub model name needs the Hub: offline it fails in seconds, naming the local
route (a safetensors or weights-only .pth file, or a kdkit student folder). The selection composes
with any loss and any head: it only sets the student's starting weights, before the head strategy
wraps it (a token the head inserts starts from the selected class token, as with --pretrained-path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import Tensor, nn

from kdkit.models.names import resolve_model_name
from kdkit.models.pretrained import _to_token_layout, read_state_dict
from kdkit.models.saved import student_folder
from kdkit.registry import KdkitError

LAYERS = ("first", "uniform")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def uniform_indices(large: int, small: int) -> Tensor:
    """idx(N, n) of the module docstring: the n evenly spaced indices kept of N (N >= n >= 1), int64."""
    if small > large or small < 1:
        raise ValueError(f"cannot select {small} of {large}")
    if large % small == 0:
        return torch.arange(small) * (large // small)
    return torch.round(torch.linspace(0, large - 1, small)).long()


def select_elements(weight: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """`weight` narrowed to `shape` by uniform selection in every dimension (same rank, no dimension
    larger than the weight's). Returns a new contiguous tensor of `shape`."""
    if weight.dim() != len(shape) or any(s > w for w, s in zip(weight.shape, shape, strict=True)):
        raise ValueError(f"cannot select {tuple(shape)} from {tuple(weight.shape)}")
    out = weight
    for dim, (w, s) in enumerate(zip(weight.shape, shape, strict=True)):
        if w != s:
            out = out.index_select(dim, uniform_indices(w, s))
    return out.contiguous().clone()


@dataclass
class Selection:
    """What weight selection did: which larger tensor each student tensor came from."""

    source: str
    layers: str
    selected: dict[str, str] = field(default_factory=dict)  # student key -> larger key (sliced or whole)
    sliced: dict[str, str] = field(default_factory=dict)  # student key -> "larger shape -> student shape"
    resampled: list[str] = field(default_factory=list)  # position / patch embedding resampled first
    stacks: dict[str, tuple[int, int]] = field(default_factory=dict)  # stack -> (larger's, student's layers)
    from_class: list[str] = field(default_factory=list)  # from the class token (token layout)
    kept: list[str] = field(default_factory=list)  # the classifier: its random initialisation

    def line(self) -> str:
        """One line for the user: what was selected from where, and what was not."""
        widths = sorted({p for v in self.sliced.values() for p in _width_pairs(v)}, key=lambda p: (-p[0], -p[1]))
        parts = [f"{len(self.selected)} tensors selected ({len(self.sliced)} sliced uniformly"
                 + (f": widths {', '.join(f'{a} -> {b}' for a, b in widths)}" if widths else "") + ")"]
        if self.stacks:
            which = "first" if self.layers == "first" else "evenly spaced"
            parts.append("layers: " + ", ".join(f"{name} {which} {s} of {t}" for name, (t, s) in self.stacks.items()))
        if self.resampled:
            parts.append(f"resampled to the student's grid ({', '.join(self.resampled)})")
        if self.from_class:
            parts.append(f"from the class token ({', '.join(self.from_class)})")
        if self.kept:
            parts.append(f"classifier at its random init ({', '.join(self.kept)})")
        return f"weight selection from {self.source}: " + ", ".join(parts)


def _width_pairs(change: str) -> list[tuple[int, int]]:
    a, b = (tuple(int(x) for x in s.split("x")) for s in change.split(" -> "))
    return [(x, y) for x, y in zip(a, b, strict=True) if x != y]


def _stacks(keys: list[str]) -> dict[str, list[int]]:
    """Every numbered stack of a state dict's keys: prefix -> the sorted indices under it
    ("blocks" -> [0, 1, 2, 3]; "stages.1.blocks" -> [0, 1, 2])."""
    found: dict[str, set[int]] = {}
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                found.setdefault(".".join(parts[:i]), set()).add(int(part))
    return {k: sorted(v) for k, v in found.items()}


def layer_map(student_keys: list[str], larger_keys: list[str], layers: str = "first") -> tuple[dict[str, str],
                                                                                            dict[str, tuple[int, int]]]:
    """The larger model's key for every student key (step 1 of the module docstring), and the stacks
    whose lengths differ: {prefix: (larger's, student's)}. A student stack longer than the larger
    model's is a KdkitError (a smaller model)."""
    if layers not in LAYERS:
        raise KdkitError(f"model.init_from_layers must be one of {', '.join(LAYERS)}, got {layers!r}")
    mine, theirs = _stacks(student_keys), _stacks(larger_keys)
    mapping, lengths = {}, {}
    for key in student_keys:
        parts, mapped = key.split("."), []
        for i, part in enumerate(parts):
            if part.isdigit() and i < len(parts) - 1:
                own, other = mine[".".join(parts[:i])], theirs.get(".".join(mapped), [])
                if other and len(own) > len(other):
                    name = ".".join(parts[:i])
                    raise KdkitError(f"the model to select from is smaller than the student: {len(other)} layers in "
                                     f"{name}, the student has {len(own)}; weight selection takes a larger model of "
                                     f"the student's family")
                if other and len(own) < len(other):
                    lengths[".".join(mapped)] = (len(other), len(own))
                    if layers == "uniform":
                        part = str(other[int(uniform_indices(len(other), len(own))[own.index(int(part))])])
            mapped.append(part)
        mapping[key] = ".".join(mapped)
    return mapping, lengths


def _classifier_keys(model: nn.Module, keys: list[str]) -> list[str]:
    """The student's classifier tensors (timm's pretrained_cfg "classifier", else `head.*`)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return [k for k in keys if k.startswith(tuple(f"{n}." for n in names))]


def _adapt_spatial(key: str, larger: Tensor, mine: Tensor, model: nn.Module) -> Tensor | None:
    """The position embedding resampled to the student's grid, or the patch embedding to its patch
    size, as timm's ViT checkpoint filter does; None when `key` needs neither."""
    if key == "pos_embed" and larger.dim() == 3 and larger.shape[1] != mine.shape[1]:
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is None:
            return None
        return resample_abs_pos_embed(larger, new_size=list(grid), num_prefix_tokens=prefix, verbose=False)
    if key == "patch_embed.proj.weight" and larger.dim() == 4 and larger.shape[-2:] != mine.shape[-2:]:
        return resample_patch_embed(larger, list(mine.shape[-2:]), verbose=False)
    return None


def select_weights(model: nn.Module, larger: dict[str, Tensor], source: str = "",
                   layers: str = "first") -> tuple[dict[str, Tensor], Selection]:
    """The student `model`'s (a timm model, before any head wrapper) state dict with every tensor but
    the classifier selected from `larger` (a state dict of the larger model), as the module
    docstring says. Returns (a full state dict for `model.load_state_dict`, the record)."""
    mine = model.state_dict()
    larger, _, from_class = _to_token_layout(larger, model)
    keys = [k for k in mine if k not in _classifier_keys(model, list(mine))]
    record = Selection(source, layers, kept=[k for k in mine if k not in keys],
                       from_class=[k for k in from_class if not k.startswith("head")])
    mapping, record.stacks = layer_map(keys, list(larger), layers)
    missing = [k for k in keys if mapping[k] not in larger]
    if missing:
        raise KdkitError(f"{source} is not of the student's family: {len(missing)} of the student's {len(keys)} "
                         f"tensors have no counterpart there ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}); weight selection takes a larger model of the "
                         f"student's architecture")
    state = dict(mine)
    for key in keys:
        big, want = larger[mapping[key]], mine[key]
        adapted = _adapt_spatial(key, big, want, model)
        if adapted is not None:
            big = adapted
            record.resampled.append(key)
        if big.dim() != want.dim() or (want.dim() == 4 and big.shape[2:] != want.shape[2:]):
            raise KdkitError(f"{source} is not of the student's family: {mapping[key]} is "
                             f"{_shape(big)} there, {key} is {_shape(want)} in the student")
        if any(s > b for b, s in zip(big.shape, want.shape, strict=True)):
            raise KdkitError(f"the model to select from is smaller than the student: {mapping[key]} is "
                             f"{_shape(big)} there, {key} is {_shape(want)} in the student; weight selection "
                             f"takes a larger model of the student's family")
        state[key] = select_elements(big, want.shape).to(want.dtype)
        record.selected[key] = mapping[key]
        if big.shape != want.shape:
            record.sliced[key] = f"{_shape(big)} -> {_shape(want)}"
    return state, record


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


HUB_HINT = ("without internet pass the larger model's weights as a local file: --init-from FILE (safetensors or a "
            "weights-only .pth) or a kdkit student folder")


def larger_state_dict(source: str | Path, hub: Callable[[str], dict[str, Tensor]]) -> tuple[dict[str, Tensor], str]:
    """The larger model's state dict and how to name it: a local weights file (safetensors or a
    weights-only .pth, read as --pretrained-path reads it), a kdkit student folder or run directory
    (its student/model.safetensors), or a timm model name, whose pretrained weights `hub(name)`
    returns (models/factory.py: from the Hub, failing in seconds offline with HUB_HINT)."""
    path = Path(source)
    if path.is_dir():
        folder = student_folder(path)
        return read_state_dict(folder / "model.safetensors"), str(folder)
    if path.is_file():
        return read_state_dict(path), str(path)
    text = str(source)
    if text.lower().endswith(_WEIGHT_SUFFIXES) or "/" in text or "\\" in text:
        raise KdkitError(f"--init-from {text}: no such file or folder")
    try:
        name = resolve_model_name(text)
    except KdkitError as e:
        raise KdkitError(f"--init-from {text}: not a file or folder, and {e}") from None
    return hub(name), name


def init_from_larger(model: nn.Module, source: str | Path, hub: Callable[[str], dict[str, Tensor]],
                     layers: str = "first") -> Selection:
    """Load into `model` (a timm model, before any head wrapper) the weights selected from the larger
    model `source` (see `larger_state_dict`). Returns the record; its `line()` is for the user."""
    larger, name = larger_state_dict(source, hub)
    state, record = select_weights(model, larger, name, layers)
    model.load_state_dict(state, strict=True)
    return record
