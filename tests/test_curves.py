"""Training curves: read_run against metrics.jsonl parsed here with json, real PNGs from real runs
(signature, IHDR size, read back by matplotlib), `kdkit plot`, torn lines, sparse runs, and the
error without the `plot` extra."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import kdkit
from kdkit.curves import plot_runs, read_run, write_curves
from kdkit.registry import KdkitError
from tests.helpers import run_cli

TEACHER = Path(kdkit.__file__).parent / "assets" / "teachers" / "resnet9_cifar_s"
TINY = ["--student", "deit_tiny", "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--img-size", "32",
        "--patch-size", "8"]
FAST = ["--epochs", "2", "--batch-size", "16", "--workers", "0", "--no-progress", "--set", "run.log_every=3",
        "--set", "optim.warmup_epochs=0"]
PNG = b"\x89PNG\r\n\x1a\n"
SIZE = (1400, 600)  # the figure's 14 x 6 inches at 100 dpi


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """DeiT-Ti distilled from the bundled teacher (two heads), and DeiT-Ti without its distillation
    token trained alone (one shared head)."""
    out = tmp_path_factory.mktemp("runs")
    assert run_cli("distill", "--teacher", "resnet9_cifar_s", "--teacher-weights", TEACHER, *TINY, "--loss", "soft",
                   "--preset", "none", "--data", tiny_data, "--output", out, "--name", "kd", *FAST) == 0
    assert run_cli("train", "--model", "deit_tiny_patch16_224", *TINY[2:], "--head", "shared", "--data", tiny_data,
                   "--output", out, "--name", "no-kd", *FAST) == 0
    return out / "kd", out / "no-kd"


def records(run_dir):
    """(step lines, evaluation lines) of RUN/metrics.jsonl, every line parsed with json."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "step" in x], [x for x in lines if "eval" in x]


def assert_png(path, size=SIZE):
    data = Path(path).read_bytes()
    assert data[:8] == PNG
    assert data[12:16] == b"IHDR" and struct.unpack(">II", data[16:24]) == size
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (size[1], size[0])
    rgb = image[..., :3]
    drawn = (rgb < 0.95).any(axis=-1).mean()
    assert 0.02 < drawn < 0.5, drawn  # axes, lines and text on a white page
    return rgb


def test_read_run_matches_metrics_jsonl(runs):
    kd, no_kd = runs
    steps, evals = records(kd)
    assert len(steps) >= 4 and len(evals) == 2
    c = read_run(kd)
    assert c.label == "kd" and c.skipped_lines == 0
    assert c.updates == [x["update"] for x in steps]
    assert c.step_epochs == [x["epoch"] for x in steps] and set(c.step_epochs) == {0, 1}
    assert list(c.terms) == ["loss", "task", "kd"]
    for name in ("loss", "task", "kd"):
        assert c.terms[name] == pytest.approx([x[name] for x in steps])
    assert c.lr == pytest.approx([x["lr"] for x in steps])
    assert c.images_per_s == pytest.approx([x["images_per_s"] for x in steps])
    assert c.eval_epochs == [1, 2]  # epochs completed: the lines say 0 and 1
    assert [x["epoch"] for x in evals] == [0, 1]
    assert set(c.top1) == {"class", "dist", "fused"}
    for head in ("class", "dist", "fused"):
        assert c.top1[head] == pytest.approx([x["eval"][f"{head}_top1"] for x in evals])
    summary = json.loads((kd / "summary.json").read_text())
    assert c.teacher_top1 == pytest.approx(summary["teacher_check"]["teacher_top1_slice"])
    assert c.teacher_images == 60 and c.epochs == 2
    assert c.title == "kd: distill deit_tiny from resnet9_cifar_s (soft distillation)"

    alone = read_run(no_kd, "alone")
    steps, evals = records(no_kd)
    assert alone.label == "alone" and alone.teacher_top1 is None and list(alone.terms) == ["loss", "task"]
    assert alone.terms["loss"] == pytest.approx([x["loss"] for x in steps])
    assert alone.one_head and not c.one_head  # a shared head gives the three the same top-1
    assert alone.top1["fused"] == pytest.approx([x["eval"]["fused_top1"] for x in evals])


