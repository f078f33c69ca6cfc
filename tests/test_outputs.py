"""Every verb writes only where it is told, and never over a finished output unless the command says
so: a run's name is one folder inside its output folder; an existing run, export, comparison or
figure is refused (naming it) without --overwrite; a run that fails before its first checkpoint
leaves no run directory."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import kdkit
from tests.helpers import ONE_EPOCH, TINY_RESNET_ARGS, TINY_VIT_ARGS, run_cli


def one_line(capsys, verb, *argv) -> str:
    capsys.readouterr()
    code = run_cli(verb, *argv)
    err = capsys.readouterr().err.strip()
    # the error is one line, the last (a run's header may come before it, on stderr too)
    assert code == 2 and "Traceback" not in err and err.splitlines()[-1].startswith(f"kdkit {verb}: error: "), err
    return err.splitlines()[-1]


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "ABSOLUTE", ""])
def test_a_run_name_is_one_folder_inside_the_output_folder(name, tiny_data, tmp_path, capsys):
    out = tmp_path / "runs"
    name = str(tmp_path / "abs") if name == "ABSOLUTE" else name
    err = one_line(capsys, "train", "--model", "resnet10t", "--data", tiny_data, "--output", out, "--name", name,
                   *ONE_EPOCH)
    assert "one folder name inside the output folder" in err
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"[run]\nname = {name!r}\n".replace("'", '"'))
    if name:  # a recipe file's run.name ("" there means the default name)
        assert "run.name" in one_line(capsys, "train", "--recipe", recipe, "--data", tiny_data, "--output", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]  # nothing written, inside or out


def test_an_earlier_run_is_refused_naming_it_and_replaced_only_with_overwrite(tiny_data, tmp_path, capsys):
    train = ["train", "--model", "resnet10t", *TINY_RESNET_ARGS, "--data", tiny_data, *ONE_EPOCH,
             "--output", tmp_path, "--name", "run"]
    assert run_cli(*train) == 0
    run = tmp_path / "run"
    before = digest(run)
    assert {"metrics.jsonl", "student/model.safetensors", "summary.json"} <= set(before)
    err = one_line(capsys, *train, "--seed", "1")
    assert f"{run} exists" in err and f"--resume {run}" in err and "--overwrite" in err
    assert digest(run) == before  # not a byte changed
    (run / "notes.txt").write_text("an earlier run's leftover")
    assert run_cli(*train, "--seed", "1", "--overwrite") == 0
    after = digest(run)
    assert "notes.txt" not in after and after["student/model.safetensors"] != before["student/model.safetensors"]
    assert "seed = 1" in (run / "recipe.toml").read_text()
    # --overwrite replaces a kdkit run, nothing else
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    err = one_line(capsys, *train[:-1], "mine", "--overwrite")
    assert f"{mine} exists and is not a kdkit run directory" in err
    assert (mine / "thesis.tex").read_text() == "years of work" and len(list(mine.iterdir())) == 1
    assert "give one of them" in one_line(capsys, "train", "--resume", run, "--overwrite")


def test_a_failed_distill_from_logits_leaves_no_run_directory(tiny_runs, tiny_data, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_runs["cache"], cache)
    shard = sorted((cache / "shards").iterdir())[0]
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF  # a value byte: found when the shard is read, at the first step
    shard.write_bytes(bytes(data))
    out = tmp_path / "runs"
    err = one_line(capsys, "distill", "--logit-cache", cache, "--preset", "none", "--student", "deit_tiny",
                   *TINY_VIT_ARGS, "--data", tiny_data, *ONE_EPOCH, "--output", out, "--name", "from-cache")
    assert "corrupt" in err and str(shard) in err
    assert not (out / "from-cache").exists()


def test_cache_refuses_a_folder_that_is_not_its_cache(tiny_runs, tiny_data, teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["single"], run)
    before = digest(run)
    err = one_line(capsys, "cache", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--preset", "none",
                   "--data", tiny_data, *ONE_EPOCH, "--out", run)
    assert f"{run} exists and is not a kdkit logit cache" in err
    assert digest(run) == before


def test_compare_and_plot_replace_their_outputs_only_with_overwrite(tiny_runs, tiny_data, tmp_path, capsys):
    teacher = Path(kdkit.__file__).parent / "assets" / "teachers" / "resnet9_cifar_s"
    compare = ["compare", "--models", f"resnet9_cifar_s={teacher}", "--data", tiny_data, "--out", tmp_path,
               "--workers", 0, "--no-progress"]
    (tmp_path / "disagreement.csv").write_text("mine")
    err = one_line(capsys, *compare)
    assert f"{tmp_path / 'disagreement.csv'} exists" in err and "--overwrite" in err
    assert (tmp_path / "disagreement.csv").read_text() == "mine"
    assert run_cli(*compare, "--overwrite") == 0
    assert (tmp_path / "disagreement.csv").read_text().startswith(",ground truth,resnet9_cifar_s")

    png = tmp_path / "curves.png"
    png.write_bytes(b"mine")
    err = one_line(capsys, "plot", tiny_runs["single"], "--out", png)
    assert f"{png} exists" in err and png.read_bytes() == b"mine"
    assert run_cli("plot", tiny_runs["single"], tiny_runs["dual"], "--out", png, "--overwrite") == 0
    assert png.read_bytes().startswith(b"\x89PNG")
