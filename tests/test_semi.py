"""Semi-supervised distillation: unlabeled images learnt through the teacher, per-sample masks,
the confidence threshold, the mixed sampler, caches over labeled + unlabeled data, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from kdkit.cache import LogitCache
from kdkit.data import (
    MixedSampler,
    SemiSupervisedDataset,
    create_loader,
    open_dataset,
    open_unlabeled,
    sample_path,
    view_settings,
    with_views,
)
from kdkit.losses import create_loss, semi_supervised, task_ce
from kdkit.models import create_student
from kdkit.types import StudentOut
from tests.helpers import TINY_DEIT, run_cli, semi_args, step_terms, teacher_args

NORM = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3}  # the test teacher's own


@pytest.fixture(scope="module")
def unlabeled_dir(tmp_path_factory) -> Path:
    """40 training images of the bundled sample that tiny_data lacks, without class folders: half
    flat, half two folders deep, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("unlabeled")
    (root / "a" / "b").mkdir(parents=True)
    for i, cls_dir in enumerate(sorted((sample_path() / "train").iterdir())):
        for j, f in enumerate(sorted(cls_dir.iterdir())[20:24]):
            shutil.copy(f, root / ("a/b" if j % 2 else "") / f"{i}-{j}.jpg")
    (root / "notes.txt").write_text("not an image")
    return root




LOSS = ["--loss", "soft", "--tau", "2", "--confidence-threshold", "0.6"]


def semi_dataset(tiny_data: Path, unlabeled_dir: Path, ratio: float = 1.0, views: dict | None = None):
    labeled = open_dataset(tiny_data, "train", seed=3)
    ds = SemiSupervisedDataset(labeled, open_unlabeled(unlabeled_dir, labeled.classes, seed=3), ratio)
    return with_views(ds, views or view_settings({**NORM, "interpolation": "bicubic", "crop_pct": 1.0}), 10)


