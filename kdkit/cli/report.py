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


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def print_cache_plan(plan: dict) -> None:
    """`kdkit plan`'s tables: the measured parts, then online / cached / hybrid and the fastest."""
    m, cache, runs = plan["measured"], plan["cache"], plan["runs"]
    b = plan["global_batch_size"] // plan["processes"]
    table = Table(title=f"measured on {plan['device']}: median of {plan['timed_steps']} batches of {b} "
                        f"(per process)")
    for col in ("part", "ms / batch", "images/s"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for key, name in (("loader", f"data loader ({plan['workers']} workers)"), ("teacher", "teacher forward"),
                      ("student", "student step (forward, loss, backward, optimizer)"),
                      ("encode", "cache records: encode + serialise"), ("read", "cache records: densify")):
        table.add_row(name, f"{1e3 * m[key]:.2f}", f"{b / m[key]:.0f}" if m[key] else "-")
    out.print(table)
    if plan.get("load_average") and plan["cpus"] and plan["load_average"] > plan["cpus"]:
        out.print(f"[bold yellow]note: the machine was busy (load average {plan['load_average']:.1f} on "
                  f"{plan['cpus']} CPUs): these times include waiting for other jobs")
    out.print(f"teacher's share of a step: {100 * plan['measured_teacher_share']:.1f}% measured "
              f"(FLOPs estimate {100 * plan['teacher_share_of_step']:.1f}%); a step is "
              + ("max(loader, compute): workers load beside it" if plan["loader_overlaps"] else
                 "loader + compute (no workers)"))
    table = Table(title=f"{runs} run(s) x {plan['epochs']} epochs x {plan['steps_per_epoch']} steps of "
                        f"{plan['global_batch_size']}")
    for col in ("strategy", "train images/s", "teacher passes", "cache", "cache write", "total", "note"):
        table.add_column(col, justify="left" if col in ("strategy", "note") else "right")
    for name in ("online", "cached", "hybrid"):
        s = plan[name]
        label = name if name != "hybrid" else f"hybrid, {s['cache_epochs']} cached"
        note = "fastest" if name == plan["fastest"] else (s["why_not"] or "")
        table.add_row(label, f"{s['images_per_s']:.0f}", str(s["teacher_passes"]),
                      _si(s["cache_bytes"], "B") if s["cache_epochs"] else "-",
                      _duration(s["write_s"]) if s["cache_epochs"] else "-", _duration(s["total_s"]), note)
    out.print(table)
    pays = plan["cache_pays_from_runs"]
    out.print(f"cache: replay, top-{cache['topk']} {cache['dtype']}, {cache['bytes_per_record']} B a record, "
              f"{cache['records_per_epoch']} records an epoch: {_si(cache['bytes'], 'B')} for {plan['epochs']} "
              f"epochs, written in {_duration(cache['write_s'])}"
              + (f"; {_si(cache['free_bytes'], 'B')} free at {cache['where']}" if cache["free_bytes"] is not None
                 else ""))
    out.print(f"fastest for {runs} run(s): {plan['fastest']}; "
              + (f"a cache pays from {pays} runs on" if pays else
                 "a cache never pays here: reading it is no faster than running the teacher"))
