"""The training loop, evaluation, checkpoints and the recipe runner."""

from kdkit.engine.evaluate import evaluate
from kdkit.engine.loop import DistillationStep, fit

__all__ = ["DistillationStep", "evaluate", "fit"]
