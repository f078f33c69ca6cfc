"""Cache integrity at read time (checksums, index ranges, missing shards) and one writer at a time
(kdkit.files.exclusive_lock): a second writer refused naming the first, a killed holder's lock
recovered, the lock released after an exception."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
import torch

from kdkit.cache import LogitCache
from kdkit.cache import store as store_module
from kdkit.data.sampler import epoch_views
from kdkit.files import LOCK_NAME, exclusive_lock
from kdkit.registry import KdkitError
from kdkit.sources import CachedLogits
from tests.helpers import common, logits_of, run_cli, teacher_args, write_id_cache

HOST = socket.gethostname()








def expected(views: torch.Tensor, epoch: int) -> torch.Tensor:
    return logits_of(views.float(), torch.full((len(views),), float(epoch))).log_softmax(1)




def tensor_offset(path: Path, name: str) -> tuple[int, int]:
    """Byte range of tensor `name` in a safetensors file (read from its header here, not by kdkit)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        lo, hi = json.loads(f.read(size))[name]["data_offsets"]
    return 8 + size + lo, 8 + size + hi


def poke(path: Path, at: int, value: int | None = None) -> None:
    """Flip every bit of byte `at` (or set it to `value`)."""
    data = bytearray(path.read_bytes())
    data[at] = data[at] ^ 0xFF if value is None else value
    path.write_bytes(bytes(data))


# ---- A. integrity at read time -------------------------------------------------------------------


@pytest.mark.parametrize("repeats,topk,dtype", [(1, 0, "float32"), (2, 0, "float32"), (1, 4, "float16")])
def test_an_intact_cache_reads_exactly_what_the_writer_was_given(tmp_path, repeats, topk, dtype):
    root = write_id_cache(tmp_path / "c", repeats=repeats, topk=topk, dtype=dtype)
    checked, unchecked = LogitCache(root), LogitCache(root, check_shards=False)
    for epoch in range(2):
        for views in epoch_views(70, 5, epoch, repeats).split(16):  # the training sampler's order
            got, want = checked.lookup(epoch, views), expected(views, epoch)
            assert torch.equal(got, unchecked.lookup(epoch, views))
            if topk == 0:
                assert torch.equal(got, want)
            else:  # top-4 in float16: the stored classes and their rounded values, exactly
                top = want.topk(topk)
                assert torch.equal(got.argmax(1), top.indices[:, 0])
                assert torch.equal(got.gather(1, top.indices), top.values.half().float())
    assert checked.store._checked == set(checked.store.all_shards())  # every shard was hashed once


