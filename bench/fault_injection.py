"""Fault injection: kill kdkit at random points, resume, and count the resumed results that equal
an uninterrupted run's.

    python bench/fault_injection.py [single] [--kills 20]   # one `kdkit distill` process
    python bench/fault_injection.py multi [--kills 10]      # one of two processes (accelerate launch)
    python bench/fault_injection.py cache [--kills 20]      # `kdkit cache`
    python bench/fault_injection.py elastic [--kills 4]     # stop under 2 processes, resume under 1, and back

Inputs: 12 training and 6 test images per class of the bundled CIFAR-10 sample (120 + 60), a
fixed random resnet10t teacher (single: a weights file, run at resnet10t's default 176x176; the
others: a timm folder whose config says 32x32), a 2-block, 32-wide DeiT student at 32x32, global
batch 16 (7 steps an epoch), 3 epochs, preset deit (RandAugment, random erasing, Mixup/CutMix,
repeated augmentation, label smoothing) with Mixup 0.8, AdamW with a cosine schedule, a checkpoint
after every update (the newest 2 kept), a metrics line every step, run.deterministic.

single: drop_path, EMA; SIGKILL after a random step, the even-numbered kills a random fraction of
a step later, the odd-numbered ones as soon as the next checkpoint's temporary folder appears
(mid-write). Resumed with `kdkit distill --resume`; equal = every metrics.jsonl line (timings
aside) and every tensor of student/ and student_ema/ bit for bit.

multi: the same run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo); SIGKILL
one worker (rank chosen at random; mid-write kills alternate the writer, rank 0, and rank 1) at a
random step or mid-write. Measured: how long the other process takes to exit, and what it says
(one `kdkit ...` line, no kdkit traceback). Then `--frozen` trials SIGSTOP a worker (a hung peer:
nothing tells the other) with KDKIT_DIST_TIMEOUT=--timeout, and `--no-launcher` trials start the
two processes by hand (RANK, WORLD_SIZE, MASTER_ADDR: as on two machines, with no launcher to end
the survivor) and SIGKILL one. Every trial is resumed with two processes under the launcher and
compared with the uninterrupted two-process run (losses to 1e-5, weights to 1e-5; same process
count, so bit for bit is expected). Loader workers: kdkit's default (2 per process) unless --workers.

cache: `kdkit cache` of 6 epochs in shards of 16 records (48 shards), SIGKILL after a random number
of shards, half of the kills a random fraction of a shard later, half while a shard's temporary
file exists (mid-write). Resumed by running the same command again; equal = the same manifest, the
same shard files, every tensor and header equal to an uninterrupted cache's, no temporary left.

elastic: drop_path 0 (its draws are per process) and no EMA; a two-process run killed at a random step is
resumed by one process, a one-process run by two; each is compared with the uninterrupted run of
the process count it started with (losses and weights to 1e-5).

Prints a table and JSON; writes --json-out (default bench/results/fault_injection[_KIND].json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, kdkit_source  # noqa: E402

from kdkit.cache.store import mmap_safetensors  # noqa: E402
from kdkit.config import DataConfig  # noqa: E402
from kdkit.data import sample_path  # noqa: E402

STEPS_PER_EPOCH, EPOCHS = 7, 3
KDKIT = [sys.executable, "-m", "kdkit"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdkit"]


def make_inputs(root: Path) -> tuple[Path, Path]:
    """12 training and 6 test images per class from the bundled sample, and a tiny fixed teacher."""
    data = root / "data"
    for split, n in (("train", 12), ("test", 6)):
        for cls in sorted((sample_path() / split).iterdir()):
            (data / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, data / split / cls.name / f.name)
    teacher = root / "resnet10t.safetensors"
    torch.manual_seed(1)
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), teacher)
    return data, teacher


def teacher_folder(root: Path, weights: Path) -> Path:
    """The same teacher as a timm folder whose config says 32x32 input (a bare weights file runs at
    resnet10t's default 176x176: five times the work per image)."""
    folder = root / "teacher32"
    folder.mkdir()
    shutil.copy(weights, folder / "model.safetensors")
    cfg = {"architecture": "resnet10t", "num_classes": 10,
           "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                              "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 10}}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def distill_args(data: Path, teacher: Path, run_dir: Path, workers: int, drop_path: bool = True) -> list[str]:
    args = ["distill", "--teacher", "resnet10t", "--teacher-weights", str(teacher),
            "--student", "deit_tiny", "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}",
            "--img-size", "32", "--patch-size", "8", "--data", str(data), "--output", str(run_dir.parent),
            "--name", run_dir.name, "--loss", "soft", "--tau", "2", "--epochs", str(EPOCHS), "--batch-size", "16",
            "--lr", "1e-3", "--workers", str(workers), "--no-progress",
            "--set", "optim.warmup_epochs=1", "--set", "aug.mixup=0.8",
            "--set", "run.checkpoint_every=1", "--set", "run.keep_checkpoints=2",
            "--set", "run.log_every=1", "--set", "run.teacher_check_batches=1", "--set", "run.deterministic=true"]
    # preset deit (RandAugment, random erasing, Mixup/CutMix, repeated augmentation, label smoothing:
    # all seeded per image or batch), with drop_path 0.1 and an EMA, or without drop-path, whose draws
    # are per process
    args += ["--set", "model.drop_path=0.1", "--set", "optim.ema_decay=0.9"] if drop_path else \
        ["--set", "model.drop_path=0.0"]
    return args


