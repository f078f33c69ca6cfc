"""`kdkit plan`: the pricing of online / cached / hybrid written out by hand, and the choice it makes
from real timings on two set-ups whose answer is known: a teacher far cheaper than the data loader
(online) and a ResNet-50 teacher, about ten times the tiny student's step (cache, for 2 runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from kdkit.config import load_recipe
from kdkit.engine.plan import StepTimes, compare_strategies, plan_cache
from tests.helpers import run_cli

STUDENT = {"student": "deit_tiny", "img_size": 32, "patch_size": 8, "kwargs": {"depth": 2, "embed_dim": 32,
                                                                              "num_heads": 2}}


TINY = {"channels": [8, 8, 8, 8], "stem_width": 8}  # resnet10t at 1.2 MFLOPs an image, as the student's forward


def saved_teacher(root: Path, name: str, **kwargs) -> Path:
    """A random `name` for 10 classes at 32x32 as a timm folder (weights do not change its speed)."""
    root.mkdir()
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "model.safetensors")
    cfg = {"architecture": name, "num_classes": 10,
           "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                              "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 10}}
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def test_the_strategies_are_priced_as_written():
    t = StepTimes(loader=0.010, teacher=0.050, student=0.020, encode=0.001, read=0.002)
    kw = {"steps_per_epoch": 10, "write_batches_per_epoch": 10.5, "images_per_step": 64, "epochs": 4,
          "cache_epochs": 4, "cache_bytes_per_epoch": 1000, "free_bytes": 10_000}
    serial = compare_strategies(t, overlap=False, runs=1, **kw)
    online, cached, write = 0.010 + 0.070, 0.010 + 0.022, 0.010 + 0.051
    assert serial["online"]["total_s"] == pytest.approx(4 * 10 * online)
    assert serial["cached"]["write_s"] == pytest.approx(4 * 10.5 * write)
    assert serial["cached"]["total_s"] == pytest.approx(4 * 10.5 * write + 4 * 10 * cached)
    assert serial["online"]["images_per_s"] == pytest.approx(64 / online)
    assert serial["fastest"] == "online"  # one run: the cache does the teacher's work and then some
    # the cache pays once the runs it serves save more than it cost: 4*10*(0.080-0.032) a run vs 4*10.5*0.061
    assert serial["cache_pays_from_runs"] == 2
    assert compare_strategies(t, overlap=False, runs=2, **kw)["fastest"] == "cached"
    # with loader workers a step is max(loader, compute)
    over = compare_strategies(t, overlap=True, runs=3, **kw)
    assert over["online"]["seconds_per_step"] == pytest.approx(0.070)
    assert over["cached"]["seconds_per_step"] == pytest.approx(0.022)
    # a disk that holds 2 of the 4 epochs: no whole cache; the hybrid caches 2 and runs the teacher for 2
    small = compare_strategies(t, overlap=False, runs=3, **{**kw, "free_bytes": 2500, "cache_epochs": 2})
    assert not small["cached"]["feasible"] and "2500 are free" in small["cached"]["why_not"]
    hybrid = small["hybrid"]
    assert hybrid["total_s"] == pytest.approx(2 * 10.5 * write + 3 * (2 * 10 * cached + 2 * 10 * online))
    assert hybrid["teacher_passes"] == 2 + 3 * 2 and small["fastest"] == "hybrid"
    # a loss that needs the teacher's features cannot read a cache
    live = compare_strategies(t, overlap=False, runs=9, cacheable=False, **kw)
    assert live["fastest"] == "online" and not live["hybrid"]["feasible"]
    # reading no faster than the teacher: a cache never pays
    assert compare_strategies(StepTimes(0.01, 0.001, 0.02, 0.001, 0.002), overlap=False, runs=1,
                              **kw)["cache_pays_from_runs"] is None


def _recipe(tiny_data, teacher: Path, **kwargs) -> object:
    name = json.loads((teacher / "config.json").read_text())["architecture"]
    return load_recipe(None, {"model": {**STUDENT, "teacher": name, "teacher_weights": str(teacher),
                                        "teacher_kwargs": kwargs},
                              "data": {"path": str(tiny_data), "batch_size": 32, "workers": 0},
                              "aug": {"auto_augment": "rand-m9-mstd0.5-inc1"}, "optim": {"epochs": 10},
                              "run": {"progress": False, "teacher_check_batches": 1}})


@pytest.fixture
def one_thread():
    """Time on one thread: two threads on cores other jobs share spin-wait for each other, and a
    1-ms forward then takes a second (measured on this suite's 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_plan_chooses_online_for_a_tiny_teacher_and_the_cache_for_a_large_one(tmp_path, tiny_data, one_thread):
    """The cache saves a teacher pass per step for every run after the first, and costs a second
    pass of the loader (to write it) plus the reads: with 2 runs it wins when the teacher costs more
    than the loader (here decoding and RandAugment): ResNet-50 at 32 px, not an 8-channel ResNet-10-T."""
    tiny = plan_cache(_recipe(tiny_data, saved_teacher(tmp_path / "tiny", "resnet10t", **TINY), **TINY), runs=2,
                      out=tmp_path)
    large = plan_cache(_recipe(tiny_data, saved_teacher(tmp_path / "large", "resnet50")), runs=2, out=tmp_path)
    for plan in (tiny, large):
        assert plan["steps_per_epoch"] == 3 and plan["cache"]["records_per_epoch"] == 120
        assert plan["cache"]["bytes"] == 120 * 10 * 21 and plan["online"]["teacher_passes"] == 20
        assert plan["cached"]["teacher_passes"] == 10 and all(v > 0 for v in plan["measured"].values())
    m_tiny, m_large = tiny["measured"], large["measured"]
    assert m_tiny["teacher"] < m_tiny["loader"] and m_large["teacher"] > 4 * m_large["student"]  # the set-ups
    assert tiny["fastest"] == "online" and large["fastest"] == "cached"
    assert large["cache_pays_from_runs"] == 2 and (tiny["cache_pays_from_runs"] or 99) > 2
    assert large["cached"]["images_per_s"] > 2 * large["online"]["images_per_s"]
    one = compare_strategies(StepTimes(**m_large), overlap=False, steps_per_epoch=3, write_batches_per_epoch=3.75,
                             images_per_step=32, epochs=10, runs=1, cache_epochs=10, cache_bytes_per_epoch=2520,
                             free_bytes=None)
    assert one["fastest"] == "online"  # one run: writing the cache costs what it saves
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large", "tiny"]  # nothing else written


def test_kdkit_plan_prints_a_table_or_json_and_refuses_a_cache_in_one_line(tmp_path, tiny_data, teacher_dir,
                                                                           capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["plan", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--student", "deit_tiny",
            "--img-size", "32", "--patch-size", "8", "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}",
            "--data", tiny_data, "--workers", "0", "--batch-size", "16", "--epochs", "3", "--steps", "2",
            "--set", "run.teacher_check_batches=1", "--no-progress"]
    capsys.readouterr()
    assert run_cli(*args, "--runs", "3", "--topk", "5", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == 3 and report["cache"]["topk"] == 5 and report["cache"]["bytes_per_record"] == 5 * 3 + 6
    assert report["fastest"] in ("online", "cached", "hybrid") and report["timed_steps"] == 2
    assert run_cli(*args) == 0
    text = capsys.readouterr().out
    assert "teacher forward" in text and "hybrid" in text and "fastest for 1 run(s)" in text
    assert list(tmp_path.iterdir()) == []
    assert run_cli(*args, "--runs", "0") == 2
    assert capsys.readouterr().err.strip().endswith("--runs must be at least 1, not 0")