def test_a_flipped_byte_in_a_shards_values_fails_the_first_lookup_that_touches_it(tmp_path, capsys):
    root = write_id_cache(tmp_path / "c", n=100, epochs=1, dtype="float16")  # shards of 32, 32, 32, 4 records
    shard = root / "shards" / "e0000-s00001.safetensors"
    lo, hi = tensor_offset(shard, "values")
    poke(shard, (lo + hi) // 2 + 1)  # the high byte of a float16 in the middle of the values
    cache = LogitCache(root)  # every shard is there: opening is fine
    first = torch.arange(0, 32)
    assert torch.equal(cache.lookup(0, first), expected(first, 0).half().float())  # shard 0 is intact
    with pytest.raises(KdkitError) as e:
        cache.lookup(0, torch.tensor([3, 40, 97]))
    msg = str(e.value)
    assert "e0000-s00001.safetensors" in msg and "checksum" in msg and f"kdkit cache --verify {root}" in msg
    # without the check the flip is a silently wrong teacher output (exactly one value differs)
    second = torch.arange(32, 64)
    raw = LogitCache(root, check_shards=False).lookup(0, second)
    assert (raw != expected(second, 0).half().float()).sum().item() >= 1
    # `kdkit cache --verify`, which the message suggests, names the same shard
    capsys.readouterr()
    assert run_cli("cache", "--verify", root, "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["corrupt"] == ["e0000-s00001.safetensors"] and not report["missing"]


def test_a_flipped_class_index_is_a_clear_error_not_an_index_error(tmp_path):
    root = write_id_cache(tmp_path / "c", n=100, epochs=1, dtype="float16")
    shard = root / "shards" / "e0000-s00002.safetensors"
    lo, _ = tensor_offset(shard, "top1")
    poke(shard, lo + 5, 0xFF)  # record 69's top-1 class: 255 of 10
    with pytest.raises(IndexError):  # what a run died of before the check (issue 15)
        LogitCache(root, check_shards=False).lookup(0, torch.tensor([69]))
    with pytest.raises(KdkitError, match="e0000-s00002.safetensors is corrupt"):
        LogitCache(root).lookup(0, torch.tensor([69]))


def test_a_shard_of_the_wrong_layout_is_refused(tmp_path):
    root = write_id_cache(tmp_path / "c", n=100, epochs=1, dtype="float16")
    shards = root / "shards"
    # a shard of another position (same size: its checksum is fine) copied over this one
    shutil.copy(shards / "e0000-s00000.safetensors", shards / "e0000-s00001.safetensors")
    with pytest.raises(KdkitError, match="metadata says epoch 0, shard 0"):
        LogitCache(root).lookup(0, torch.tensor([33]))
    shutil.copy(shards / "e0000-s00000.safetensors", shards / "e0000-s00003.safetensors")  # the last has 4
    with pytest.raises(KdkitError, match=r"values is torch.float16 \(32, 10\), expected torch.float16 \(4, 10\)"):
        LogitCache(root).lookup(0, torch.tensor([99]))


@pytest.mark.parametrize("key, value", [("dtype", "float32"), ("topk", 4)])
def test_an_edited_manifest_is_named_not_reported_as_corrupt_shards(key, value, tmp_path, capsys):
    root = write_id_cache(tmp_path / "c", n=100, epochs=1, dtype="float16")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest[key] = value
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdkitError) as e:
        LogitCache(root).lookup(0, torch.tensor([3]))
    msg = str(e.value)
    assert "manifest.json was edited" in msg and "e0000-s00000.safetensors" in msg and "corrupt" not in msg
    capsys.readouterr()
    assert run_cli("cache", "--verify", root, "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["not_in_manifest"] and not report["corrupt"] and report["ok"] is False


def test_an_epoch_or_view_outside_the_cache_is_a_clear_error(tmp_path):
    cache = LogitCache(write_id_cache(tmp_path / "plain", n=70, epochs=2))
    for epoch, views, needle in ((2, [0], "holds epochs 0-1, not epoch 2"), (-1, [0], "not epoch -1"),
                                 (0, [5, 70], "view id 70 is outside"), (1, [-3], "view id -3 is negative")):
        with pytest.raises(KdkitError, match=needle):
            cache.lookup(epoch, torch.tensor(views))
    with pytest.raises(KdkitError, match="record 70 is outside"):
        cache.store.rows(0, torch.tensor([1, 70]))
    with pytest.raises(KdkitError, match="not epoch 5"):
        cache.store.rows(5, torch.tensor([1]))
    drawn = LogitCache(write_id_cache(tmp_path / "drawn", n=70, epochs=1, repeats=2))
    stored = drawn.views_of_epoch(0)
    absent = sorted(set(range(140)) - set(stored.tolist()))[0]
    for view in (absent, 10_000):
        with pytest.raises(KdkitError, match=f"view id {view} is not among the cache's views of epoch 0"):
            drawn.lookup(0, torch.tensor([int(stored[0]), view]))
    fixed = LogitCache(write_id_cache(tmp_path / "fixed", n=70, mode="fixed"))
    assert torch.equal(fixed.lookup(7, torch.tensor([75])), expected(torch.tensor([5]), 0))  # repeat 1 of image 5
    with pytest.raises(KdkitError, match="negative"):
        fixed.lookup(0, torch.tensor([-1]))


def test_a_missing_shard_is_refused_when_the_cache_is_opened(tmp_path):
    root = write_id_cache(tmp_path / "c", n=70, epochs=2)  # 3 shards an epoch
    (root / "shards" / "e0001-s00002.safetensors").unlink()
    for open_it in (LogitCache, CachedLogits):
        with pytest.raises(KdkitError) as e:
            open_it(str(root))
        assert "1 of 6 shards missing (e0001-s00002.safetensors)" in str(e.value)
        assert "rerun the same `kdkit cache`" in str(e.value)
    partial = LogitCache(root, partial=True)  # the writer's view of a cache it is resuming
    assert torch.equal(partial.lookup(1, torch.tensor([0, 63])), expected(torch.tensor([0, 63]), 1))


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory, tiny_data, teacher_dir) -> Path:
    """`kdkit cache` of the tiny data: 1 epoch of 120 records in 2 shards."""
    root = tmp_path_factory.mktemp("real") / "c"
    assert run_cli("cache", *common(tiny_data, epochs=1), *teacher_args(teacher_dir), "--shard-size", "64",
                   "--out", root) == 0
    return root


def test_distill_from_a_damaged_cache_fails_with_one_clear_line(tmp_path, tiny_data, real_cache, capsys):
    missing, flipped = tmp_path / "missing", tmp_path / "flipped"
    shutil.copytree(real_cache, missing)
    shutil.copytree(real_cache, flipped)
    (missing / "shards" / "e0000-s00001.safetensors").unlink()
    shard = flipped / "shards" / "e0000-s00001.safetensors"
    poke(shard, tensor_offset(shard, "top1")[0] + 3, 0xFF)
    args = [*common(tiny_data, epochs=1), "--output", tmp_path / "runs", "--loss", "soft"]
    capsys.readouterr()
    assert run_cli("distill", *args, "--logit-cache", missing, "--name", "m") == 2
    err = capsys.readouterr().err
    assert "incomplete: 1 of 2 shards missing (e0000-s00001.safetensors)" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "m").exists()  # refused before anything was written
    assert run_cli("distill", *args, "--logit-cache", flipped, "--name", "f") == 2
    err = capsys.readouterr().err
    assert "e0000-s00001.safetensors is corrupt" in err and "kdkit cache --verify" in err
    assert "IndexError" not in err and "Traceback" not in err