def cache_args(data: Path, teacher: Path, out: Path, workers: int) -> list[str]:
    return ["cache", "--teacher", "resnet10t", "--teacher-weights", str(teacher), "--student", "deit_tiny",
            "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--img-size", "32", "--patch-size", "8",
            "--data", str(data), "--epochs", "6", "--batch-size", "16", "--workers", str(workers), "--seed", "3",
            "--no-progress", "--preset", "none", "--set", "aug.mixup=0.8", "--set", "aug.reprob=0.25",
            "--shard-size", "16", "--out", str(out)]


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("images_per_s", None)
        rec.get("eval", {}).pop("images_per_s", None)
        out.append(rec)
    return out


def loss_diff(a: list[dict], b: list[dict]) -> float | None:
    """Largest |difference| of the per-step loss terms; None when the steps themselves differ."""
    sa, sb = ([r for r in x if "loss" in r] for x in (a, b))
    if [(r["epoch"], r["step"], r["update"]) for r in sa] != [(r["epoch"], r["step"], r["update"]) for r in sb]:
        return None
    return max((abs(x[k] - y[k]) for x, y in zip(sa, sb, strict=True) for k in ("loss", "task", "kd")), default=0.0)


def weight_diff(a: Path, b: Path) -> float | None:
    worst = 0.0
    for folder in ("student", "student_ema"):
        if not (b / folder).is_dir():
            continue
        try:
            x, y = load_file(a / folder / "model.safetensors"), load_file(b / folder / "model.safetensors")
        except OSError:
            return None
        if x.keys() != y.keys():
            return None
        worst = max([worst, *((x[k].float() - y[k].float()).abs().max().item() for k in x)])
    return worst


def wait_for_steps(proc: subprocess.Popen, metrics: Path, after_step: int, deadline: float) -> None:
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count('"step"') > after_step:
            return
        time.sleep(0.005)


def wait_for(proc: subprocess.Popen, folder: Path, pattern: str, deadline: float) -> None:
    """Busy-wait (a write takes milliseconds) until a file or folder matching `pattern` appears."""
    while proc.poll() is None and time.monotonic() < deadline and not any(folder.glob(pattern)):
        pass


def wait_for_kill_point(proc: subprocess.Popen, in_write: bool, folder: Path, pattern: str, delay: float,
                        deadline: float) -> None:
    """After the chosen step or shard: as soon as a write's temporary `pattern` appears in `folder`
    (in_write, a kill mid-write), else `delay` seconds later (a kill at a random point of the next)."""
    if in_write:
        wait_for(proc, folder, pattern, deadline)
    else:
        time.sleep(delay)


def kill_unless_finished(proc: subprocess.Popen) -> bool:
    """SIGKILL `proc` unless it has already ended; waits for it. True if it had ended by itself."""
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return finished


