"""Rich tables for run summaries and evaluations (stdout)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

out = Console()


def print_eval(result: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("head", "top-1 %", "top-5 %"):
        table.add_column(col, justify="right" if col != "head" else "left")
    for prefix in ("", "ema_") if "ema_class_top1" in result else ("",):
        for head in ("class",) if result.get("heads") == 1 else ("class", "dist", "fused"):  # one head: one row
            key = f"{prefix}{head}"
            table.add_row(key.replace("_", " "), f"{result[f'{key}_top1']:.2f}", f"{result[f'{key}_top5']:.2f}")
    out.print(table)
    out.print(f"{result['n']} images, {result['images_per_s']:.0f} images/s, {result['skipped']} unreadable skipped"
              f"{named(result.get('skipped_names', []))}", soft_wrap=True)


SHOWN_NAMES = 3  # unreadable images named on the console (all of them in summary.json)


def named(names: list[str]) -> str:
    """": a.jpg, b.jpg, c.jpg (+2 more in summary.json)" for the first unreadable images, "" for none."""
    if not names:
        return ""
    more = f" (+{len(names) - SHOWN_NAMES} more in summary.json)" if len(names) > SHOWN_NAMES else ""
    return f": {', '.join(names[:SHOWN_NAMES])}{more}"


def print_summary(summary: dict) -> None:
    if summary.get("eval"):
        print_eval(summary["eval"], f"{summary['mode']}: {summary['run_dir']}")
    out.print(f"student saved to {summary['student']}  ({summary['train_seconds']:.0f} s)")
    data = summary.get("data", {})
    skipped = {split: d.get("skipped_images", 0) for split, d in data.items()}
    if summary.get("skipped_steps") or any(skipped.values()):
        train = data.get("train", {})
        out.print(f"skipped: {summary.get('skipped_steps', 0)} steps with a non-finite loss, "
                  f"{skipped.get('train', 0)} unreadable training images (views, over the epochs)"
                  f"{named(train.get('skipped_names', []))}"
                  f"{'' if len(train.get('skipped_names', [])) > SHOWN_NAMES else ' (see summary.json)'}",
                  soft_wrap=True)


def _si(n: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def print_plan(plan: dict) -> None:
    """The dry run's table: the models, their cost, the teacher's share of a step, a cache's size."""
    table = Table(title=f"dry run: {plan['mode']}, loss {plan['loss']}, preset {plan['preset']} (nothing written)")
    for col in ("model", "params", "input", "FLOPs / image"):
        table.add_column(col, justify="left" if col == "model" else "right")
    s = plan["student"]
    table.add_row(f"student {s['name']}", _si(s["params"]), "x".join(map(str, s["input_size"][1:])),
                  _si(s["flops_per_image"]))
    for t in plan["teachers"]:
        table.add_row(f"teacher {t['name']}", _si(t["params"]), "x".join(map(str, t["input_size"][1:])),
                      _si(t["flops_per_image"]))
    out.print(table)
    check = plan.get("teacher_check") or {}
    if plan["teachers"]:
        out.print(f"teacher's share of a training step's compute: {100 * plan['teacher_share_of_step']:.1f}% "
                  f"(its forward against the student's forward + backward)"
                  + (f"; teacher check top-1 {check['teacher_top1_slice']:.1f}%" if check else ""))
    out.print(f"{plan['train_images']} training images, {plan['classes']} classes, {plan['steps_per_epoch']} steps "
              f"of {plan['global_batch_size']} per epoch, {plan['epochs']} epochs, {plan['processes']} process(es), "
              f"precision {plan['precision']}, logit source {plan['logit_source']}")
    out.print(f"a `kdkit cache` of this run (replay, float16, every class): {plan['cache_records_per_epoch']} records "
              f"per epoch, {_si(plan['cache_bytes'], 'B')} for {plan['epochs']} epochs")
