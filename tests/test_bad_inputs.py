"""User mistakes that used to end in a traceback or a silent wrong answer: one clear line and exit
code 2 now, and nothing left behind that looks like a run."""

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import kdkit
from kdkit.data import ImageFolderDataset, UnlabeledFolderDataset
from tests.helpers import cli_error, run_cli

FAST = ["--img-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--no-progress",
        "--set", "optim.warmup_epochs=0"]


def test_quickstart_recipe_without_teacher_weights_names_the_flag(tiny_data, tmp_path, capsys):
    err = cli_error(capsys, "distill", "--recipe", "quickstart", "--data", tiny_data, "--output", tmp_path, *FAST)
    bundled = Path(kdkit.__file__).resolve().parent / "assets" / "teachers" / "resnet9_cifar_s"
    assert "--teacher-weights" in err and f"(the bundled one: {bundled})" in err and bundled.is_dir()
    assert not any(tmp_path.iterdir())


def test_data_given_a_file_says_it_is_a_file(tiny_data, tmp_path, capsys):
    f = tmp_path / "data.txt"
    f.write_text("not a folder")
    err = cli_error(capsys, "train", "--model", "resnet10t", "--data", f, "--output", tmp_path / "runs", *FAST)
    assert "is a file, not a data folder" in err and not (tmp_path / "runs").exists()


def test_an_empty_weights_file_says_it_is_empty(tiny_data, tmp_path, capsys):
    (tmp_path / "w.safetensors").write_bytes(b"")
    err = cli_error(capsys, "eval", "--model", "resnet10t", "--weights", tmp_path / "w.safetensors", "--data", tiny_data)
    assert "is empty (0 bytes)" in err