def worker_pids(launcher: int, deadline: float) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (their RANK variable)."""
    import psutil

    while time.monotonic() < deadline:
        found = {}
        for child in psutil.Process(launcher).children():
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                found[int(rank)] = child.pid
        if len(found) == 2:
            return found
        time.sleep(0.05)
    raise RuntimeError("the launcher's two workers did not appear")


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie waiting for its parent counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def exit_time(pid: int, t0: float, limit: float) -> float | None:
    """Seconds from t0 until `pid` exits; None past `limit`."""
    while time.monotonic() - t0 < limit:
        if gone(pid):
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def kdkit_lines(text: str) -> list[str]:
    """The lines a kdkit process said about stopping (errors and the SIGTERM line)."""
    return [x for x in text.splitlines() if re.match(r"kdkit( \w+)?: (error|process)", x)]


def kdkit_traceback(text: str) -> bool:
    """Whether a kdkit process printed a Python traceback (the launcher's own report is torch's)."""
    return bool(re.search(r'File "[^"]*/kdkit/', text))


def resumed_from(stderr: str) -> int | None:
    """The update count of the checkpoint a resume says it started from (the console wraps lines)."""
    m = re.search(r"resuming from \S*?step-(\d+):", stderr.replace("\n", ""))
    return int(m.group(1)) if m else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- single: one process ----------------------------------------------------------------------------

def single_trial(data: Path, teacher: Path, run_dir: Path, after_step: int, fraction: float, step_s: float,
                 workers: int, in_write: bool) -> dict:
    proc = subprocess.Popen([*KDKIT, *distill_args(data, teacher, run_dir, workers)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    folder, deadline = run_dir / "checkpoints", time.monotonic() + 300
    wait_for_steps(proc, run_dir / "metrics.jsonl", after_step, deadline)
    wait_for_kill_point(proc, in_write, folder, ".step-*", fraction * step_s, deadline)
    finished = kill_unless_finished(proc)
    checkpoints = sorted(int(p.name[5:]) for p in folder.glob("step-*")) if not finished else []
    torn = [p.name for p in folder.glob(".step-*")]  # a checkpoint write the kill interrupted
    resumed = subprocess.run([*KDKIT, "distill", "--resume", str(run_dir), "--no-progress", "--workers", str(workers)],
                             capture_output=True, text=True)
    return {"after_step": after_step, "in_write": in_write, "fraction": round(fraction, 3),
            "finished_before_kill": finished, "checkpoints_on_disk": checkpoints, "interrupted_write": torn,
            "resumed_from": resumed_from(resumed.stderr),
            "resume_rc": resumed.returncode, "error": resumed.stderr.strip().splitlines()[-1:] if resumed.returncode
            else []}


def run_single(args, root: Path, data: Path, teacher: Path, rng: random.Random) -> dict:
    reference = root / "runs" / "reference"
    subprocess.run([*KDKIT, *distill_args(data, teacher, reference, args.workers)], check=True, capture_output=True)
    step_s = json.loads((reference / "summary.json").read_text())["train_seconds"] / (STEPS_PER_EPOCH * EPOCHS)
    want, rows = records(reference), []
    for i in range(args.kills):
        run_dir = root / "runs" / f"kill{i:02d}"
        row = single_trial(data, teacher, run_dir, rng.randrange(STEPS_PER_EPOCH * EPOCHS), rng.random(), step_s,
                           args.workers, in_write=i % 2 == 1)
        row["same_losses"] = row["resume_rc"] == 0 and records(run_dir) == want
        row["same_weights"] = row["resume_rc"] == 0 and weight_diff(run_dir, reference) == 0.0
        rows.append({"kill": i, **row})
        shutil.rmtree(run_dir)
    table = Table(title=f"fault injection: {args.kills} SIGKILLs of `kdkit distill`, each resumed")
    for col in ("kill", "after step", "then", "checkpoints", "torn write", "resumed from", "same losses",
                "same weights"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["kill"]), str(r["after_step"]), "in write" if r["in_write"] else f"+{r['fraction']:.2f}",
                      "finished" if r["finished_before_kill"] else " ".join(map(str, r["checkpoints_on_disk"])),
                      "yes" if r["interrupted_write"] else "", str(r["resumed_from"] or "-"), str(r["same_losses"]),
                      str(r["same_weights"]))
    Console(width=110).print(table)
    equal = sum(r["same_losses"] and r["same_weights"] for r in rows)
    Console().print(f"{equal}/{args.kills} resumed runs equal the uninterrupted run (per-step losses and final "
                    f"student and EMA weights, bit for bit)")
    return {"kills": args.kills, "equal": equal, "steps": STEPS_PER_EPOCH * EPOCHS,
            "interrupted_writes": sum(bool(r["interrupted_write"]) for r in rows), "rows": rows}


# --- multi: one of two processes --------------------------------------------------------------------

def multi_trial(data: Path, teacher: Path, run_dir: Path, how: str, victim: int, after_step: int, fraction: float,
                step_s: float, in_write: bool, timeout: float, workers: int) -> dict:
    """Start a two-process run, stop worker `victim` (how: "kill" under the launcher, "freeze" =
    SIGSTOP under the launcher, "no-launcher" = SIGKILL of one of two hand-started processes), time
    the other's exit, keep what the processes said."""
    args = distill_args(data, teacher, run_dir, workers)
    env = {**os.environ, "KDKIT_DIST_TIMEOUT": str(timeout)} if how == "freeze" else dict(os.environ)
    deadline = time.monotonic() + 300
    logs = [Path(tempfile.mkstemp(prefix="kdkit-fi-", suffix=".log")[1]) for _ in range(2)]
    if how == "no-launcher":
        port = free_port()
        procs = [subprocess.Popen([*KDKIT, *args], stdout=subprocess.DEVNULL, stderr=logs[r].open("w"),
                                  env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                                       "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"})
                 for r in range(2)]
        pids, watched = {r: p.pid for r, p in enumerate(procs)}, procs[0]
    else:
        launcher = subprocess.Popen([*LAUNCH, *args], stdout=logs[0].open("w"), stderr=subprocess.STDOUT, env=env)
        procs, watched = [launcher], launcher
        pids = worker_pids(launcher.pid, deadline)
    wait_for_steps(watched, run_dir / "metrics.jsonl", after_step, deadline)
    wait_for_kill_point(watched, in_write, run_dir / "checkpoints", ".step-*", fraction * step_s, deadline)
    finished = any(p.poll() is not None for p in procs)
    t0 = time.monotonic()
    if not finished:
        os.kill(pids[victim], signal.SIGSTOP if how == "freeze" else signal.SIGKILL)
    survivor_s = exit_time(pids[1 - victim], t0, limit=timeout + 120) if not finished else None
    if how == "freeze":  # the frozen one is ended by the launcher (SIGKILL after its grace period) or by us
        os.kill(pids[victim], signal.SIGKILL) if not gone(pids[victim]) else None
    for p in procs:
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    all_s = time.monotonic() - t0
    said = "".join(log.read_text(errors="replace") for log in logs)
    for log in logs:
        log.unlink()
    folder = run_dir / "checkpoints"
    torn = [p.name for p in folder.glob(".step-*")]
    resumed = subprocess.run([*LAUNCH, "distill", "--resume", str(run_dir), "--no-progress", "--workers",
                              str(workers)], capture_output=True, text=True)
    lines = kdkit_lines(said)
    return {"how": how, "victim_rank": victim, "after_step": after_step, "in_write": in_write,
            "fraction": round(fraction, 3), "finished_before_kill": finished, "survivor_exit_s": survivor_s and
            round(survivor_s, 2), "all_exited_s": round(all_s, 2), "survivor_lines": lines,
            "kdkit_traceback": kdkit_traceback(said), "interrupted_write": torn,
            "resumed_from": resumed_from(resumed.stderr),
            "resume_rc": resumed.returncode,
            "resume_error": resumed.stderr.strip().splitlines()[-3:] if resumed.returncode else []}


