"""One way to build an Accelerator, for every verb and the Python API."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from kdkit.registry import KdkitError


def create_accelerator(precision: str = "auto", grad_accum: int = 1, log_with: list[str] | None = None,
                       project_dir: str | os.PathLike | None = None) -> Accelerator:
    """An Accelerator on the GPU when there is one. Precision "auto" leaves it to Accelerate's own
    resolution (the `accelerate launch --mixed_precision` flag, ACCELERATE_MIXED_PRECISION, an
    `accelerate config` file through the launcher); "no", "bf16" or "fp16" win over those.
    log_with: Accelerate's tracker names (installed ones: engine.metrics.resolve_trackers), which
    write under `project_dir` (the run directory) where they write files."""
    chosen = None if precision == "auto" else precision
    wanted = chosen or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if AcceleratorState._shared_state.get("_mixed_precision", wanted) != wanted:
        # Accelerate keeps one precision per process; another run in the same process (the Python
        # API, tests) may ask for another. The process group (PartialState) is kept.
        AcceleratorState._reset_state()
    try:
        return Accelerator(mixed_precision=chosen, gradient_accumulation_steps=grad_accum,
                           cpu=not torch.cuda.is_available(), log_with=log_with or None,
                           project_dir=None if project_dir is None else str(project_dir))
    except ValueError as e:
        raise KdkitError(f"cannot set up precision {wanted!r}: {e}") from None


def set_deterministic() -> None:
    """Deterministic kernels (warn where none exists) and cuBLAS's fixed workspace; on CPU runs are
    reproducible already, so this only matters on CUDA."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
