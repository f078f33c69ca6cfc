"""Cache format 3: what a top-K record keeps (mean, std and label beside the top K), what is exact
when it is densified, and that every approximation stays inside the bounds docs/cache.md states.
The truth is the teacher's full (C,) log-probability vector; bounds and references are written out
here in float64 from the docs' formulas, not taken from kdkit."""

from __future__ import annotations

import json

import pytest
import torch

from kdkit.cache import LogitCache, decode_record, encode_record, record_bytes
from kdkit.cache.writer import write_cache
from kdkit.config import load_recipe
from kdkit.engine.build import build_run
from kdkit.engine.caching import cache_teacher
from kdkit.engine.step import make_batch
from kdkit.losses import dist_loss, mlkd_terms, soft_kd, z_score
from kdkit.losses.dkd import dkd_terms
from kdkit.registry import KdkitError
from kdkit.sources import CachedLogits
from tests.helpers import AUG, IdImages, id_teacher, parse_value, run_cli, teacher_like, write_id_cache


def outside_top(logp: torch.Tensor, k: int, seed: int = 1) -> torch.Tensor:
    """(n,) a label class for every row chosen outside its top k."""
    g = torch.Generator().manual_seed(seed)
    top = logp.topk(k).indices
    labels = torch.randint(logp.shape[1], (logp.shape[0],), generator=g)
    for i in range(len(labels)):
        while labels[i] in top[i]:
            labels[i] = (labels[i] + 1) % logp.shape[1]
    return labels


def stored_mask(rec: dict, labels: torch.Tensor | None, c: int) -> torch.Tensor:
    mask = torch.zeros(rec["indices"].shape[0], c, dtype=torch.bool).scatter_(1, rec["indices"].long(), True)
    if labels is not None:
        mask[torch.arange(len(labels)), labels] = True
    return mask


def tempered(x: torch.Tensor, tau: float) -> torch.Tensor:
    x = x.double() / tau
    return x - torch.logsumexp(x, dim=1, keepdim=True)


def test_a_top10_of_1000_record_is_46_bytes_and_the_shard_holds_them(tmp_path):
    rec = encode_record(teacher_like(64, 1000), 10, torch.float16, torch.arange(64))
    per_record = sum(t[0].numel() * t.element_size() for t in rec.values())
    # 10 float16 log-probabilities, 10 int16 classes, mean, std, label: 20 + 20 + 6
    assert per_record == record_bytes(10, 1000, "float16") == 46 <= 48
    assert record_bytes(10, 1000, "float32") == 10 * 6 + 12 and record_bytes(1000, 1000, "float16") == 2002


def test_stored_classes_are_exact_and_the_mass_tail_keeps_tau1(tmp_path):
    z = teacher_like(32, 1000)
    logp = z.log_softmax(1)
    labels = outside_top(logp, 10)
    rec = encode_record(z, 10, torch.float32, labels)
    d = decode_record(rec, 1000, labels)
    mask = stored_mask(rec, labels, 1000)
    assert torch.equal(d[mask], logp[mask])  # top 10 and the label: the teacher's own values
    assert torch.equal(d.argmax(1), logp.argmax(1))
    # tau = 1: the tail's total probability is the teacher's; every tail class gets its mean
    tail_true = torch.where(mask, 0.0, logp.double().exp()).sum(1)
    tail_d = torch.where(mask, 0.0, d.double().exp()).sum(1)
    torch.testing.assert_close(tail_d, tail_true, rtol=1e-5, atol=1e-9)
    # the KD gradient at tau = 1 is exact on every stored class, and in its sum over the tail
    student = torch.randn(32, 1000, dtype=torch.float64, requires_grad=True)
    grads = [torch.autograd.grad(soft_kd(student, t.double(), 1.0), student)[0] for t in (logp, d)]
    # (to float32's rounding of the tail's mass: the records are float32)
    torch.testing.assert_close(grads[1][mask], grads[0][mask], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.where(mask, 0.0, grads[1]).sum(1), torch.where(mask, 0.0, grads[0]).sum(1),
                               rtol=1e-6, atol=1e-9)
    assert (grads[1] - grads[0]).abs().max() > 1e-6  # inside the tail it is the tail's mean, not the truth


