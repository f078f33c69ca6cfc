"""Strategies from other packages: a plugin is a module that registers losses, heads or logit
sources on import (`@LOSSES.register("mine")`).

kdkit imports every module of the `kdkit.plugins` entry-point group when a verb runs, so an
installed package needs nothing on the command line:

    [project.entry-points."kdkit.plugins"]
    mine = "my_package.kd_strategies"

and `--plugin MODULE` (repeatable) imports a module that is not installed as a package (a file on
`PYTHONPATH` or in the current folder). Recipes name strategies, never modules: a recipe cannot
make kdkit import code.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points

from kdkit.registry import KdkitError

GROUP = "kdkit.plugins"


def load_plugins(modules: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Import the entry points of GROUP, then `modules`; returns the modules imported. A module that
    fails to import is a KdkitError naming it and the error."""
    names = [ep.value for ep in entry_points(group=GROUP)] + list(modules)
    if "" not in sys.path:
        sys.path.insert(0, "")  # `--plugin my_losses` finds ./my_losses.py, as `python -m` would
    for name in names:
        try:
            importlib.import_module(name.split(":")[0])
        except ImportError as e:
            raise KdkitError(f"cannot import plugin {name!r}: {e}") from None
    return names