def test_hidden_files_and_folders_are_ignored_and_counted(tiny_data, tmp_path):
    root = tmp_path / "train"
    shutil.copytree(tiny_data / "train", root)
    some = next((root / "cat").iterdir())
    shutil.copy(some, root / "cat" / ".hidden.jpg")
    shutil.copy(some, root / "cat" / "._resource_fork.jpg")
    (root / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    shutil.copy(some, root / ".ipynb_checkpoints" / "x.jpg")
    ds = ImageFolderDataset(root)
    assert len(ds.classes) == 10 and len(ds) == 120 and ds.ignored_files == 2
    unlabeled = UnlabeledFolderDataset(root, ds.classes)
    assert len(unlabeled) == 120 and unlabeled.ignored_files == 3


def test_eval_of_a_bare_weights_file_builds_the_datas_class_count(tiny_data, tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    save_file(model.state_dict(), tmp_path / "ten.safetensors")
    assert run_cli("eval", "--model", "resnet10t", "--weights", tmp_path / "ten.safetensors", "--data", tiny_data,
                   "--workers", "0", "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the top-1 of the reloaded model, computed here on the same images
    from kdkit.data import create_loader, create_transforms, open_dataset

    cfg = model.pretrained_cfg
    ds = open_dataset(tiny_data, "test", create_transforms(cfg["input_size"][-1], cfg["mean"], cfg["std"], False,
                                                           interpolation=cfg["interpolation"],
                                                           crop_pct=cfg["crop_pct"]))
    model.eval()
    with torch.no_grad():
        correct = sum((model(b["images"]).argmax(1) == b["target"]).sum().item()
                      for b in create_loader(ds, 30, training=False, workers=0))
    assert result["class_top1"] == pytest.approx(100.0 * correct / len(ds), abs=1e-6)
    # a 1,000-class checkpoint on 10-class data is refused, never scored
    save_file(timm.create_model("resnet10t").state_dict(), tmp_path / "thousand.safetensors")
    err = cli_error(capsys, "eval", "--model", "resnet10t", "--weights", tmp_path / "thousand.safetensors",
                 "--data", tiny_data)
    assert "class count differs" in err


def test_a_custom_student_with_the_wrong_class_count_is_refused_before_training(tiny_data, teacher_dir, tmp_path):
    import kdkit
    from kdkit.registry import KdkitError

    student = timm.create_model("resnet10t", num_classes=5)
    with pytest.raises(KdkitError, match="the student predicts 5 classes but the data has 10"):
        kdkit.distill(student, "resnet10t", str(tiny_data), teacher_weights=str(teacher_dir), epochs=1,
                      batch_size=16, workers=0, progress=False, output=str(tmp_path), name="five")


def test_an_empty_class_folder_is_a_warning_naming_it(tiny_data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    (root / "train" / "zz_empty").mkdir()
    assert run_cli("train", "--model", "resnet10t", "--data", root, "--output", tmp_path, "--name", "e", *FAST) == 0
    err = capsys.readouterr().err
    assert "class folders without images" in err and "zz_empty" in err


def test_cache_prints_its_table_to_stdout(tiny_data, teacher_dir, tmp_path, capsys):
    assert run_cli("cache", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--student", "deit_tiny",
                   "--img-size", "32", "--patch-size", "8", "--data", tiny_data, "--epochs", "1", "--workers", "0",
                   "--no-progress", "--preset", "none", "--out", tmp_path / "c") == 0
    out = capsys.readouterr().out
    assert "kdkit cache" in out and "records_per_epoch" in out


def test_hub_weights_offline_fail_at_once_with_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    """HF_HUB_OFFLINE (or an unreachable Hub) is one line before any download is tried, not minutes of retries."""
    import huggingface_hub

    tried = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: tried.append(a) or 1 / 0)
    args = ["distill", "--teacher", "regnety_160", "--student", "deit_tiny", "--data", tiny_data, "--epochs", "1",
            "--workers", "0", "--batch-size", "16", "--output", tmp_path, "--name", "off"]
    for env, says in ((("HF_HUB_OFFLINE", "1"), "HF_HUB_OFFLINE is set"),
                      (("HF_ENDPOINT", "http://127.0.0.1:9"), "cannot be reached (http://127.0.0.1:9")):
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv(*env)
        capsys.readouterr()
        assert run_cli(*args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and "regnety_160" in err[0] and "--teacher-weights" in err[0]
    assert tried == [] and not (tmp_path / "off").exists()


@pytest.mark.parametrize("policy", ["bogus", "rand-m9-zz1"])
def test_an_auto_augment_policy_timm_refuses_is_one_line(policy, tiny_data, teacher_dir, tmp_path, capsys):
    for verb in ("distill", "cache"):
        out = ["--output", tmp_path / "runs"] if verb == "distill" else ["--out", tmp_path / "cache"]
        err = cli_error(capsys, verb, "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--data", tiny_data,
                     "--aa", policy, *out, *FAST)
        assert f"aug.auto_augment {policy!r} is not a timm augmentation policy" in err
    assert not any(tmp_path.iterdir())


def test_a_presets_own_loss_settings_are_not_warned_of_but_the_users_are(tiny_data, teacher_dir, capsys):
    dry = ["distill", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--student", "resnet10t",
           "--data", tiny_data, "--dry-run", *FAST]
    capsys.readouterr()
    assert run_cli(*dry) == 0  # preset deit: loss hard, with its kl_reduction 'deit' for the soft variant
    assert "has no effect" not in capsys.readouterr().err
    assert run_cli(*dry, "--set", "loss.kl_reduction=batchmean") == 0
    assert "loss.kl_reduction = 'batchmean' has no effect on loss 'hard'" in " ".join(capsys.readouterr().err.split())


def test_a_single_head_student_prints_one_row(tiny_runs, tiny_data, capsys):
    rows = {}
    for run in ("single", "dual"):
        capsys.readouterr()
        assert run_cli("eval", "--weights", tiny_runs[run] / "student", "--data", tiny_data, "--workers", "0") == 0
        rows[run] = [line.split("│")[1].strip() for line in capsys.readouterr().out.splitlines()
                     if line.startswith("│")]
    assert rows == {"single": ["class"], "dual": ["class", "dist", "fused"]}