def test_unlabeled_samples_train_the_distillation_head_only():
    student = create_student("deit_tiny", 10, "token", img_size=32, patch_size=8,
                             model_kwargs={k: v for k, v in TINY_DEIT.items() if k not in ("img_size", "patch_size")})
    images, teacher = torch.randn(8, 3, 32, 32), torch.randn(8, 10) * 3
    target = torch.tensor([1, 2, 3, 4, -1, -1, -1, -1])
    loss = semi_supervised(create_loss("soft", task_weight=0.5, kd_weight=0.5, tau=2.0))
    out = student(images)
    terms = loss(out, teacher, target)
    kl = torch.nn.functional.kl_div((out.dist_logits / 2).log_softmax(1), (teacher / 2).log_softmax(1),
                                    reduction="none", log_target=True).sum(1) * 4
    assert terms["kd_labeled"].item() == pytest.approx(kl[:4].mean().item(), rel=1e-5)
    assert terms["kd_unlabeled"].item() == pytest.approx(kl[4:].mean().item(), rel=1e-5) and terms["kd_unlabeled"] > 0
    assert terms["task"].item() == pytest.approx(task_ce(out.logits[:4], target[:4]).item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(0.5 * terms["task"].item() + 0.5 * kl.mean().item(), rel=1e-5)
    # the unlabeled part alone: its gradients reach the distillation token's head and the backbone,
    # never the class head (soft Mixup rows that are all zero mean "unlabeled" as well)
    for unlabeled in (torch.full((4,), -1), torch.zeros(4, 10)):
        student.zero_grad()
        part = loss(student(images[4:]), teacher[4:], unlabeled)
        part["loss"].backward()
        grads = {n: p.grad for n, p in student.named_parameters()}
        assert grads["model.head_dist.weight"].abs().sum() > 0 and grads["model.blocks.0.attn.qkv.weight"].abs().sum() > 0
        assert torch.count_nonzero(grads["model.head.weight"]) == 0 and part["task"] == 0


def test_confidence_threshold_counts_what_the_teacher_is_sure_of(tiny_data, unlabeled_dir, teacher_dir):
    # images from the mixed loader, the teacher run by hand (plain timm, its own normalisation)
    ds = semi_dataset(tiny_data, unlabeled_dir, ratio=2.0)
    batch = next(iter(create_loader(ds, 16, training=True, workers=0, seed=3)))
    unl = batch["target"] < 0
    assert unl.sum() == 32 and (batch["index"][unl] >= ds.num_labeled).all()
    model = timm.create_model("resnet10t", num_classes=10)
    model.load_state_dict(load_file(teacher_dir / "model.safetensors"))
    with torch.no_grad():
        logits = model.eval()(batch["images"])
    confidence = np.asarray(torch.softmax(logits.double(), 1).max(1).values)[np.asarray(unl)]
    # a threshold in a clear gap between two confidences near the 40% quantile (no float32 tie)
    levels = np.unique(confidence)
    gaps = [i for i in range(len(levels) - 1) if levels[i + 1] - levels[i] > 1e-4]
    i = min(gaps, key=lambda i: abs(i - 0.4 * len(levels)))
    threshold = float(levels[i] + levels[i + 1]) / 2
    expected = float(np.mean(confidence >= threshold))
    assert 0.2 < expected < 1.0
    student = StudentOut(torch.randn(48, 10), torch.randn(48, 10))
    for kind in ("soft", "hard"):
        terms = semi_supervised(create_loss("soft", tau=2.0), kind, threshold, tau=2.0)(student, logits, batch["target"])
        assert terms["unlabeled_kept"].item() == pytest.approx(expected, abs=1e-7)
    kept = torch.zeros(48, dtype=torch.bool)
    kept[unl.nonzero()[:, 0][torch.from_numpy(confidence >= threshold)]] = True
    hard = torch.nn.functional.cross_entropy(student.dist_logits[kept], logits[kept].argmax(1))
    assert terms["kd_unlabeled"].item() == pytest.approx(hard.item(), rel=1e-5)


def test_labeled_plus_unlabeled_run_learns_from_the_unlabeled_images(tmp_path, tiny_data, unlabeled_dir, teacher_dir):
    assert run_cli("distill", *semi_args(tiny_data, unlabeled_dir, 1), "--loss", "soft", *teacher_args(teacher_dir),
                   "--unlabeled-ratio", "1.5", "--pseudo-label", "hard", "--output", tmp_path, "--name", "semi") == 0
    steps = step_terms(tmp_path / "semi")
    assert len(steps) == 120 // 16
    assert all(s["kd_unlabeled"] > 0 and s["kd_labeled"] > 0 and s["unlabeled_kept"] == 1.0 for s in steps)
    summary = json.loads((tmp_path / "semi" / "summary.json").read_text())
    assert summary["train_images"] == 120 and summary["unlabeled"]["images"] == 40
    assert summary["unlabeled"]["per_step"] == 24 and summary["data"]["train"]["unlabeled"]["ignored_files"] == 1
    assert summary["conventions"]["pseudo_label"] == "hard"


def test_python_api_takes_unlabeled_images_as_a_second_source(tmp_path, tiny_data, unlabeled_dir, teacher_dir):
    import kdkit

    result = kdkit.distill("deit_tiny", "resnet10t", str(tiny_data), unlabeled=str(unlabeled_dir), unlabeled_ratio=0.5,
                           confidence_threshold=0.5, teacher_weights=str(teacher_dir), img_size=32, patch_size=8,
                           kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, loss="soft", epochs=1,
                           batch_size=16, workers=0, progress=False, output=str(tmp_path), name="api",
                           log_every=1, warmup_epochs=0)
    assert result.summary["unlabeled"]["per_step"] == 8 and result.summary["conventions"]["confidence_threshold"] == 0.5
    assert {"kd_labeled", "kd_unlabeled", "unlabeled_kept"} <= set(step_terms(tmp_path / "api")[0])


def views(sampler) -> list[int]:
    """The view ids a training sampler yields (it yields (epoch, view id))."""
    return [v for _, v in sampler]


def test_mixed_sampler_same_global_batches_for_any_process_count(tiny_data, unlabeled_dir):
    ds = semi_dataset(tiny_data, unlabeled_dir, ratio=1.5)  # 120 labeled + 40 unlabeled; 24 per step
    one = MixedSampler(ds, 16)
    for epoch in range(3):
        one.set_epoch(epoch)
        steps = torch.tensor(views(one)).view(-1, 40)
        assert steps.shape[0] == 7 and (steps[:, :16] < 120).all() and (steps[:, 16:] % 160 >= 120).all()
        assert len(set(steps.flatten().tolist())) == steps.numel()  # distinct views, though 168 > 40 unlabeled
        for p in (2, 4):
            parts = []
            for rank in range(p):
                s = MixedSampler(ds, 16, num_replicas=p, rank=rank)
                s.set_epoch(epoch)
                parts.append(torch.tensor(views(s)).view(7, 40 // p))
            assert torch.equal(torch.cat(parts, 1).sort(1).values, steps.sort(1).values)
        one.set_epoch(epoch, 2 * 40)  # resuming after 2 steps skips them
        assert torch.equal(torch.tensor(views(one)), steps[2:].flatten())
    # the unlabeled stream continues across epochs: every pass shows each unlabeled image once
    stream = []
    for epoch in range(2):
        one.set_epoch(epoch)
        drawn = torch.tensor(views(one)).view(-1, 40)[:, 16:].flatten() % 160 - 120
        stream += drawn.tolist() + [None] * (180 - len(drawn))  # epoch e starts at stream position 180 e
    assert sorted(stream[:40]) == list(range(40)) and sorted(stream[40:80]) == list(range(40))
    assert stream[180:220] != stream[:40] and sorted(stream[200:240]) == list(range(40))


def test_mixup_partners_stay_in_their_pool(tiny_data, unlabeled_dir):
    views = view_settings({**NORM, "interpolation": "bicubic"}, {
        "scale": (0.5, 1.0), "hflip": 0.5, "color_jitter": 0.0, "auto_augment": "", "reprob": 0.0, "mixup": 0.8,
        "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "label_smoothing": 0.1, "repeated_aug": 0,
        "interpolation": "bicubic"})
    ds = semi_dataset(tiny_data, unlabeled_dir, views=views)
    labeled_only = with_views(open_dataset(tiny_data, "train", seed=3), views, 10)
    for view in range(0, 160, 7):
        assert (ds.partner(view) < 120) == (view < 120)
        target = ds[view]["target"]
        assert target.sum().item() == pytest.approx(1.0 if view < 120 else 0.0, abs=1e-6)
        if view < 120:  # a labeled view is the one a labeled-only run draws
            assert torch.equal(ds[view]["image"], labeled_only[view]["image"])


@pytest.mark.parametrize("mode", ["replay", "fixed"])
def test_cache_with_unlabeled_images_gives_the_online_losses(tmp_path, tiny_data, unlabeled_dir, teacher_dir, mode,
                                                             capsys):
    args = semi_args(tiny_data, unlabeled_dir, 2, "--set", "aug.scale=[0.5, 1.0]", "--set", "aug.mixup=0.8",
                     "--set", "aug.label_smoothing=0.1")
    assert run_cli("cache", *args, *teacher_args(teacher_dir), "--mode", mode, "--dtype", "float32",
                   "--out", tmp_path / "c") == 0
    cache = LogitCache(tmp_path / "c")
    assert cache.manifest["records_per_epoch"] == 120 + (40 if mode == "fixed" else 120)
    if mode == "fixed":  # one record per image, labeled and unlabeled: the teacher re-run agrees
        capsys.readouterr()  # the cache's result table (stdout)
        assert run_cli("cache", *args, *teacher_args(teacher_dir), "--verify", tmp_path / "c", "--samples", "16",
                       "--json") == 0
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] and report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
        return
    assert run_cli("distill", *args, *LOSS, *teacher_args(teacher_dir), "--output", tmp_path, "--name", "live") == 0
    assert run_cli("distill", *args, *LOSS, "--logit-cache", tmp_path / "c", "--output", tmp_path, "--name", "cached") == 0
    live, cached = step_terms(tmp_path / "live"), step_terms(tmp_path / "cached")
    assert len(live) == len(cached) == 14 and any(0 < s["unlabeled_kept"] < 1 for s in live)
    for a, b in zip(live, cached, strict=True):
        for term in ("loss", "task", "kd", "kd_labeled", "kd_unlabeled", "unlabeled_kept"):
            assert abs(a[term] - b[term]) <= 1e-5, (a["step"], term, a[term], b[term])
    capsys.readouterr()
    for other, needle in (([*args, "--unlabeled-ratio", "2"], "unlabeled_ratio: cache 1.0, run 2.0"),
                          ([a for a in args if a != unlabeled_dir and a != "--unlabeled"],
                           "unlabeled.num_samples: cache 40, run None")):
        assert run_cli("distill", *other, "--logit-cache", tmp_path / "c", "--output", tmp_path) == 2
        assert needle in capsys.readouterr().err


def test_empty_or_unreadable_unlabeled_source_is_one_clear_error(tmp_path, tiny_data, capsys):
    import datasets

    (tmp_path / "empty").mkdir()
    (tmp_path / "texts" / "deep").mkdir(parents=True)
    (tmp_path / "texts" / "deep" / "a.txt").write_text("x")
    (tmp_path / "broken").mkdir()
    for i in range(3):
        (tmp_path / "broken" / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg" * i)
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "no_images"))
    capsys.readouterr()
    cases = {"missing": "unlabeled data not found", "empty": "no images found in the unlabeled folder",
             "texts": "no images found in the unlabeled folder", "broken": "is unreadable: none of 3 sampled images",
             "no_images": "dataset needs an Image column"}
    for name, needle in cases.items():
        assert run_cli("distill", *semi_args(tiny_data, tmp_path / name), "--teacher", "resnet10t",
                       "--output", tmp_path / "runs") == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert run_cli("train", "--model", "resnet10t", "--data", tiny_data, "--set", f"data.unlabeled={tmp_path}",
                   "--output", tmp_path / "runs") == 2
    assert "use kdkit distill" in capsys.readouterr().err


def test_unlabeled_datasets_folder_without_label_column(tmp_path, unlabeled_dir):
    import datasets

    files = sorted(str(p) for p in unlabeled_dir.rglob("*.jpg"))[:6]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": files}, features=features).save_to_disk(str(tmp_path / "hf"))
    ds = open_unlabeled(tmp_path / "hf", ["a", "b"])
    assert len(ds) == 6 and ds.classes == ["a", "b"] and ds.read(0)[1] == -1


def test_function_matching_preset_and_recipe(tmp_path, tiny_data, unlabeled_dir, teacher_dir):
    from kdkit.config import load_recipe

    for r in (load_recipe(None, {"preset": "function-matching"}), load_recipe("cifar10_function_matching")):
        assert (r.loss.kind, r.loss.task_weight, r.loss.kd_weight, r.loss.tau) == ("soft", 0.0, 1.0, 1.0)
        assert (r.aug.mixup, r.aug.cutmix, r.aug.mixup_prob, r.aug.label_smoothing) == (1.0, 0.0, 1.0, 0.0)
        assert (r.model.head, r.optim.clip_grad, r.loss.pseudo_label) == ("shared", 1.0, "soft")
    assert r.data.unlabeled and r.optim.epochs == 300
    args = [a if a != "deit_tiny" else "deit_tiny_patch16_224" for a in semi_args(tiny_data, unlabeled_dir, 1)]
    assert run_cli("distill", "--preset", "function-matching", *args, *teacher_args(teacher_dir), "--output", tmp_path,
                   "--name", "fm") == 0
    steps = step_terms(tmp_path / "fm")
    assert all(s["task"] > 0 and s["kd_unlabeled"] > 0 for s in steps)  # labels mixed: logged, weighted 0
    assert all(s["loss"] == pytest.approx(s["kd"], rel=1e-6) for s in steps)
