"""CTKD and MLKD against their authors' formulas, written out here independently (explicit exp, sums
and matrix products in float64, differentiated by autograd), and CTKD's temperature end to end:
trained, checkpointed, resumed, left out of the saved student."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kdkit.engine.checkpoint import list_checkpoints
from kdkit.losses import create_loss, curriculum_lambda, mlkd_terms
from kdkit.losses.ctkd import ADAPTER, LearnableTemperature
from kdkit.registry import KdkitError
from kdkit.types import StudentOut
from tests.helpers import kl_py, rows, run_cli, softmax_py

TOL = {"rtol": 1e-10, "atol": 1e-12}  # torch.testing.assert_close
APPROX = {"rel": 1e-10, "abs": 1e-12}  # pytest.approx


def random_logits(b, c, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=torch.float64) * scale


def probs(z, tau):
    e = torch.exp(z / tau - (z / tau).max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


# ---- CTKD: zhengli97/CTKD written out ----

def cosine_decay_ref(i, max_value=0.0, min_value=-1.0, num_loops=10):
    """train_student.py's CosineDecay.get_value, called with the 1-based epoch; the CTKD scripts set
    max 0, min -1, so the value is -lambda and multiplies the gradient of the temperature."""
    i = min(max(i, 0), num_loops)
    return (math.cos(i * math.pi / num_loops) + 1.0) * 0.5 * (max_value - min_value) + min_value


def ctkd_kd_ref(zs, zt, theta, t_start=1.0, t_end=20.0):
    """The loop's temp = t_start + t_end * sigmoid(Global_T), then DistillKL: batchmean KL * T^2."""
    temp = t_start + t_end / (1.0 + torch.exp(-theta))
    p_t, p_s = probs(zt, temp), probs(zs, temp)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=1).mean() * temp * temp


@pytest.mark.parametrize("epochs", [10, 5, 3])
def test_ctkd_lambda_is_the_reference_cosine_decay_reversed(epochs):
    for epoch in range(epochs + 3):  # kdkit's 0-based epoch is the reference loop's epoch + 1
        assert curriculum_lambda(epoch, epochs) == pytest.approx(-cosine_decay_ref(epoch + 1, num_loops=epochs),
                                                                 abs=1e-15)
    assert curriculum_lambda(epochs - 1, epochs) == 1.0 and curriculum_lambda(100, epochs) == 1.0
    assert curriculum_lambda(0, 10, lambda_max=2.0, lambda_min=0.5) == pytest.approx(
        0.5 + 1.5 * (1 - math.cos(math.pi / 10)) / 2, abs=1e-15)


@pytest.mark.parametrize("epoch", [0, 4, 20])
def test_ctkd_value_and_gradients_are_the_references_with_the_temperature_gradient_reversed(epoch):
    zs, zd, zt = random_logits(6, 7, 0), random_logits(6, 7, 1), random_logits(6, 7, 2)
    y = torch.tensor([0, 3, 6, 2, 1, 5])
    loss = create_loss("ctkd", task_weight=0.1, kd_weight=0.9, lambda_epochs=10)
    temperature = LearnableTemperature().double()
    with torch.no_grad():
        temperature.theta.fill_(0.3)
    zd = zd.requires_grad_()
    terms = loss(StudentOut(zs, zd, adapted={ADAPTER: temperature(None)}), zt, y, epoch=epoch)
    terms["loss"].backward()

    theta_ref, zd_ref = torch.tensor(0.3, dtype=torch.float64, requires_grad=True), zd.detach().clone().requires_grad_()
    kd_ref = ctkd_kd_ref(zd_ref, zt, theta_ref)
    (0.9 * kd_ref).backward()
    assert terms["kd"].item() == pytest.approx(kd_ref.item(), **APPROX)
    assert terms["tau"].item() == pytest.approx(1 + 20 / (1 + math.exp(-0.3)), **APPROX)
    torch.testing.assert_close(zd.grad, zd_ref.grad, **TOL)  # the student descends the KD loss as usual
    lam = -cosine_decay_ref(epoch + 1)
    assert 0 < lam <= 1
    # the temperature ascends it: the reference's gradient times -lambda
    assert temperature.theta.grad.item() == pytest.approx(-lam * theta_ref.grad.item(), **APPROX)
    assert theta_ref.grad.item() != 0


