"""Training-state checkpoints: everything a run needs to continue exactly, and no pickle.

A checkpoint is a folder, written whole (atomic_folder: temporary folder, fsync, rename):

    RUN/checkpoints/step-0001234/     (1234 = optimizer updates so far; the newest run.keep_checkpoints kept)
      model.safetensors      the head-wrapped student's state dict
      ema.safetensors        the EMA student (optim.ema_decay > 0)
      state.safetensors      every other tensor: optimizer moments, torch RNG states (uint8), ...
      state.json             the rest, as data: position (epoch, step, updates, ...), optimizer
                             param_groups, scheduler, gradient scaler, numpy/python RNG states
                             per process, the run's recipe; tensors appear as {"__tensor__": key}
      manifest.json          sha256 and size of every other file, written last

A folder with no manifest, a missing file or a wrong checksum is skipped (with a warning) in
favour of the previous checkpoint. Data-loader workers need no saved state: every view is a
function of (seed, epoch, view id) and the sampler's order of (seed, epoch), so (epoch, step)
is the data state (see data/sampler.py).

A checkpoint resumes under another number of processes (elastic): the global batch, the data
order and the views do not depend on it, so the run continues as it would have. What is per
process is the RNG state (dropout, drop-path) and the unreadable-image count: the count is
summed onto process 0; each process takes its own RNG state where the checkpoint has one, else
process 0's (as at a fresh start, where every process is seeded alike).

A resume must run the recipe that wrote the checkpoint: anything but RESUME_SAFE differing is
refused, naming each key (recipe_changes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from kdkit.config import load_recipe, upgrade_recipe
from kdkit.console import console
from kdkit.engine.metrics import MetricsLog
from kdkit.files import (
    atomic_folder,
    atomic_write_text,
    remove_stale_temporaries,
)
from kdkit.registry import KdkitError

FORMAT = "kdkit-checkpoint/1"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Position:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress
    step: int = 0  # batches of that epoch already consumed
    updates: int = 0  # optimizer updates so far
    skipped_steps: int = 0  # steps skipped for a non-finite loss (run.on_nonfinite = "skip")
    skipped_images: int = 0  # unreadable training images met by this process, over the run
    skipped_names: list[str] = field(default_factory=list)  # and their names (kdkit.data.note_skipped)
    metrics_lines: int = 0  # lines of metrics.jsonl written up to here
    eval: dict = field(default_factory=dict)  # the last evaluation
    best: dict = field(default_factory=dict)  # the evaluation of RUN/student_best: {"epoch", "metric", "value"}


# Recipe keys a resume may change: they do not change the steps the resumed run shares with the
# recorded one. optim.epochs only moves where the run stops: the learning-rate schedule is the
# checkpoint's, fixed at the start (fewer epochs end the recorded run early, step for step; more run
# past the schedule's end, with cosine at optim.min_lr, like timm's cool-down epochs).
# run.log_every and run.eval_every change what metrics.jsonl records and when student/ is saved,
# not the training (the loaders draw from private generators, not the run's RNG); the rest is
# speed and reporting. Not here: run.precision, run.seed and everything that shapes the model, the
# data, the augmentation, the loss or the optimizer.
RESUME_SAFE = ("optim.epochs", "run.log_every", "run.eval_every", "run.checkpoint_every", "run.keep_checkpoints",
               "run.progress", "run.on_nonfinite", "run.teacher_check_batches", "data.workers",
               "data.persistent_workers", "data.prefetch_factor", "data.strict", "run.log_with")
# where the run directory is: a run may be moved or renamed between a stop and its resume
RESUME_IGNORED = ("run.output", "run.name")


def recipe_changes(before: dict, after: dict, safe: tuple[str, ...] = RESUME_SAFE) -> list[str]:
    """The recipe keys ("section.key", as Recipe.to_dict() nests them) whose values differ between
    `before` and `after`, outside `safe` and RESUME_IGNORED, each as "key (old -> new)"; [] if none."""
    a, b = _flat(before), _flat(after)
    return [f"{k} ({a.get(k, 'not set')!r} -> {b.get(k, 'not set')!r})" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in safe and k not in RESUME_IGNORED]


def _flat(recipe: dict) -> dict[str, Any]:
    """{"section.key": value}, values in JSON's form (tuples as lists), as a recipe.toml reads back."""
    plain = json.loads(json.dumps(recipe))
    return {f"{section}.{k}" if isinstance(values, dict) else section: v for section, values in plain.items()
            for k, v in (values.items() if isinstance(values, dict) else [(section, values)])}


