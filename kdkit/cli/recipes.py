"""kdkit recipes: list the bundled recipes, or print one."""

from __future__ import annotations

import argparse

from kdkit.cli.common import bundled_recipes
from kdkit.registry import KdkitError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list bundled recipes or print one")
    name = p.add_argument("name", nargs="?", metavar="NAME", help="print this bundled recipe")
    name.complete = bundled_recipes
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.config import list_recipes, read_recipe_file, recipes_dir

    if args.name:
        path = recipes_dir() / f"{args.name}.toml"
        if not path.is_file():
            read_recipe_file(args.name)  # a clear error naming the bundled recipes
            raise KdkitError(f"{args.name} is not a bundled recipe; bundled: {', '.join(list_recipes())}")
        print(path.read_text())
        return 0
    for name in list_recipes():
        first = (recipes_dir() / f"{name}.toml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:28s} {first}")
    return 0