def test_ctkd_starts_at_the_references_temperature_and_needs_its_adapter():
    loss = create_loss("ctkd")
    (name, module), = loss.student_adapters().items()
    assert name == ADAPTER
    assert loss.temperature(module(None), 0).item() == pytest.approx(1 + 20 / (1 + math.exp(-1.0)), rel=1e-6)
    s = random_logits(2, 3, 0)
    with pytest.raises(KdkitError, match="no learnable temperature"):
        loss(StudentOut(s, s), s, torch.tensor([0, 1]), epoch=0)
    with pytest.raises(KdkitError, match="tau_range"):
        create_loss("ctkd", tau_range=0.0)


# ---- MLKD: Jin-Ying/Multi-Level-Logit-Distillation written out ----

def mlkd_ref(zs, zt, temps):
    """KD_ours.py's kd_loss, bc_loss and cc_loss, each summed over the temperatures, without the
    masks (see kdkit/losses/mlkd.py): explicit sums over samples and classes."""
    b, c = zs.shape
    inst = bat = cls = 0.0
    for t in temps:
        ps, pt = probs(zs, t), probs(zt, t)
        inst = inst + (pt * (torch.log(pt) - torch.log(ps))).sum(dim=1).mean() * t * t
        ms = torch.stack([torch.stack([(ps[i] * ps[j]).sum() for j in range(b)]) for i in range(b)])
        mt = torch.stack([torch.stack([(pt[i] * pt[j]).sum() for j in range(b)]) for i in range(b)])
        bat = bat + ((mt - ms) ** 2).sum() / b
        gs = torch.stack([torch.stack([(ps[:, k] * ps[:, m]).sum() for m in range(c)]) for k in range(c)])
        gt = torch.stack([torch.stack([(pt[:, k] * pt[:, m]).sum() for m in range(c)]) for k in range(c)])
        cls = cls + ((gt - gs) ** 2).sum() / c
    return inst, bat, cls


def test_mlkd_instance_term_is_kl_by_hand_in_plain_python():
    zs, zt = random_logits(4, 5, 3), random_logits(4, 5, 4)
    want = sum(t * t * sum(kl_py(softmax_py(b, t), softmax_py(a, t)) for a, b in zip(rows(zs), rows(zt), strict=True))
               / 4 for t in (1.0, 4.0))
    assert mlkd_terms(zs, zt, (1.0, 4.0))[0].item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("temps", [(2.0, 3.0, 4.0, 5.0, 6.0), (1.0, 2.0, 3.0, 5.0, 6.0)])
def test_mlkd_terms_and_gradients_are_the_references(temps):
    zs, zt = random_logits(6, 5, 5).requires_grad_(), random_logits(6, 5, 6)
    zr = zs.detach().clone().requires_grad_()
    got, want = mlkd_terms(zs, zt, temps), mlkd_ref(zr, zt, temps)
    for g, w in zip(got, want, strict=True):
        assert g.item() == pytest.approx(w.item(), **APPROX)
    (got[0] + 2 * got[1] + 3 * got[2]).backward()
    (want[0] + 2 * want[1] + 3 * want[2]).backward()
    torch.testing.assert_close(zs.grad, zr.grad, **TOL)


