"""The Python API: `kdkit.distill(student, teacher, data, ...)` and `kdkit.train(model, data, ...)`.

`distill` runs what `kdkit distill` runs: without a `recipe`, preset deit (DeiT's recipe: hard
distillation through a distillation head, RandAugment, Mixup/CutMix, repeated augmentation,
label smoothing); `preset="none"` gives kdkit's plain defaults. `train` runs what `kdkit train`
runs: kdkit's plain defaults, no preset and no teacher. Both return a `Result`: the trained
student as one plain `nn.Module` whose forward gives (B, K) logits (a student with two heads has
them fused, DeiT's late fusion), the run summary and the run directory.

    import kdkit
    result = kdkit.distill("deit_tiny", "resnet50", "DIR", epochs=10, batch_size=64)
    logits = result.model(images)  # (B, K): a plain module, no kdkit needed to use it
    result.summary["eval"]["top1"], result.run_dir / "student"  # also saved for timm

student / teacher / model: a timm name (or kdkit short name) or any nn.Module classifier. A module
student is copied, and the copy trained: the module you pass is left as it was. A module teacher
is frozen in place (eval mode, no gradients); its weights are not changed. A plain nn.Module (no
timm forward_features/forward_head) serves as the student with head `shared` (its own classifier
takes both losses) or `dual` (a second classifier on the input of its final nn.Linear), which
head `auto` (preset deit) picks when it has a final nn.Linear; `token` and `native` need a ViT
with a class token or timm's own distillation head.

data / eval_data: a path as the CLI takes it (an ImageFolder root with train/ and val/, tar
shards, a `datasets.save_to_disk` folder, "hf:NAME", "cifar10-sample"), or an object:

- a map-style torch `Dataset` of (image, class) pairs: images as PIL images, uint8 tensors or
  arrays, or ToTensor's float tensors in [0, 1], given raw (kdkit applies the recipe's
  transforms, seeded per view; a dataset that augments or normalises itself is refused);
- a `DataLoader` over one: its dataset, batch size (per process) and workers are used; kdkit
  draws the order itself (seeded, replayable, resumable), so a loader with a sampler of its own
  (weighted, say) or over an IterableDataset is refused with one line;
- a Hugging Face `datasets.Dataset` with an Image column and a label column, or a `DatasetDict`
  (its "train" split trains, its val/validation/test split evaluates).

A single dataset object with no `eval_data` is evaluated on itself (with a warning). Data given
as objects keeps what data from a folder has: the same views and order for the same seed,
mid-epoch `resume`, and a fingerprint of its content in the run's records (kdkit/data/objects.py).

settings: any recipe key by its bare name (`epochs=3`, `tau=4.0`, `batch_size=64`, `head="dual"`,
`loss="soft"`, `lr=1e-3`; docs/cli.md lists them), or a whole `recipe` (a Recipe, whose values
the settings then override). Unlabeled images: `unlabeled="UDIR", unlabeled_ratio=3` (docs/semi-supervised.md).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from kdkit.config import RENAMED, Recipe, _merge, load_recipe
from kdkit.registry import KdkitError, suggest

__all__ = ["Result", "distill", "recipe_from_settings", "train"]

# Bare names that differ from the recipe's field names.
# the settings' short names: data.path and loss.kind; and the RENAMED keys' old names (teacher_logits, logits, ...)
_RENAMES = {"data": "path", "loss": "kind", **{old.split(".")[1]: new.split(".")[1] for old, new in RENAMED.items()}}


@dataclass
class Result:
    """What `distill` and `train` return.

    model: the trained student as one plain nn.Module, forward(images) -> (B, K) logits: a
      two-headed student's heads fused (their average, DeiT's late fusion), as `kdkit export
      --format timm` saves it; a module you passed comes back as (a trained copy of) its own class.
      A head no single module computes (a plugin's) comes as the student behind kdkit's OneHead,
      which gives the same fused logits.
    summary: the run summary (RUN/summary.json): "eval" (top1, top5, loss, n), "best",
      "conventions" (the loss's settings), data fingerprints, timings.
    run_dir: the run directory (recipe.toml, metrics.jsonl, student/ for timm, checkpoints/).
    """

    model: nn.Module
    summary: dict
    run_dir: Path


def _section_of() -> dict[str, str]:
    recipe = Recipe()
    return {g.name: f.name for f in dataclasses.fields(recipe) if dataclasses.is_dataclass(getattr(recipe, f.name))
            for g in dataclasses.fields(getattr(recipe, f.name))}


def recipe_from_settings(recipe: Recipe | None = None, **settings: object) -> Recipe:
    """A Recipe from bare setting names (each recipe key is unique across sections); `preset`
    names a preset (docs/concepts.md), "none" for none."""
    sections = _section_of()
    over: dict = {}
    for name, value in settings.items():
        if name == "preset":
            over["preset"] = value
            continue
        key = _RENAMES.get(name, name)
        if key not in sections:
            raise KdkitError(f"unknown setting {name!r}.{suggest(name, [*sections, *_RENAMES, 'preset'])}")
        over = _merge(over, {sections[key]: {key: value}})
    base = recipe.to_dict() if recipe is not None else {}
    return load_recipe(None, _merge(base, over))


def _data_settings(data: object, settings: dict) -> tuple[dict, object | None]:
    """(the data settings, the data object or None for a path); a DataLoader's batch size and
    workers where the settings do not give them."""
    from kdkit.data import describe_object, is_data_object, loader_settings

    if not is_data_object(data):
        return {"data": str(data)}, None
    extra = {"data": describe_object(data)}
    if isinstance(data, DataLoader):
        from kdkit.cli.common import world_size

        extra.update({k: v for k, v in loader_settings(data, world_size()).items() if k not in settings})
    return extra, data


def _finish(summary: dict) -> Result:
    """The Result of a run's summary: the student collapsed into one plain module where its head
    allows (kdkit.models.fused.plain_model), else (a plugin's head, say) the head-wrapped student
    behind a module that gives its fused logits."""
    from kdkit.console import console
    from kdkit.export import OneHead
    from kdkit.models.fused import plain_model
    from kdkit.models.saved import read_config
    from kdkit.registry import KdkitError

    student = summary.pop("model")
    config = read_config(Path(summary["student"]))
    try:
        model = plain_model(student, config)
    except KdkitError as e:
        console.print(f"note: {e}: Result.model is the student with its heads fused (kdkit's OneHead)")
        model = OneHead(student.eval(), "fused")
    return Result(model, summary, Path(summary["run_dir"]))


def distill(student: str | nn.Module, teacher: str | nn.Module, data: object, *, eval_data: object | None = None,
            recipe: Recipe | None = None, resume: str | Path | None = None, overwrite: bool = False,
            **settings: object) -> Result:
    """Distil `teacher` into `student` on `data`, as `kdkit distill` does: preset deit unless a
    `recipe` or `preset=` says otherwise. See the module docstring for the arguments.

    eval_data: the evaluation split when `data` is a single dataset object (a path or object).
    resume: a run directory to continue from its newest checkpoint (the same call otherwise).
    overwrite: replace an earlier run in the run directory (refused otherwise).
    Returns a Result (model, summary, run_dir).
    """
    from kdkit.engine.run import run

    if recipe is None:
        settings.setdefault("preset", "deit")  # the CLI's distill without --recipe
    names = {k: v for k, v in {"student": student, "teacher": teacher}.items() if isinstance(v, str)}
    extra, obj = _data_settings(data, settings)
    r = recipe_from_settings(recipe, **extra, **names, **settings)
    module = copy.deepcopy(student) if isinstance(student, nn.Module) else None
    return _finish(run(r, "distill", student=module, teacher=teacher if isinstance(teacher, nn.Module) else None,
                       resume=resume, overwrite=overwrite, data=obj, eval_data=eval_data))


def train(model: str | nn.Module, data: object, *, eval_data: object | None = None, recipe: Recipe | None = None,
          resume: str | Path | None = None, overwrite: bool = False, **settings: object) -> Result:
    """Supervised training of `model` on `data` (no teacher), as `kdkit train` does: kdkit's plain
    defaults (no preset) unless a `recipe` or `preset=` says otherwise. Arguments and the Result as
    for `distill`."""
    from kdkit.engine.run import run

    extra, obj = _data_settings(data, settings)
    names = {"student": model} if isinstance(model, str) else {}
    r = recipe_from_settings(recipe, **extra, loss="none", **names, **settings)
    module = copy.deepcopy(model) if isinstance(model, nn.Module) else None
    return _finish(run(r, "train", student=module, resume=resume, overwrite=overwrite, data=obj,
                       eval_data=eval_data))
