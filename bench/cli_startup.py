"""How fast the command line answers: `kdkit --help` and `kdkit distill --help`, each in a fresh process.

    python bench/cli_startup.py [--runs 7] [--json-out bench/results/cli_startup.json]

Times each command `--runs` times (after one untimed run that warms the file cache) and reports the
median and the range of the wall time. A second pass runs each command under `python -X importtime`
and reports the heavy packages it imported (torch, timm, accelerate, datasets, ...: none is the
goal) and the slowest top-level imports; for reference, it also times `python -c "import torch"`.
`kdkit` is the console script beside this Python when there is one, else `python -m kdkit`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, kdkit_source  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "timm", "accelerate", "datasets", "numpy", "PIL", "safetensors", "rich")


def kdkit_command() -> list[str]:
    script = Path(sys.executable).with_name("kdkit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kdkit"]


def _env() -> dict:
    # this checkout first, as the tests run it
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def wall_times(cmd: list[str], runs: int) -> list[float]:
    subprocess.run(cmd, capture_output=True, env=_env(), check=False)  # warm the page cache
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, env=_env())
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.decode()[-500:]}")
    return times


def imports(args: list[str]) -> dict:
    """Heavy packages and the slowest top-level imports of `python -X importtime -m kdkit ARGS`."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "kdkit", *args], capture_output=True, text=True,
                       env=_env())
    rows, packages = [], set()
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        packages.add(name.strip().split(".")[0])
        if not name.startswith("  "):  # a top-level import: nested ones are indented further
            rows.append((int(cumulative), name.strip()))
    return {"heavy_imported": sorted(set(HEAVY) & packages),
            "slowest_imports_ms": [[n, round(us / 1000, 1)] for us, n in sorted(rows, reverse=True)[:5]],
            "total_import_ms": round(sum(us for us, _ in rows) / 1000, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="timed runs per command (default: 7)")
    p.add_argument("--json-out", type=Path, help="also write the result here")
    args = p.parse_args()
    kdkit = kdkit_command()
    cases = {"python -m kdkit --help": ([sys.executable, "-m", "kdkit", "--help"], ["--help"]),
             "kdkit distill --help": ([*kdkit, "distill", "--help"], ["distill", "--help"]),
             "python -c 'import torch' (reference)": ([sys.executable, "-c", "import torch"], None)}
    rows = []
    for label, (cmd, argv) in cases.items():
        times = wall_times(cmd, args.runs)
        row = {"command": label, "argv": cmd, "runs": args.runs, "median_s": round(statistics.median(times), 3),
               "min_s": round(min(times), 3), "max_s": round(max(times), 3)}
        if argv is not None:
            row.update(imports(argv))
        rows.append(row)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kdkit start-up, {args.runs} runs each, fresh processes")
    for col in ("command", "median s", "range s", "heavy packages imported", "slowest top-level imports (ms)"):
        table.add_column(col, justify="right" if col.endswith(" s") else "left")
    for r in rows:
        slow = ", ".join(f"{n} {ms:g}" for n, ms in r.get("slowest_imports_ms", [])[:3])
        table.add_row(r["command"], f"{r['median_s']:.3f}", f"{r['min_s']:.3f}-{r['max_s']:.3f}",
                      ", ".join(r.get("heavy_imported", [])) or ("none" if "heavy_imported" in r else ""), slow)
    Console(width=150).print(table)
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0],
              "kdkit": kdkit_source(), "kdkit_command": kdkit, "rows": rows, "command": " ".join(sys.argv)}
    print(json.dumps(result, indent=2))
    if args.json_out:
        from kdkit.files import atomic_write_text

        atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
