"""The newer strategies against their papers' formulas computed by hand, and end to end through the CLI:
DKD, DIST, logit standardisation, feature distillation, the teacher ensemble, the native head."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file

from kdkit.engine.build import attach_adapters
from kdkit.losses import LOSSES, create_loss
from kdkit.models import create_student, create_teacher
from kdkit.registry import KdkitError
from kdkit.sources import TeacherEnsemble
from kdkit.types import StudentOut, TeacherOut
from tests.helpers import (
    FAST,
    TINY_DEIT,
    TOKEN_STUDENT,
    dist_py,
    dkd_py,
    kl_py,
    rows,
    run_cli,
    softmax_py,
    z_score_py,
)


def ce_py(z, y):
    return -math.log(softmax_py(z)[y])


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(3)
    s, d, t = (torch.randn(5, 6, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    return s, d, t, torch.tensor([0, 3, 5, 1, 2])


def test_dkd_loss_is_ce_plus_the_papers_dkd_on_the_distillation_head(logits):
    s, d, t, y = logits
    terms = create_loss("dkd", alpha=1.0, beta=8.0, tau=4.0, task_weight=1.0, kd_weight=1.0)(StudentOut(s, d), t, y)
    ce = sum(ce_py(z, int(c)) for z, c in zip(rows(s), y.tolist(), strict=True)) / 5
    kd = dkd_py(d, t, y, 1.0, 8.0, 4.0)[0].mean().item()
    assert terms["task"].item() == pytest.approx(ce, rel=1e-10)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert terms["loss"].item() == pytest.approx(ce + kd, rel=1e-10)


def test_dkd_takes_the_mixup_argmax_and_the_teachers_class_where_there_is_no_label(logits):
    s, d, t, _ = logits
    soft = torch.zeros(5, 6, dtype=torch.float64)
    soft[:, 2], soft[:, 4] = 0.7, 0.3  # Mixup rows whose larger share is class 2
    soft[4] = 0.0  # an unlabeled sample: the teacher's class
    terms = create_loss("dkd", tau=2.0, task_weight=0.0, kd_weight=1.0)(StudentOut(s, d), t, soft)
    gts = [2, 2, 2, 2, int(t[4].argmax())]
    kd = dkd_py(d, t, torch.tensor(gts), 1.0, 8.0, 2.0)[0].mean().item()
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-10)


def test_dist_loss_is_the_papers_relation_match(logits):
    s, d, t, y = logits
    terms = create_loss("dist", beta=1.0, gamma=2.0, tau=2.0)(StudentOut(s, d), t, y)
    _, inter, intra = dist_py(d, t, 2.0)
    assert terms["kd"].item() == pytest.approx(4.0 * (inter + 2.0 * intra), rel=1e-9)


def test_standardised_soft_kd_is_kl_of_z_scored_logits(logits):
    s, d, t, y = logits
    terms = create_loss("soft", tau=2.0, standardize=True)(StudentOut(s, d), t, y)
    zd, zt = rows(z_score_py(d)), rows(z_score_py(t))
    kd = sum(4.0 * kl_py(softmax_py(b, 2.0), softmax_py(a, 2.0)) for a, b in zip(zd, zt, strict=True)) / 5
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-9)
    assert create_loss("soft", tau=2.0, standardize=True).conventions()["standardize"] is True


def test_feature_loss_matches_projected_features_and_pooled_tokens_by_hand():
    torch.manual_seed(0)
    student = create_student("deit_tiny_patch16_224", 10, "token", model_kwargs=dict(TINY_DEIT))
    loss = LOSSES.create("feature", {"tokens": True, "feature_weight": 0.5, "token_weight": 2.0,
                                     "logit_loss": "none"}, student_features=32, teacher_features=8)
    attach_adapters(student, loss)
    out = student(torch.randn(2, 3, 32, 32))
    teacher = TeacherOut(torch.randn(2, 10), torch.randn(2, 8), torch.randn(2, 8, 8, 8))
    y = torch.tensor([1, 7])
    terms = loss(out, teacher, y)
    w, b = student.adapters["features"].proj.weight, student.adapters["features"].proj.bias
    proj = out.features @ w.T + b
    feature = ((proj - teacher.features) ** 2).mean()
    # the 8x8 map pooled to the 4x4 token grid: each token's target is the mean of its 2x2 block
    wt, bt = student.adapters["tokens"].proj.weight, student.adapters["tokens"].proj.bias
    err = 0.0
    for i in range(4):
        for j in range(4):
            block = teacher.spatial[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(2, 3))  # (B, C)
            err = err + ((out.tokens[:, 4 * i + j] @ wt.T + bt - block) ** 2).sum()
    tokens = err / (2 * 16 * 8)
    assert terms["feature"].item() == pytest.approx(feature.item(), rel=1e-5)
    assert terms["tokens"].item() == pytest.approx(tokens.item(), rel=1e-5)
    # logit_loss "none" trains both heads on the labels: (CE(class) + CE(dist)) / 2
    ce = sum(ce_py(z, c) for lg in (out.logits, out.dist_logits) for z, c in zip(rows(lg.detach()), [1, 7],
                                                                                  strict=True)) / 4
    assert terms["loss"].item() == pytest.approx(ce + 0.5 * feature.item() + 2.0 * tokens.item(), rel=1e-5)
    terms["loss"].backward()
    assert student.adapters["features"].proj.weight.grad.abs().sum() > 0  # trained with the student
    assert not any(k.startswith("adapters") for k in student.model.state_dict())


def test_teacher_ensemble_averages_probabilities_or_logits():
    torch.manual_seed(0)
    members = [create_teacher(timm.create_model("resnet10t", num_classes=4), input_size=(3, 32, 32))
               for _ in range(2)]
    x = torch.randn(3, 3, 32, 32)
    z = [m(x).double() for m in members]
    probs = TeacherEnsemble(members, "probs")(x).double()
    for i in range(3):
        mean = [(softmax_py(z[0][i].tolist())[k] + softmax_py(z[1][i].tolist())[k]) / 2 for k in range(4)]
        assert softmax_py(probs[i].tolist()) == pytest.approx(mean, rel=1e-5)
    assert torch.allclose(TeacherEnsemble(members, "logits")(x).double(), (z[0] + z[1]) / 2, atol=1e-5)
    with pytest.raises(KdkitError, match="combine"):
        TeacherEnsemble(members, "mean")


def test_native_head_trains_levits_own_distillation_head(tmp_path):
    torch.manual_seed(0)
    levit = timm.create_model("levit_128s", num_classes=10, img_size=32)
    student = create_student(levit, 10)
    assert type(student).__name__ == "NativeHead"
    before = student.model.head_dist.linear.weight.clone()
    out = student(torch.randn(2, 3, 32, 32))
    assert not torch.equal(out.logits, out.dist_logits)
    t = torch.randn(2, 10)
    create_loss("soft")(out, t, torch.tensor([1, 2]))["loss"].backward()
    torch.optim.SGD(student.parameters(), lr=1.0).step()
    assert not torch.equal(before, student.model.head_dist.linear.weight)  # its own head learnt from the teacher
    with pytest.raises(KdkitError, match="native"):
        create_student(timm.create_model("levit_128s", num_classes=10, img_size=32), 10, "dual")
    student.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # plain timm's inference is the late fusion of the two heads
        assert torch.allclose(student(x).fused, student.model(x), atol=1e-5)




def _steps(run):
    return [x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "step" in x]


@pytest.mark.parametrize("loss, extra, terms", [
    ("dkd", ["--set", "loss.args={alpha=1.0, beta=2.0}", "--tau", "2"], {"task", "kd"}),
    ("dist", ["--set", "loss.args={beta=1.0, gamma=1.0}", "--set", "aug.mixup=0.8"], {"task", "kd"}),
    ("feature", ["--set", "loss.args={tokens=true, logit_loss=\"hard\"}"], {"task", "kd", "feature", "tokens"}),
    ("mlkd", ["--set", "loss.args={temperatures=[1.0, 2.0, 3.0, 5.0, 6.0]}"], {"task", "kd"}),
])
def test_new_losses_distil_through_the_cli(tiny_data, teacher_dir, tmp_path, loss, extra, terms):
    assert run_cli("distill", *TOKEN_STUDENT, "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--data",
                   tiny_data, "--loss", loss, *extra, *FAST, "--output", tmp_path, "--name", loss) == 0
    steps = _steps(tmp_path / loss)
    assert steps and terms <= set(steps[0]) and all(math.isfinite(x["loss"]) for x in steps)
    cfg = json.loads((tmp_path / loss / "student" / "config.json").read_text())
    assert cfg["kdkit"]["conventions"]["loss"] == loss
    # a feature projection trains with the student but is not part of it
    saved = set(load_file(tmp_path / loss / "student" / "model.safetensors"))
    assert not any("adapters" in k for k in saved)


def test_a_two_teacher_ensemble_distils_live_and_into_a_cache_naming_every_member(tiny_data, teacher_dir, tmp_path):
    ensemble = ["--set", 'model.teacher=["resnet10t", "resnet10t"]', "--set",
                f'model.teacher_weights=["{teacher_dir}", "{teacher_dir}"]', "--set", 'model.logit_source_args={combine="logits"}']
    repeated = ["--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--teacher", "resnet10t",
                "--teacher-weights", teacher_dir, *ensemble[4:]]  # the flags repeated, as a user types them
    assert run_cli("distill", *TOKEN_STUDENT, *repeated, "--data", tiny_data, "--loss", "soft", *FAST, "--output", tmp_path,
                   "--name", "ens") == 0
    summary = json.loads((tmp_path / "ens" / "summary.json").read_text())
    assert len(summary["teacher_check"]["members"]) == 2
    assert run_cli("cache", *TOKEN_STUDENT[:1], *TOKEN_STUDENT[1:2], *TOKEN_STUDENT[4:], *ensemble, "--data", tiny_data, *FAST, "--out", tmp_path / "cache") == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["teacher"]["name"] == "ensemble(resnet10t,resnet10t)"
    assert [m["weights"] for m in manifest["teacher"]["members"]] == [str(teacher_dir)] * 2
    assert manifest["teacher"]["combine"] == "logits"
    # the same ensemble, read from the cache, trains as the live one
    assert run_cli("distill", *TOKEN_STUDENT, "--logit-cache", tmp_path / "cache", *ensemble[:4], "--data", tiny_data, "--loss",
                   "soft", *FAST, "--output", tmp_path, "--name", "ens-cached") == 0


def test_feature_distillation_from_a_cache_is_refused_clearly(tiny_data, tmp_path, capsys, tiny_runs):
    capsys.readouterr()
    assert run_cli("distill", "--student", "deit_tiny", "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}",
                   "--img-size", "32", "--patch-size", "8", "--logit-cache", tiny_runs["cache"], "--data", tiny_data,
                   "--loss", "feature", *FAST, "--output", tmp_path, "--name", "fc") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "features are not cached" in err[0]
    assert not (tmp_path / "fc").exists()


def test_feature_distillation_under_two_processes_is_the_one_process_run(tmp_path, tiny_data, teacher_dir):
    """The feature projections live in the head, so data parallelism syncs them: two processes train
    what one process trains (the all-reduce order aside). The learning rate is the one this test had
    when --lr was scaled by batch / 512 (1e-3 x 16 / 512): Adam turns the all-reduce's rounding of
    near-zero gradients into whole steps, which a 32x larger rate makes larger than the tolerance."""
    from tests.helpers import run_kdkit, step_terms

    args = [*TOKEN_STUDENT, "--data", tiny_data, "--batch-size", "16", "--epochs", "1", "--workers", "0", "--seed", "5",
            "--no-progress", "--set", "run.log_every=1", "--set", "optim.warmup_epochs=0", "--set", "optim.lr=3.125e-5",
            "--set", "aug.mixup=0.8", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--preset", "none",
            "--loss", "feature", "--set", "loss.args={tokens=true}"]
    for n in (1, 2):
        run_kdkit(n, "distill", *args, "--output", tmp_path, "--name", f"p{n}")
    one, two = step_terms(tmp_path / "p1"), step_terms(tmp_path / "p2")
    assert len(one) == len(two) == 7
    for a, b in zip(one, two, strict=True):
        for term in ("loss", "feature", "tokens"):
            assert abs(a[term] - b[term]) <= 1e-5, (a["step"], term)
    w1, w2 = (load_file(tmp_path / p / "student" / "model.safetensors") for p in ("p1", "p2"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0) for k in w1)


@pytest.mark.parametrize("loss, args", [("dkd", "{beta=2.0}"), ("dist", "{gamma=1.0}")])
def test_new_losses_learn_from_unlabeled_images(tiny_data, teacher_dir, tmp_path, loss, args):
    """DKD takes the teacher's class where there is no label; DIST's batch term runs over the samples
    that count (labeled + kept unlabeled)."""
    from tests.helpers import semi_args

    root = tmp_path / "u"
    root.mkdir()
    for f in sorted((tiny_data / "test").rglob("*.jpg"))[:24]:
        (root / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    assert run_cli("distill", *semi_args(tiny_data, root, 1), "--teacher", "resnet10t", "--teacher-weights",
                   teacher_dir, "--loss", loss, "--set", f"loss.args={args}", "--confidence-threshold", "0.0",
                   "--preset", "none", "--output", tmp_path, "--name", loss) == 0
    steps = _steps(tmp_path / loss)
    assert steps and all(math.isfinite(x["kd_unlabeled"]) and x["unlabeled_kept"] == 1.0 for x in steps)


def test_feature_distillation_with_unlabeled_images_is_refused_clearly(tiny_data, teacher_dir, tmp_path, capsys):
    from tests.helpers import semi_args

    capsys.readouterr()
    assert run_cli("distill", *semi_args(tiny_data, tiny_data / "test", 1), "--teacher", "resnet10t",
                   "--teacher-weights", teacher_dir, "--loss", "feature", "--preset", "none", "--output", tmp_path,
                   "--name", "fu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unlabeled" in err[0]
