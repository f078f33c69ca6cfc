"""When one process of a multi-process run dies or hangs, the others stop by themselves, soon, with
one clear line (kdkit.accelerator); and what a killed cache writer leaves is cleaned up."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdkit.accelerator import DEFAULT_TIMEOUT, dist_timeout, peer_failure
from kdkit.config import DataConfig
from kdkit.registry import KdkitError
from tests.helpers import LAUNCH, run_args

GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:7381: "
              "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the "
              "application. Check the logs of the remote worker before reporting an error. GLHF!")
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                "15000ms for recv operation to complete")


def test_a_collective_failing_on_a_peer_becomes_one_line_and_other_errors_stay_as_they_are(monkeypatch):
    monkeypatch.delenv("KDKIT_DIST_TIMEOUT", raising=False)
    lost = peer_failure(RuntimeError(GLOO_RESET), 1, 2, "--resume runs/x continues from its newest checkpoint")
    assert isinstance(lost, KdkitError) and "\n" not in str(lost)
    assert str(lost).startswith("process 1 of 2 lost contact with the other processes (Read error "
                                "[127.0.0.1]:7381: Connection reset by peer): one of them has died")
    assert "--resume runs/x" in str(lost) and "GLHF" not in str(lost) and "pair.cc" not in str(lost)
    hung = peer_failure(RuntimeError(GLOO_TIMEOUT), 0, 4)
    assert str(hung).startswith(f"process 0 of 4 waited {DEFAULT_TIMEOUT:g} s (KDKIT_DIST_TIMEOUT)")
    assert "Timed out waiting 15000ms for recv operation to complete" in str(hung)
    if hasattr(torch.distributed, "DistBackendError"):  # NCCL's errors have their own class
        assert peer_failure(torch.distributed.DistBackendError("NCCL communicator was aborted"), 3, 8) is not None
    # not a peer's failure: left alone
    assert peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"), 0, 2) is None
    assert peer_failure(RuntimeError("DataLoader timed out after 60 seconds"), 0, 2) is None
    assert peer_failure(RuntimeError(GLOO_RESET), 0, 1) is None  # one process has no peers
    assert peer_failure(ValueError(GLOO_RESET), 0, 2) is None


def test_the_collective_timeout_comes_from_the_environment_and_is_checked(monkeypatch):
    monkeypatch.delenv("KDKIT_DIST_TIMEOUT", raising=False)
    assert dist_timeout() == DEFAULT_TIMEOUT == 600
    monkeypatch.setenv("KDKIT_DIST_TIMEOUT", "45")
    assert dist_timeout() == 45.0 and dist_timeout(7) == 7.0
    for bad in ("0", "-3", "ten"):
        monkeypatch.setenv("KDKIT_DIST_TIMEOUT", bad)
        with pytest.raises(KdkitError, match="KDKIT_DIST_TIMEOUT"):
            dist_timeout()


def test_sigterm_is_one_line_and_exit_143_with_finally_blocks_run():
    code = ("import time\nfrom kdkit.accelerator import stop_on_sigterm\nstop_on_sigterm(1, 2)\n"
            "try:\n    print('ready', flush=True)\n    time.sleep(60)\nfinally:\n    print('cleaned up', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "cleaned up" in out
    assert err.strip().startswith("kdkit: process 1 of 2 stopped by SIGTERM") and len(err.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair(tmp_path: Path, data: Path, teacher: Path, env: dict) -> tuple[list[subprocess.Popen], list[Path]]:
    """Two kdkit processes started by hand, as on two machines: no launcher ends one when the other fails."""
    port, logs, procs = _free_port(), [tmp_path / "rank0.log", tmp_path / "rank1.log"], []
    args = [*run_args(data, teacher), "--epochs", "50", "--output", tmp_path, "--name", "run"]
    for rank in range(2):
        penv = {**os.environ, **env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        with logs[rank].open("w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "kdkit", "distill", *map(str, args)], env=penv,
                                          stdout=subprocess.DEVNULL, stderr=log))
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count('"step"') >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-2000:]
        time.sleep(0.02)
    return procs, logs


def _stop_lines(log: Path) -> list[str]:
    return [x for x in log.read_text().splitlines() if x.startswith("kdkit distill: error:")]


def test_a_killed_peer_makes_the_other_process_exit_at_once_with_one_line(tmp_path, tiny_data, teacher_dir):
    procs, logs = _pair(tmp_path, tiny_data, teacher_dir, {})
    t0 = time.monotonic()
    procs[0].kill()  # the main process: it also holds the rendezvous store
    procs[0].wait()
    rc = procs[1].wait(timeout=60)
    took = time.monotonic() - t0
    said = logs[1].read_text()
    assert rc == 2 and took < 60, said[-2000:]
    lines = _stop_lines(logs[1])
    assert len(lines) == 1 and "Traceback" not in said, said[-2000:]
    assert lines[0].startswith("kdkit distill: error: process 1 of 2 lost contact with the other processes")
    assert f"--resume {tmp_path / 'run'}" in lines[0]


def test_a_hung_peer_makes_the_other_process_give_up_after_the_timeout(tmp_path, tiny_data, teacher_dir):
    procs, logs = _pair(tmp_path, tiny_data, teacher_dir, {"KDKIT_DIST_TIMEOUT": "4"})
    t0 = time.monotonic()
    os.kill(procs[1].pid, signal.SIGSTOP)  # alive, silent: nothing but the timeout can tell
    try:
        rc = procs[0].wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        procs[1].kill()
        procs[1].wait()
    said = logs[0].read_text()
    assert rc == 2 and 4 <= took < 40, (took, said[-2000:])
    lines = _stop_lines(logs[0])
    assert len(lines) == 1 and "Traceback" not in said, said[-2000:]
    assert lines[0].startswith("kdkit distill: error: process 0 of 2 waited 4 s (KDKIT_DIST_TIMEOUT) for the other "
                               "processes")


def _gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie waiting for its parent counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_peer_with_loader_workers_ends_the_other_under_the_launcher_in_seconds(tmp_path, tiny_data,
                                                                                       teacher_dir):
    """kdkit's default loader workers (2 a process): the killed process's forked workers hold its sockets,
    so the survivor's collectives saw it alive until they noticed their parent's death (torch polls every
    5 s); they die with it now, and the launcher's SIGTERM ends the survivor with its one line."""
    import psutil

    workers = DataConfig().workers
    assert workers > 0
    args = [*run_args(tiny_data, teacher_dir), "--epochs", "50", "--workers", str(workers), "--output", tmp_path,
            "--name", "run"]
    log = tmp_path / "launch.log"
    with log.open("w") as out:
        launcher = subprocess.Popen([*LAUNCH, "distill", *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        metrics, deadline, pids = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120, {}
        while len(pids) < 2 or not (metrics.is_file() and metrics.read_text().count('"step"') >= 3):
            assert time.monotonic() < deadline and launcher.poll() is None, log.read_text()[-2000:]
            pids = {int(c.environ()["RANK"]): c.pid for c in psutil.Process(launcher.pid).children()
                    if "RANK" in c.environ()}
            time.sleep(0.05)
        loader_workers = [c.pid for c in psutil.Process(pids[1]).children()]
        assert len(loader_workers) >= workers  # the loaders' workers are running
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        while not all(map(_gone, loader_workers)) and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        workers_gone = time.monotonic() - t0
        while not _gone(pids[0]) and time.monotonic() - t0 < 60:
            time.sleep(0.02)
        took = time.monotonic() - t0
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    said = log.read_text()
    lines = [x for x in said.splitlines() if re.match(r"kdkit( \w+)?: (error|process)", x)]
    # the killed process's workers die with it (they held its sockets open for up to torch's 5 s poll), and
    # the survivor follows in seconds (it took 5 to 9 s; the bound leaves room for a loaded machine)
    assert workers_gone < 1.5, workers_gone
    assert took < 15, (took, said[-3000:])
    # its own line: the launcher's SIGTERM, or the collective that failed first
    assert len(lines) == 1 and re.match(r"kdkit: process 0 of 2 stopped by SIGTERM|kdkit distill: error: process 0 "
                                        r"of 2 lost contact with the other processes", lines[0]), said[-3000:]
    assert not re.search(r'File "[^"]*/kdkit/', said), said[-3000:]  # no kdkit traceback
    assert f"--resume {tmp_path / 'run'}" in lines[0]
