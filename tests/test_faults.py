"""Faults that must cost minutes, not the run: a NaN loss, a full disk, a torn metrics line, and
files from users that would run code if they were unpickled or executed."""

import errno
import json
import pathlib

import pytest
import torch
from torch import nn

import kdkit
from kdkit.config import load_recipe
from kdkit.engine.checkpoint import latest_checkpoint, list_checkpoints, write_checkpoint
from kdkit.engine.metrics import MetricsLog
from kdkit.files import atomic_write, atomic_write_text
from kdkit.models import create_teacher
from kdkit.registry import KdkitError
from tests.helpers import RUN, NaNTeacher, TinyConvNet


def finite(module: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def test_nan_loss_stops_naming_step_and_term_and_keeps_a_good_checkpoint(tiny_data, tmp_path):
    with pytest.raises(KdkitError) as e:
        kdkit.distill(TinyConvNet(), NaNTeacher(bad=3), str(tiny_data), output=str(tmp_path), name="nan",
                      checkpoint_every=100, **RUN)
    message = str(e.value)
    assert "non-finite loss at epoch 0 step 3" in message and "kd=nan" in message
    assert "task" not in message  # the label term was finite
    folder, files = latest_checkpoint(tmp_path / "nan")
    state = json.loads(files["state.json"])
    assert folder.name == "step-0000003" and state["position"]["step"] == 3 and str(folder) in message
    from safetensors.torch import load

    assert all(torch.isfinite(v).all() for v in load(files["model.safetensors"]).values())


def test_nan_loss_skipped_and_counted_when_asked(tiny_data, tmp_path):
    result = kdkit.distill(TinyConvNet(), NaNTeacher(bad=3), str(tiny_data), output=str(tmp_path), name="skip",
                           on_nonfinite="skip", log_every=1, **RUN)
    assert result.summary["skipped_steps"] == 1 and result.summary["updates"] == 6
    assert finite(result.model)
    records = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if "step" in r] == [0, 0, 0, 1, 1, 1, 1]


def _disk_full_after(monkeypatch, n_files: int) -> None:
    """Writing checkpoint files fails with ENOSPC after `n_files` files, half-way through one."""
    import kdkit.engine.checkpoint as state

    written = {"n": 0}
    real = state.write_file

    def write_file(path, data):
        written["n"] += 1
        if written["n"] > n_files:
            real(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(state, "write_file", write_file)


def test_disk_full_while_checkpointing_is_a_clear_error_and_the_previous_checkpoint_survives(
        tiny_data, tmp_path, monkeypatch):
    files_per_checkpoint = 4  # model, state tensors, state.json, manifest
    _disk_full_after(monkeypatch, 2 * files_per_checkpoint)  # the third checkpoint (update 6) fails
    with pytest.raises(KdkitError, match="out of disk space writing .*step-0000006; the previous checkpoint is intact"):
        kdkit.train(TinyConvNet(), str(tiny_data), output=str(tmp_path), name="full", checkpoint_every=2,
                    **{k: v for k, v in RUN.items() if k not in ("loss", "tau")})
    checkpoints = tmp_path / "full" / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["step-0000004", "step-0000002"]
    assert latest_checkpoint(tmp_path / "full")[0].name == "step-0000004"  # verifies
    assert not list(checkpoints.glob(".*"))  # no temporary left behind


def test_disk_full_in_atomic_writes_keeps_the_old_file(tmp_path):
    target = atomic_write_text(tmp_path / "summary.json", "old")

    def full(tmp):
        pathlib.Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(KdkitError, match="out of disk space"):
        atomic_write(target, full)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_checkpoint_folder_is_replaced_whole(tmp_path):
    write_checkpoint(tmp_path / "checkpoints" / "step-0000001", {"a.json": b"1"})
    write_checkpoint(tmp_path / "checkpoints" / "step-0000001", {"b.json": b"2"})
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step-0000001").iterdir()) == ["b.json", "manifest.json"]
    assert latest_checkpoint(tmp_path)[1] == {"b.json": b"2"}
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_metrics_log_drops_a_torn_line_and_what_followed_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"ste')
    log = MetricsLog(path, keep=2)  # the checkpoint was taken after 2 lines
    log.write(step=2)
    log.close()
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 0}\n{"ste')
    log = MetricsLog(path, keep=5)
    assert log.lines == 1
    log.close()
    assert path.read_text() == '{"step": 0}\n'


class Payload:
    """Unpickling this would create `marker`: a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_pickled_weights_file_is_refused_without_running_its_code(tmp_path):
    marker, weights = tmp_path / "pwned", tmp_path / "teacher.pth"
    torch.save({"state_dict": Payload(marker)}, weights)
    with pytest.raises(KdkitError, match="weights_only=True"):
        create_teacher("resnet10t", 10, weights=weights)
    assert not marker.exists()


def test_recipes_are_data_a_yaml_python_tag_is_refused(tmp_path):
    marker, recipe = tmp_path / "pwned", tmp_path / "r.yaml"
    recipe.write_text(f"description: !!python/object/apply:pathlib.Path.touch [{json.dumps(str(marker))}]\n")
    with pytest.raises(KdkitError, match="cannot parse recipe"):
        load_recipe(recipe)
    assert not marker.exists()


def test_eval_every_zero_evaluates_only_the_last_epoch_and_log_every_zero_is_refused(tiny_data, tmp_path):
    base = {k: v for k, v in RUN.items() if k not in ("loss", "tau", "epochs")}
    kdkit.train(TinyConvNet(), str(tiny_data), output=str(tmp_path), name="e0", epochs=2, eval_every=0, **base)
    rows = [json.loads(line) for line in (tmp_path / "e0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "eval" in r] == [1]
    with pytest.raises(KdkitError, match="run.log_every must be >= 1, got 0"):
        kdkit.train(TinyConvNet(), str(tiny_data), output=str(tmp_path), name="l0", log_every=0, **base)