def test_write_curves_writes_a_png_in_the_run(runs, tmp_path):
    kd, _ = runs
    (kd / "curves.png").unlink(missing_ok=True)
    path = write_curves(kd)
    assert path == kd / "curves.png"
    rgb = assert_png(path)
    # the loss is drawn in black and the task term in matplotlib's tab:red (214, 39, 40)
    assert (np.abs(rgb - np.array([214, 39, 40]) / 255).max(axis=-1) < 0.02).sum() > 200
    assert (rgb.max(axis=-1) < 0.05).sum() > 500
    assert not list(kd.glob(".curves.png.*"))  # no temporary left behind
    elsewhere = write_curves(kd, tmp_path / "figs" / "kd.png")
    assert elsewhere == tmp_path / "figs" / "kd.png"
    assert_png(elsewhere)


def test_plot_verb_overlays_labelled_runs(runs, tmp_path, capsys):
    kd, no_kd = runs
    capsys.readouterr()
    out = tmp_path / "F.png"
    assert run_cli("plot", f"distilled={kd}", no_kd, "--out", out) == 0
    assert_png(out)
    printed = capsys.readouterr().out
    assert "distilled" in printed and "no-kd" in printed and f"wrote {out}" in printed
    for run in runs:  # the last evaluation's fused top-1 of each run, as summary.json has it
        assert f"{json.loads((run / 'summary.json').read_text())['eval']['fused_top1']:.2f}" in printed
    teacher = json.loads((kd / "summary.json").read_text())["teacher_check"]["teacher_top1_slice"]
    assert f"{teacher:.2f}" in printed

    (no_kd / "curves.png").unlink(missing_ok=True)
    assert run_cli("plot", no_kd) == 0  # one run, no --out: RUN/curves.png
    assert_png(no_kd / "curves.png")


def test_a_torn_last_line_is_skipped(runs, tmp_path):
    kd, _ = runs
    run = tmp_path / "torn"
    shutil.copytree(kd, run, ignore=shutil.ignore_patterns("student", "checkpoints"))
    steps, evals = records(run)
    text = (run / "metrics.jsonl").read_text()
    torn = json.dumps(steps[0])[:40]  # a crash in the middle of a write: no closing brace, no newline
    (run / "metrics.jsonl").write_text(text + torn)
    c = read_run(run)
    assert c.skipped_lines == 1
    assert c.updates == [x["update"] for x in steps]
    assert c.terms["kd"] == pytest.approx([x["kd"] for x in steps])
    assert c.top1["fused"] == pytest.approx([x["eval"]["fused_top1"] for x in evals])
    assert_png(write_curves(run))


def test_a_run_with_one_step_and_no_evaluation_still_draws(runs, tmp_path):
    kd, _ = runs
    first = (kd / "metrics.jsonl").read_text().splitlines()[0]
    one, empty = tmp_path / "one", tmp_path / "empty"
    one.mkdir()
    empty.mkdir()
    (one / "metrics.jsonl").write_text(first + "\n")
    (empty / "metrics.jsonl").write_text("")
    c = read_run(one)
    assert c.updates == [json.loads(first)["update"]] and c.eval_epochs == [] and c.top1 == {}
    assert c.teacher_top1 is None and c.title == "one"
    assert read_run(empty).updates == []
    assert_png(write_curves(one))
    assert_png(write_curves(empty))
    assert_png(plot_runs([one, f"nothing yet={empty}", kd], tmp_path / "all.png"))


def _error(capsys, *argv):
    capsys.readouterr()
    code = run_cli(*argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_missing_runs_are_one_clear_line(runs, tmp_path, capsys):
    kd, _ = runs
    assert "no such run directory" in _error(capsys, "plot", kd, tmp_path / "nope", "--out", tmp_path / "x.png")
    (tmp_path / "bare").mkdir()
    assert "has no metrics.jsonl" in _error(capsys, "plot", tmp_path / "bare")
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_the_error_names_the_extra(runs, tmp_path, monkeypatch, capsys):
    kd, _ = runs
    # None in sys.modules makes `import matplotlib...` fail as if it were not installed
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import matplotlib.figure  # noqa: F401
    with pytest.raises(KdkitError) as e:
        write_curves(kd, tmp_path / "c.png")
    assert 'pip install "kdkit[plot]"' in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(KdkitError, match="kdkit\\[plot\\]"):
        plot_runs([kd], tmp_path / "c.png")
    assert 'pip install "kdkit[plot]"' in _error(capsys, "plot", kd, "--out", tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_importing_kdkit_does_not_import_matplotlib():
    code = "import sys, kdkit, kdkit.curves, kdkit.cli, kdkit.cli.plot; print('matplotlib' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(Path(kdkit.__file__).parents[1]))  # this copy of kdkit
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "False"