def run_multi(args, root: Path, data: Path, teacher: Path, rng: random.Random) -> dict:
    reference = root / "runs" / "reference"
    done = subprocess.run([*LAUNCH, *distill_args(data, teacher, reference, args.workers)], capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    step_s = json.loads((reference / "summary.json").read_text())["train_seconds"] / (STEPS_PER_EPOCH * EPOCHS)
    want = records(reference)
    plan = [("kill", rng.randrange(2) if i % 2 == 0 else (i // 2) % 2, i % 2 == 1) for i in range(args.kills)]
    plan += [("freeze", i % 2, False) for i in range(args.frozen)]
    plan += [("no-launcher", i % 2, False) for i in range(args.no_launcher)]
    rows = []
    for i, (how, victim, in_write) in enumerate(plan):
        run_dir = root / "runs" / f"trial{i:02d}"
        row = multi_trial(data, teacher, run_dir, how, victim, rng.randrange(1, STEPS_PER_EPOCH * EPOCHS - 1),
                          rng.random(), step_s, in_write, args.timeout, args.workers)
        got = records(run_dir) if row["resume_rc"] == 0 else []
        row["loss_diff"] = loss_diff(got, want) if got else None
        row["weight_diff"] = weight_diff(run_dir, reference) if got else None
        row["bit_for_bit"] = bool(got) and got == want and row["weight_diff"] == 0.0
        row["one_clear_line"] = (row["finished_before_kill"] or len(row["survivor_lines"]) == 1) \
            and not row["kdkit_traceback"]
        limit = args.timeout + 60 if how == "freeze" else 60
        row["survived"] = (row["finished_before_kill"] or (row["survivor_exit_s"] is not None
                                                            and row["survivor_exit_s"] <= limit)) \
            and row["one_clear_line"] and row["loss_diff"] is not None and row["loss_diff"] <= 1e-5 \
            and row["weight_diff"] is not None and row["weight_diff"] <= 1e-5
        rows.append({"trial": i, **row})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(run_dir)
    table = Table(title="fault injection: one of two processes stopped (accelerate launch, gloo), each run resumed "
                        "with two")
    for col in ("trial", "how", "rank", "after step", "then", "survivor exit", "it said", "torn write",
                "resumed from", "max |Δ loss|", "max |Δ w|", "ok"):
        table.add_column(col, justify="right")
    for r in rows:
        said = ", ".join("SIGTERM" if "SIGTERM" in x else "waited (timeout)" if " waited " in x else
                         "lost contact" if "lost contact" in x else x[:30] for x in r["survivor_lines"]) or "-"
        table.add_row(str(r["trial"]), r["how"], str(r["victim_rank"]), str(r["after_step"]),
                      "in write" if r["in_write"] else f"+{r['fraction']:.2f}",
                      "finished" if r["finished_before_kill"] else f"{r['survivor_exit_s']} s", said,
                      "yes" if r["interrupted_write"] else "", str(r["resumed_from"] or "-"),
                      f"{r['loss_diff']:.1e}" if r["loss_diff"] is not None else "-",
                      f"{r['weight_diff']:.1e}" if r["weight_diff"] is not None else "-", str(r["survived"]))
    Console(width=150).print(table)
    by_how = {}
    for r in rows:
        k = by_how.setdefault(r["how"], {"tried": 0, "survived": 0, "bit_for_bit": 0, "survivor_exit_s_max": 0.0})
        k["tried"] += 1
        k["survived"] += r["survived"]
        k["bit_for_bit"] += r["bit_for_bit"]
        k["survivor_exit_s_max"] = max(k["survivor_exit_s_max"], r["survivor_exit_s"] or 0.0)
    for how, k in by_how.items():
        Console().print(f"{how}: {k['survived']}/{k['tried']} survived (the other process exited with one kdkit line, "
                        f"the resume equals the uninterrupted run to 1e-5; {k['bit_for_bit']} bit for bit); "
                        f"slowest survivor exit {k['survivor_exit_s_max']:.1f} s")
    return {"kills": args.kills, "frozen": args.frozen, "no_launcher": args.no_launcher, "timeout_s": args.timeout,
            "steps": STEPS_PER_EPOCH * EPOCHS, "by_kind": by_how,
            "interrupted_writes": sum(bool(r["interrupted_write"]) for r in rows), "rows": rows}


# --- cache ------------------------------------------------------------------------------------------

def same_cache(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two cache folders hold the same manifest and shards (tensors, headers), and nothing else."""
    ma, mb = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    if ma != mb:
        return False, "manifest"
    fa, fb = (sorted(p.name for p in (x / "shards").iterdir()) for x in (a, b))
    if fa != fb:
        return False, f"files: {sorted(set(fa) ^ set(fb))[:3]}"
    extra = sorted(p.name for p in b.iterdir() if p.name not in ("manifest.json", "shards"))
    if extra:
        return False, f"left over: {extra}"
    for name in fa:
        (ta, ha), (tb, hb) = mmap_safetensors(a / "shards" / name), mmap_safetensors(b / "shards" / name)
        if ha != hb or ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False, f"shard {name}"
    return True, ""


def run_cache(args, root: Path, data: Path, teacher: Path, rng: random.Random) -> dict:
    reference = root / "caches" / "reference"
    start = time.perf_counter()
    done = subprocess.run([*KDKIT, *cache_args(data, teacher, reference, args.workers), "--json"], check=True,
                          capture_output=True, text=True)
    whole_s = time.perf_counter() - start
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    total, shard_s = stats["shards_written"], stats["seconds"] / stats["shards_written"]
    rows = []
    for i in range(args.kills):
        out = root / "caches" / f"kill{i:02d}"
        after, fraction, in_write = rng.randrange(total), rng.random(), i % 2 == 1
        proc = subprocess.Popen([*KDKIT, *cache_args(data, teacher, out, args.workers)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        shards = out / "shards"
        while proc.poll() is None and time.monotonic() < deadline:
            if shards.is_dir() and sum(1 for e in os.scandir(shards) if not e.name.startswith(".")) >= after:
                break
            time.sleep(0.002)
        wait_for_kill_point(proc, in_write, shards, ".e*.tmp", fraction * shard_s, deadline)
        finished = kill_unless_finished(proc)
        present = sum(1 for p in shards.glob("e*.safetensors")) if shards.is_dir() else 0
        torn = sorted(p.name for p in shards.glob(".*.tmp")) if shards.is_dir() else []
        resumed = subprocess.run([*KDKIT, *cache_args(data, teacher, out, args.workers), "--json"],
                                 capture_output=True, text=True)
        result = json.loads(resumed.stdout.strip().splitlines()[-1]) if resumed.returncode == 0 else {}
        equal, why = same_cache(reference, out) if resumed.returncode == 0 else (False, resumed.stderr[-300:])
        rows.append({"kill": i, "after_shards": after, "in_write": in_write, "fraction": round(fraction, 3),
                     "finished_before_kill": finished, "shards_on_disk": present, "interrupted_write": torn,
                     "resume_rc": resumed.returncode, "shards_written_on_resume": result.get("shards_written"),
                     "equal": equal, "why": why})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out)
    table = Table(title=f"fault injection: {args.kills} SIGKILLs of `kdkit cache` ({total} shards), each resumed")
    for col in ("kill", "after shards", "then", "shards on disk", "torn write", "written on resume", "equal"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["kill"]), str(r["after_shards"]), "in write" if r["in_write"] else f"+{r['fraction']:.2f}",
                      "finished" if r["finished_before_kill"] else str(r["shards_on_disk"]),
                      "yes" if r["interrupted_write"] else "", str(r["shards_written_on_resume"]),
                      str(r["equal"]) + (f" ({r['why']})" if r["why"] else ""))
    Console(width=120).print(table)
    equal = sum(r["equal"] for r in rows)
    Console().print(f"{equal}/{args.kills} resumed caches equal the uninterrupted one (manifest, shard files, every "
                    f"tensor and header; no temporary left); {sum(bool(r['interrupted_write']) for r in rows)} kills "
                    f"interrupted a shard write")
    return {"kills": args.kills, "equal": equal, "shards": total, "uninterrupted_s": round(whole_s, 1),
            "shard_s": round(shard_s, 4),
            "interrupted_writes": sum(bool(r["interrupted_write"]) for r in rows), "rows": rows}


# --- elastic ----------------------------------------------------------------------------------------

def run_elastic(args, root: Path, data: Path, teacher: Path, rng: random.Random) -> dict:
    refs = {}
    for n in (1, 2):
        refs[n] = root / "runs" / f"reference{n}"
        done = subprocess.run([*(LAUNCH if n == 2 else KDKIT), *distill_args(data, teacher, refs[n], 0, False)],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
    rows = []
    for i in range(args.kills):
        before, after = (2, 1) if i % 2 == 0 else (1, 2)
        run_dir = root / "runs" / f"elastic{i:02d}"
        proc = subprocess.Popen([*(LAUNCH if before == 2 else KDKIT), *distill_args(data, teacher, run_dir, 0, False)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        step = rng.randrange(1, STEPS_PER_EPOCH * EPOCHS - 1)
        wait_for_steps(proc, run_dir / "metrics.jsonl", step, time.monotonic() + 300)
        finished = proc.poll() is not None
        if not finished:  # the workers first (torchrun starts them in sessions of their own), then the launcher
            import psutil

            for pid in [c.pid for c in psutil.Process(proc.pid).children(recursive=True)] + [proc.pid]:
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        resumed = subprocess.run([*(LAUNCH if after == 2 else KDKIT), "distill", "--resume", str(run_dir),
                                  "--no-progress", "--workers", "0"], capture_output=True, text=True)
        got = records(run_dir) if resumed.returncode == 0 else []
        row = {"trial": i, "processes": f"{before} -> {after}", "after_step": step, "finished_before_kill": finished,
               "resumed_from": resumed_from(resumed.stderr),
               "resume_rc": resumed.returncode,
               "loss_diff": loss_diff(got, records(refs[before])) if got else None,
               "weight_diff": weight_diff(run_dir, refs[before]) if got else None,
               "loss_diff_vs_other_count": loss_diff(got, records(refs[after])) if got else None,
               "error": resumed.stderr.strip().splitlines()[-3:] if resumed.returncode else []}
        row["equal"] = row["loss_diff"] is not None and row["loss_diff"] <= 1e-5 and row["weight_diff"] is not None \
            and row["weight_diff"] <= 1e-5
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(run_dir)
    table = Table(title="elastic resume: a run stopped by SIGKILL under N processes, resumed under M")
    for col in ("trial", "processes", "after step", "resumed from", "max |Δ loss|", "max |Δ w|", "equal (1e-5)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["trial"]), r["processes"], str(r["after_step"]), str(r["resumed_from"] or "-"),
                      f"{r['loss_diff']:.1e}" if r["loss_diff"] is not None else "-",
                      f"{r['weight_diff']:.1e}" if r["weight_diff"] is not None else "-", str(r["equal"]))
    Console(width=120).print(table)
    equal = sum(r["equal"] for r in rows)
    Console().print(f"{equal}/{args.kills} elastic resumes equal the uninterrupted run of the starting process count "
                    f"(per-step losses and final weights to 1e-5)")
    return {"kills": args.kills, "equal": equal, "steps": STEPS_PER_EPOCH * EPOCHS, "rows": rows}


KINDS = {"single": run_single, "multi": run_multi, "cache": run_cache, "elastic": run_elastic}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", nargs="?", default="single", choices=KINDS)
    p.add_argument("--kills", type=int, default=None, help="trials (default: single 20, multi 10, cache 20, elastic 4)")
    p.add_argument("--frozen", type=int, default=2, help="multi: SIGSTOP trials (a hung peer)")
    p.add_argument("--no-launcher", type=int, default=2, help="multi: SIGKILL trials without a launcher")
    p.add_argument("--timeout", type=float, default=20.0, help="multi: KDKIT_DIST_TIMEOUT of the SIGSTOP trials")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None,
                   help="data-loader workers (default: multi kdkit's default, 2; the others 0)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    if args.kills is None:
        args.kills = {"single": 20, "multi": 10, "cache": 20, "elastic": 4}[args.kind]
    if args.workers is None:
        args.workers = DataConfig().workers if args.kind == "multi" else 0
    out = args.json_out or f"bench/results/fault_injection{'' if args.kind == 'single' else '_' + args.kind}.json"
    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdkit-faults-") as tmp:
        root = Path(tmp)
        data, teacher = make_inputs(root)
        if args.kind != "single":  # single keeps the setting of its earlier results
            teacher = teacher_folder(root, teacher)
        result = KINDS[args.kind](args, root, data, teacher, rng)
    result = {"kind": args.kind, **result, "seed": args.seed, "workers": args.workers,
              "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
              "machine": f"{cpu_model()}, {os.cpu_count()} cores", "kdkit": kdkit_source()}
    Console().print(f"{result['seconds']:.0f} s")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "kdkit")}))


if __name__ == "__main__":
    main()
