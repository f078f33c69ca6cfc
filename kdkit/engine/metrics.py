"""RUN/metrics.jsonl, the run's record of every logged step and evaluation (resume rewrites it), and
its mirror on experiment trackers (run.log_with: TensorBoard, W&B, MLflow, Aim, through Accelerate)."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from accelerate.utils import (
    is_aim_available,
    is_mlflow_available,
    is_tensorboard_available,
    is_wandb_available,
)

from kdkit.config import TRACKERS
from kdkit.console import console
from kdkit.files import atomic_write_text, disk_full, out_of_space
from kdkit.registry import KdkitError

if TYPE_CHECKING:
    from accelerate import Accelerator

PROJECT = "kdkit"  # the trackers' project: W&B project, MLflow experiment, TensorBoard's RUN/kdkit/


class Tracker(Protocol):
    """Where a MetricsLog mirrors its lines. A line's step is its `update` (optimizer updates so
    far); an evaluation line, which has none, takes the last one before it."""

    def start(self, kept: list[tuple[int, dict]]) -> None:
        """Called when the log opens, with (step, record) of the lines kept from before (a resume)."""

    def log(self, record: dict, step: int) -> None:
        """Called after each line is written."""


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per line, flushed as written (main process only; `path`
    None elsewhere).

    Opening it keeps the first `keep` complete lines of the file and appends after them: 0 for a
    fresh run, the checkpoint's count on resume, so that the file reads as if the run had never
    stopped (a line torn by a crash is dropped with whatever followed the checkpoint).

    tracker: gets every line after it is written (kdkit's runs pass their RunTrackers).
    """

    def __init__(self, path: Path | None, keep: int = 0, tracker: Tracker | None = None):
        self.path, self.file, self.lines, self.update = path, None, 0, 0
        self.tracker = None
        if path is None:
            return
        kept: list[str] = []
        if keep and path.is_file():
            for line in path.read_text(errors="replace").splitlines(keepends=True):
                if len(kept) == keep or not _complete_json(line):
                    break
                kept.append(line)
        atomic_write_text(path, "".join(kept))
        self.lines = len(kept)
        self.file = open(path, "a", buffering=1)  # noqa: SIM115  (line-buffered: one write per record)
        self.tracker = tracker
        if self.tracker is not None:
            records = [json.loads(line) for line in kept]
            self.tracker.start([(self._step(rec), rec) for rec in records])

    def _step(self, record: dict) -> int:
        self.update = int(record.get("update", self.update))
        return self.update

    def write(self, **record: object) -> None:
        if self.file:
            try:
                self.file.write(json.dumps(record) + "\n")
            except OSError as e:
                raise out_of_space(self.path, "every line before this one") if disk_full(e) else e from None
            self.lines += 1
            step = self._step(record)
            if self.tracker is not None:
                self.tracker.log(record, step)

    def sync(self) -> int:
        """Flush to disk (before a checkpoint records the line count); returns the line count."""
        if self.file:
            self.file.flush()
            os.fsync(self.file.fileno())
        return self.lines

    def close(self) -> None:
        if self.file:
            self.file.close()


def _complete_json(line: str) -> bool:
    if not line.endswith("\n"):
        return False
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


# --- the trackers of Accelerate ----------------------------------------------------------------------

def scalars(record: dict, prefix: str = "") -> dict[str, float | int]:
    """The numbers of a metrics line, nested dicts joined with "/" (eval/class_top1, ...); bools as 0/1."""
    out: dict[str, float | int] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float):
            out[f"{prefix}{k}"] = int(v) if isinstance(v, bool) else v
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested recipe dict as scalars by "section.key" (model.student, ...): lists as their JSON,
    nested tables as further keys, None left out (TensorBoard's hparams take scalars only)."""
    out: dict[str, int | float | str | bool] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        elif isinstance(v, list | tuple):
            out[f"{prefix}{k}"] = json.dumps(list(v))
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out


def resolve_trackers(names: list[str]) -> list[str]:
    """run.trackers() for Accelerator(log_with=...): "all" is every tracker of config.TRACKERS that
    is installed. A named one that is not (Accelerate would drop it silently) is an error naming
    the pip extra."""
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                 "mlflow": is_mlflow_available, "aim": is_aim_available}
    chosen = [n for n in names if n != "all"]
    for name in chosen:
        if not available[name]():
            state = ("is installed in a version Accelerate cannot use" if importlib.util.find_spec(name)
                     else "is not installed")
            raise KdkitError(f"--log-with {name} (run.log_with): the {name} package {state}: "
                             f'pip install "kdkit[{name}]"')
    if "all" in names:
        chosen += [n for n in TRACKERS if n not in chosen and available[n]()]
        if not chosen:
            raise KdkitError(f"--log-with all (run.log_with): none of {', '.join(TRACKERS)} is installed: "
                             f'pip install "kdkit[tensorboard]" (or kdkit[wandb], kdkit[mlflow], kdkit[aim])')
    return chosen


