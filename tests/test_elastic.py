"""Resuming under another number of processes, and the recipe a resume may (not) change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdkit.engine.checkpoint import list_checkpoints, read_checkpoint, write_checkpoint
from tests.helpers import run_args, run_cli, run_kdkit

STEPS = 7  # 120 training images, global batch 16


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_data, teacher_dir) -> Path:
    """2 epochs under 2 processes (gloo), a checkpoint every 3 updates and at each epoch's end, all kept."""
    out = tmp_path_factory.mktemp("elastic")
    run_kdkit(2, "distill", *run_args(tiny_data, teacher_dir), "--output", out, "--name", "p2",
          "--set", "run.checkpoint_every=3", "--set", "run.keep_checkpoints=10")
    return out / "p2"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def copy_stopped_at(run: Path, dest: Path, update: int) -> Path:
    """A copy of `run` as if it had been stopped right after checkpoint step-`update`: later
    checkpoints, the student and the summary gone (metrics.jsonl keeps its lines: a resume must cut them)."""
    shutil.copytree(run, dest)
    for folder in list_checkpoints(dest):
        if int(folder.name[5:]) > update:
            shutil.rmtree(folder)
    shutil.rmtree(dest / "student")
    (dest / "summary.json").unlink()
    return dest


def test_a_two_process_checkpoint_resumes_under_one_process_as_the_run_would_have_gone_on(two_process_run, tmp_path):
    assert [f.name for f in list_checkpoints(two_process_run)][-3:] == ["step-0000007", "step-0000006", "step-0000003"]
    run = copy_stopped_at(two_process_run, tmp_path / "run", 9)  # epoch 2, after its step 2
    # the two processes met 3 and 4 unreadable images before the stop (as a run over damaged files
    # would record them); the resumed run must still count all 7
    folder = run / "checkpoints" / "step-0000009"
    files = read_checkpoint(folder)
    state = json.loads(files["state.json"])
    assert len(state["processes"]) == 2
    state["processes"][0]["skipped_images"], state["processes"][1]["skipped_images"] = 3, 4
    write_checkpoint(folder, {**files, "state.json": json.dumps(state).encode()})

    assert run_cli("distill", "--resume", run, "--no-progress", "--workers", "0") == 0  # this process alone
    got, want = steps(run), steps(two_process_run)
    assert [(r["epoch"], r["step"], r["update"]) for r in got] == [(e, s, e * STEPS + s + 1) for e in (0, 1)
                                                                    for s in range(STEPS)]
    assert [(r["epoch"], r["step"], r["update"]) for r in got] == [(r["epoch"], r["step"], r["update"]) for r in want]
    # the same global batches; the all-reduce adds the two halves' gradients in another order than
    # one process's backward, hence float32 rounding (measured: 2e-7 on losses, 1e-8 on weights)
    for a, b in zip(got, want, strict=True):
        assert all(abs(a[k] - b[k]) <= 1e-5 for k in ("loss", "task", "kd")), (a["epoch"], a["step"])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    w1, w2 = (load_file(r / "student" / "model.safetensors") for r in (run, two_process_run))
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0) for k in w1)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 1 and summary["updates"] == 2 * STEPS
    assert summary["data"]["train"]["skipped_images"] == 3 + 4


def test_resume_refuses_a_changed_recipe_naming_every_difference_and_leaves_the_run_as_it_was(
        two_process_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_process_run, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    # epochs, logging and evaluation cadence may change; the lr and Mixup may not
    assert run_cli("distill", "--resume", run, "--lr", "0.1", "--set", "aug.mixup=0.5", "--epochs", "3",
                   "--log-every", "2", "--eval-every", "2", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "optim.lr (0.001 -> 0.1)" in err and "aug.mixup (0.8 -> 0.5)" in err
    assert "optim.epochs (" not in err and "run.log_every (" not in err and "run.eval_every (" not in err
    # a recipe.toml edited by hand is caught by the recipe each checkpoint records
    text = (run / "recipe.toml").read_text()
    assert "weight_decay = 0.05\n" in text and "seed = 5\n" in text
    (run / "recipe.toml").write_text(text.replace("weight_decay = 0.05\n", "weight_decay = 0.1\n")
                                     .replace("seed = 5\n", "seed = 6\n"))
    before[Path("recipe.toml")] = (run / "recipe.toml").read_bytes()
    assert run_cli("distill", "--resume", run, "--no-progress", "--workers", "0") == 2
    err = capsys.readouterr().err
    assert "was written by another recipe" in err and "Traceback" not in err
    assert "optim.weight_decay (0.05 -> 0.1)" in err and "run.seed (5 -> 6)" in err
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # no checkpoint, metrics line, student or recipe.toml touched


def test_more_epochs_on_resume_continue_the_recorded_schedule_and_fewer_than_done_are_refused(
        two_process_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_process_run, run)
    assert run_cli("distill", "--resume", run, "--epochs", "1", "--no-progress", "--workers", "0") == 2
    assert "2 epochs into the run, past the 1 epochs asked for: resume with --epochs 2" in capsys.readouterr().err
    assert run_cli("distill", "--resume", run, "--epochs", "3", "--no-progress", "--workers", "0") == 0
    assert "note: optim.epochs 2 -> 3: the learning-rate schedule stays the one the run started with" in \
        " ".join(capsys.readouterr().err.split())
    got, want = steps(run), steps(two_process_run)
    assert got[:2 * STEPS] == want  # the recorded epochs, untouched
    # the third epoch runs past the cosine schedule's end: at the recipe's min_lr (the default 1e-5)
    assert [(r["epoch"], r["lr"]) for r in got[2 * STEPS:]] == [(2, 1e-5)] * STEPS
    assert json.loads((run / "summary.json").read_text())["updates"] == 3 * STEPS


def test_a_two_process_run_on_shards_is_the_folder_run_and_resumes_under_one_process(
        two_process_run, tiny_data, teacher_dir, tmp_path):
    """Elastic resume on tar shards: two processes read the shards written from the folder, and get
    the folder run's batches (losses within the all-reduce's float32 rounding of the folder run);
    stopped after update 9, the shard run resumes under one process as the folder run went on."""
    shards = tmp_path / "tiny-wds"
    assert run_cli("shards", tiny_data, "--out", shards, "--shard-size", "50") == 0
    out = tmp_path / "runs"
    run_kdkit(2, "distill", *run_args(shards, teacher_dir), "--output", out, "--name", "p2",
          "--set", "run.checkpoint_every=3", "--set", "run.keep_checkpoints=10")
    sharded, folder = steps(out / "p2"), steps(two_process_run)
    key = ("epoch", "step", "update")
    assert [tuple(r[k] for k in key) for r in sharded] == [tuple(r[k] for k in key) for r in folder]
    for a, b in zip(sharded, folder, strict=True):  # two processes reduce in a fixed order: equal, not close
        assert all(a[k] == b[k] for k in ("loss", "task", "kd")), (a["epoch"], a["step"])

    run = copy_stopped_at(out / "p2", tmp_path / "resumed", 9)
    assert run_cli("distill", "--resume", run, "--no-progress", "--workers", "0") == 0  # this process alone
    got = steps(run)
    assert [tuple(r[k] for k in key) for r in got] == [tuple(r[k] for k in key) for r in folder]
    for a, b in zip(got, folder, strict=True):
        assert all(abs(a[k] - b[k]) <= 1e-5 for k in ("loss", "task", "kd")), (a["epoch"], a["step"])
    w1, w2 = (load_file(r / "student" / "model.safetensors") for r in (run, two_process_run))
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0) for k in w1)
