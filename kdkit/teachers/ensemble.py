"""Deprecated alias of kdkit.sources.ensemble (see kdkit/teachers/__init__.py)."""

from kdkit.sources.ensemble import *  # noqa: F403