def test_mlkd_loss_weighs_the_three_levels_and_records_its_temperatures():
    zs, zd, zt = random_logits(5, 6, 7), random_logits(5, 6, 8), random_logits(5, 6, 9)
    loss = create_loss("mlkd", temperatures=[1.0, 3.0], instance_weight=0.5, batch_weight=2.0, class_weight=3.0,
                       task_weight=0.0, kd_weight=1.0)
    inst, bat, cls = mlkd_ref(zd, zt, (1.0, 3.0))
    terms = loss(StudentOut(zs, zd), zt, torch.tensor([0, 1, 2, 3, -1]))
    assert terms["kd"].item() == pytest.approx((0.5 * inst + 2 * bat + 3 * cls).item(), **APPROX)
    assert loss.conventions()["temperatures"] == [1.0, 3.0]
    with pytest.raises(KdkitError, match="temperatures"):
        create_loss("mlkd", temperatures=[0.0])


# ---- end to end ----

def test_ctkd_temperature_trains_checkpoints_and_resumes_as_the_uninterrupted_run(tiny_data, teacher_dir, tmp_path):
    """Two epochs with lambda ramping over 2: the temperature moves, is in every checkpoint (and
    not in the saved student), and a run resumed in the second epoch ends where the whole run ends."""
    from tests.helpers import FAST, TOKEN_STUDENT
    from tests.helpers import steps as records

    args = ["distill", *TOKEN_STUDENT, "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--data", tiny_data,
            "--loss", "ctkd", "--set", "loss.args={lambda_epochs=2}", *FAST, "--epochs", "2", "--lr", "1e-2",
            "--set", "run.checkpoint_every=2", "--set", "run.keep_checkpoints=3", "--output", tmp_path]
    assert run_cli(*args, "--name", "whole") == 0
    whole = tmp_path / "whole"
    steps = [x for x in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines()) if "step" in x]
    taus = [x["tau"] for x in steps]
    assert taus[0] == pytest.approx(1 + 20 / (1 + math.exp(-1.0)), rel=1e-6) and len(set(taus)) > 3
    newest = list_checkpoints(whole)[0]
    theta = load_file(newest / "model.safetensors")[f"adapters.{ADAPTER}.theta"]
    assert theta.item() != 1.0
    assert not any(ADAPTER in k for k in load_file(whole / "student" / "model.safetensors"))
    assert json.loads((whole / "student" / "config.json").read_text())["kdkit"]["conventions"]["loss"] == "ctkd"

    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for folder in list_checkpoints(resumed)[:2]:  # keep the oldest: update 10, in the second epoch
        shutil.rmtree(folder)
    shutil.rmtree(resumed / "student")
    assert run_cli("distill", "--resume", resumed, "--no-progress", "--workers", "0") == 0
    assert records(resumed) == records(whole)  # every step's loss, task, kd and tau
    a, b = (load_file(r / "student" / "model.safetensors") for r in (resumed, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctkd_with_unlabeled_images_is_refused_clearly(tiny_data, teacher_dir, tmp_path, capsys):
    from tests.helpers import semi_args

    capsys.readouterr()
    assert run_cli("distill", *semi_args(tiny_data, tiny_data / "test", 1), "--teacher", "resnet10t",
                   "--teacher-weights", teacher_dir, "--loss", "ctkd", "--preset", "none", "--output", tmp_path,
                   "--name", "cu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unlabeled" in err[0]
    assert not (tmp_path / "cu").exists()


def test_ctkd_and_mlkd_from_a_float32_cache_are_the_live_runs(tiny_data, teacher_dir, tmp_path):
    """Both are logit losses: read from a replay cache of all classes (float32) they train as from the
    live teacher, step by step, the learnt temperature included (Mixup on: MLKD's batch and class
    relations see the mixed views the cache replays)."""
    from tests.helpers import common, distill, teacher_args

    args = common(tiny_data, epochs=1)
    assert run_cli("cache", *args, *teacher_args(teacher_dir), "--dtype", "float32", "--out", tmp_path / "c") == 0
    for loss, extra, terms in (("ctkd", "{lambda_epochs=1}", ("loss", "task", "kd", "tau")),
                               ("mlkd", "{temperatures=[1.0, 4.0]}", ("loss", "task", "kd"))):
        setting = ["--loss", loss, "--set", f"loss.args={extra}"]
        live = distill(tmp_path, f"{loss}-live", *args, *teacher_args(teacher_dir), *setting)
        cached = distill(tmp_path, f"{loss}-cached", *args, "--logit-cache", tmp_path / "c", *setting)
        assert len(live) == len(cached) == 7
        for a, b in zip(live, cached, strict=True):
            for term in terms:
                assert abs(a[term] - b[term]) <= 1e-5, (loss, a["step"], term, a[term], b[term])


def test_ctkd_temperature_under_two_processes_is_the_one_process_run(tmp_path, tiny_data, teacher_dir):
    """The temperature lives in the head, so data parallelism syncs it: two processes learn the
    temperature one process learns (the all-reduce order aside)."""
    from tests.helpers import TOKEN_STUDENT, run_kdkit, step_terms

    args = [*TOKEN_STUDENT, "--data", tiny_data, "--batch-size", "16", "--epochs", "1", "--workers", "0", "--seed", "5",
            "--no-progress", "--set", "run.log_every=1", "--set", "optim.warmup_epochs=0", "--set", "optim.lr=1e-2",
            "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--preset", "none", "--loss", "ctkd",
            "--set", "loss.args={lambda_epochs=1}"]
    for n in (1, 2):
        run_kdkit(n, "distill", *args, "--output", tmp_path, "--name", f"p{n}")
    one, two = step_terms(tmp_path / "p1"), step_terms(tmp_path / "p2")
    assert len(one) == len(two) == 7 and len({r["tau"] for r in one}) == 7
    for a, b in zip(one, two, strict=True):
        for term in ("loss", "kd", "tau"):  # float32 sums in another order: 1e-5 of the value
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-6), (a["step"], term)


def test_mlkd_with_unlabeled_samples_relates_the_samples_that_count():
    """Under the semi-supervised wrapper MLKD's batch and class relations run over the labeled and
    kept unlabeled samples, as DIST's do: here every sample counts, so it is MLKD of the whole batch."""
    from kdkit.losses import semi_supervised

    zs, zd, zt = random_logits(6, 5, 10), random_logits(6, 5, 11), random_logits(6, 5, 12)
    loss = semi_supervised(create_loss("mlkd", temperatures=[2.0], task_weight=0.0, kd_weight=1.0))
    terms = loss(StudentOut(zs, zd), zt, torch.tensor([0, -1, 2, -1, 4, 1]))
    assert terms["kd"].item() == pytest.approx(sum(mlkd_ref(zd, zt, (2.0,))).item(), **APPROX)
    assert terms["unlabeled_kept"].item() == 1.0


def test_mlkd_with_soft_pseudo_labels_weighs_its_labeled_value_by_the_labeled_count():
    from kdkit.losses import semi_supervised

    zs, zd, zt = random_logits(6, 5, 10), random_logits(6, 5, 11), random_logits(6, 5, 12)
    base = create_loss("mlkd", temperatures=[2.0], task_weight=0.0, kd_weight=1.0)
    loss = semi_supervised(base, "soft", tau=2.0, task_weight=0.0, kd_weight=1.0)
    terms = loss(StudentOut(zs, zd), zt, torch.tensor([0, -1, 2, -1, 4, 1]))
    lab, unl = [0, 2, 4, 5], [1, 3]
    mlkd_l = sum(mlkd_ref(zd[lab], zt[lab], (2.0,))).item()
    soft_u = [4.0 * kl_py(softmax_py(rows(zt)[j], 2.0), softmax_py(rows(zd)[j], 2.0)) for j in unl]
    assert terms["kd"].item() == pytest.approx((4 * mlkd_l + sum(soft_u)) / 6, **APPROX)
    assert terms["kd_labeled"].item() == pytest.approx(mlkd_l, **APPROX)
