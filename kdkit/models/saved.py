"""The student's saved form: a folder in timm's own layout, so it leaves kdkit as an ordinary timm model.

    student/model.safetensors   the timm model's state dict (class head, and DeiT's native token)
    student/config.json         timm's config format (architecture, num_classes, model_args,
                                pretrained_cfg) plus a "kdkit" block (head, loss conventions)
    student/kdkit_head.safetensors   parameters the head strategy added (dual head, inserted token)

`timm.create_model("local-dir:RUN/student", pretrained=True)` rebuilds it with plain timm.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from kdkit.files import atomic_write, atomic_write_text
from kdkit.models.pretrained import read_state_dict
from kdkit.registry import KdkitError

HEAD_FILE = "kdkit_head.safetensors"


def _split_state(student: nn.Module) -> tuple[dict, dict]:
    # copies: safetensors refuses tensors that share memory (a module registered under two names, as
    # CoaT's shared position convolutions); loading puts the same values back into the one module
    model_state = {k: v.detach().clone().contiguous() for k, v in student.model.state_dict().items()}
    extra = {k: v.detach().clone().contiguous() for k, v in student.state_dict().items()
             if not k.startswith(("model.", "adapters."))}  # a loss's training adapters are not the student
    return model_state, extra


def save_student(folder: str | Path, student: nn.Module, config: dict) -> Path:
    """Save a head-wrapped student (see module docstring). `config` is timm's config dict."""
    folder = Path(folder)
    model_state, extra = _split_state(student)
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(model_state, tmp))
    if extra:
        atomic_write(folder / HEAD_FILE, lambda tmp: save_file(extra, tmp))
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    return folder


def load_student_weights(student: nn.Module, path: str | Path) -> None:
    """Load a saved student folder (or its model.safetensors, or a timm checkpoint of exactly this
    model: safetensors or a weights-only .pth) into a head-wrapped student, strictly, as timm's
    --initial-checkpoint. A mismatch is one line pointing to --pretrained-path, which adapts."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise KdkitError(f"no student weights at {weights}")
    state = {f"model.{k}": v for k, v in read_state_dict(weights).items()}
    try:
        if (folder / HEAD_FILE).is_file():
            state.update(load_file(str(folder / HEAD_FILE)))
        student.load_state_dict(state, strict=True)
    except Exception as e:
        msg = " ".join(str(e).split())  # torch's message spans lines: one line for the user
        raise KdkitError(f"cannot load {weights} into the student strictly (--student-weights/--initial-checkpoint "
                         f"takes a checkpoint of exactly this student; for another class count, image or patch "
                         f"size, or distillation token use --pretrained-path FILE): {type(e).__name__}: "
                         f"{msg[:500]}") from None


def read_config(path: str | Path) -> dict:
    """The config.json of a saved student folder (or of the folder holding a weights file)."""
    path = Path(path)
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg.is_file():
        raise KdkitError(f"no config.json beside {path}: pass --model and its options")
    return json.loads(cfg.read_text())


def student_folder(path: str | Path) -> Path:
    """The saved student of a run directory (RUN/student), or `path` itself when it is a student
    folder (config.json + model.safetensors). A path holding neither is a KdkitError."""
    path = Path(path)
    for folder in (path / "student", path):
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    if not path.exists():
        raise KdkitError(f"{path} does not exist: pass a run directory or its student folder")
    unfinished = " (the run has not finished: the student is saved when it ends)" \
        if (path / "recipe.toml").is_file() else ""
    raise KdkitError(f"{path} holds no saved student{unfinished}: expected {path}/student/ with config.json and "
                     f"model.safetensors")


# the class names that runs before the head registry names recorded
_LEGACY_HEADS = {"TokenHead": "token", "DualHead": "dual", "SharedHead": "shared", "NativeHead": "native"}


def head_of(config: dict) -> str:
    """The head strategy's registry name recorded in a saved student's config.json ("shared" for a
    folder kdkit did not write)."""
    recorded = config.get("kdkit", {}).get("head", "shared")
    return _LEGACY_HEADS.get(recorded, recorded)


TWO_HEADED = ("token", "dual", "native")  # heads with a class and a distillation head


def is_two_headed(config: dict) -> bool:
    """Whether a saved student has a class and a distillation head (token, dual or native)."""
    return head_of(config) in TWO_HEADED
