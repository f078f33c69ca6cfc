"""timm's and DeiT's flags mean what they mean there: commands pasted from their READMEs and docs
resolve, key by key, to the recipe their scripts would run (the expected values are written out
from timm's train.py and DeiT's main.py, not read from kdkit); no prefix abbreviations; and the
recipe keys behind the flags (crop, normalisation, optimizer, step schedule, EMA, best student)
change what they say."""

import json
import math
import shlex
from pathlib import Path

import pytest
import timm
import torch

from kdkit.cli import build_parser, main
from kdkit.cli.common import recipe_from_args
from kdkit.cli.distill import FLAGS
from kdkit.config import load_recipe
from kdkit.registry import KdkitError
from tests.helpers import ONE_EPOCH, TINY_VIT_ARGS, run_cli

# DeiT, README_deit.md, "Multinode training": DeiT-B with hard distillation from RegNetY-160
DEIT_DISTILL = ("python run_with_submitit.py --model deit_base_distilled_patch16_224 --distillation-type hard "
                "--teacher-model regnety_160 --teacher-path https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth "
                "--use_volta32")
# DeiT, README_deit.md, "Training": DeiT-tiny on one node of 4 GPUs
DEIT_TRAIN = ("python -m torch.distributed.launch --nproc_per_node=4 --use_env main.py --model deit_tiny_patch16_224 "
              "--batch-size 256 --data-path /path/to/imagenet --output_dir /path/to/save")
# timm, hfdocs/source/training_script.mdx (EfficientNet-B2 on 2 GPUs), plus the distillation flags of
# train.py (its README and docs show none): --kd-model-name, --distill-loss-weight, --kd-temperature
TIMM_TRAIN = ("./distributed_train.sh 2 --data-dir /imagenet/ --model efficientnet_b2 -b 128 --sched step --epochs 450 "
              "--decay-epochs 2.4 --decay-rate .97 --opt rmsproptf --opt-eps .001 -j 8 --warmup-lr 1e-6 "
              "--weight-decay 1e-5 --drop 0.3 --drop-path 0.2 --model-ema --model-ema-decay 0.9999 "
              "--aa rand-m9-mstd0.5 --remode pixel --reprob 0.2 --amp --lr .016")
TIMM_KD = " --kd-model-name efficientnet_b4 --distill-loss-weight 0.5 --kd-temperature 2"


def _args(command: str) -> list[str]:
    """The script's own arguments of a pasted command (after main.py / run_with_submitit.py / the
    launcher script and its process count)."""
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w.endswith((".py", ".sh")))
    rest = words[start + 1:]
    return rest[1:] if words[start].endswith(".sh") else rest


def _resolve(argv: list[str]):
    return recipe_from_args(build_parser().parse_args(["distill", *argv]), FLAGS)


def _flat(recipe) -> dict:
    return {f"{s}.{k}" if isinstance(v, dict) else s: x for s, v in recipe.to_dict().items()
            for k, x in (v.items() if isinstance(v, dict) else [(s, v)])}


def _check(recipe, expected: dict) -> None:
    got = _flat(recipe)
    wrong = {k: (got[k], v) for k, v in expected.items()
             if (tuple(got[k]) if isinstance(got[k], list | tuple) else got[k]) != v}
    assert not wrong, wrong  # key: (kdkit, timm / DeiT)


