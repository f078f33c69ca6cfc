"""Training curves of a run (RUN/curves.png) and of several runs overlaid (`kdkit plot`).

The figures are drawn from what a run leaves on disk: RUN/metrics.jsonl (a line per logged step and
per evaluation), RUN/summary.json (the teacher check) and RUN/recipe.toml (names, epochs). Reading
needs nothing but the standard library; drawing needs matplotlib (the `plot` extra), imported only
inside the drawing functions so that `import kdkit` stays light.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdkit.registry import KdkitError

# keys of a step line that are not terms of the loss
STEP_KEYS = ("epoch", "step", "update", "lr", "images_per_s", "skipped", "skipped_steps")
FRACTIONS = ("unlabeled_kept",)  # named terms that are fractions in [0, 1], not losses
HEADS = ("class", "dist", "fused")
HEAD_NAMES = {"class": "class head", "dist": "distillation head", "fused": "fused"}
FIGSIZE, DPI = (14.0, 6.0), 100  # 1400 x 600 pixels
INSTALL = 'pip install "kdkit[plot]"'


@dataclass
class RunCurves:
    """What RUN/metrics.jsonl (plus summary.json and recipe.toml) holds, as aligned lists.

    Step series are aligned with `updates` (one entry per logged step): `terms` maps "loss" and every
    named term (task, kd, kd_labeled, kd_unlabeled, unlabeled_kept, ...) to its values, NaN where a
    line lacks the term. Evaluation series are aligned with `eval_epochs`, the number of epochs
    completed at each evaluation (1 after the first; the line's own "epoch" is 0-based): `top1` maps
    class, dist, fused and, with an EMA, ema_class, ema_dist, ema_fused to top-1 in percent.
    `teacher_top1` is the teacher check's top-1 (%) on `teacher_images` evaluation images, None
    when the run has none (train runs, cached logits, a run still in progress). `skipped_lines`
    counts lines that are not complete JSON objects (a line torn by a crash).
    """

    run_dir: Path
    label: str
    updates: list[int] = field(default_factory=list)
    step_epochs: list[int] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)
    lr: list[float] = field(default_factory=list)
    images_per_s: list[float] = field(default_factory=list)
    eval_epochs: list[int] = field(default_factory=list)
    top1: dict[str, list[float]] = field(default_factory=dict)
    teacher_top1: float | None = None
    teacher_images: int | None = None
    epochs: int | None = None  # optim.epochs of the recipe: the run's planned length
    title: str = ""
    skipped_lines: int = 0

    @property
    def one_head(self) -> bool:
        """Whether every evaluation gave the three heads the same top-1 (a shared head, a plain model)."""
        return all(self.top1.get(h) == self.top1.get("class") for h in HEADS)


def read_run(run_dir: str | Path, label: str | None = None) -> RunCurves:
    """Parse RUN/metrics.jsonl (and summary.json, recipe.toml where present) into a RunCurves named
    `label` (default: the run directory's name). A missing folder or metrics.jsonl is a KdkitError."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise KdkitError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise KdkitError(f"{run_dir} has no metrics.jsonl: not a kdkit run directory (runs write it from their first step)")
    c = RunCurves(run_dir, label or run_dir.resolve().name)
    steps, evals = [], []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            c.skipped_lines += line.strip() != ""
        elif isinstance(record.get("eval"), dict):
            evals.append(record)
        elif "update" in record:
            steps.append(record)
    names = list(dict.fromkeys(k for s in steps for k in s if k not in STEP_KEYS and _number(s[k])))
    names.sort(key=lambda k: k != "loss")
    c.updates = [int(s["update"]) for s in steps]
    c.step_epochs = [int(s.get("epoch", 0)) for s in steps]
    c.terms = {k: [float(s.get(k, math.nan)) for s in steps] for k in names}
    c.lr = [float(s.get("lr", math.nan)) for s in steps]
    c.images_per_s = [float(s.get("images_per_s", math.nan)) for s in steps]
    c.eval_epochs = [int(e["epoch"]) + 1 for e in evals]
    heads = [p + h for p in ("", "ema_") for h in HEADS if any(f"{p}{h}_top1" in e["eval"] for e in evals)]
    c.top1 = {h: [float(e["eval"].get(f"{h}_top1", math.nan)) for e in evals] for h in heads}
    summary, recipe = _read(run_dir / "summary.json", json.loads), _read(run_dir / "recipe.toml", tomllib.loads)
    check = summary.get("teacher_check") or {}
    if _number(check.get("teacher_top1_slice")):
        c.teacher_top1, c.teacher_images = float(check["teacher_top1_slice"]), check.get("images")
    model = recipe.get("model", {})
    c.epochs = recipe.get("optim", {}).get("epochs")
    mode, student = summary.get("mode"), model.get("student", "")
    what = f"{mode} {student}" if mode else student
    if mode == "distill":
        teacher = model.get("teacher") or Path(model.get("logit_cache") or model.get("teacher_logits") or "?").name
        what += f" from {teacher} ({(summary.get('conventions') or {}).get('loss', '?')} distillation)"
    c.title = f"{c.label}: {what}" if what else c.label
    return c


def write_curves(run_dir: str | Path | RunCurves, out: str | Path | None = None, label: str | None = None) -> Path:
    """Draw one run's curves to `out` (default RUN/curves.png, 1400 x 600 px) and return its path;
    `label` names the run in the title (default: its directory's name). `run_dir` may be a run
    already read (read_run).

    Left: loss and its named terms against optimizer updates, the learning rate below (and the
    fraction of unlabeled images kept, where logged). Right: top-1 of the class, distillation and
    fused heads against epochs, the teacher's top-1 as a horizontal line where known. Needs
    matplotlib (KdkitError naming the `plot` extra without it)."""
    make_figure = _matplotlib()
    c = run_dir if isinstance(run_dir, RunCurves) else read_run(run_dir, label)
    fig, (ax_loss, ax_lr, ax_top1) = _figure(make_figure, c.title)
    colors = _colors()
    losses = [k for k in c.terms if k not in FRACTIONS]
    for i, name in enumerate(losses):
        _line(ax_loss, c.updates, c.terms[name], "black" if name == "loss" else colors[i % len(colors)],
              name if name == "loss" else f"{name} term", width=2.0 if name == "loss" else 1.3)
    _epoch_ticks(ax_loss, ax_lr, c)
    _line(ax_lr, c.updates, c.lr, "tab:blue", "learning rate", smooth=False)
    kept = [k for k in c.terms if k in FRACTIONS]
    if kept:
        twin = ax_lr.twinx()
        for name in kept:
            _line(twin, c.updates, c.terms[name], "tab:olive", name.replace("_", " "), width=1.0)
        twin.set_ylabel("fraction kept")
        twin.set_ylim(-0.05, 1.05)
        handles = ax_lr.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax_lr.legend(handles=handles, loc="best", fontsize=9)
    heads = ["class"] if c.one_head else list(HEADS)
    for prefix, style in (("", "-"), ("ema_", "--")):  # the EMA dashed, with hollow markers
        for i, head in enumerate(heads):
            values = c.top1.get(prefix + head)
            if values:
                name = ("student" if c.one_head else HEAD_NAMES[head]) if not prefix else \
                    ("EMA student" if c.one_head else f"EMA {HEAD_NAMES[head]}")
                _points(ax_top1, c.eval_epochs, values, colors[i], f"{name} ({values[-1]:.1f}%)", style,
                        hollow=bool(prefix))
    _teacher(ax_top1, [c], "0.35")
    _finish(ax_loss, ax_lr, ax_top1, [c])
    return _save(fig, Path(out) if out else c.run_dir / "curves.png")


def plot_runs(run_dirs: list[str | Path | RunCurves], out: str | Path) -> Path:
    """Overlay several runs in one figure at `out` (1400 x 600 px) and return its path: the loss and
    the learning rate against updates, top-1 against epochs (fused solid; class dashed and
    distillation dotted for two-headed runs), one colour per run. An entry may be LABEL=RUN to
    name the run in the legend (default: the run directory's name), or a run already read (read_run)."""
    make_figure = _matplotlib()
    runs = [_run_of(item) for item in run_dirs]
    names = [r.label for r in runs]
    for r in runs:  # two runs of the same name from different folders: name them by their parent too
        if names.count(r.label) > 1 and r.label == r.run_dir.resolve().name:
            r.label = f"{r.run_dir.resolve().parent.name}/{r.label}"
    title = " vs ".join(r.label for r in runs)
    fig, (ax_loss, ax_lr, ax_top1) = _figure(make_figure, title if len(title) < 120 else f"{len(runs)} runs")
    colors = _colors()
    for i, r in enumerate(runs):
        color = colors[i % len(colors)]
        _line(ax_loss, r.updates, r.terms.get("loss", []), color, r.label, width=1.8)
        _line(ax_lr, r.updates, r.lr, color, r.label, smooth=False)
        heads = ["fused"] if r.one_head else ["fused", "class", "dist"]
        for head, style in zip(heads, ("-", "--", ":"), strict=False):
            values = r.top1.get(head)
            if values:
                name = r.label if r.one_head else f"{r.label} {HEAD_NAMES[head]}"
                _points(ax_top1, r.eval_epochs, values, color, f"{name} ({values[-1]:.1f}%)", style,
                        width=2.0 if head == "fused" else 1.2)
    _teacher(ax_top1, runs, "0.35")
    _finish(ax_loss, ax_lr, ax_top1, runs)
    if ax_lr.get_legend():
        ax_lr.get_legend().remove()  # the loss panel's legend names the same colours
    return _save(fig, Path(out))


def _run_of(item: str | Path | RunCurves) -> RunCurves:
    """A plot_runs entry as a RunCurves of its own (plot_runs may rename it)."""
    if isinstance(item, RunCurves):
        return replace(item)
    label, path = split_label(item)
    return read_run(path, label)


def split_label(item: str | Path) -> tuple[str | None, Path]:
    """"LABEL=RUN" -> (LABEL, RUN); a plain RUN (or a path that exists with "=" in it) -> (None, RUN)."""
    text = str(item)
    if "=" in text and not Path(text).exists():
        label, path = text.split("=", 1)
        if label:
            return label, Path(path)
    return None, Path(text)


def _matplotlib() -> Any:
    """A factory of matplotlib Figures drawn on the Agg canvas; a KdkitError naming the extra without
    matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise KdkitError(f"drawing curves needs matplotlib, which is not installed: {INSTALL}") from None

    def make(**kw: Any) -> Figure:
        fig = Figure(**kw)
        FigureCanvasAgg(fig)  # no pyplot, no global backend: safe inside any program
        return fig

    return make


def _figure(make: Any, title: str) -> tuple[Any, tuple[Any, Any, Any]]:
    fig = make(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=(1.25, 1), height_ratios=(2.2, 1))
    ax_loss = fig.add_subplot(grid[0, 0])
    ax_lr = fig.add_subplot(grid[1, 0], sharex=ax_loss)
    ax_top1 = fig.add_subplot(grid[:, 1])
    fig.suptitle(title, fontsize=13)
    return fig, (ax_loss, ax_lr, ax_top1)


def _colors() -> list[str]:
    return ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:cyan"]


def _line(ax: Any, x: list[int], y: list[float], color: str, label: str, width: float = 1.3,
          smooth: bool = True) -> None:
    """A step series: the raw values faint and a moving average over them where there are many."""
    points = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(b)]
    if not points:
        return
    xs, ys = zip(*points, strict=True)
    marker = "o" if len(xs) < 30 else None
    stride = max(1, len(xs) // 2000)  # a long run's 30k logged steps: no more points than pixels
    if smooth and len(xs) >= 30:
        ax.plot(xs[::stride], ys[::stride], color=color, linewidth=0.8, alpha=0.25)
        ys = _moving_average(list(ys), max(5, len(ys) // 20))
    ax.plot(xs[::stride], ys[::stride], color=color, linewidth=width, label=label, marker=marker, markersize=3.5)


def _moving_average(y: list[float], window: int) -> list[float]:
    """Centred mean over `window` values, by running sums: O(len(y)). The window narrows towards
    the ends, staying centred, so that a falling loss is not bent up (or down) at either end."""
    sums, n = [0.0], len(y)
    for v in y:
        sums.append(sums[-1] + v)
    out = []
    for i in range(n):
        h = min(window // 2, i, n - 1 - i)
        out.append((sums[i + h + 1] - sums[i - h]) / (2 * h + 1))
    return out


def _epoch_ticks(ax: Any, ax_lr: Any, c: RunCurves) -> None:
    """Epoch boundaries on top of the loss panel: tick k where k epochs are complete (the update
    before the first logged step of the next epoch), so that updates read against the top-1 panel."""
    ends = {}
    for update, epoch in zip(c.updates, c.step_epochs, strict=True):
        ends.setdefault(epoch, update - 1)
    ticks = [(k, u) for k, u in sorted(ends.items()) if k > 0]
    if not ticks:
        return
    every = math.ceil(len(ticks) / 15)
    ticks = [t for t in ticks if t[0] % every == 0]
    top = ax.secondary_xaxis("top")
    top.set_xticks([u for _, u in ticks], labels=[str(k) for k, _ in ticks])
    top.set_xlabel("epochs completed", fontsize=9)
    top.tick_params(labelsize=8)
    for _, u in ticks:
        for a in (ax, ax_lr):
            a.axvline(u, color="0.6", linewidth=0.6, linestyle=":")


def _points(ax: Any, x: list[int], y: list[float], color: str, label: str, style: str, width: float = 1.8,
            hollow: bool = False) -> None:
    """An evaluation series; markers on each evaluation where there are few enough to tell apart."""
    ax.plot(x, y, linestyle=style, color=color, linewidth=width, marker="o" if len(x) <= 40 else None,
            markersize=6 if hollow else 4, markerfacecolor="white" if hollow else color, label=label)


def _teacher(ax: Any, runs: list[RunCurves], color: str) -> None:
    """The teacher check's top-1 as a horizontal line: one per distinct value."""
    seen: dict[float, list[RunCurves]] = {}
    for r in runs:
        if r.teacher_top1 is not None:
            seen.setdefault(round(r.teacher_top1, 2), []).append(r)
    for i, (top1, rs) in enumerate(sorted(seen.items())):
        who = "teacher" if len(seen) == 1 else f"teacher of {', '.join(r.label for r in rs)}"
        images = f", {rs[0].teacher_images} eval images" if rs[0].teacher_images else ""
        ax.axhline(top1, color=color, linestyle=("-.", ":", "--")[i % 3], linewidth=1.5,
                   label=f"{who} ({top1:.1f}%{images})")


def _finish(ax_loss: Any, ax_lr: Any, ax_top1: Any, runs: list[RunCurves]) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    updates = sum(len(r.updates) for r in runs)
    ax_loss.set_title("training loss (logged steps)")
    ax_loss.set_ylabel("loss")
    ax_loss.tick_params(labelbottom=False)
    ax_lr.set_xlabel("optimizer updates")
    ax_lr.set_ylabel("learning rate")
    ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))  # no offset text between panels
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax_lr.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 10_000 else f"{v:g}"))
    last_update = max([u for r in runs for u in r.updates] + [1])
    ax_lr.set_xlim(0, last_update * 1.02 + 0.5)
    lr = [v for r in runs for v in r.lr if math.isfinite(v)]
    ax_lr.set_ylim(0, max(lr) * 1.1 if lr and max(lr) > 0 else 1)  # from 0: a constant lr is a flat line, not noise
    ax_top1.set_title("evaluation top-1")
    ax_top1.set_xlabel("epoch")
    ax_top1.set_ylabel("top-1 (%)")
    ax_top1.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    last = max([e for r in runs for e in r.eval_epochs] + [r.epochs or 1 for r in runs])
    ax_top1.set_xlim(0.5, last + 0.5)
    for ax in (ax_loss, ax_lr, ax_top1):
        ax.grid(True, alpha=0.3)
    if updates:
        ax_loss.legend(loc="best", fontsize=9)
        if not ax_lr.get_legend():
            ax_lr.legend(loc="best", fontsize=9)
    else:
        ax_loss.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=ax_loss.transAxes,
                     fontsize=12, color="0.4")
    if any(r.eval_epochs for r in runs) or any(r.teacher_top1 is not None for r in runs):
        lo, hi = ax_top1.get_ylim()
        ax_top1.set_ylim(max(0.0, lo), min(100.0, hi))
        ax_top1.legend(loc="best", fontsize=9)
    if not any(r.eval_epochs for r in runs):
        ax_top1.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax_top1.transAxes,
                     fontsize=12, color="0.4")


def _save(fig: Any, path: Path) -> Path:
    from kdkit.files import atomic_write

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _read(path: Path, parse: Any) -> dict:
    """A JSON or TOML file as a dict; {} where it is missing or unreadable (a run still in progress)."""
    try:
        value = parse(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
