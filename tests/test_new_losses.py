"""DKD, DIST and logit standardisation against their papers' formulas, each computed by hand here
with plain Python (math, statistics) sample by sample and class by class."""

import math
import statistics

import pytest
import torch

from kdkit.losses import soft_kd, soft_kd_per_sample
from kdkit.losses.dist import dist_inter_per_sample, dist_loss, dist_terms, pearson
from kdkit.losses.dkd import dkd, dkd_per_sample, dkd_terms
from kdkit.losses.standardize import z_score
from kdkit.registry import KdkitError
from tests.helpers import dist_py, dkd_py, kl_py, pearson_py, rows, softmax_py, z_score_py

F64 = {"rtol": 1e-10, "atol": 1e-10}
F32 = {"rtol": 1e-5, "atol": 1e-5}


def logits(b, k, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g, dtype=torch.float64) * scale


@pytest.fixture
def batch():
    s, t = logits(5, 6, 0), logits(5, 6, 1)
    y = torch.tensor([0, 3, 5, 2, 3])
    return s, t, y




# ---- plain-Python references ----







def logsumexp_py(v):
    m = max(v)
    return m + math.log(sum(math.exp(x - m) for x in v))


def dkd_log_py(s, t, y, alpha, beta, tau):
    """dkd_py in logs, for logits where 1 - p_gt underflows even a Python float (exp(-1e4)):
    log(1 - p_gt) = logsumexp of the other logits - logsumexp of all; p_hat = softmax of the others."""
    out = []
    for zs, zt, gt in zip(rows(s), rows(t), y.tolist(), strict=True):
        terms = []
        for z in (zs, zt):
            z = [v / tau for v in z]
            rest = [v for j, v in enumerate(z) if j != gt]
            lse = logsumexp_py(z)
            terms.append(([z[gt] - lse, logsumexp_py(rest) - lse], softmax_py(rest)))
        (lb_s, hat_s), (lb_t, hat_t) = terms
        tckd = sum(math.exp(lt) * (lt - ls) for lt, ls in zip(lb_t, lb_s, strict=True))
        out.append(tau * tau * (alpha * tckd + beta * kl_py(hat_t, hat_s)))
    return torch.tensor(out, dtype=torch.float64)








def close(actual, expected, tol):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected, **tol)


# ---- DKD ----

@pytest.mark.parametrize("alpha,beta,tau", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.5, 2.5)])
def test_dkd_matches_formula_float64(batch, alpha, beta, tau):
    s, t, y = batch
    expected, tckd, nckd = dkd_py(s, t, y, alpha, beta, tau)
    got = dkd_per_sample(s, t, y, alpha, beta, tau)
    assert got.dtype == torch.float64 and got.shape == (5,)
    close(got, expected, F64)
    close(expected, dkd_log_py(s, t, y, alpha, beta, tau), F64)  # the two references agree
    close(dkd(s, t, y, alpha, beta, tau), expected.mean(), F64)
    got_t, got_n = dkd_terms(s, t, y, tau)
    close(got_t, tckd, F64)
    close(got_n, nckd, F64)


def test_dkd_matches_formula_float32(batch):
    s, t, y = batch[0].float(), batch[1].float(), batch[2]
    expected, _, _ = dkd_py(s, t, y, 1.0, 8.0, 4.0)  # from the float32 values, in double
    got = dkd_per_sample(s, t, y)
    assert got.dtype == torch.float32
    close(got, expected, F32)
    close(dkd(s, t, y), expected.mean(), F32)


def test_dkd_alpha_zero_is_kl_over_non_target_classes(batch):
    s, t, y = batch
    keep = [[j for j in range(6) if j != gt] for gt in y.tolist()]
    s_nt = torch.stack([s[i, keep[i]] for i in range(5)])
    t_nt = torch.stack([t[i, keep[i]] for i in range(5)])
    tau, beta = 3.0, 8.0
    # KD over the K - 1 non-target logits alone: softmax renormalises them by construction.
    expected = beta * soft_kd_per_sample(s_nt, t_nt, tau)
    close(dkd_per_sample(s, t, y, alpha=0.0, beta=beta, tau=tau), expected, F64)
    by_hand = [beta * tau * tau * kl_py(softmax_py(b, tau), softmax_py(a, tau)) for a, b in
               zip(rows(s_nt), rows(t_nt), strict=True)]
    close(dkd_per_sample(s, t, y, alpha=0.0, beta=beta, tau=tau), by_hand, F64)


