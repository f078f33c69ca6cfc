"""Strategies from other packages: a plugin is a module that registers losses, heads or logit
sources on import (`@LOSSES.register("mine")`).

kdkit imports every module of the `kdkit.plugins` entry-point group when a verb runs, so an
installed package needs nothing on the command line:

    [project.entry-points."kdkit.plugins"]
    mine = "my_package.kd_strategies"

and `--plugin MODULE` (repeatable; before or after the verb) imports a module that is not installed
as a package: a module name on `PYTHONPATH` or in the current folder, or a path to a .py file. Recipes name strategies, never modules: a recipe cannot
make kdkit import code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

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
            if name.endswith(".py"):
                import_file(Path(name))
            else:
                importlib.import_module(name.split(":")[0])
        except (ImportError, OSError) as e:
            raise KdkitError(f"cannot import plugin {name!r}: {e}") from None
    return names


def import_file(path: Path) -> None:
    """Import a .py file as the module named by its stem (once: a second load is a no-op)."""
    if path.stem in sys.modules:
        return
    if not path.is_file():
        raise OSError(f"no file {path}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise


def split_plugin_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the --plugin values, argv without them): `--plugin M` and `--plugin=M`, anywhere."""
    plugins, rest, it = [], [], iter(argv)
    for arg in it:
        if arg == "--plugin":
            value = next(it, None)
            if value is None:
                raise KdkitError("--plugin needs a MODULE (a module name or a .py file)")
            plugins.append(value)
        elif arg.startswith("--plugin="):
            plugins.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return plugins, rest
