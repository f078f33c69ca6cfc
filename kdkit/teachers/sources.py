"""Deprecated alias of kdkit.sources.base (see kdkit/teachers/__init__.py)."""

from kdkit.sources.base import *  # noqa: F403
from kdkit.sources.base import SourceContext as RunPieces  # noqa: F401