@pytest.mark.parametrize("tau", [0.5, 2.0, 4.0, 8.0])
def test_tempered_probabilities_of_stored_classes_stay_within_the_documented_bounds(tau):
    """docs/cache.md: at temperature tau every stored class's log-probability is off by one common
    delta = log(A + T) - log(A + T'), A the stored classes' tempered mass, T the true tail's, T' the
    fill's. With the mass fill and a = 1 / tau, n tail classes of total probability M, each at most
    p_K (the K-th stored probability), of mean log-probability m_t:
        tau > 1: max(M p_K^(a-1), n exp(a m_t)) <= T <= T' = n^(1-a) M^a      so delta <= 0
        tau < 1: T' <= T <= M p_K^(a-1)                                       so delta >= 0."""
    c, k = 1000, 10
    z = teacher_like(64, c, seed=3)
    logp = z.log_softmax(1)
    labels = outside_top(logp, k)
    rec = encode_record(z, k, torch.float32, labels)
    d = decode_record(rec, c, labels)
    mask = stored_mask(rec, labels, c)
    gap = (tempered(d, tau) - tempered(logp, tau)).masked_fill(~mask, torch.nan)
    delta = gap.nanmean(1)
    assert (gap.nan_to_num(0) - torch.where(mask, delta[:, None], 0)).abs().max() < 1e-9  # one delta per row
    s = logp.double().masked_fill(~mask, -torch.inf)
    a, n = 1.0 / tau, c - mask.sum(1)
    big_a = (a * s).exp().sum(1)
    big_m = 1 - s.exp().sum(1)
    p_k = rec["values"][:, -1].double().exp()
    m_t = (c * rec["mean"].double() - s.nan_to_num(neginf=0).sum(1)) / n
    fill = n * (big_m / n) ** a
    if tau > 1:
        lo = torch.maximum(big_m * p_k ** (a - 1), n * (a * m_t).exp())
        low, high = (big_a + lo).log() - (big_a + fill).log(), torch.zeros_like(delta)
    else:
        low, high = torch.zeros_like(delta), (big_a + big_m * p_k ** (a - 1)).log() - (big_a + fill).log()
    assert (delta >= low - 1e-6).all() and (delta <= high + 1e-6).all()  # float32 records
    assert delta.abs().max() > 1e-4  # the approximation exists away from tau = 1
    # the ratios between stored classes are exact at every tau (the logits' differences are stored)
    top = rec["indices"].long()
    torch.testing.assert_close(tempered(d, tau).gather(1, top).diff(dim=1), tempered(logp, tau).gather(1, top).diff(
        dim=1), rtol=0, atol=1e-9)


def test_the_stored_label_makes_dkd_target_term_exact_at_tau1():
    z = teacher_like(48, 100, seed=5)
    logp = z.log_softmax(1)
    labels = outside_top(logp, 5)
    rec = encode_record(z, 5, torch.float32, labels)
    student = teacher_like(48, 100, seed=6).double()
    truth = dkd_terms(student, logp.double(), labels, tau=1.0)
    with_label = dkd_terms(student, decode_record(rec, 100, labels).double(), labels, tau=1.0)
    without = dkd_terms(student, decode_record(rec, 100).double(), labels, tau=1.0)  # format 2 kept no label
    torch.testing.assert_close(with_label[0], truth[0], rtol=1e-6, atol=1e-9)  # TCKD
    assert (without[0] - truth[0]).abs().max() > 1e-3
    # NCKD needs the tail's shape: approximate (closer with the label than without)
    assert (with_label[1] - truth[1]).abs().mean() < (without[1] - truth[1]).abs().mean()


