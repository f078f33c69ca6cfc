"""--log-with: experiment trackers mirror metrics.jsonl. TensorBoard for real, read back with
TensorBoard's own reader, after a plain run and after a run killed with SIGKILL and resumed."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import kdkit
from kdkit.accelerator import create_accelerator
from kdkit.config import load_recipe
from kdkit.engine.metrics import MetricsLog, RunTrackers, tracker_failed
from kdkit.registry import KdkitError
from tests.helpers import LAUNCH, TINY_VIT_ARGS, run_cli

ROOT = Path(__file__).resolve().parents[1]


def distill_args(teacher_dir: Path, data: Path, run_dir: Path, epochs: int) -> list[str]:
    return ["distill", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--student", "deit_tiny",
            *TINY_VIT_ARGS, "--preset", "none", "--loss", "soft", "--data", data, "--output", run_dir.parent,
            "--name", run_dir.name, "--epochs", str(epochs), "--batch-size", "16", "--workers", "0",
            "--no-progress", "--seed", "0", "--set", "optim.warmup_epochs=0", "--log-every", "1",
            "--checkpoint-every", "0", "--set", "run.teacher_check_batches=1", "--log-with", "tensorboard"]


def expected_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from metrics.jsonl: each number of a line at its update (an evaluation
    line at the update before it), nested keys joined with "/", values as TensorBoard's float32."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    update = 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        update = rec.get("update", update)
        flat = {f"eval/{k}": v for k, v in rec.pop("eval", {}).items()} | rec
        for tag, value in flat.items():
            out[tag].append((update, float(np.float32(value))))
    return dict(out)


def tensorboard_scalars(log_dir: Path, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), purge_orphaned_data=purge)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_mirrors_every_line_and_the_recipe(tiny_data, teacher_dir, tmp_path):
    run_dir = tmp_path / "tb"
    assert run_cli(*distill_args(teacher_dir, tiny_data, run_dir, epochs=2)) == 0
    want = expected_scalars(run_dir)
    assert {"loss", "kd", "task", "lr", "images_per_s", "eval/class_top1", "eval/fused_top5"} <= set(want)
    assert len(want["eval/class_top1"]) == 2 and len(want["loss"]) == 14  # 7 steps x 2 epochs, every one logged
    assert tensorboard_scalars(run_dir / "kdkit") == want

    # the recipe as the run's hyperparameters (TensorBoard's hparams plugin, in a folder of its own)
    (hp_dir,) = [p.parent for p in (run_dir / "kdkit").glob("*/events.out.tfevents.*")]
    acc = EventAccumulator(str(hp_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    recipe = tomllib.loads((run_dir / "recipe.toml").read_text())
    scalar_keys = [(s, k, v) for s, table in recipe.items() if isinstance(table, dict)
                   for k, v in table.items() if isinstance(v, str | int | float)]
    assert len(scalar_keys) > 50
    for section, key, value in scalar_keys:
        hp = hparams[f"{section}.{key}"]
        got = {"number_value": hp.number_value, "string_value": hp.string_value,
               "bool_value": hp.bool_value}[hp.WhichOneof("kind")]
        assert got == value, (section, key)
    assert hparams["model.kwargs.depth"].number_value == 2
    assert hparams["aug.scale"].string_value == json.dumps(recipe["aug"]["scale"])


def test_a_resumed_run_has_each_step_once_across_its_event_files(tiny_data, teacher_dir, tmp_path):
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "kdkit", *map(str, distill_args(teacher_dir, tiny_data, run_dir,
                                                                                    epochs=3))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 120
    # killed in its second epoch, past the first epoch's checkpoint: its events after it are orphans
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and '"epoch": 1, "step": 2,' in metrics.read_text():
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    before = tensorboard_scalars(run_dir / "kdkit")
    assert run_cli("distill", "--resume", run_dir, "--no-progress", "--workers", "0") == 0

    assert len(list((run_dir / "kdkit").glob("events.out.tfevents.*"))) == 2
    raw, want = tensorboard_scalars(run_dir / "kdkit", purge=False), expected_scalars(run_dir)
    assert len(raw["loss"]) > len(want["loss"]) == 21  # the killed run's steps after its checkpoint, twice
    assert len(before["loss"]) >= 7 + 2
    assert tensorboard_scalars(run_dir / "kdkit") == want
    steps = [s for s, _ in want["loss"]]
    assert steps == sorted(set(steps)) == list(range(1, 22))


def test_two_processes_log_once(tiny_data, teacher_dir, tmp_path):
    run_dir = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*LAUNCH, *map(str, distill_args(teacher_dir, tiny_data, run_dir, epochs=1))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((run_dir / "kdkit").glob("events.out.tfevents.*"))) == 1  # the main process's writer only
    want = expected_scalars(run_dir)
    assert len(want["loss"]) == 7 and tensorboard_scalars(run_dir / "kdkit") == want


def test_resume_at_a_step_shared_by_kept_and_later_lines(tmp_path):
    """With gradient accumulation, lines kept by a checkpoint and lines after it can share an update:
    TensorBoard purges that step, and the kept lines at it are sent again."""
    updates = [0, 1, 1, 2, 2, 3]  # grad_accum 2, a line per batch; the checkpoint keeps 3 lines
    acc = create_accelerator(log_with=["tensorboard"], project_dir=tmp_path)
    trackers = RunTrackers(acc, tmp_path, {"optim": {"grad_accum": 2}})
    log = MetricsLog(tmp_path / "metrics.jsonl", tracker=trackers)
    for i, u in enumerate(updates[:5]):  # the stopped run wrote 5 lines, 3 of them before its checkpoint
        log.write(epoch=0, step=i, update=u, loss=float(i))
    log.close()
    trackers.finish()
    acc = create_accelerator(log_with=["tensorboard"], project_dir=tmp_path)
    trackers = RunTrackers(acc, tmp_path, {"optim": {"grad_accum": 2}})
    log = MetricsLog(tmp_path / "metrics.jsonl", keep=3, tracker=trackers)
    for i, u in enumerate(updates[3:], start=3):
        log.write(epoch=0, step=i, update=u, loss=10.0 + i)  # changed values: must replace the orphans
    log.write(epoch=0, eval={"class_top1": 50.0})
    log.close()
    trackers.finish()
    got = tensorboard_scalars(tmp_path / "kdkit")
    assert got["loss"] == [(0, 0.0), (1, 1.0), (1, 2.0), (2, 13.0), (2, 14.0), (3, 15.0)]
    assert got["eval/class_top1"] == [(3, 50.0)]


def test_a_tracker_not_installed_names_its_pip_extra(tiny_data, teacher_dir, tmp_path, capsys):
    assert importlib.util.find_spec("wandb") is None  # the real missing package, not a stub
    run_dir = tmp_path / "wb"
    argv = [a if a != "tensorboard" else "tensorboard,wandb" for a in distill_args(teacher_dir, tiny_data, run_dir, 1)]
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "Traceback" not in err
    assert 'wandb package is not installed: pip install "kdkit[wandb]"' in err
    assert not run_dir.exists()  # refused before anything is written


def test_log_with_takes_a_list_or_comma_separated_names(capsys, tmp_path):
    assert load_recipe(overrides={"run": {"log_with": "tensorboard, wandb"}}).run.trackers() == ["tensorboard", "wandb"]
    assert load_recipe(overrides={"run": {"log_with": ["aim", "mlflow", "aim"]}}).run.trackers() == ["aim", "mlflow"]
    assert load_recipe().run.trackers() == []
    with pytest.raises(KdkitError, match="Did you mean 'tensorboard'"):
        load_recipe(overrides={"run": {"log_with": "tensorbord"}})
    assert run_cli("train", "--data", tmp_path, "--log-with", "wandb,nope") == 2
    assert "run.log_with must be one of tensorboard, wandb, mlflow, aim, all, got 'nope'" in capsys.readouterr().err


def test_a_run_that_fails_closes_its_trackers_with_every_line_written(tiny_data, tmp_path):
    from tests.helpers import RUN, NaNTeacher, TinyConvNet

    with pytest.raises(KdkitError, match="non-finite loss at epoch 0 step 3"):
        kdkit.distill(TinyConvNet(), NaNTeacher(bad=3), str(tiny_data), output=str(tmp_path), name="failed",
                      checkpoint_every=100, log_every=1, log_with="tensorboard", **RUN)
    want = expected_scalars(tmp_path / "failed")
    assert [s for s, _ in want["loss"]] == [1, 2, 3]  # the lines before the non-finite step
    assert tensorboard_scalars(tmp_path / "failed" / "kdkit") == want  # flushed by the close


def test_mlflow_refusing_its_file_store_is_one_line_with_both_ways_out():
    # MLflow 3.14's own message (mlflow/store/tracking/file_store.py), raised as an MlflowException
    mlflow_says = RuntimeError(
        "The filesystem tracking backend (e.g., './mlruns') is in maintenance mode and will not receive further "
        "updates. Please migrate to a database backend (e.g., 'sqlite:///mlflow.db') to access the latest MLflow "
        "features.\nIf the filesystem backend is required for your workflow, set MLFLOW_ALLOW_FILE_STORE=true to "
        "opt out of this exception.")
    line = str(tracker_failed("mlflow", mlflow_says))
    assert "\n" not in line and "MLFLOW_TRACKING_URI=sqlite:///mlflow.db" in line
    assert "MLFLOW_ALLOW_FILE_STORE=true" in line
    other = str(tracker_failed("wandb", ValueError("api key\nmissing")))
    assert other == "--log-with wandb (run.log_with): the tracker could not start: ValueError: api key missing"