# ---- B. one writer at a time ----------------------------------------------------------------------


def _hold(folder: str, purpose: str, ready) -> None:
    with exclusive_lock(folder, purpose):
        ready.set()
        time.sleep(600)


def hold(folder: Path, purpose: str) -> multiprocessing.Process:
    """Another process holding the lock of `folder` until it is killed."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_hold, args=(str(folder), purpose, ready), daemon=True)
    p.start()
    assert ready.wait(60)
    return p


def kill(p: multiprocessing.Process) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL


def test_a_lock_is_refused_naming_its_holder_and_recovered_after_a_sigkill(tmp_path, capsys):
    folder = tmp_path / "c"
    p = hold(folder, "cache writer")
    try:
        with pytest.raises(KdkitError) as e, exclusive_lock(folder, "cache writer"):
            pass
        msg = str(e.value)
        assert f"{folder} is in use by a kdkit cache writer (pid {p.pid} on {HOST}, started " in msg
        assert "wait for it to finish" in msg
        left = json.loads((folder / LOCK_NAME).read_text())
        assert left["pid"] == p.pid and left["host"] == HOST
    finally:
        kill(p)
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == p.pid  # a killed holder leaves its file
    capsys.readouterr()
    with exclusive_lock(folder, "run") as lock:
        mine = json.loads(lock.read_text())
        assert mine["pid"] == os.getpid() and mine["purpose"] == "run"
    assert f"taking over the lock of {folder} left by a kdkit cache writer (pid {p.pid}" in capsys.readouterr().err
    assert not (folder / LOCK_NAME).exists()


def test_the_lock_is_released_after_an_exception_and_excludes_this_process_too(tmp_path):
    folder = tmp_path / "new"
    with pytest.raises(ValueError), exclusive_lock(folder, "run"):
        assert (folder / LOCK_NAME).is_file()
        with pytest.raises(KdkitError, match=f"pid {os.getpid()}"), exclusive_lock(folder, "run"):
            pass  # a second holder in the same process is refused as well
        raise ValueError
    assert not folder.exists()  # it made the folder, nothing was written in it: nothing left behind
    kept = tmp_path / "kept"
    with pytest.raises(ValueError), exclusive_lock(kept, "run"):
        (kept / "recipe.toml").write_text("")
        raise ValueError
    assert sorted(p.name for p in kept.iterdir()) == ["recipe.toml"]
    p = hold(kept, "run")  # another process takes it at once
    kill(p)


def test_a_lock_file_left_by_another_host_is_taken_over_with_a_warning(tmp_path, capsys):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"purpose": "run", "pid": 1, "host": "elsewhere",
                                                "started": "2025-01-01 00:00:00 +0000"}))
    with exclusive_lock(folder, "run"):
        pass
    err = capsys.readouterr().err
    assert "warning" in err and "pid 1 on elsewhere" in err and "make sure nothing runs there" in err


def _contend(folder: str, start, out) -> None:
    taken = clashes = refused = 0
    start.wait()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        try:
            with exclusive_lock(folder, "run"):
                try:
                    fd = os.open(os.path.join(folder, "inside"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    clashes += 1
                    continue
                os.close(fd)
                taken += 1
                time.sleep(0.0005)
                os.unlink(os.path.join(folder, "inside"))
        except KdkitError:
            refused += 1
        time.sleep(0.0002)
    out.put((taken, clashes, refused))


def test_two_processes_contending_for_a_lock_are_never_inside_together(tmp_path):
    """Each takes and releases the lock as fast as it can for 1.5 s (the folder made and removed
    every time); inside, an O_EXCL marker file proves that no other holder is there."""
    ctx = multiprocessing.get_context("fork")
    out, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_contend, args=(str(tmp_path / "f"), start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(r[1] for r in results) == 0, results
    assert all(r[0] > 0 for r in results) and sum(r[2] for r in results) > 0, results  # they did contend


def test_a_second_cache_writer_is_refused_while_the_first_writes(tmp_path, tiny_data, teacher_dir, monkeypatch,
                                                                  capsys):
    args = [*common(tiny_data, epochs=1), *teacher_args(teacher_dir), "--shard-size", "32", "--out", tmp_path / "c"]
    real, second = store_module.LogitStore.write, []

    def write_and_start_another(self, epoch, shard, record):
        if not second:  # while the first writer is in the middle of its shards
            second.append(run_cli("cache", *args))
            second.append(capsys.readouterr().err)
        real(self, epoch, shard, record)

    monkeypatch.setattr(store_module.LogitStore, "write", write_and_start_another)
    assert run_cli("cache", *args) == 0
    code, err = second
    assert code == 2 and f"is in use by a kdkit cache writer (pid {os.getpid()} on {HOST}" in err
    monkeypatch.setattr(store_module.LogitStore, "write", real)
    assert run_cli("cache", "--verify", tmp_path / "c", "--json") == 0
    assert not (tmp_path / "c" / LOCK_NAME).exists()


def test_a_cache_writer_killed_or_interrupted_leaves_the_folder_free(tmp_path, tiny_data, teacher_dir, monkeypatch,
                                                                     capsys):
    root = tmp_path / "c"
    args = [*common(tiny_data, epochs=1), *teacher_args(teacher_dir), "--shard-size", "32", "--out", root]
    real, calls = store_module.LogitStore.write, []

    def interrupt_the_second(self, epoch, shard, record):
        calls.append(shard)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self, epoch, shard, record)

    monkeypatch.setattr(store_module.LogitStore, "write", interrupt_the_second)
    assert run_cli("cache", *args) == 130
    monkeypatch.setattr(store_module.LogitStore, "write", real)
    assert not (root / LOCK_NAME).exists()
    p = hold(root, "cache writer")  # a writer SIGKILLed in the middle leaves its lock file
    kill(p)
    capsys.readouterr()
    assert run_cli("cache", *args) == 0
    assert f"taking over the lock of {root}" in capsys.readouterr().err
    assert len(list((root / "shards").glob("*.safetensors"))) == 4 and not (root / LOCK_NAME).exists()
