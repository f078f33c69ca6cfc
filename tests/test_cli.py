"""The real entry point end to end on real CIFAR-10 images, and one clear error per bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image

from kdkit.data import create_loader, create_transforms, open_dataset, sample_path
from tests.helpers import cli_error, run_cli

TINY = ["--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--img-size", "32", "--patch-size", "8"]
FAST = ["--img-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--no-progress", "--set", "optim.warmup_epochs=0"]


@pytest.fixture(scope="module")
def teacher_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert run_cli("train", "--model", "resnet10t", "--data", tiny_data, "--output", out, "--name", "teacher",
                   *FAST) == 0
    return out / "teacher"


def test_train_writes_a_complete_run_directory(teacher_run):
    assert {p.name for p in teacher_run.iterdir()} >= {"recipe.toml", "metrics.jsonl", "summary.json", "student"}
    lines = [json.loads(x) for x in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "step" in x]
    assert steps and {"loss", "task", "lr", "images_per_s"} <= set(steps[0])
    assert any("eval" in x for x in lines)
    summary = json.loads((teacher_run / "summary.json").read_text())
    assert summary["eval"]["n"] == 60 and summary["conventions"]["loss"] == "none"


def test_distill_then_eval_then_reload_with_plain_timm(tiny_data, teacher_run, tmp_path, capsys):
    code = run_cli("distill", "--teacher", "resnet10t", "--teacher-weights", teacher_run / "student",
                   "--student", "deit_tiny", *TINY, "--data", tiny_data, "--output", tmp_path, "--name", "kd",
                   "--loss", "soft", "--tau", "2", "--preset", "none", *FAST)
    assert code == 0
    folder = tmp_path / "kd" / "student"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["kdkit"]["conventions"] == {"loss": "soft", "task_weight": 0.5, "kd_weight": 0.5,
                                           "label_smoothing": 0.0, "tau": 2.0, "kl_reduction": "batchmean"}
    assert cfg["kdkit"]["plain_timm"] is True
    summary = json.loads((tmp_path / "kd" / "summary.json").read_text())
    assert summary["teacher_check"]["num_classes"] == 10
    terms = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines() if '"kd"' in x]
    assert terms and terms[0]["kd"] > 0

    # plain timm rebuilds the distilled DeiT (both heads) from the folder, with the same logits
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    ds = open_dataset(tiny_data, "test", transform=create_transforms(32, cfg["pretrained_cfg"]["mean"],
                                                                     cfg["pretrained_cfg"]["std"], False))
    images = next(iter(create_loader(ds, 60, training=False, workers=0)))["images"]
    with torch.no_grad():
        feats = model.forward_features(images)
        fused = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
    top1 = (fused.argmax(1) == torch.tensor(ds.targets)).float().mean().item() * 100

    capsys.readouterr()
    assert run_cli("eval", "--weights", folder, "--data", tiny_data, "--workers", "0", "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 60
    assert result["fused_top1"] == pytest.approx(top1)
    assert result["images_per_s"] > 0


def test_dual_head_student_round_trip(tiny_data, teacher_run, tmp_path, capsys):
    assert run_cli("distill", "--teacher", "resnet10t", "--teacher-weights", teacher_run / "student",
                   "--student", "resnet10t", "--head", "dual", "--data", tiny_data, "--output", tmp_path,
                   "--name", "dual", *FAST) == 0
    folder = tmp_path / "dual" / "student"
    assert (folder / "kdkit_head.safetensors").is_file()
    summary = json.loads((tmp_path / "dual" / "summary.json").read_text())
    capsys.readouterr()
    assert run_cli("eval", "--weights", folder, "--data", tiny_data, "--workers", "0", "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("class_top1", "dist_top1", "fused_top1"):
        assert result[key] == pytest.approx(summary["eval"][key])


def test_cli_on_the_bundled_sample(tmp_path):
    assert run_cli("train", "--model", "deit_tiny", *TINY, "--data", "cifar10-sample", "--output", tmp_path,
                   "--name", "s", "--epochs", "1", "--batch-size", "128", "--no-progress",
                   "--set", "optim.warmup_epochs=0") == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert (summary["train_images"], summary["eval_images"]) == (3000, 2000)




def test_bad_inputs_give_one_clear_line(tiny_data, teacher_run, tmp_path, capsys):
    common = ["--output", tmp_path, *FAST]
    assert "Did you mean" in cli_error(capsys, "train", "--model", "resnet5O", "--data", tiny_data, *common)
    assert "not found" in cli_error(capsys, "train", "--model", "resnet10t", "--data", tmp_path / "nope", *common)
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "test" / "cat").mkdir(parents=True)
    assert "no images" in cli_error(capsys, "train", "--model", "resnet10t", "--data", empty, *common)
    kd = ["distill", "--teacher", "resnet10t", "--student", "resnet10t", "--data", tiny_data, *common]
    assert "tau" in cli_error(capsys, *kd, "--teacher-weights", teacher_run / "student", "--tau", "0")
    assert "kd_weight" in cli_error(capsys, *kd, "--teacher-weights", teacher_run / "student", "--kd-weight", "2")
    # a teacher trained on 3 classes, data with 10
    three = tmp_path / "three"
    for split in ("train", "test"):
        for c in ("airplane", "cat", "dog"):
            shutil.copytree(tiny_data / split / c, three / split / c)
    assert run_cli("train", "--model", "resnet10t", "--data", three, "--name", "t3", *common) == 0
    err = cli_error(capsys, *kd, "--teacher-weights", tmp_path / "t3" / "student")
    assert "3 classes" in err or "class count" in err
    assert "unknown recipe key" in cli_error(capsys, *kd, "--set", "loss.temperature=2")


def test_hub_dataset_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    err = cli_error(capsys, "train", "--model", "resnet10t", "--data", "hf:not/a-dataset", "--output", tmp_path, *FAST)
    assert "from the hub" in err


def test_unreadable_images_are_skipped_and_counted_or_fatal_with_strict(tiny_data, tmp_path, capsys):
    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    cls = data / "test" / "cat"
    (cls / "zero.jpg").write_bytes(b"")
    (cls / "trunc.jpg").write_bytes((sample_path() / "test" / "cat" / "0000.jpg").read_bytes()[:100])
    (cls / "notes.png").write_text("not an image")
    Image.new("L", (40, 30), 128).save(cls / "gray.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 128)).save(cls / "rgba.png")
    Image.new("CMYK", (32, 32), (0, 255, 0, 0)).save(cls / "cmyk.jpg")
    Image.new("P", (32, 32)).save(cls / "palette.png")
    assert run_cli("train", "--model", "resnet10t", "--data", data, "--output", tmp_path, "--name", "bad",
                   *FAST) == 0
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["eval"]["skipped"] == 3 and summary["eval"]["n"] == 64
    err = cli_error(capsys, "train", "--model", "resnet10t", "--data", data, "--output", tmp_path, *FAST,
                 "--set", "data.strict=true")
    assert "unreadable image" in err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "kdkit", "recipes"], capture_output=True, text=True, check=True)
    assert "deit_tiny_imagenet" in out.stdout and "quickstart" in out.stdout


def test_quickstart_smoke_run_prints_the_table(tmp_path, capsys):
    assert run_cli("quickstart", "--epochs", "1", "--output", tmp_path, "--no-progress",
                   "--set", "model.kwargs={depth=1, embed_dim=32, num_heads=2}", "--set", "model.patch_size=8") == 0
    printed = capsys.readouterr().out
    assert "late fusion" in printed and "student without distillation" in printed
    for run in ("no-kd", "distilled"):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert summary["eval"]["n"] == 2000
    # the bundled teacher knows CIFAR-10 (84% on these images when it was packed)
    teacher_check = json.loads((tmp_path / "distilled" / "summary.json").read_text())["teacher_check"]
    assert teacher_check["teacher_top1_slice"] > 75


def test_distill_without_a_recipe_runs_deits_whole_recipe(tiny_data, teacher_dir, tmp_path, capsys):
    assert run_cli("distill", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--student", "deit_tiny",
                   *TINY, "--data", tiny_data, "--output", tmp_path, "--name", "deit", *FAST) == 0
    assert "preset deit (DeiT's recipe" in " ".join(capsys.readouterr().err.split())
    import tomllib

    r = tomllib.loads((tmp_path / "deit" / "recipe.toml").read_text())
    assert r["preset"] == "deit" and (r["loss"]["kind"], r["loss"]["kl_reduction"]) == ("hard", "deit")
    assert (r["aug"]["auto_augment"], r["aug"]["mixup"], r["aug"]["cutmix"], r["aug"]["reprob"],
            r["aug"]["repeated_aug"], r["aug"]["label_smoothing"], r["model"]["drop_path"]) == (
        "rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.25, 3, 0.1, 0.1)
    assert json.loads((tmp_path / "deit" / "summary.json").read_text())["conventions"]["loss"] == "hard"
