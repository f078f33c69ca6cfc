"""Kill a real `python -m kdkit distill` with SIGKILL at a random step, resume it, and get the
uninterrupted run's per-step losses and final weights bit for bit (CPU: kernels are deterministic)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from kdkit.engine.checkpoint import latest_checkpoint, list_checkpoints
from tests.helpers import EPOCHS, STEPS_PER_EPOCH, assert_same_run, distill_args, run_cli


def kdkit(*args) -> list[str]:
    return [sys.executable, "-m", "kdkit", *map(str, args)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny untrained timm teacher saved as safetensors (its answers need not be good, only fixed)."""
    path = tmp_path_factory.mktemp("teacher") / "resnet10t.safetensors"
    torch.manual_seed(1)
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(tiny_data, teacher, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    assert run_cli(*distill_args(teacher, tiny_data, run_dir)) == 0
    return run_dir


def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(tiny_data, teacher, reference, tmp_path):
    seed = random.randrange(10_000)
    kill_after = random.Random(seed).randrange(1, STEPS_PER_EPOCH * EPOCHS - 1)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(kdkit(*distill_args(teacher, tiny_data, run_dir)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count('"step"') > kill_after:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run_cli("distill", "--resume", run_dir, "--no-progress", "--workers", "0") == 0, f"seed {seed}"
    assert_same_run(run_dir, reference)


def test_a_broken_newest_checkpoint_is_skipped_for_the_previous_one(tiny_data, teacher, reference, tmp_path, capsys):
    run_dir = tmp_path / "broken"
    shutil.copytree(reference, run_dir)
    newest, previous, older = list_checkpoints(run_dir)
    # the newest loses the end of a file; a crash in the middle of writing another one left its temporary folder
    data = (newest / "state.safetensors").read_bytes()
    (newest / "state.safetensors").write_bytes(data[: len(data) // 2])
    (run_dir / "checkpoints" / ".step-0000099.abc.tmp").mkdir()
    (run_dir / "checkpoints" / ".step-0000099.abc.tmp" / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(run_dir)[0] == previous
    assert "incomplete or corrupt" in capsys.readouterr().err
    (previous / "manifest.json").unlink()  # a folder without its manifest is incomplete too
    assert latest_checkpoint(run_dir)[0] == older
    assert run_cli("distill", "--resume", run_dir, "--no-progress") == 0
    assert_same_run(run_dir, reference)
    assert not list((run_dir / "checkpoints").glob(".*"))


def test_checkpoints_hold_no_pickle_and_only_the_newest_are_kept(reference):
    folders = list_checkpoints(reference)
    assert [f.name for f in folders] == ["step-0000014", "step-0000012", "step-0000010"]
    for f in folders:
        assert {p.suffix for p in f.iterdir()} == {".safetensors", ".json"}


def test_resume_refuses_flags_that_change_the_run(reference, tmp_path, capsys):
    run_dir = tmp_path / "r"
    shutil.copytree(reference, run_dir)
    capsys.readouterr()
    assert run_cli("distill", "--resume", run_dir, "--lr", "0.1", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "Traceback" not in err
    assert run_cli("distill", "--resume", tmp_path / "nope") == 2
    assert "not a kdkit run directory" in capsys.readouterr().err
