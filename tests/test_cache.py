"""The logit cache: exact replay of augmented views, top-K records, resume, refusal, verification."""

from __future__ import annotations

import json

import pytest
import torch

from kdkit.cache import LogitCache, decode_record, encode_record, record_bytes
from kdkit.config import load_recipe
from kdkit.engine.caching import cache_teacher
from tests.helpers import AUG, common, distill, parse_value, run_cli, teacher_args


@pytest.fixture(scope="module")
def live_runs(tmp_path_factory, tiny_data, teacher_dir) -> dict:
    """Online-teacher runs (soft and hard) that the cached runs must reproduce: 8 epochs x 7 steps."""
    tmp = tmp_path_factory.mktemp("live")
    return {loss: distill(tmp, loss, *common(tiny_data), *teacher_args(teacher_dir), "--loss", loss, "--tau", "2")
            for loss in ("soft", "hard")}


def test_replay_cache_float32_all_classes_gives_the_online_losses(tmp_path, tiny_data, teacher_dir, live_runs):
    assert run_cli("cache", *common(tiny_data), *teacher_args(tmp_path / "nope"), "--out", tmp_path / "c") == 2
    assert run_cli("cache", *common(tiny_data), *teacher_args(teacher_dir), "--dtype", "float32",
                   "--out", tmp_path / "c") == 0
    cached = distill(tmp_path, "cached", *common(tiny_data), "--logit-cache", tmp_path / "c", "--loss", "soft",
                     "--tau", "2")
    live = live_runs["soft"]
    assert len(cached) == len(live) >= 50
    for a, b in zip(live, cached, strict=True):
        for term in ("loss", "task", "kd"):
            assert abs(a[term] - b[term]) <= 1e-5, (a["step"], term, a[term], b[term])
    summary = json.loads((tmp_path / "runs" / "cached" / "summary.json").read_text())
    assert "teacher_check" not in summary and summary["logits"]["mode"] == "replay"


def test_float16_top10_hard_losses_identical_soft_within_fp16_rounding(tmp_path, tiny_data, teacher_dir, live_runs):
    assert run_cli("cache", *common(tiny_data), *teacher_args(teacher_dir), "--topk", "10", "--out",
                   tmp_path / "c") == 0
    hard = distill(tmp_path, "hard", *common(tiny_data), "--logit-cache", tmp_path / "c", "--loss", "hard")
    assert [r["loss"] for r in hard] == [r["loss"] for r in live_runs["hard"]]
    soft = distill(tmp_path, "soft", *common(tiny_data), "--logit-cache", tmp_path / "c", "--loss", "soft", "--tau", "2")
    # float16 keeps 11 significant bits: each stored log-probability is off by at most 2^-11 of
    # itself (4.9e-4 relative); the soft term moves by at most about that fraction of itself.
    for a, b in zip(live_runs["soft"], soft, strict=True):
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-3, abs=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-5)


def test_top_k_records_rebuild_a_distribution_with_the_exact_top1():
    torch.manual_seed(0)
    logits = torch.randn(64, 100) * 3
    logits[0, 7] = logits[0, 3] = 9.0  # a tie: the stored top-1 must win after decoding
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        rec = encode_record(logits, 10, dtype)
        assert rec["values"].shape == (64, 10) and rec["indices"].dtype == torch.uint8
        full = decode_record(rec, 100)
        p = logits.log_softmax(1)
        assert torch.allclose(full.exp().sum(1), torch.ones(64), atol=1e-2)
        top = p.topk(10)
        assert torch.equal(full.argmax(1), rec["indices"][:, 0].long())
        assert torch.equal(full.argmax(1), torch.where(torch.arange(64) == 0, rec["indices"][:, 0].long(),
                                                       p.argmax(1)))
        tol = {torch.float16: 1e-2, torch.bfloat16: 8e-2, torch.float32: 1e-6}[dtype]
        assert (full.gather(1, top.indices) - top.values).abs().max() <= tol
        # the rest of the mass is spread evenly over the 90 other classes
        stored = rec["values"].float()
        rest = ((1 - stored.exp().sum(1)) / 90).clamp_min(1e-12 / 90)
        others = torch.ones_like(full, dtype=torch.bool).scatter_(1, rec["indices"].long(), False)
        assert torch.allclose(full[others].view(64, 90).exp(), rest[:, None].expand(64, 90), rtol=1e-4)
        if dtype == torch.float32:
            exact = (1 - top.values.exp().sum(1)) / 90
            assert torch.allclose(rest, exact, rtol=1e-3)
    # format 3: a top-K record also keeps the mean, std and label of its C log-probabilities (3 x 2 bytes)
    assert record_bytes(10, 10, "float16") == 21 and record_bytes(10, 1000, "float16") == 46


