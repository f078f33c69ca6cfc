"""timm's own model test suite (its tests/test_models.py) run on kdkit's registered models.

    python bench/timm_model_tests.py PATH/TO/timm/tests/test_models.py [--models 't2t*'] \
        [--json-out bench/results/timm_model_tests.json] [-- EXTRA PYTEST ARGS, e.g. -k forward]

kdkit's models (every timm entrypoint whose module is under kdkit.) are registered with timm
before pytest imports the test file. The file's tests are parametrised by calls to
`timm.list_models(...)` at import time; this runner wraps that one function for the run so that
each call returns only kdkit's models (or the `--models` subset) that the call would select if
timm had declared them in its own lists:

  - `module=` lists (timm's FEAT_INTER_FILTERS, the modules whose models have
    forward_intermediates and FeatureGetterNet features): kdkit's `FEAT_INTER_MODULES` join them;
  - filter / exclude lists that name timm's ViTs (`vit_*`, timm's NON_STD_FILTERS: token-sequence
    outputs, no 4-D feature map): kdkit's `NON_STD` join them.

Tests with model names written into the file (timm's own regression cases) are deselected.
Nothing in the test file is copied or changed. pytest's report goes to stderr; the table (one row
per test, one column per model: pass / FAIL / skip, "-" where timm's lists do not select the
model) to stdout, then the JSON of the results (also written to --json-out). Exit status 1 when a
test failed.

timm's test file matches the installed timm's version: take it from the same release (the sdist,
`pip download timm==X --no-deps --no-binary :all:`, holds tests/), or a checkout at that tag.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import platform
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import timm
import timm.models
import torch
from rich.console import Console
from rich.table import Table

import kdkit.models  # noqa: F401  (registers kdkit's models with timm)
from kdkit.console import console
from kdkit.files import atomic_write_text
from kdkit.registry import KdkitError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, kdkit_source  # noqa: E402

# kdkit modules (timm's registry keys a model by its module's last name) whose models implement
# forward_intermediates / prune_intermediate_layers and features_only through FeatureGetterNet.
FEAT_INTER_MODULES = ("t2t_vit", "cifar")
# kdkit models whose features are a token sequence (B, T, C), as timm's `vit_*` in NON_STD_FILTERS.
NON_STD = ("t2t_vit_*",)
# a name only timm's ViT lists hold: how the runner recognises NON_STD_FILTERS and its copies
VIT_MARK = "vit_*"

OUTCOME_MARK = {"passed": "pass", "failed": "FAIL", "skipped": "skip"}


def kdkit_models() -> list[str]:
    """Names of the models kdkit registers with timm, in timm's order."""
    return [n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("kdkit.")]


def _as_list(value: str | Iterable[str]) -> list[str]:
    return [value] if isinstance(value, str) and value else [] if isinstance(value, str) else list(value)


def restricted_list_models(original, selected: set[str]):
    """timm.list_models, with kdkit's declarations added and the result limited to `selected`."""

    def list_models(filter: str | Iterable[str] = "", module: str | Iterable[str] = "", pretrained: bool = False,
                    exclude_filters: str | Iterable[str] = "", name_matches_cfg: bool = False,
                    include_tags: bool | None = None) -> list[str]:
        filters, modules, excludes = _as_list(filter), _as_list(module), _as_list(exclude_filters)
        if modules and "vision_transformer" in modules:
            modules += FEAT_INTER_MODULES
        if VIT_MARK in filters:
            filters += NON_STD
        if VIT_MARK in excludes:
            excludes += NON_STD
        names = original(filter=filters, module=modules, pretrained=pretrained, exclude_filters=excludes,
                         name_matches_cfg=name_matches_cfg, include_tags=include_tags)
        return [n for n in names if n.split(".")[0] in selected]

    return list_models