def test_dkd_beta_zero_is_binary_kl(batch):
    s, t, y = batch
    tau = 2.0
    expected = []
    for zs, zt, gt in zip(rows(s), rows(t), y.tolist(), strict=True):
        ps, pt = softmax_py(zs, tau)[gt], softmax_py(zt, tau)[gt]
        expected.append(tau * tau * (pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))))
    close(dkd_per_sample(s, t, y, alpha=1.0, beta=0.0, tau=tau), expected, F64)


def test_dkd_of_identical_logits_is_zero(batch):
    s, _, y = batch
    for x in (s, s.float(), s * 40):  # *40: the gt class near all the mass in some rows
        tckd, nckd = dkd_terms(x, x.clone(), y, tau=4.0)
        assert torch.all(tckd.abs() < 1e-6) and torch.all(nckd.abs() < 1e-6)
        assert dkd(x, x.clone(), y).abs() < 1e-6


def test_dkd_finite_when_student_puts_all_mass_on_gt():
    # p_other = 4 * exp(-200): 0 in float32, so log(1 - p_gt) from probabilities would be -inf.
    s = torch.tensor([[200.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1e4, -3.0, 2.0, 1.0]], requires_grad=True)
    t = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [1.0, 3.0, 0.0, 2.5, -2.0]])
    y = torch.tensor([0, 1])
    assert (1 - torch.softmax(s.detach(), dim=1)[:, 0])[0] == 0  # the regime this test is about
    loss_rows = dkd_per_sample(s, t, y, alpha=1.0, beta=8.0, tau=1.0)
    assert torch.isfinite(loss_rows).all()
    close(loss_rows[:1], dkd_py(s.detach()[:1], t[:1], y[:1], 1.0, 8.0, 1.0)[0], F32)  # exp(-200): 1e-87
    close(loss_rows, dkd_log_py(s.detach(), t, y, 1.0, 8.0, 1.0), F32)
    loss_rows.mean().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_dkd_finite_when_teacher_puts_all_mass_on_gt():
    s = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[300.0, 0.0, 1.0, -1.0, 0.5]])
    y = torch.tensor([0])
    loss = dkd(s, t, y, tau=1.0)
    expected, _, _ = dkd_py(s.detach(), t, y, 1.0, 8.0, 1.0)
    close(loss, expected.mean(), F32)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_dkd_gradient_matches_finite_differences(batch):
    s, t, y = batch
    s = (s / 2).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: dkd_per_sample(x, t, y, 1.0, 8.0, 2.0), (s,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dkd_half_inputs_give_float32(batch, dtype):
    s, t, y = batch[0].to(dtype), batch[1].to(dtype), batch[2]
    got = dkd_per_sample(s, t, y)
    assert got.dtype == torch.float32 and dkd(s, t, y).dtype == torch.float32
    expected, _, _ = dkd_py(s, t, y, 1.0, 8.0, 4.0)  # from the rounded half values
    close(got, expected, F32)


def test_dkd_takes_the_gt_index_it_is_given(batch):
    s, t, _ = batch
    y_teacher = t.argmax(dim=1)  # what the caller passes for unlabeled samples
    expected, _, _ = dkd_py(s, t, y_teacher, 1.0, 8.0, 4.0)
    close(dkd_per_sample(s, t, y_teacher.int()), expected, F64)  # int32 indices work too


@pytest.mark.parametrize("target,match", [
    (torch.tensor([0, -1, 2, 3, 1]), "teacher's argmax"),
    (torch.tensor([0, 6, 2, 3, 1]), r"\[0, 6\)"),
    (torch.full((5, 6), 1 / 6), "argmax"),
    (torch.tensor([0, 1]), "one gt class index"),
])
def test_dkd_rejects_bad_targets(batch, target, match):
    s, t, _ = batch
    with pytest.raises(KdkitError, match=match):
        dkd(s, t, target)


def test_dkd_rejects_bad_settings(batch):
    s, t, y = batch
    with pytest.raises(KdkitError, match="tau"):
        dkd(s, t, y, tau=0.0)
    with pytest.raises(KdkitError, match="one shape"):
        dkd(s, t[:, :5], y)
    with pytest.raises(KdkitError, match="at least 2 classes"):
        dkd(s[:, :1], t[:, :1], torch.zeros(5, dtype=torch.long))


# ---- DIST ----

def test_pearson_is_the_textbook_correlation():
    x, z = logits(4, 7, 2), logits(4, 7, 3)
    expected = [statistics.correlation(a, b) for a, b in zip(rows(x), rows(z), strict=True)]
    close(pearson(x, z, eps=0.0), expected, F64)
    with_eps = [pearson_py(a, b, 1e-8) for a, b in zip(rows(x), rows(z), strict=True)]
    close(pearson(x, z), with_eps, F64)


def test_pearson_is_invariant_to_affine_maps_of_one_argument():
    x, z = logits(4, 7, 2), logits(4, 7, 3)
    a = torch.tensor([[0.5], [3.0], [10.0], [1e-2]], dtype=torch.float64)
    b = torch.tensor([[1.0], [-2.0], [0.0], [7.0]], dtype=torch.float64)
    base = pearson(x, z, eps=0.0)
    close(pearson(x, a * z + b, eps=0.0), base, F64)
    close(pearson(a * x + b, z, eps=0.0), base, F64)
    close(pearson(x, -a * z + b, eps=0.0), -base, F64)  # a negative scale flips the sign


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_dist_matches_formula_float64(tau):
    s, t = logits(6, 5, 4), logits(6, 5, 5)
    per_sample, inter, intra = dist_py(s, t, tau)
    got_inter, got_intra = dist_terms(s, t, tau)
    close(got_inter, inter, F64)
    close(got_intra, intra, F64)
    close(dist_inter_per_sample(s, t, tau), per_sample, F64)
    close(dist_loss(s, t, beta=2.0, gamma=0.5, tau=tau), tau * tau * (2.0 * inter + 0.5 * intra), F64)


def test_dist_matches_formula_float32():
    s, t = logits(6, 5, 4).float(), logits(6, 5, 5).float()
    per_sample, inter, intra = dist_py(s, t, 4.0)
    got_inter, got_intra = dist_terms(s, t, 4.0)
    assert got_inter.dtype == torch.float32
    close(got_inter, inter, F32)
    close(got_intra, intra, F32)
    close(dist_inter_per_sample(s, t, 4.0), per_sample, F32)
    close(dist_loss(s, t, tau=4.0), 16.0 * (inter + intra), F32)


def test_dist_of_identical_logits_is_zero():
    s = logits(6, 5, 4)
    inter, intra = dist_terms(s, s.clone(), eps=0.0)
    assert abs(inter) < 1e-12 and abs(intra) < 1e-12
    # with the eps, rho = ||a'||^2 / (||a'||^2 + eps): short of 1 by about eps / ||a'||^2
    inter, intra = dist_terms(s, s.clone())
    assert 0 <= inter < 1e-5 and 0 <= intra < 1e-5
    assert dist_loss(s.float(), s.float().clone(), tau=2.0) < 1e-4


def test_dist_is_invariant_to_per_sample_logit_shifts_not_to_scaling():
    s, t = logits(6, 5, 4), logits(6, 5, 5)
    shift = logits(6, 1, 6) * 10
    base = dist_loss(s, t, beta=1.0, gamma=1.0, tau=2.0)
    close(dist_loss(s + shift, t - shift, tau=2.0), base, F64)  # softmax ignores a per-row shift
    assert abs(dist_loss(3 * s, t, tau=2.0) - base) > 1e-3  # scaling logits is not affine in Y


def test_dist_constant_rows_and_single_sample():
    s, t = logits(4, 5, 7), logits(4, 5, 8)
    s[1] = 0.0  # a zero-initialised head: a constant row of Y, rho = 0/0
    per_sample = dist_inter_per_sample(s, t)
    assert torch.isfinite(per_sample).all() and per_sample[1] == 1.0
    expected, _, _ = dist_py(s, t, 1.0)
    close(per_sample, expected, F64)
    _, intra = dist_terms(s[:1], t[:1])  # one sample: every class column is constant
    assert intra == 1.0


def test_dist_gradient_matches_finite_differences():
    s, t = logits(5, 6, 9).requires_grad_(True), logits(5, 6, 10)
    assert torch.autograd.gradcheck(lambda x: dist_loss(x, t, beta=1.0, gamma=2.0, tau=2.0), (s,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dist_half_inputs_give_float32(dtype):
    s, t = logits(6, 5, 4).to(dtype), logits(6, 5, 5).to(dtype)
    inter, intra = dist_terms(s, t)
    assert inter.dtype == intra.dtype == torch.float32
    assert dist_inter_per_sample(s, t).dtype == torch.float32 and dist_loss(s, t).dtype == torch.float32
    _, e_inter, e_intra = dist_py(s, t, 1.0)
    close(inter, e_inter, F32)
    close(intra, e_intra, F32)


def test_dist_rejects_bad_settings():
    s, t = logits(4, 5, 7), logits(4, 5, 8)
    with pytest.raises(KdkitError, match="tau"):
        dist_loss(s, t, tau=-1.0)
    with pytest.raises(KdkitError, match="one shape"):
        dist_terms(s, t[:3])


# ---- logit standardisation ----

def test_z_score_matches_formula():
    x = logits(5, 7, 11, scale=5.0) + 3.0
    close(z_score(x), z_score_py(x), F64)
    got = z_score(x.float())
    assert got.dtype == torch.float32
    close(got, z_score_py(x.float()), F32)


def test_z_score_rows_have_mean_0_and_sample_std_1():
    x = logits(6, 5, 12, scale=4.0) - 7.0
    for row in rows(z_score(x)):
        assert abs(statistics.mean(row)) < 1e-12
        assert abs(statistics.stdev(row) - 1) < 1e-6  # divisor K - 1: the reference code's torch.std
        assert abs(statistics.pstdev(row) - math.sqrt(4 / 5)) < 1e-6


def test_z_score_is_invariant_to_shift_and_positive_scale():
    x = logits(4, 6, 13)
    a = torch.tensor([[0.5], [2.0], [30.0], [1.0]], dtype=torch.float64)
    b = torch.tensor([[4.0], [-1.0], [0.0], [100.0]], dtype=torch.float64)
    torch.testing.assert_close(z_score(a * x + b), z_score(x), rtol=1e-6, atol=1e-6)  # up to eps / std
    # hence KD on standardised logits ignores the student's logit range, the paper's point
    t = logits(4, 6, 14)
    base = soft_kd(z_score(x), z_score(t), tau=2.0)
    torch.testing.assert_close(soft_kd(z_score(a * x + b), z_score(t), tau=2.0), base, rtol=1e-6, atol=1e-6)


def test_z_score_constant_row_is_zeros():
    x = logits(3, 5, 15)
    x[1] = 4.0
    out = z_score(x)
    assert torch.isfinite(out).all() and torch.all(out[1] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_z_score_half_inputs_give_float32(dtype):
    x = (logits(4, 6, 16) * 20).to(dtype)
    got = z_score(x)
    assert got.dtype == torch.float32
    close(got, z_score_py(x), F32)


def test_z_score_rejects_a_single_class():
    with pytest.raises(KdkitError, match="K >= 2"):
        z_score(torch.zeros(4, 1))