def test_interrupted_cache_resumes_and_equals_an_uninterrupted_one(tmp_path, tiny_data, teacher_dir, monkeypatch):
    args = [*common(tiny_data, epochs=2), *teacher_args(teacher_dir), "--shard-size", "32"]
    assert run_cli("cache", *args, "--out", tmp_path / "whole") == 0
    from kdkit.cache import store

    real, calls = store.LogitStore.write, []

    def crash_on_third(self, epoch, shard, record):
        calls.append((epoch, shard))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third shard is written
        real(self, epoch, shard, record)

    monkeypatch.setattr(store.LogitStore, "write", crash_on_third)
    assert run_cli("cache", *args, "--out", tmp_path / "cut") == 130
    monkeypatch.setattr(store.LogitStore, "write", real)
    assert len(list((tmp_path / "cut" / "shards").glob("*.safetensors"))) == 2
    r = load_recipe(None, {"model": {"teacher": "resnet10t", "teacher_weights": str(teacher_dir), "img_size": 32,
                                     "patch_size": 8, "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}},
                           "data": {"path": str(tiny_data), "workers": 0, "batch_size": 16},
                           "optim": {"epochs": 2}, "run": {"seed": 3, "progress": False},
                           "aug": {k.split(".")[1]: parse_value(v) for k, v in (a.split("=") for a in AUG)}})
    stats = cache_teacher(r, tmp_path / "cut", shard_size=32)
    assert stats["shards_present"] == 2 and stats["shards_written"] == 6
    whole, cut = LogitCache(tmp_path / "whole"), LogitCache(tmp_path / "cut")
    for epoch, shard in whole.store.all_shards():
        a, b = whole.store.read(epoch, shard), cut.store.read(epoch, shard, check=True)
        assert all(torch.equal(a[k], b[k]) for k in a)




def test_what_a_killed_writer_leaves_is_removed_and_the_cache_completed(tmp_path, tiny_data, teacher_dir, capsys):
    import shutil

    from kdkit.cache.store import mmap_safetensors

    args = [*common(tiny_data, epochs=1), *teacher_args(teacher_dir), "--shard-size", "32"]
    assert run_cli("cache", *args, "--out", tmp_path / "whole") == 0
    names = sorted(p.name for p in (tmp_path / "whole" / "shards").iterdir())
    assert len(names) == 4 and sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["manifest.json", "shards"]
    # SIGKILL while shard 2 was written: two shards done, kdkit's temporary half-written, safetensors'
    # own temporary beside it, the lock file of the dead writer
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shards = cut / "shards"
    data = (shards / names[2]).read_bytes()
    for name in names[2:]:
        (shards / name).unlink()
    (shards / f".{names[2]}.k5uvl9e7.tmp").write_bytes(data[: len(data) // 2])
    (shards / ".tmpa6MquK").write_bytes(data[:100])
    (cut / ".kdkit.lock").write_text(json.dumps({"purpose": "cache writer", "pid": 999999, "host": "elsewhere"}))
    # SIGKILL at the very start: the lock and a half-written manifest, nothing else
    start = tmp_path / "start"
    start.mkdir()
    (start / ".kdkit.lock").write_text("{}")
    (start / ".manifest.json.x1y2z3.tmp").write_text('{"form')
    for out in (cut, start):
        assert run_cli("cache", *args, "--out", out) == 0
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shards"]
        assert sorted(p.name for p in (out / "shards").iterdir()) == names
        assert (out / "manifest.json").read_text() == (tmp_path / "whole" / "manifest.json").read_text()
        for name in names:
            (ta, ha), (tb, hb) = (mmap_safetensors(x / "shards" / name) for x in (tmp_path / "whole", out))
            assert ha == hb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # a folder that is not a cache keeps its hidden temporaries: they are not kdkit's
    other = tmp_path / "other"
    other.mkdir()
    (other / ".draft.tmp").write_text("mine")
    capsys.readouterr()
    assert run_cli("cache", *args, "--out", other) == 2
    assert "is not a kdkit logit cache" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == [".draft.tmp"]


def test_mismatched_cache_is_refused_naming_the_difference(tmp_path, tiny_data, teacher_dir, capsys):
    assert run_cli("cache", *common(tiny_data, epochs=2), *teacher_args(teacher_dir), "--out", tmp_path / "c") == 0
    capsys.readouterr()
    cases = {"seed": common(tiny_data, epochs=2, seed=4),
             "views.img_size": [*common(tiny_data, epochs=2), "--img-size", "16"],
             "views.reprob": [*common(tiny_data, epochs=2), "--set", "aug.reprob=0.5"],
             "holds 2 epochs": common(tiny_data, epochs=3)}
    for needle, args in cases.items():
        assert run_cli("distill", *args, "--logit-cache", tmp_path / "c", "--output", tmp_path / "runs") == 2
        assert needle in capsys.readouterr().err
    # a cache folder refuses to be resumed with other settings
    assert run_cli("cache", *common(tiny_data, epochs=2), *teacher_args(teacher_dir), "--topk", "3",
                   "--out", tmp_path / "c") == 2
    assert "topk: cache 10, run 3" in capsys.readouterr().err
    # a class folder added between cache and distill
    extra = tmp_path / "data"
    import shutil

    shutil.copytree(tiny_data, extra)
    shutil.copytree(extra / "train" / "cat", extra / "train" / "zebra")
    shutil.copytree(extra / "test" / "cat", extra / "test" / "zebra")
    args = [*common(extra, epochs=2)]
    assert run_cli("distill", *args, "--logit-cache", tmp_path / "c", "--output", tmp_path / "runs") == 2
    assert "added ['zebra']" in capsys.readouterr().err


def test_longer_run_falls_back_to_the_live_teacher_or_cycles(tmp_path, tiny_data, teacher_dir, live_runs):
    assert run_cli("cache", *common(tiny_data), *teacher_args(teacher_dir), "--dtype", "float32", "--epochs", "5",
                   "--out", tmp_path / "c") == 0
    mixed = distill(tmp_path, "mixed", *common(tiny_data), "--logit-cache", tmp_path / "c", *teacher_args(teacher_dir),
                    "--loss", "soft", "--tau", "2")
    for a, b in zip(live_runs["soft"], mixed, strict=True):  # epochs 5-7 computed live
        assert abs(a["loss"] - b["loss"]) <= 1e-5
    assert json.loads((tmp_path / "runs" / "mixed" / "summary.json").read_text())["logits"]["live_after"] == 5
    cycled = distill(tmp_path, "cycled", *common(tiny_data), "--logit-cache", tmp_path / "c", "--logit-cache-cycle",
                     "--loss", "soft", "--tau", "2")
    assert len(cycled) == len(mixed)
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 for a, b in zip(mixed[:35], cycled[:35], strict=True))


def test_verify_catches_a_corrupted_shard_and_rechecks_the_teacher(tmp_path, tiny_data, teacher_dir, capsys):
    args = [*common(tiny_data, epochs=1), *teacher_args(teacher_dir)]
    assert run_cli("cache", *args, "--out", tmp_path / "c", "--shard-size", "64") == 0
    capsys.readouterr()  # the cache's result table (stdout)
    assert run_cli("cache", *args, "--verify", tmp_path / "c", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["teacher_matches_manifest"] and report["rechecked"] == 64
    assert report["max_abs_diff"] < 2e-2 and report["top1_agreement"] == 1.0  # float16 records
    shard = tmp_path / "c" / "shards" / "e0000-s00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert run_cli("cache", "--verify", tmp_path / "c", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["corrupt"] == ["e0000-s00001.safetensors"] and not report["missing"]