class Collector:
    """pytest plugin: keeps the items parametrised with a selected model, records each outcome."""

    def __init__(self, selected: set[str]):
        self.selected = selected
        self.results: dict[str, dict] = {}  # nodeid -> {test, model, outcome, message}
        self.names: dict[str, tuple[str, str]] = {}  # nodeid -> (test function, model)

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        keep, drop = [], []
        for item in items:
            name = getattr(item, "callspec", None) and item.callspec.params.get("model_name")
            model = name.split(".")[0] if isinstance(name, str) else None  # "t2t_vit_7.untrained" -> "t2t_vit_7"
            if model in self.selected:
                keep.append(item)
                self.names[item.nodeid] = (item.originalname, model)
            else:
                drop.append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        test, model = self.names[report.nodeid]
        item = self.results.setdefault(report.nodeid, {"test": test, "model": model, "outcome": "passed",
                                                       "message": ""})
        if report.failed:
            item["outcome"] = "failed"
            crash = getattr(report.longrepr, "reprcrash", None)
            item["message"] = (crash.message if crash else str(report.longrepr)).splitlines()[0][:300]
        elif report.skipped and item["outcome"] != "failed":
            item["outcome"] = "skipped"
            longrepr = report.longrepr
            item["message"] = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)[:300]


def run(test_file: Path, models: list[str], pytest_args: list[str]) -> dict:
    """Run timm's test file on `models`; the results as a dict (see the module docstring)."""
    selected = set(models)
    collector = Collector(selected)
    original = timm.list_models
    patched = restricted_list_models(original, selected)
    args = [str(test_file), "-p", "no:cacheprovider", "--import-mode=importlib", "-q", "--tb=line",
            "-W", "ignore::pytest.PytestUnknownMarkWarning", *pytest_args]
    timm.list_models = timm.models.list_models = patched
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # pytest's report to stderr; stdout: the table and JSON
            code = pytest.main(args, plugins=[collector])
    finally:
        timm.list_models = timm.models.list_models = original
    return {"command": " ".join(["python", "bench/timm_model_tests.py", *sys.argv[1:]]),
            "pytest_exit_code": int(code), "seconds": round(time.perf_counter() - start, 1),
            "timm": timm.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": cpu_model(), "kdkit": kdkit_source(), "models": models,
            "tests": sorted(collector.results.values(), key=lambda r: (r["test"], models.index(r["model"])))}


def table(results: dict) -> Table:
    models = results["models"]
    grid: dict[str, dict[str, str]] = {}
    for r in results["tests"]:
        grid.setdefault(r["test"], {})[r["model"]] = OUTCOME_MARK[r["outcome"]]
    t = Table(title=f"timm {results['timm']} tests/test_models.py on kdkit's models")
    t.add_column("test")
    for m in models:
        t.add_column(m, justify="center")
    for test, row in grid.items():
        t.add_row(test, *[row.get(m, "-") for m in models])
    counts = {k: sum(r["outcome"] == k for r in results["tests"]) for k in OUTCOME_MARK}
    t.caption = ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; {results['seconds']} s"
    return t


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("test_file", type=Path, help="timm's tests/test_models.py")
    p.add_argument("--models", nargs="*", default=["*"], help="fnmatch patterns over kdkit's model names")
    p.add_argument("--json-out", type=Path, help="also write the results JSON here")
    args = p.parse_args(own)
    try:
        if not args.test_file.is_file():
            raise KdkitError(f"{args.test_file} is not a file: pass the path of timm's tests/test_models.py")
        models = [m for m in kdkit_models() if any(fnmatch.fnmatch(m, pat) for pat in args.models)]
        if not models:
            raise KdkitError(f"no kdkit model matches {args.models}: choose from {kdkit_models()}")
    except KdkitError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    results = run(args.test_file.resolve(), models, extra)
    Console(width=140).print(table(results))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_out:
        atomic_write_text(args.json_out, text + "\n")
    failed = any(r["outcome"] == "failed" for r in results["tests"])
    return 1 if failed or results["pytest_exit_code"] not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
