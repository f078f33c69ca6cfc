"""Losses against the paper's formulas, computed by hand with plain tensor arithmetic."""

import math

import pytest
import torch

from kdkit import KdkitError, StudentOut, create_loss
from kdkit.losses import hard_kd, soft_kd, task_ce


def softmax(z):
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def ce_by_hand(logits, q):
    """Mean over samples of -sum_k q_k log softmax(logits)_k."""
    return -(q * torch.log(softmax(logits))).sum(1).mean()


def one_hot(y, k):
    return torch.eye(k, dtype=torch.float64)[y]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    d = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    return s, d, t, y


def kl_by_hand(student, teacher, tau):
    p_t, p_s = softmax(teacher / tau), softmax(student / tau)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum()  # summed over batch and classes


def test_soft_loss_matches_formula(logits):
    s, d, t, y = logits
    tau, lam = 3.0, 0.3
    loss = create_loss("soft", task_weight=1 - lam, kd_weight=lam, tau=tau)
    terms = loss(StudentOut(s, s), t, y)
    expected = (1 - lam) * ce_by_hand(s, one_hot(y, 5)) + lam * tau**2 * kl_by_hand(s, t, tau) / 6
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-9)


def test_deit_kl_reduction_divides_by_numel(logits):
    s, _, t, _ = logits
    batchmean = soft_kd(s, t, 2.0, "batchmean")
    deit = soft_kd(s, t, 2.0, "deit")
    assert batchmean.item() == pytest.approx((4.0 * kl_by_hand(s, t, 2.0) / 6).item(), rel=1e-9)
    assert deit.item() == pytest.approx((4.0 * kl_by_hand(s, t, 2.0) / 30).item(), rel=1e-9)


def test_hard_loss_matches_formula(logits):
    s, _, t, y = logits
    terms = create_loss("hard", task_weight=0.5, kd_weight=0.5)(StudentOut(s, s), t, y)
    y_t = t.argmax(1)
    expected = 0.5 * ce_by_hand(s, one_hot(y, 5)) + 0.5 * ce_by_hand(s, one_hot(y_t, 5))
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-9)


def test_hard_label_smoothing_spreads_eps_over_other_classes(logits):
    s, _, t, _ = logits
    eps, k = 0.1, 5
    q = torch.full((6, k), eps / (k - 1), dtype=torch.float64)
    q[torch.arange(6), t.argmax(1)] = 1 - eps
    assert hard_kd(s, t, eps).item() == pytest.approx(ce_by_hand(s, q).item(), rel=1e-9)
    # not torch's convention (which puts 1 - eps + eps / K on the true class)
    torch_style = torch.nn.functional.cross_entropy(s, t.argmax(1), label_smoothing=eps)
    assert abs(torch_style.item() - hard_kd(s, t, eps).item()) > 1e-4


def test_token_loss_uses_class_head_for_labels_and_dist_head_for_teacher(logits):
    s, d, t, y = logits
    eps = 0.1
    terms = create_loss("hard", task_weight=0.5, kd_weight=0.5, label_smoothing=eps)(StudentOut(s, d), t, y)
    smooth_y = one_hot(y, 5) * (1 - eps) + eps / 5  # torch/timm label smoothing on the labels
    expected = 0.5 * ce_by_hand(s, smooth_y) + 0.5 * ce_by_hand(d, one_hot(t.argmax(1), 5))
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-9)
    assert terms["task"].item() == pytest.approx(ce_by_hand(s, smooth_y).item(), rel=1e-9)


def test_soft_targets_from_mixup_and_unlabeled_rows_are_masked(logits):
    s, _, _, y = logits
    q = one_hot(y, 5) * 0.7 + one_hot(y.roll(1), 5) * 0.3
    assert task_ce(s, q).item() == pytest.approx(ce_by_hand(s, q).item(), rel=1e-9)
    y_missing = y.clone()
    y_missing[:2] = -1
    assert task_ce(s, y_missing).item() == pytest.approx(ce_by_hand(s[2:], one_hot(y[2:], 5)).item(), rel=1e-9)
    assert task_ce(s, torch.full((6,), -1)).item() == 0.0


def test_no_distillation_trains_both_heads_on_labels(logits):
    s, d, _, y = logits
    terms = create_loss("none")(StudentOut(s, d), None, y)
    expected = (ce_by_hand(s, one_hot(y, 5)) + ce_by_hand(d, one_hot(y, 5))) / 2
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=0.0), "tau"), (dict(tau=-1.0), "tau"), (dict(kd_weight=1.5), "kd_weight"),
    (dict(task_weight=-0.1), "task_weight"), (dict(kl_reduction="mean"), "kl_reduction"),
])
def test_bad_loss_settings_are_clear_errors(kwargs, match):
    with pytest.raises(KdkitError, match=match):
        create_loss("soft", **kwargs)


def test_unknown_loss_suggests_closest():
    with pytest.raises(KdkitError, match="Did you mean 'soft'"):
        create_loss("sfot")


def test_soft_loss_gradient_is_finite_for_extreme_logits():
    s = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0]])
    loss = soft_kd(s, t, 1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()