# --- a state tree <-> (tensors, JSON) --------------------------------------------------------------

def to_json_tree(obj: Any, tensors: dict[str, torch.Tensor], key: str = "") -> Any:
    """A JSON-able copy of `obj` with each tensor moved into `tensors` under its path and replaced
    by {"__tensor__": path}; tuples and dicts with non-string keys are tagged so they come back."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone()  # clone: safetensors refuses tensors sharing storage
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_json_tree(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, to_json_tree(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json_tree(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_json_tree(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__array__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} (at {key!r}) in a checkpoint")


def from_json_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `to_json_tree`: `obj` read back from JSON, tensors put back from `tensors`."""
    if isinstance(obj, list):
        return [from_json_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(from_json_tree(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: from_json_tree(v, tensors) for k, v in obj["__items__"]}
    if "__array__" in obj:
        return np.asarray(obj["__array__"], dtype=obj["dtype"])
    return {k: from_json_tree(v, tensors) for k, v in obj.items()}


# --- RNG -------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's torch (CPU and CUDA), numpy and python RNG states (dropout, drop_path, ...)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoint folders ----------------------------------------------------------------------------

def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_checkpoint(folder: str | Path, files: dict[str, bytes]) -> Path:
    """Write `files` (name -> content) and their manifest as one folder, atomically."""

    def write(tmp: Path) -> None:
        manifest = {"format": FORMAT, "files": {}}
        for name, data in files.items():
            write_file(tmp / name, data)
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())

    return atomic_folder(folder, write)


def read_checkpoint(folder: str | Path) -> dict[str, bytes]:
    """The files of a checkpoint folder, each checked against the manifest; ValueError if the folder
    is incomplete or any file differs from what was written."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"no readable {MANIFEST} ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} checkpoint")
    files = {}
    for name, meta in manifest["files"].items():
        try:
            data = (folder / name).read_bytes()
        except OSError:
            raise ValueError(f"{name} is missing") from None
        if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError(f"{name} does not match its checksum")
        files[name] = data
    return files


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """RUN/checkpoints/step-* folders, newest (most updates) first."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))] \
        if folder.is_dir() else []
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: str | Path, warn: bool = True) -> tuple[Path, dict[str, bytes]] | None:
    """The newest checkpoint that verifies, with its files; broken ones are skipped with a warning."""
    for folder in list_checkpoints(run_dir):
        try:
            return folder, read_checkpoint(folder)
        except ValueError as e:
            if warn:
                console.print(f"[bold yellow]warning: checkpoint {folder} is incomplete or corrupt ({e}): "
                              f"skipped in favour of the previous one")
    return None


