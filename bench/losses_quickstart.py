"""The distillation losses side by side at the quickstart's scale: the quickstart recipe (4 x 128
DeiT, patch 8, from the bundled ResNet-9 on the 3,000-image CIFAR-10 sample, 15 epochs) with each
loss swapped in, everything else (data, augmentation, schedule, seed) unchanged.

    python bench/losses_quickstart.py [--seeds 0 1] [--only soft dkd] [--out bench/results/losses_quickstart.json]

Prints a table (fused top-1 on the 2,000 held-out images, per loss and seed) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
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
}


def run(loss: str, seed: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "kdkit", "distill", "--recipe", "quickstart", "--teacher-weights", TEACHER,
           *LOSSES[loss], "--seed", str(seed), "--no-progress", "--output", str(out), "--name", f"{loss}-{seed}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{loss} seed {seed} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((out / f"{loss}-{seed}" / "summary.json").read_text())
    ev = summary["eval"]
    return {"loss": loss, "seed": seed, "fused_top1": ev["fused_top1"], "class_top1": ev["class_top1"],
            "dist_top1": ev["dist_top1"], "wall_s": time.perf_counter() - start, "conventions": summary["conventions"],
            "command": " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "losses_quickstart.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for loss in args.only:
                rows.append(run(loss, seed, Path(tmp)))
                r = rows[-1]
                print(f"{loss:18s} seed {seed}: fused {r['fused_top1']:.2f}  ({r['wall_s']:.0f} s)", file=sys.stderr)
                # written after every run, so that a long comparison stopped half-way keeps what it measured
                Path(args.out).write_text(json.dumps({"cpu": cpu_model(), "seeds": args.seeds, "rows": rows}, indent=2))
    by = {loss: [r["fused_top1"] for r in rows if r["loss"] == loss] for loss in args.only}
    print(f"| loss | fused top-1 % (seeds {' '.join(map(str, args.seeds))}) | mean | wall s (mean) |")
    print("|---|---|---|---|")
    for loss, vals in by.items():
        wall = statistics.mean(r["wall_s"] for r in rows if r["loss"] == loss)
        print(f"| {loss} | {' '.join(f'{v:.2f}' for v in vals)} | {statistics.mean(vals):.2f} | {wall:.0f} |")
    result = {"cpu": cpu_model(), "kdkit": kdkit_source(), "seeds": args.seeds, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"cpu": result["cpu"], "mean_fused_top1": {k: statistics.mean(v) for k, v in by.items()}}))


if __name__ == "__main__":
    main()