def test_the_normal_tail_keeps_mean_and_std_so_z_scores_of_stored_classes_are_exact():
    c = 1000
    z = teacher_like(40, c, seed=7)
    logp = z.log_softmax(1)
    labels = outside_top(logp, 10)
    rec = encode_record(z, 10, torch.float32, labels)
    mask = stored_mask(rec, labels, c)
    d = decode_record(rec, c, labels, tail="normal")
    assert torch.equal(d[mask], logp[mask]) and torch.equal(d.argmax(1), logp.argmax(1))
    torch.testing.assert_close(d.double().mean(1), logp.double().mean(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(d.double().std(1), logp.double().std(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(z_score(d)[mask], z_score(logp)[mask], rtol=0, atol=1e-5)
    assert (d.masked_fill(mask, -torch.inf).amax(1) < rec["values"][:, -1]).all()  # the tail stays below
    torch.testing.assert_close(decode_record(rec, c, labels, tail="normal"), d, rtol=0, atol=0)  # one record, one tail
    # the mass fill leaves the row's spread to the stored classes: its z-scores are far off
    assert (z_score(decode_record(rec, c, labels))[mask] - z_score(logp)[mask]).abs().max() > 1.0
    # float16 records: the mean of ~-20 is off by up to 2^-7; the tail's variance is not lost with it
    half = decode_record(encode_record(z, 10, torch.float16, labels), c, labels, tail="normal")
    torch.testing.assert_close(half.double().std(1), logp.double().std(1), rtol=2e-3, atol=0)


def test_a_normal_shaped_tail_is_rebuilt_exactly_up_to_the_order_of_its_classes():
    """docs/cache.md: when the teacher's tail lies at the normal quantiles of its mean and variance,
    the "normal" fill holds the same values, in another order: every tempered log-probability of
    the stored classes is then exact at any tau, and the tail's values are the teacher's multiset."""
    c, k, n = 200, 8, 24
    g = torch.Generator().manual_seed(11)
    tail = torch.special.ndtri((torch.arange(c - k, dtype=torch.float64) + 0.5) / (c - k))
    tail = (tail - tail.mean()) / tail.std(unbiased=False)
    z = torch.empty(n, c, dtype=torch.float64)
    for i in range(n):
        order = torch.randperm(c, generator=g)
        z[i, order[k:]] = 1.3 * tail
        z[i, order[:k]] = 6.0 + torch.rand(k, generator=g, dtype=torch.float64) * 4
    logp = z.float().log_softmax(1)
    rec = encode_record(z.float(), k, torch.float32)
    d = decode_record(rec, c, tail="normal")
    mask = stored_mask(rec, None, c)
    torch.testing.assert_close(d[~mask].view(n, -1).sort(1).values, logp[~mask].view(n, -1).sort(1).values,
                               rtol=0, atol=2e-4)
    for tau in (0.5, 1.0, 2.0, 4.0, 8.0):
        torch.testing.assert_close(tempered(d, tau)[mask], tempered(logp, tau)[mask], rtol=0, atol=1e-4)
    # and no class is favoured: over many records each class's average place in the tail order is the middle
    many = decode_record(encode_record(teacher_like(3000, 50, seed=12), 5, torch.float32), 50, tail="normal")
    top = many.topk(5).indices
    ranks = many.scatter(1, top, torch.nan).argsort(1).argsort(1).double().scatter(1, top, torch.nan)
    assert (ranks.nanmean(0) - 22.0).abs().max() < 1.5  # 0..44 in the tail: mean 22, sd of a mean ~0.24


def test_dist_and_mlkd_run_on_densified_records_and_converge_with_k():
    """Batch-relational losses read the densified rows like any logits; their gradient's error (the
    tail's shape, at tau 4 here) shrinks as K grows and vanishes at K = C."""
    c = 100
    z = teacher_like(32, c, seed=9)
    logp = z.log_softmax(1)
    student = teacher_like(32, c, seed=10).requires_grad_()
    labels = torch.randint(c, (32,), generator=torch.Generator().manual_seed(0))

    def grads(teacher_rows):
        dist = dist_loss(student, teacher_rows, tau=4.0)
        mlkd = sum(mlkd_terms(student, teacher_rows))
        assert torch.isfinite(dist) and torch.isfinite(mlkd)
        return [torch.autograd.grad(x, student)[0] for x in (dist, mlkd)]

    full = grads(logp)
    errors = []
    for k in (5, 20, 60, c):
        got = grads(decode_record(encode_record(z, k, torch.float32, labels), c, labels))
        errors.append([((a - b).norm() / b.norm()).item() for a, b in zip(got, full, strict=True)])
    assert errors[-1] == [0.0, 0.0]  # K = C: the records are the log-probabilities
    for loss in range(2):
        assert errors[0][loss] > errors[1][loss] > errors[2][loss] > 0


def test_a_format2_cache_is_refused_with_the_command_that_rewrites_it(tmp_path, capsys):
    root = write_id_cache(tmp_path / "c", n=40, epochs=1, topk=4, dtype="float16")
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format": "kdkit-logits/2"}))
    with pytest.raises(KdkitError) as e:
        LogitCache(root)
    msg = str(e.value)
    assert "'kdkit-logits/2'" in msg and "--overwrite" in msg and f"--out {root}" in msg and "\n" not in msg
    capsys.readouterr()
    assert run_cli("cache", "--verify", root) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err
    # the writer: refused without --overwrite, rewritten with it
    with pytest.raises(KdkitError, match="format: cache 'kdkit-logits/2', run 'kdkit-logits/3'.*--overwrite"):
        write_cache(id_teacher, IdImages(40), root, manifest, batch_size=16, workers=0, progress=False)
    write_cache(id_teacher, IdImages(40), root, manifest, batch_size=16, workers=0, progress=False, overwrite=True)
    assert LogitCache(root).lookup(0, torch.arange(4)).shape == (4, 10)


def test_a_replay_cache_under_mixup_places_each_views_label_and_verify_checks_the_stats(tmp_path, tiny_data,
                                                                                          teacher_dir, capsys):
    """Writer and reader agree on every view's label class (Mixup/CutMix's larger weight): the
    cached rows equal the live teacher's on the top 3 and on the label, batch after batch."""
    aug = {a.split("=")[0].split(".")[1]: parse_value(a.split("=")[1]) for a in AUG}
    r = load_recipe(None, {"model": {"student": "deit_tiny", "teacher": "resnet10t", "teacher_weights": str(teacher_dir),
                                     "img_size": 32, "patch_size": 8,
                                     "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}},
                           "data": {"path": str(tiny_data), "workers": 0, "batch_size": 16},
                           "optim": {"epochs": 1}, "run": {"seed": 3, "progress": False}, "aug": aug,
                           "loss": {"kind": "soft", "args": {"standardize": True}}})
    cache_teacher(r, tmp_path / "c", topk=3, dtype="float32", shard_size=64)
    parts = build_run(r, "distill")
    cached = CachedLogits(tmp_path / "c", tail="normal")
    placed = 0
    for raw in parts.train_loader:
        batch = make_batch(raw, torch.device("cpu"))
        live, got = parts.logits(batch).log_softmax(1), cached(batch)
        assert batch.target.ndim == 2  # Mixup/CutMix rows
        top = live.topk(3).indices
        torch.testing.assert_close(got.gather(1, top), live.gather(1, top), rtol=0, atol=1e-5)
        label = batch.target.argmax(1)
        torch.testing.assert_close(got.gather(1, label[:, None]), live.gather(1, label[:, None]), rtol=0, atol=1e-5)
        torch.testing.assert_close(got.std(1), live.std(1), rtol=1e-4, atol=0)
        placed += int((~(top == label[:, None]).any(1)).sum())
    assert placed > 0  # some labels were outside the top 3 and came from the label slot
    # a run whose loss standardises reads the normal fill by itself
    with_cache = load_recipe(None, {**r.to_dict(), "model": {**r.to_dict()["model"], "teacher": "",
                                                                "teacher_weights": "",
                                                                "logit_cache": str(tmp_path / "c")}})
    assert build_run(with_cache, "distill").logits.tail == "normal"
    # and through the command line, DKD on standardised logits from the top-3 cache
    assert run_cli("distill", "--logit-cache", tmp_path / "c", "--student", "deit_tiny", "--img-size", "32", "--patch-size",
                   "8", "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--data", tiny_data, "--preset",
                   "none", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--seed", "3", "--no-progress",
                   *(x for a in AUG for x in ("--set", a)), "--loss", "dkd", "--set", "loss.args={standardize=true}",
                   "--output", tmp_path / "runs", "--name", "dkd") == 0
    summary = json.loads((tmp_path / "runs" / "dkd" / "summary.json").read_text())
    assert summary["logits"]["topk"] == 3 and summary["logits"]["tail"] == "normal"
    capsys.readouterr()
    assert run_cli("cache", "--verify", tmp_path / "c", "--teacher", "resnet10t", "--teacher-weights", teacher_dir,
                   "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["rechecked"] == 64 and report["max_abs_diff"] < 1e-4
