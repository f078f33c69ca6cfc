"""The distillation losses side by side at the quickstart's scale: the quickstart recipe (4 x 128
DeiT, patch 8, from the bundled ResNet-9 on the 3,000-image CIFAR-10 sample, 15 epochs) with each
loss swapped in, everything else (data, augmentation, schedule, seed) unchanged.

    python bench/losses_quickstart.py [--seeds 0 1] [--only soft dkd] [--sources live cache]
        [--larger runs/vit-larger/student] [--out bench/results/losses_quickstart.json]

--sources cache runs every row that has a teacher a second time reading a `kdkit cache` of the same
recipe and seed (written once per seed, replay mode: the run's own views) instead of the live
teacher. The ws rows (weight selection, --init-from) need --larger: the larger model to select the
student from (`kdkit train --recipe cifar10_vit_larger`, see that recipe).

Prints a table (fused top-1 on the 2,000 held-out images, per loss, source and seed; for a cached
row its difference from the live one, in top-1 and in the first logged step's loss) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_model, kdkit_source  # noqa: E402

TEACHER = str(Path(__file__).parents[1] / "kdkit" / "assets" / "teachers" / "resnet9_cifar_s")
# loss -> extra arguments; the quickstart itself is soft at tau 4 with weights 0.1 / 0.9
LOSSES = {
    "none": ["--loss", "none"],
    "soft": [],
    "hard": ["--loss", "hard", "--set", "loss.task_weight=0.5", "--set", "loss.kd_weight=0.5"],
    "soft+standardize": ["--set", "loss.args={standardize=true}", "--tau", "2"],
    "dkd": ["--loss", "dkd", "--set", "loss.args={alpha=1.0, beta=8.0}", "--set", "loss.task_weight=1.0",
            "--set", "loss.kd_weight=1.0"],
    "dist": ["--loss", "dist", "--set", "loss.args={beta=1.0, gamma=1.0}", "--tau", "1", "--set",
             "loss.task_weight=0.5", "--set", "loss.kd_weight=1.0"],
    "feature": ["--loss", "feature", "--set", "loss.args={logit_loss=\"soft\", feature_weight=1.0}"],
    # CTKD with its authors' CIFAR-100 settings (the loss's defaults) and the quickstart's weights 0.1 / 0.9 (theirs)
    "ctkd": ["--loss", "ctkd"],
    # MLKD with its authors' CIFAR-100 temperatures (2..6, the loss's defaults) and weights 0.5 / 0.5 (the loss's)
    "mlkd": ["--loss", "mlkd", "--set", "loss.task_weight=0.5", "--set", "loss.kd_weight=0.5"],
    # weight selection from the larger model (--larger): without a teacher, and with the quickstart's soft loss
    "ws": ["--loss", "none", "--init-from", "{larger}"],
    "ws+soft": ["--init-from", "{larger}"],
}
NO_TEACHER = ("none", "ws")  # rows without a teacher: no cached variant


def run(loss: str, seed: int, out: Path, source: str = "live", cache: Path | None = None,
        larger: str | None = None) -> dict:
    extra = [a.replace("{larger}", larger or "") for a in LOSSES[loss]]
    if "{larger}" in " ".join(LOSSES[loss]) and not larger:
        raise SystemExit(f"{loss}: pass --larger FOLDER, the larger model to select from (kdkit train --recipe "
                         f"cifar10_vit_larger --data CIFAR10 --name vit-larger: runs/vit-larger/student)")
    name = f"{loss}-{source}-{seed}"
    cmd = [sys.executable, "-m", "kdkit", "distill", "--recipe", "quickstart", "--teacher-weights", TEACHER,
           *extra, *(["--logit-cache", str(cache)] if source == "cache" else []), "--seed", str(seed), "--no-progress",
           "--output", str(out), "--name", name]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode < 0:  # killed by a signal from outside (a shared machine): the same command once more
        print(f"{name}: killed by signal {-done.returncode}, run again", file=sys.stderr)
        shutil.rmtree(out / name, ignore_errors=True)
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{loss} ({source}) seed {seed} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    first = next(json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()
                 if "step" in json.loads(line))
    ev = summary["eval"]
    return {"loss": loss, "source": source, "seed": seed, "fused_top1": ev["fused_top1"],
            "class_top1": ev["class_top1"], "dist_top1": ev["dist_top1"], "wall_s": time.perf_counter() - start,
            "conventions": summary["conventions"], "init_from": summary.get("init_from"),
            "first_step": {k: v for k, v in first.items() if k in ("epoch", "step", "loss", "task", "kd", "tau")},
            "command": " ".join(cmd[1:])}


def write_cache(seed: int, out: Path) -> tuple[Path, float]:
    """`kdkit cache` of the quickstart recipe's teacher for `seed` (replay: the views that run draws)."""
    cache = out / f"cache-{seed}"
    cmd = [sys.executable, "-m", "kdkit", "cache", "--recipe", "quickstart", "--teacher-weights", TEACHER,
           "--seed", str(seed), "--no-progress", "--out", str(cache)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kdkit cache seed {seed} failed:\n{done.stderr[-2000:]}")
    return cache, time.perf_counter() - start


def table(rows: list[dict], seeds: list[int]) -> list[str]:
    """The markdown table: per (loss, source) the fused top-1 of each seed and their mean; the gain
    over `none`; for a cached row, cache - live in top-1 (mean) and in the first logged loss (max)."""
    def of(loss, source):
        return {r["seed"]: r for r in rows if r["loss"] == loss and r["source"] == source}

    base = of("none", "live")
    base_mean = statistics.mean(r["fused_top1"] for r in base.values()) if base else None
    lines = [f"| loss | source | {' | '.join(f'seed {s}' for s in seeds)} | mean | gain over none | "
             f"cache - live: top-1 | cache - live: first loss |", "|---|---|" + "---|" * (len(seeds) + 4)]
    for loss, source in dict.fromkeys((r["loss"], r["source"]) for r in rows):
        got = of(loss, source)
        vals = [got[s]["fused_top1"] for s in seeds if s in got]
        mean = statistics.mean(vals)
        gain = f"{mean - base_mean:+.2f}" if base_mean is not None and loss != "none" else ""
        diff = loss_diff = ""
        live = of(loss, "live")
        if source == "cache" and live:
            pairs = [(got[s], live[s]) for s in seeds if s in got and s in live]
            diff = f"{statistics.mean(c['fused_top1'] - v['fused_top1'] for c, v in pairs):+.2f}"
            loss_diff = f"{max(abs(c['first_step']['loss'] - v['first_step']['loss']) for c, v in pairs):.1e}"
        cells = [f"{got[s]['fused_top1']:.2f}" if s in got else "" for s in seeds]
        lines.append(f"| {loss} | {source} | {' | '.join(cells)} | {mean:.2f} | {gain} | {diff} | {loss_diff} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    ap.add_argument("--sources", nargs="+", choices=("live", "cache"), default=["live"])
    ap.add_argument("--larger", help="the larger model of the ws rows: a kdkit student folder or weights file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "losses_quickstart.json"))
    ap.add_argument("--report", nargs="+", metavar="JSON", help="run nothing: print the table of these results "
                    "files together (rows of several invocations, e.g. the ws rows run once --larger exists)")
    args = ap.parse_args()
    if args.report:
        done = [json.loads(Path(f).read_text()) for f in args.report]
        rows = [r for d in done for r in d["rows"]]
        print("\n".join(table(rows, sorted({r["seed"] for r in rows}))))
        return
    rows, caches = [], {}
    larger = str(Path(args.larger).resolve()) if args.larger else None

    def save() -> None:  # after every run, so that a long comparison stopped half-way keeps what it measured
        Path(args.out).write_text(json.dumps({"cpu": cpu_model(), "kdkit": kdkit_source(), "seeds": args.seeds,
                                              "caches": caches, "rows": rows}, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for loss in args.only:
                for source in args.sources:
                    if source == "cache" and loss in NO_TEACHER:
                        continue
                    cache = None
                    if source == "cache":
                        if seed not in caches:
                            path, wall = write_cache(seed, Path(tmp))
                            caches[seed] = {"path": str(path), "wall_s": wall}
                        cache = Path(caches[seed]["path"])
                    rows.append(run(loss, seed, Path(tmp), source, cache, larger))
                    r = rows[-1]
                    print(f"{loss:18s} {source:5s} seed {seed}: fused {r['fused_top1']:.2f}  ({r['wall_s']:.0f} s)",
                          file=sys.stderr)
                    save()
    print("\n".join(table(rows, args.seeds)))
    save()
    means = {f"{loss} ({source})": statistics.mean(r["fused_top1"] for r in rows if (r["loss"], r["source"]) ==
                                                   (loss, source))
             for loss, source in dict.fromkeys((r["loss"], r["source"]) for r in rows)}
    print(json.dumps({"cpu": cpu_model(), "mean_fused_top1": means}))


if __name__ == "__main__":
    main()
