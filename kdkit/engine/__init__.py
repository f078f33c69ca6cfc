"""The training loop, evaluation, checkpoints and the recipe runner."""

from kdkit.engine.evaluate import evaluate
from kdkit.engine.loop import fit
from kdkit.engine.step import DistillationStep

__all__ = ["DistillationStep", "evaluate", "fit"]