def test_deit_readme_distillation_command(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # as pasted: run_with_submitit.py's Slurm flag is refused in one line naming kdkit's way
    with pytest.raises(KdkitError, match="--use_volta32: .*accelerate launch"):
        build_parser().parse_args(["distill", *_args(DEIT_DISTILL)])
    r = _resolve(_args(DEIT_DISTILL)[:-1])
    # DeiT main.py: the flags given, and its defaults for the rest of a distillation run
    _check(r, {
        "model.student": "deit_base_distilled_patch16_224", "model.teacher": "regnety_160",
        "model.teacher_weights": "",  # timm's regnety_160.deit_in1k, downloaded from that very URL
        "loss.kind": "hard", "loss.kd_weight": 0.5, "loss.task_weight": 0.5,  # (1 - alpha) CE + alpha CE(teacher)
        "loss.tau": 1.0, "model.drop_path": 0.1, "model.drop_rate": 0.0,
        "optim.opt": "adamw", "optim.weight_decay": 0.05, "optim.sched": "cosine", "optim.epochs": 300,
        "optim.warmup_epochs": 5, "optim.warmup_lr": 1e-6, "optim.min_lr": 1e-5, "optim.momentum": 0.9,
        "optim.clip_grad": 0.0, "aug.color_jitter": 0.3, "aug.auto_augment": "rand-m9-mstd0.5-inc1",
        "aug.label_smoothing": 0.1, "aug.reprob": 0.25, "aug.remode": "pixel", "aug.recount": 1,
        "aug.mixup": 0.8, "aug.cutmix": 1.0, "aug.mixup_prob": 1.0, "aug.mixup_switch_prob": 0.5,
        "aug.repeated_aug": 3, "aug.interpolation": "bicubic", "aug.scale": (0.08, 1.0), "aug.hflip": 0.5,
        "run.seed": 0,
    })
    from kdkit.models import resolve_model_name

    assert resolve_model_name(r.model.teacher) == "regnety_160.deit_in1k"
    argv = _args(DEIT_DISTILL)
    assert timm.models.get_pretrained_cfg("regnety_160.deit_in1k").url == argv[argv.index("--teacher-path") + 1]
    # DeiT's lr: args.lr * batch_size * world_size / 512, with lr 5e-4
    for batch in (256, 1024):
        assert r.optim.learning_rate(batch) == pytest.approx(5e-4 * batch / 512)


def test_deit_readme_training_command(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # --nproc_per_node=4
    r = _resolve(_args(DEIT_TRAIN))
    assert (r.model.student, r.data.path) == ("deit_tiny_patch16_224", "/path/to/imagenet")
    assert (r.run.output, r.run.name) == ("/path/to", "save")  # the run is written to --output_dir itself
    # kdkit's --batch-size is global (its help says so); DeiT's is per process: DeiT's 4 x 256 is
    # kdkit's -b 256 under 4 processes
    assert r.data.batch_size == 256 and _resolve(["-b", "256"]).data.batch_size == 4 * 256
    with pytest.raises(KdkitError, match="--output and --output_dir both set run.output"):
        _resolve(["--output_dir", "a/b", "--output", "c"])


def test_timm_docs_command_with_distillation(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # distributed_train.sh 2
    r = _resolve(_args(TIMM_TRAIN + TIMM_KD))
    _check(r, {
        "model.student": "efficientnet_b2", "data.path": "/imagenet/", "data.batch_size": 2 * 128,  # -b: per process
        "optim.sched": "step", "optim.epochs": 450, "optim.decay_epochs": 2.4, "optim.decay_rate": 0.97,
        "optim.opt": "rmsproptf", "optim.opt_eps": 0.001, "data.workers": 8, "optim.warmup_lr": 1e-6,
        "optim.weight_decay": 1e-5, "model.drop_rate": 0.3, "model.drop_path": 0.2, "optim.ema_decay": 0.9999,
        "aug.auto_augment": "rand-m9-mstd0.5", "aug.remode": "pixel", "aug.reprob": 0.2, "run.precision": "fp16",
        "optim.lr": 0.016,
        # train.py's LogitDistillationTask: KL(teacher || student) at the temperature, x T^2, batchmean, on the
        # model's one output; --distill-loss-weight alone keeps the task weight at 1 (independent mode)
        "model.teacher": "efficientnet_b4", "loss.kind": "soft", "model.head": "shared", "loss.tau": 2.0,
        "loss.kd_weight": 0.5, "loss.task_weight": 1.0, "loss.kl_reduction": "batchmean",
    })
    assert r.optim.learning_rate(r.data.batch_size) == 0.016  # timm's --lr is absolute
    # --task-loss-weight alone: complementary; both: as given; neither: both 1 (train.py's three modes)
    kd = ["--kd-model-name", "efficientnet_b4"]
    for extra, weights in [(["--task-loss-weight", "0.25"], (0.25, 0.75)),
                           (["--task-loss-weight", "0.25", "--distill-loss-weight", "0.5"], (0.25, 0.5)),
                           ([], (1.0, 1.0))]:
        r = _resolve([*kd, *extra])
        assert (r.loss.task_weight, r.loss.kd_weight) == weights, extra
    # token distillation (TokenDistillationTask): the distillation token's head, soft or hard
    r = _resolve([*kd, "--kd-distill-type", "token", "--kd-token-distill-type", "hard"])
    assert (r.model.head, r.loss.kind, r.loss.tau) == ("token", "hard", 4.0)


def test_timm_lr_base_scales_as_train_py(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    # train.py: lr = lr_base * (global batch / lr_base_size) [** 0.5 for 'ada'/'lamb' optimizers], 256 by default
    r = _resolve(["--lr-base", "1e-3", "-b", "128", "--opt", "adamw"])
    assert r.optim.learning_rate(r.data.batch_size) == pytest.approx(1e-3 * math.sqrt(4 * 128 / 256))
    r = _resolve(["--lr-base", "0.1", "-b", "128", "--opt", "sgd", "--grad-accum-steps", "2"])
    assert r.optim.learning_rate(r.data.batch_size) == pytest.approx(0.1 * 4 * 128 * 2 / 256)
    r = _resolve(["--lr-base", "1e-3", "-b", "128", "--lr-base-size", "512", "--lr-base-scale", "linear"])
    assert r.optim.learning_rate(r.data.batch_size) == pytest.approx(1e-3 * 4 * 128 / 512)  # DeiT's rule
    r = _resolve(["--lr-base", "1e-3", "--lr-base-scale", "", "--opt", "lamb", "-b", "64"])
    assert r.optim.learning_rate(r.data.batch_size) == pytest.approx(1e-3 * math.sqrt(4 * 64 / 256))
    r = _resolve(["--lr", "0.3", "--lr-base", "1e-3"])  # --lr wins, as in train.py
    assert r.optim.learning_rate(4096) == 0.3


def test_distillation_alpha_is_complementary_unless_the_task_weight_is_given():
    assert (_resolve(["--distillation-alpha", "0.3"]).loss.task_weight, 0.3) == (pytest.approx(0.7), 0.3)
    r = _resolve(["--distillation-alpha", "0.3", "--task-weight", "0.9"])
    assert (r.loss.task_weight, r.loss.kd_weight) == (0.9, 0.3)
    r = _resolve(["--distillation-alpha", "0.3", "--set", "loss.task_weight=0.2"])
    assert (r.loss.task_weight, r.loss.kd_weight) == (0.2, 0.3)
    with pytest.raises(KdkitError, match="both set loss.kd_weight"):
        _resolve(["--distillation-alpha", "0.3", "--kd-weight", "0.5"])


def test_no_parser_takes_abbreviations(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    assert parser.allow_abbrev is False and all(p.allow_abbrev is False for p in sub.choices.values())
    r = _resolve(["--drop", "0.1", "--preset", "none"])  # timm's dropout, not --drop-path
    assert (r.model.drop_rate, r.model.drop_path) == (0.1, 0.0)
    assert _resolve(["--model-ema"]).optim.ema_decay == 0.9998  # timm's default decay
    assert _resolve(["--model-ema", "--model-ema-decay", "0.99"]).optim.ema_decay == 0.99
    assert _resolve(["--lr-base", "1e-3"]).optim.lr_base == 1e-3
    for argv, match in [(["distill", "--drop-pa", "0.1"], "unrecognized arguments: --drop-pa"),
                        (["distill", "--model-ema-decay", "0.99"], "refines timm's --model-ema"),
                        (["distill", "--eval"], "--eval: .*kdkit eval"),
                        (["distill", "--amp-dtype", "bfloat16"], "refines timm's --amp"),
                        (["distill", "--input-size", "1", "32", "32"], "--input-size takes"),
                        (["distill", "--teacher-path", "https://example.com/t.pth"], "downloads no weights"),
                        (["distill", "--teacher-model", "resnet50", "--teacher-path",
                          "https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth"], "regnety_160.deit_in1k")]:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and __import__("re").search(match, err[0]), (argv, err)


def test_switches_that_carry_values():
    r = _resolve(["--amp", "--amp-dtype", "bfloat16", "--input-size", "3", "48", "48", "--repeated-aug",
                  "--opt-kwargs", "amsgrad=True", "foo=bar", "--mean", "0.5", "--std", "0.2", "0.3", "0.4"])
    assert (r.run.precision, r.model.img_size, r.aug.repeated_aug) == ("bf16", 48, 3)
    assert r.optim.opt_kwargs == {"amsgrad": True, "foo": "bar"} and r.data.mean == [0.5]
    assert _resolve(["--no-repeated-aug"]).aug.repeated_aug == 0 and _resolve(["--input-size", "64"]).model.img_size == 64


# ---- the keys behind the flags change what they say

def _student(recipe_args: list[str]):
    from kdkit.engine.build import build_student

    return build_student(load_recipe(None, recipe_args), "train", None, 10)


def test_crop_pct_mean_and_std_reach_the_eval_view():
    from kdkit.data import eval_transform, view_settings
    from kdkit.engine.build import student_data_config

    base = ["model.student='resnet10t'", "model.img_size=96"]
    own = timm.data.resolve_data_config({}, model=timm.create_model("resnet10t"))["crop_pct"]
    for args, crop in [([], own), (["data.crop_pct=0.9"], 0.9), (["data.crop_pct=0.5"], 0.5)]:
        r = load_recipe(None, base + args)
        cfg = student_data_config(_student(base + args), r.model.img_size, r.data)
        assert cfg["crop_pct"] == crop
        steps = {type(t).__name__: t for t in eval_transform(cfg).transforms}
        # timm's transforms_factory: resize the short side to floor(size / crop_pct), then crop size
        assert steps["Resize"].size == math.floor(96 / crop) and tuple(steps["CenterCrop"].size) == (96, 96)
    r = load_recipe(None, [*base, "data.mean=[0.5]", "data.std=[0.1, 0.2, 0.3]"])
    cfg = student_data_config(_student(base), 96, r.data)
    assert (cfg["mean"], cfg["std"]) == ((0.5, 0.5, 0.5), (0.1, 0.2, 0.3))
    img = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (96, 96), (255, 0, 128))
    x = eval_transform(cfg)(img)
    assert torch.allclose(x[:, 0, 0], torch.tensor([(1 - 0.5) / 0.1, (0 - 0.5) / 0.2, (128 / 255 - 0.5) / 0.3]))
    # a view's identity (recorded in logit caches) is unchanged by the settings left at their defaults
    plain = student_data_config(_student(base), 96, load_recipe(None, base).data)
    assert view_settings(plain, load_recipe(None).to_dict()["aug"]).keys() == view_settings(
        plain, {**load_recipe(None).to_dict()["aug"], "remode": "pixel"}).keys()
    assert "remode" not in view_settings(plain, load_recipe(None).to_dict()["aug"])
    assert view_settings(plain, load_recipe(None, ["aug.remode='const'"]).to_dict()["aug"])["remode"] == "const"


def test_optimizer_settings_and_the_step_schedule():
    from kdkit.engine.build import build_optimizer

    args = ["model.student='resnet10t'", "optim.opt='adamw'", "optim.opt_betas=[0.8, 0.95]", "optim.opt_eps=1e-6",
            "optim.opt_kwargs={amsgrad=true}", "optim.sched='step'", "optim.decay_epochs=2.5", "optim.decay_rate=0.5",
            "optim.lr=0.1", "optim.warmup_epochs=0"]
    r = load_recipe(None, args)
    optimizer, scheduler, lr = build_optimizer(r, _student(args), 8, torch.device("cpu"))
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["amsgrad"], lr) == ((0.8, 0.95), 1e-6, True, 0.1)
    for update in range(0, 80, 3):  # timm's StepLRScheduler per update: lr x rate ** (update // (epochs x 8))
        scheduler.step_update(update)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (update // 20)), update


def test_student_memory_format_dropout_and_checkpointing():
    s = _student(["model.student='resnet10t'", "run.channels_last=true", "model.drop_rate=0.3"])
    assert s.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert s.model.drop_rate == 0.3
    plain = _student(["model.student='resnet10t'"])
    assert not plain.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    vit = _student(["model.student='deit_tiny_patch16_224'", "model.grad_checkpointing=true", "model.img_size=32",
                    "model.kwargs={depth=1, embed_dim=32, num_heads=2}"])
    assert vit.model.grad_checkpointing and not _student(["model.student='deit_tiny_patch16_224'", "model.img_size=32",
                                                          "model.kwargs={depth=1, embed_dim=32, num_heads=2}"]
                                                         ).model.grad_checkpointing


def test_best_student_is_kept_beside_the_last(tiny_data, tmp_path):
    from kdkit.engine.evaluate import evaluate_saved

    assert run_cli("train", "--model", "deit_tiny_patch16_224", *TINY_VIT_ARGS, "--data", tiny_data,
                   *ONE_EPOCH, "--epochs", "4", "--lr", "3e-3", "--output", tmp_path, "--name", "r",
                   "--model-ema", "--model-ema-warmup", "--eval-metric", "top1") == 0
    run = tmp_path / "r"
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(x["epoch"] + 1, x["eval"]["fused_top1"]) for x in evals if "eval" in x]
    top = max(v for _, v in evals)
    epoch = next(e for e, v in evals if v == top)  # the first of equals, as timm's CheckpointSaver
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"] == {"epoch": epoch, "metric": "top1", "value": top}
    again = evaluate_saved(run / "student_best", str(tiny_data), progress=False)
    assert again["fused_top1"] == pytest.approx(top)
    assert (run / "student").is_dir() and (run / "student_ema").is_dir()
    assert Path(run / "student_best" / "model.safetensors").is_file()


def test_cutmix_minmax_sets_the_box_and_mixup_mode_pair_is_the_only_one():
    from types import SimpleNamespace

    from kdkit.data import finish_batch, plan_batch, view_settings, with_views

    cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
           "crop_pct": 1.0}
    aug = load_recipe(None, ["aug.cutmix_minmax=[0.5, 0.54]"]).to_dict()["aug"]  # mixup and cutmix alphas 0
    ds = with_views(SimpleNamespace(), view_settings(cfg, aug), num_classes=3)
    a, b = torch.zeros(3, 32, 32), torch.ones(3, 32, 32)
    for seed in range(5):
        (ya, mix_a), (yb, mix_b) = ds.mixup(a, 0, b, 1, seed)
        xa, xb = finish_batch(*plan_batch([a, b], [mix_a, mix_b]))
        # timm's rand_bbox_minmax: sides drawn in [int(32 x 0.5), int(32 x 0.54)) = [16, 17), so 16 px;
        # lambda = 1 - 16 x 16 / (32 x 32)
        assert xa.mean().item() == pytest.approx(0.25) and xb.mean().item() == pytest.approx(0.75)
        assert torch.allclose(ya, torch.tensor([0.75, 0.25, 0.0])) and torch.allclose(yb, torch.tensor([0.25, 0.75, 0.0]))
    assert with_views(SimpleNamespace(), view_settings(cfg, load_recipe(None).to_dict()["aug"]), 3).mixup is None
    assert "cutmix_minmax" not in view_settings(cfg, load_recipe(None).to_dict()["aug"])
    assert _resolve(["--mixup-mode", "pair", "--cutmix-minmax", "0.2", "0.8"]).aug.cutmix_minmax == [0.2, 0.8]
    with pytest.raises(KdkitError, match="--mixup-mode batch: kdkit mixes pairs"):
        _resolve(["--mixup-mode", "batch"])
