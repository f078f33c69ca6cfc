"""One-call Python API: `kdkit.distill(student, teacher, data, ...)` and `kdkit.train(model, data, ...)`.

Student and teacher are timm names or any nn.Module; every other setting is a recipe key given by
its bare name (`epochs=3`, `tau=4.0`, `batch_size=64`, `head="dual"`, `loss="soft"`), or a whole
Recipe. Unlabeled images are a second data source: `kdkit.distill(s, t, "DIR", unlabeled="UDIR",
unlabeled_ratio=3, pseudo_label="hard", confidence_threshold=0.8)` (docs/semi-supervised.md).
Returns the run summary; the trained student is under "model".
"""

from __future__ import annotations

import dataclasses

from torch import nn

from kdkit.config import Recipe, _merge, load_recipe
from kdkit.engine.run import run
from kdkit.registry import KdkitError, suggest

# Bare names that differ from the recipe's field names.
_RENAMES = {"data": "path", "loss": "kind"}


def _section_of() -> dict[str, str]:
    recipe = Recipe()
    return {g.name: f.name for f in dataclasses.fields(recipe) if dataclasses.is_dataclass(getattr(recipe, f.name))
            for g in dataclasses.fields(getattr(recipe, f.name))}


def recipe_from_settings(recipe: Recipe | None = None, **settings: object) -> Recipe:
    """A Recipe from bare setting names (each recipe key is unique across sections)."""
    sections = _section_of()
    over: dict = {}
    for name, value in settings.items():
        key = _RENAMES.get(name, name)
        if key not in sections:
            raise KdkitError(f"unknown setting {name!r}.{suggest(name, list(sections) + list(_RENAMES))}")
        over = _merge(over, {sections[key]: {key: value}})
    base = recipe.to_dict() if recipe is not None else {}
    return load_recipe(None, _merge(base, over))


def distill(student: str | nn.Module, teacher: str | nn.Module, data: str, *, recipe: Recipe | None = None,
            overwrite: bool = False, **settings: object) -> dict:
    """Distil `teacher` into `student` on `data`. See the module docstring for `settings`; `overwrite`
    replaces an earlier run in the run directory (refused otherwise)."""
    names = {"student": student, "teacher": teacher}
    r = recipe_from_settings(recipe, data=data, **{k: v for k, v in names.items() if isinstance(v, str)},
                             **settings)
    return run(r, "distill", student=student if isinstance(student, nn.Module) else None,
               teacher=teacher if isinstance(teacher, nn.Module) else None, overwrite=overwrite)


def train(model: str | nn.Module, data: str, *, recipe: Recipe | None = None, overwrite: bool = False,
          **settings: object) -> dict:
    """Supervised training of `model` on `data` (no teacher); `overwrite` as for `distill`."""
    extra = {"student": model} if isinstance(model, str) else {}
    r = recipe_from_settings(recipe, data=data, loss="none", **extra, **settings)
    return run(r, "train", student=model if isinstance(model, nn.Module) else None, overwrite=overwrite)