def tracker_failed(name: str, e: Exception) -> KdkitError:
    """The one line for a tracker that raised while starting; MLflow's refusal of its file store
    (MLflow >= 3.13 without MLFLOW_ALLOW_FILE_STORE) says both ways out."""
    text = " ".join(str(e).split())
    if "MLFLOW_ALLOW_FILE_STORE" in text:
        return KdkitError("--log-with mlflow (run.log_with): MLflow refuses its file store (./mlruns, or a file "
                          "MLFLOW_TRACKING_URI) by default: set MLFLOW_TRACKING_URI=sqlite:///mlflow.db (a database), "
                          "or MLFLOW_ALLOW_FILE_STORE=true to keep the file store")
    return KdkitError(f"--log-with {name} (run.log_with): the tracker could not start: {type(e).__name__}: "
                      f"{text[:300]}")


def _after_event_files(log_dir: Path) -> None:
    """Wait until the clock's second is past every events.out.tfevents.SECOND.* file in `log_dir`."""
    seconds = [int(s) for f in log_dir.glob("events.out.tfevents.*") if (s := f.name.split(".")[3]).isdigit()]
    until = max(seconds, default=0) + 1
    while time.time() < until:
        time.sleep(until - time.time() + 0.01)


class RunTrackers:
    """The accelerator's trackers (Accelerator(log_with=..., project_dir=RUN)) as the mirror of
    RUN/metrics.jsonl (a Tracker: fit(tracker=...) hands it to the MetricsLog), with the recipe
    (flattened, `flat_config`) as each tracker's run config. Only the main process opens the log,
    so only it logs.

    They start when fit opens the log, which knows what a resume kept: TensorBoard's writer then
    opens with purge_step = the last kept line's step, which makes TensorBoard drop every event
    of the earlier event files in RUN/kdkit/ from that step on (what the stopped run wrote after
    its checkpoint), and the kept lines at that very step are sent again, so that each line is
    there once. The other trackers start a new run, which gets the lines after the checkpoint.

    TensorBoard reads a folder's event files in the order of their names, whose first field is
    the second they were opened in and whose next are host and pid: a resume in the same second as
    the stopped run's start would sort by pid, maybe before it, and its purge would drop its own
    lines instead of the orphans. So a writer waits for a later second than any file there (rarely
    more than a moment, and only when a run resumes within a second of its first start).
    """

    def __init__(self, acc: Accelerator, run_dir: Path, recipe: dict):
        self.acc, self.run_dir, self.config = acc, Path(run_dir), flat_config(recipe)

    def start(self, kept: list[tuple[int, dict]]) -> None:
        purge = kept[-1][0] if kept else 0
        name = self.run_dir.name
        _after_event_files(self.run_dir / PROJECT)
        try:
            self.acc.init_trackers(PROJECT, config=self.config,
                                   init_kwargs={"tensorboard": {"purge_step": purge},
                                                "wandb": {"name": name, "dir": str(self.run_dir)},
                                                "mlflow": {"run_name": name}})
        except Exception as e:  # the tracker's own exception type (MlflowException, wandb.Error, ...)
            started = len(self.acc.trackers)
            failed = self.acc.log_with[started] if started < len(self.acc.log_with) else self.acc.log_with[-1]
            raise tracker_failed(str(failed), e) from None
        tensorboard = [t for t in self.acc.trackers if t.name == "tensorboard"]
        for step, record in kept:
            if step == purge and tensorboard:
                tensorboard[0].log(scalars(record), step=step)
        where = f" (TensorBoard: {self.run_dir / PROJECT})" if tensorboard else ""
        console.print(f"tracking: {', '.join(t.name for t in self.acc.trackers)}{where}")

    def log(self, record: dict, step: int) -> None:
        self.acc.log(scalars(record), step=step)

    def finish(self) -> None:
        """Close every tracker. (Accelerator.end_training would also tear the process group down,
        which later runs of the same process, through the Python API, still need.)"""
        for tracker in self.acc.trackers:
            tracker.finish()
        self.acc.trackers.clear()
