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
    assert (r.optim.epochs, r.optim.lr_base, r.optim.lr_base_size, r.optim.weight_decay) == (300, 5e-4, 512, 0.05)
    assert (r.optim.lr, r.optim.lr_base_scale) == (0.0, "linear")
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


# what each bundled recipe and preset gave before optim.lr became absolute (timm's): (lr, lr_base_batch),
# the optimizer's rate being lr x global batch x grad_accum / lr_base_batch, or lr when lr_base_batch is 0
BEFORE = {"cifar10_deit_cpu": (1e-3, 0), "cifar10_distillation_methods": (1e-3, 0),
          "cifar10_function_matching": (1e-3, 0), "cifar10_semi": (1e-3, 0), "cifar10_teacher": (0.2, 0),
          "cifar10_vit_larger": (1e-3, 0), "cifar10_vit_teacher": (1e-3, 0), "deit_tiny_imagenet": (5e-4, 512), "quickstart": (1e-3, 0)}


@pytest.mark.parametrize("batch,accum", [(64, 1), (128, 4), (1024, 1), (4096, 2)])
def test_bundled_recipes_and_presets_keep_their_learning_rate(batch, accum):
    assert set(BEFORE) == set(list_recipes())
    cases = [(load_recipe(n, [f"data.batch_size={batch}", f"optim.grad_accum={accum}"]), BEFORE[n]) for n in BEFORE]
    cases += [(load_recipe(None, {"preset": p, "data": {"batch_size": batch}, "optim": {"grad_accum": accum}}),
               (5e-4, 512)) for p in (*PRESETS, "none")]
    for r, (lr, base) in cases:
        expected = lr * batch * accum / base if base else lr
        assert r.optim.learning_rate(r.data.batch_size) == pytest.approx(expected, rel=1e-12), (r.description, r.preset)


def test_learning_rate_follows_timms_train_py():
    # timm train.py: lr = lr_base * (global batch / lr_base_size), square-rooted when lr_base_scale is
    # 'sqrt' or, when empty, the optimizer's name contains 'ada' or 'lamb'; --lr wins when set
    def timm(lr_base, size, scale, opt, batch):
        ratio = batch / size
        if not scale:
            scale = "sqrt" if any(o in opt.lower() for o in ("ada", "lamb")) else "linear"
        return lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)

    for opt, scale in [("adamw", ""), ("lamb", ""), ("sgd", ""), ("nadam", ""), ("adamw", "linear"), ("sgd", "sqrt")]:
        r = load_recipe(None, {"optim": {"opt": opt, "lr_base": 0.1, "lr_base_size": 256,
                                         "lr_base_scale": scale or "auto"}})
        assert r.optim.learning_rate(1024) == pytest.approx(timm(0.1, 256, scale, opt, 1024)), (opt, scale)
    assert load_recipe(None, {"optim": {"lr": 0.3, "lr_base": 0.1}}).optim.learning_rate(1024) == 0.3


def test_earlier_recipes_keep_their_meaning(tmp_path):
    f = tmp_path / "old.toml"
    f.write_text('[optim]\nlr = 2e-3\nlr_base_batch = 256\n[run]\nchannels_last = "on"\n')
    r = load_recipe(f)
    assert r.optim.learning_rate(512) == pytest.approx(2e-3 * 512 / 256) and r.run.teacher_channels_last == "on"
    assert not r.run.channels_last
    f.write_text("[optim]\nlr = 2e-3\nlr_base_batch = 0\n")
    assert load_recipe(f).optim.learning_rate(512) == 2e-3
    with pytest.raises(KdkitError, match="now optim.lr_base_size"):
        load_recipe(None, ["optim.lr_base_batch=512"])
    with pytest.raises(KdkitError, match="run.teacher_channels_last"):
        load_recipe(None, ["run.channels_last='auto'"])


@pytest.mark.parametrize("override,match", [
    ("data.crop_pct=0", "data.crop_pct"), ("data.crop_pct=1.2", "data.crop_pct"), ("data.mean=[0.5, 0.5]", "data.mean"),
    ("data.std=[0.0]", "data.std"), ("optim.opt_eps=0", "optim.opt_eps"), ("optim.opt_betas=[0.9, 1.5]", "opt_betas"),
    ("optim.decay_rate=0", "optim.decay_rate"), ("optim.lr_base_scale='cubic'", "lr_base_scale"),
    ("optim.lr=-1", "optim.lr"), ("optim.lr_base_size=0", "lr_base_size"), ("model.drop_rate=1.0", "drop_rate"),
    ("run.eval_metric='loss'", "run.eval_metric"), ("aug.cutmix_minmax=[0.5, 0.5]", "cutmix_minmax"),
    ("aug.remode='zero'", "aug.remode"), ("aug.recount=0", "aug.recount"),
])
def test_new_keys_are_validated(override, match):
    with pytest.raises(KdkitError, match=match):
        load_recipe(None, [override])