class Checkpointer:
    """Saves a run's whole training state to RUN/checkpoints/ and restores it (module docstring).

    every: save after every `every` optimizer updates (0: only at the end of each epoch, which the
    loop always asks for); keep: how many checkpoints to keep (0: none are written); recipe: the
    run's recipe (Recipe.to_dict()), saved in every checkpoint and compared on restore.
    """

    def __init__(self, run_dir: str | Path | None, accelerator: Accelerator, student: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any = None, ema: nn.Module | None = None,
                 every: int = 0, keep: int = 2, recipe: dict | None = None, stream_readers: int | None = None):
        self.run_dir = Path(run_dir) if run_dir else None
        # a stream's readers (processes x loader workers) decide its batches: a mid-epoch resume needs the same
        self.stream_readers = stream_readers
        self.folder = self.run_dir / "checkpoints" if self.run_dir and keep > 0 else None
        self.acc, self.student, self.optimizer, self.scheduler, self.ema = accelerator, student, optimizer, scheduler, ema
        self.every, self.keep, self.recipe = every, keep, recipe
        self.last: Path | None = None

    def due(self, pos: Position) -> bool:
        return bool(self.every) and pos.updates % self.every == 0

    def start(self) -> Position:
        """A fresh run: an earlier run's checkpoints in this run directory would be resumed by
        mistake later, so they go (with a warning)."""
        folder = self.run_dir / "checkpoints" if self.run_dir else None
        if folder is not None and self.acc.is_main_process and folder.is_dir():
            if list_checkpoints(self.run_dir):
                console.print(f"[bold yellow]warning: {self.run_dir} holds checkpoints of an earlier run: "
                              f"removed (use --resume {self.run_dir} to continue a run instead)")
            shutil.rmtree(folder)
        self.acc.wait_for_everyone()
        return Position()

    def save(self, pos: Position, log: MetricsLog | None = None) -> Path | None:
        """Write the state at `pos` (call it at an optimizer-update boundary; `log` is flushed and its
        line count recorded). Every process takes part (each one's RNG state is gathered); the main
        process writes."""
        if self.folder is None:
            return None
        if log is not None:
            pos.metrics_lines = log.sync()
        local = {"rng": rng_state(), "skipped_images": pos.skipped_images, "skipped_names": pos.skipped_names}
        processes = [local]
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            processes = gather_object([local])
        path = self.folder / f"step-{pos.updates:07d}"
        error = None
        if self.acc.is_main_process:
            try:
                self._write(path, pos, processes)
            except KdkitError as e:  # out of disk space: every process must stop, not wait for the main one
                error = str(e)
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error:
            raise KdkitError(error)
        self.acc.wait_for_everyone()
        self.last = path
        return path

    def write_recipe(self) -> None:
        """RUN/recipe.toml from the run's recipe (main process): at a fresh start, and on a resume once
        the checkpoint has accepted it, so that a refused resume leaves the recorded recipe as it was."""
        if self.run_dir is None or self.recipe is None or not self.acc.is_main_process:
            return
        from kdkit.config import dumps_toml

        atomic_write_text(self.run_dir / "recipe.toml", dumps_toml(self.recipe))

    def _write(self, path: Path, pos: Position, processes: list[dict]) -> None:
        """Write one checkpoint folder (main process) and drop the ones past `keep`."""
        tree = {"position": dataclasses.asdict(pos), "processes": processes, "recipe": self.recipe,
                "stream_readers": self.stream_readers,
                "optimizer": self.optimizer.state_dict(), "accelerator_step": self.acc.step,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
                "ema_generator": getattr(self.ema, "_sr_generator", None) and self.ema._sr_generator.get_state()}
        tensors: dict[str, torch.Tensor] = {}
        state = json.dumps(to_json_tree(tree, tensors, "state"))
        files = {"model.safetensors": save_tensors(_weights(self.acc.unwrap_model(self.student))),
                 "state.safetensors": save_tensors(tensors), "state.json": state.encode()}
        if self.ema is not None:
            files["ema.safetensors"] = save_tensors(_weights(self.ema.module))
        write_checkpoint(path, files)
        for old in list_checkpoints(self.run_dir)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def keep_good(self, pos: Position, log: MetricsLog | None = None) -> Path | None:
        """Before stopping on a non-finite loss: make sure a checkpoint of the last good weights
        exists. The weights at `pos` are those of the last finite update; they are saved unless a
        checkpoint at this update exists already or they are themselves not finite."""
        if self.folder is None:
            return None
        if self.last is not None and self.last.name == f"step-{pos.updates:07d}":
            return self.last
        finite = torch.tensor([bool(p.isfinite().all()) for p in self.student.parameters()]).all()
        return self.save(pos, log) if bool(finite) else self.last

    def restore(self) -> Position:
        """Load the newest valid checkpoint into the student, optimizer, scheduler, EMA, scaler and
        RNGs; returns its position. KdkitError when there is none."""
        if self.run_dir is None:
            raise KdkitError("resuming needs a run directory")
        if self.acc.is_main_process:
            remove_stale_temporaries(self.folder or self.run_dir / "checkpoints")
        found = latest_checkpoint(self.run_dir, warn=self.acc.is_main_process)
        if found is None:
            raise KdkitError(f"no usable checkpoint in {self.run_dir / 'checkpoints'}: nothing to resume "
                             f"(start the run again without --resume)")
        path, files = found
        tensors = load_tensors(files["state.safetensors"])
        tree = from_json_tree(json.loads(files["state.json"]), tensors)
        if self.recipe is not None and tree.get("recipe") is not None:
            # a checkpoint of an earlier kdkit records earlier keys: compare in today's
            changed = recipe_changes(load_recipe(None, upgrade_recipe(tree["recipe"])).to_dict(), self.recipe)
            if changed:
                raise KdkitError(f"{path} was written by another recipe; resuming would change {', '.join(changed)}. "
                                 f"Resume with the recorded recipe (only {', '.join(RESUME_SAFE)} may change)")
        try:
            self.acc.unwrap_model(self.student).load_state_dict(load_tensors(files["model.safetensors"]))
            if self.ema is not None:
                if "ema.safetensors" not in files:
                    raise KdkitError(f"{path} has no EMA weights but optim.ema_decay > 0")
                self.ema.module.load_state_dict(load_tensors(files["ema.safetensors"]))
                if tree["ema_generator"] is not None:
                    self.ema._sr_generator.set_state(tree["ema_generator"])
            self.optimizer.load_state_dict(tree["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise KdkitError(f"checkpoint {path} does not fit this run's student or optimizer ({type(e).__name__}: "
                             f"{str(e)[:300]}): resume with the verb and recipe that wrote it") from None
        if self.scheduler is not None and tree["scheduler"] is not None:
            self.scheduler.load_state_dict(tree["scheduler"])
        if self.acc.scaler is not None and tree["scaler"] is not None:
            self.acc.scaler.load_state_dict(tree["scaler"])
        self.acc.step = tree["accelerator_step"]
        processes, index = tree["processes"], self.acc.process_index
        set_rng_state(processes[index if index < len(processes) else 0]["rng"])
        pos = Position(**tree["position"])
        if pos.step and self.stream_readers != tree.get("stream_readers"):
            raise KdkitError(f"{path} is {pos.step} steps into an epoch of a stream read by {tree.get('stream_readers')} "
                             f"readers (processes x loader workers); this run has {self.stream_readers}: a stream's "
                             f"batches depend on its readers, so resume with the same processes and --workers")
        # the run's total stays right under any number of processes (fit sums the processes' counts)
        same = len(processes) == self.acc.num_processes
        pos.skipped_images = processes[index]["skipped_images"] if same else \
            sum(p["skipped_images"] for p in processes) if self.acc.is_main_process else 0
        pos.skipped_names = processes[index].get("skipped_names", []) if same else \
            [n for p in processes for n in p.get("skipped_names", [])] if self.acc.is_main_process else []
        self.last = path
        if self.acc.is_main_process:
            console.print(f"resuming from {path}: epoch {pos.epoch + 1}, step {pos.step}, {pos.updates} updates")
            if len(processes) != self.acc.num_processes:
                console.print(f"note: the checkpoint was written by {len(processes)} process"
                              f"{'es' if len(processes) > 1 else ''}, this run has {self.acc.num_processes}: the "
                              f"global batch and data order are the same, so the run continues as before "
                              f"(dropout and drop-path draws, which are per process, aside)")
        return pos


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
