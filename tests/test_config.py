"""Recipes: bundled ones parse, unknown keys and wrong types name the key and the closest valid one."""

import pytest

from kdkit import KdkitError, load_recipe
from kdkit.api import recipe_from_settings
from kdkit.config import PRESETS, dumps_toml, list_recipes, parse_override


def test_bundled_recipes_parse():
    names = list_recipes()
    assert {"deit_tiny_imagenet", "cifar10_teacher", "cifar10_deit_cpu", "quickstart"} <= set(names)
    for name in names:
        load_recipe(name)


def test_deit_recipe_has_the_papers_settings():
    r = load_recipe("deit_tiny_imagenet")
    assert (r.optim.epochs, r.optim.lr, r.optim.lr_base_batch, r.optim.weight_decay) == (300, 5e-4, 512, 0.05)
    assert (r.optim.warmup_epochs, r.optim.sched, r.optim.opt) == (5, "cosine", "adamw")
    assert r.aug.auto_augment == "rand-m9-mstd0.5-inc1"
    assert (r.aug.mixup, r.aug.cutmix, r.aug.reprob, r.aug.label_smoothing) == (0.8, 1.0, 0.25, 0.1)
    assert (r.model.drop_path, r.aug.repeated_aug, r.model.teacher, r.model.head) == (0.1, 3, "regnety_160", "token")
    assert (r.loss.kind, r.loss.task_weight, r.loss.kd_weight) == ("hard", 0.5, 0.5)


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(KdkitError, match=r"optim.learning_rate.*Did you mean 'optim.warmup_lr'|optim.lr"):
        load_recipe(f)
    f.write_text("[optm]\nlr = 0.1\n")
    with pytest.raises(KdkitError, match="Did you mean 'optim'"):
        load_recipe(f)


def test_wrong_type_names_the_key(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("optim:\n  epochs: ten\n")
    with pytest.raises(KdkitError, match="optim.epochs: expected int"):
        load_recipe(f)


def test_precedence_defaults_preset_file_overrides(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('preset = "deit"\n[loss]\nkd_weight = 0.3\n')
    r = load_recipe(f, ["loss.tau=2.5", "optim.epochs=7"])
    assert r.loss.kl_reduction == PRESETS["deit"]["loss"]["kl_reduction"]  # from the preset
    assert r.loss.kd_weight == 0.3  # the file beats the preset
    assert (r.loss.tau, r.optim.epochs) == (2.5, 7)  # overrides beat the file
    assert isinstance(r.loss.tau, float)


def test_resolved_recipe_round_trips_through_toml(tmp_path):
    r = load_recipe("cifar10_deit_cpu", ["model.kwargs={depth=2}"])
    f = tmp_path / "resolved.toml"
    f.write_text(dumps_toml(r.to_dict()))
    assert load_recipe(f) == r


def test_override_syntax_errors():
    with pytest.raises(KdkitError, match="section.key=value"):
        parse_override("optim.lr")
    assert parse_override("run.name=abc") == {"run": {"name": "abc"}}


def test_python_settings_map_to_recipe_keys():
    r = recipe_from_settings(epochs=3, tau=4.0, data="d", loss="soft", head="dual")
    assert (r.optim.epochs, r.loss.tau, r.data.path, r.loss.kind, r.model.head) == (3, 4.0, "d", "soft", "dual")
    with pytest.raises(KdkitError, match="Did you mean 'epochs'"):
        recipe_from_settings(epoch=3)
