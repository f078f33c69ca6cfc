"""kdkit quickstart: the whole story offline on the bundled CIFAR-10 sample, in minutes on a CPU.

Trains the quickstart student without distillation, distils the same student (same augmentation,
epochs and seed) from the bundled ConvNet teacher through a distillation token, evaluates all of
them on the held-out split and prints one table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  kdkit quickstart                     # about 2 minutes on 2 Xeon cores, 4-5 on an AVX2 laptop
  kdkit quickstart --epochs 2          # a smoke run
  kdkit quickstart --set loss.tau=2    # any recipe key of recipes/quickstart.toml
"""


def teacher_path() -> Path:
    """The bundled CIFAR-10 teacher (reproduced by recipes/cifar10_teacher.toml)."""
    return Path(__file__).resolve().parent.parent / "assets" / "teachers" / "resnet9_cifar_s"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="distil vs. no distillation on the bundled sample, one table",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="override the recipe's epochs")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="override the recipe's seed")
    p.add_argument("--output", default="runs/quickstart", metavar="DIR",
                   help="where the two runs are written (default: runs/quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key of recipes/quickstart.toml (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.config import _merge, parse_override

    over: dict = {"run": {"output": args.output}}
    if args.epochs is not None:
        over["optim"] = {"epochs": args.epochs}
    if args.seed is not None:
        over["run"]["seed"] = args.seed
    if args.no_progress:
        over["run"]["progress"] = False
    for item in args.overrides:
        over = _merge(over, parse_override(item))
    result = run_quickstart(over)
    print_table(result["teacher"], result["no_kd"], result["distilled"])
    return 0


def run_quickstart(overrides: dict) -> dict:
    """Both runs of the quickstart recipe (with `overrides`) and the teacher's evaluation.

    Returns {"teacher": eval, "no_kd": summary, "distilled": summary} (evals as in kdkit.evaluate).
    """
    from kdkit.cli.report import out
    from kdkit.config import _merge, load_recipe
    from kdkit.engine.evaluate import evaluate_saved
    from kdkit.engine.run import run as run_recipe

    over = _merge({"model": {"teacher_weights": str(teacher_path())}}, overrides)
    distill = load_recipe("quickstart", _merge(over, {"run": {"name": "distilled"}}))
    baseline = load_recipe("quickstart", _merge(over, {"run": {"name": "no-kd"}, "loss": {"kind": "none"}}))
    out.rule("1/2 student without distillation")
    base = run_recipe(baseline, "train")
    out.rule("2/2 the same student distilled from the teacher")
    kd = run_recipe(distill, "distill")

    # The teacher on the same held-out split, as `kdkit eval` sees its saved folder.
    t = evaluate_saved(distill.model.teacher_weights, distill.data.path, batch_size=500,
                       workers=distill.data.workers, split=distill.data.eval_split, progress=distill.run.progress)
    return {"teacher": t, "no_kd": base, "distilled": kd}


def print_table(t: dict, base_summary: dict, kd_summary: dict) -> None:
    from rich.table import Table

    from kdkit.cli.report import out

    base, kd = base_summary["eval"], kd_summary["eval"]
    ref = base["fused_top1"]
    table = Table(title=f"kdkit quickstart: top-1 on {kd['n']} held-out CIFAR-10 images")
    for col in ("model", "top-1 %", "vs. no KD"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row("teacher (ResNet-9, all 50k CIFAR-10 train)", f"{t['class_top1']:.2f}", "")
    table.add_row("student without distillation", f"{ref:.2f}", "")
    for head, name in (("class", "class head"), ("dist", "distillation head"), ("fused", "late fusion")):
        v = kd[f"{head}_top1"]
        table.add_row(f"distilled student: {name}", f"{v:.2f}", f"{v - ref:+.2f}")
    out.print(table)
    gain = kd["fused_top1"] - ref
    verdict = "beats" if gain > 0 else "does NOT beat"
    out.print(f"The distilled student (late fusion) {verdict} the student trained without distillation by "
              f"{gain:+.2f} points. Runs: {base_summary['run_dir']}, {kd_summary['run_dir']} "
              f"({base_summary['train_seconds'] + kd_summary['train_seconds']:.0f} s of training).")
