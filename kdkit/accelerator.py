"""One way to build an Accelerator, for every verb and the Python API; and what a process does when
another process of its run dies or hangs (a timeout on every collective, one clear line, an exit)."""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs

from kdkit.console import console
from kdkit.registry import KdkitError

TIMEOUT_ENV = "KDKIT_DIST_TIMEOUT"
# Seconds a process waits in one collective (all-reduce, barrier, gather) before it gives up on the
# others. Long enough for the legitimate waits (the main process writing a large checkpoint, one
# cache shard of a slow teacher); short enough that a hung or vanished peer costs minutes, not
# torch's 30 min (gloo) or a job's wall-clock limit.
DEFAULT_TIMEOUT = 600.0


def dist_timeout(seconds: float | None = None) -> float:
    """The collective timeout in seconds: `seconds`, else $KDKIT_DIST_TIMEOUT, else DEFAULT_TIMEOUT."""
    raw = os.environ.get(TIMEOUT_ENV, "") if seconds is None else seconds
    if raw == "":
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise KdkitError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds > 0: unset it for the default "
                         f"({DEFAULT_TIMEOUT:g} s) or set e.g. {TIMEOUT_ENV}=1800")
    return value


# Sharded training through Accelerate, refused: kdkit's checkpoints (resumable, pickle-free) and saved
# student (plain timm) are full state dicts of the student, the optimizer and the EMA, written by
# one process; under FSDP or DeepSpeed those are shards (DTensors, ZeRO partitions) that each need
# their own gather, and a run would write raw shards. A distilled classifier fits on one device,
# so data parallelism (DDP) is the supported way to use many: one line says so, before anything
# is written.
SHARDED = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED",
           "Megatron-LM": "ACCELERATE_USE_MEGATRON_LM"}


def check_not_sharded(distributed_type: str | None = None) -> None:
    """Refuse FSDP (FSDP1 or Accelerate's FSDP2 plugin), DeepSpeed and Megatron-LM with one line:
    asked for by `accelerate launch --use_fsdp / --use_deepspeed`, an `accelerate config` file
    with that distributed_type (the launcher turns it into ACCELERATE_USE_* variables) or the
    variables themselves; `distributed_type`: an Accelerator's, once built (a plugin given another way)."""
    from accelerate.utils import parse_flag_from_env

    asked = [name for name, env in SHARDED.items() if parse_flag_from_env(env)]
    built = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed", "MEGATRON_LM": "Megatron-LM"}.get(
        str(distributed_type).rpartition(".")[2])
    for name in asked or ([built] if built else []):
        how = f"{SHARDED[name]}=true, as `accelerate launch` sets it for --use_{name.lower().replace('-', '_')} " \
              f"or a config file with distributed_type {name.upper().replace('-', '_')}" if asked else "the Accelerator"
        raise KdkitError(f"kdkit does not train under {name} ({how}): its checkpoints and saved student are whole "
                         f"state dicts, not shards; the student is replicated instead: launch with "
                         f"`accelerate launch --multi_gpu --num_processes N -m kdkit ...` (DDP, docs/distributed.md)")


def create_accelerator(precision: str = "auto", grad_accum: int = 1, timeout: float | None = None,
                       log_with: list[str] | None = None, project_dir: str | os.PathLike | None = None) -> Accelerator:
    """An Accelerator on the GPU when there is one. Precision "auto" leaves it to Accelerate's own
    resolution (the `accelerate launch --mixed_precision` flag, ACCELERATE_MIXED_PRECISION, an
    `accelerate config` file through the launcher); "no", "bf16" or "fp16" win over those.

    Under a launcher the process group gets a timeout of `timeout` seconds (default: dist_timeout())
    on every collective, and SIGTERM (what a launcher sends the others when one process fails) is
    one line and an exit (see `stop_on_sigterm`). The timeout is set when the process group is
    made, by the first Accelerator of the process. log_with: Accelerate's tracker names (installed
    ones: engine.metrics.resolve_trackers), which write under `project_dir` (the run directory).
    FSDP, DeepSpeed and Megatron-LM are refused (check_not_sharded)."""
    check_not_sharded()
    chosen = None if precision == "auto" else precision
    wanted = chosen or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if AcceleratorState._shared_state.get("_mixed_precision", wanted) != wanted:
        # Accelerate keeps one precision per process; another run in the same process (the Python
        # API, tests) may ask for another. The process group (PartialState) is kept.
        AcceleratorState._reset_state()
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout(timeout)))
    try:
        acc = Accelerator(mixed_precision=chosen, gradient_accumulation_steps=grad_accum,
                          cpu=not torch.cuda.is_available(), kwargs_handlers=[group], log_with=log_with or None,
                          project_dir=None if project_dir is None else str(project_dir))
    except ValueError as e:
        raise KdkitError(f"cannot set up precision {wanted!r}: {e}") from None
    check_not_sharded(acc.distributed_type)
    if acc.num_processes > 1:
        stop_on_sigterm(acc.process_index, acc.num_processes)
    note = lone_launch_note(acc.num_processes)
    if note:
        console.print(f"[bold yellow]note:[/] {note}", soft_wrap=True, highlight=False)
    return acc


def lone_launch_note(processes: int, env: dict[str, str] | None = None) -> str | None:
    """One line when `accelerate launch` was asked for several processes and started this one alone:
    its simple launcher (taken with --cpu, and without --multi_gpu where there is no GPU) runs one
    process whatever --num_processes says. It marks the process with ACCELERATE_USE_CPU and, for
    more than one process, MASTER_ADDR/MASTER_PORT, but starts no others (no WORLD_SIZE). None otherwise."""
    env = os.environ if env is None else env
    if processes != 1 or "ACCELERATE_USE_CPU" not in env or "MASTER_PORT" not in env or "WORLD_SIZE" in env:
        return None
    return ("accelerate launch started 1 process, not the --num_processes asked for: its simple launcher (taken with "
            "--cpu, or without --multi_gpu) runs one. For N processes on CPU: accelerate launch --multi_gpu "
            "--num_processes N, without --cpu (with no GPU each process runs on the CPU)")


def set_deterministic() -> None:
    """Deterministic kernels (warn where none exists) and cuBLAS's fixed workspace; on CPU runs are
    reproducible already, so this only matters on CUDA."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


# --- when another process fails ---------------------------------------------------------------------

# what gloo, NCCL and c10d say when a peer is gone (connection reset or closed) or silent (timeout)
_PEER_LOST = re.compile(r"connection (reset|closed|refused)|broken pipe|socket|peer|timed? ?out|timeout|"
                        r"nccl|gloo|c10d|process group|collective", re.IGNORECASE)
_TIMED_OUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)


class PeerFailure(KdkitError):
    """A collective failed because another process died or hangs. The process group is broken then:
    the CLI prints the line and ends the process at once (os._exit), since tearing the group down,
    or leaving it to interpreter exit, can abort in gloo's threads ("terminate called without an
    active exception", exit -6) after the line was printed."""


def peer_failure(e: BaseException, process: int, processes: int, resume_hint: str = "") -> PeerFailure | None:
    """The one-line PeerFailure for `e` when it is a collective failing because another process died
    or hangs (torch's DistError, or gloo's and NCCL's RuntimeErrors); None for any other error."""
    if processes < 2 or not isinstance(e, RuntimeError):
        return None
    text = str(e)
    if text.startswith("DataLoader"):  # its own worker timeout or crash: not a peer's
        return None
    if not (isinstance(e, getattr(torch.distributed, "DistError", ())) or _PEER_LOST.search(text)):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    cause = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo prefixes its source file and line
    cause = re.sub(r"\s*(This is typically caused|Check the logs).*$", "", cause)[:160].rstrip(". ")
    if _TIMED_OUT.search(text):
        what = (f"waited {dist_timeout():g} s ({TIMEOUT_ENV}) for the other processes in a collective, in vain "
                f"({cause}): one of them hangs or has died")
    else:
        what = f"lost contact with the other processes ({cause}): one of them has died (killed, out of memory?)"
    hint = resume_hint or _HINT["text"]
    return PeerFailure(f"process {process} of {processes} {what}; stopped. {hint} (the other processes' logs, or "
                      f"the launcher's report, name the first failure)")


# what to do next, said by a process stopped by a failure (peers_watched sets it for its body)
_HINT = {"text": "what was written so far is intact: run the same command again (with --resume RUN_DIR for a "
                 "training run)"}


@contextmanager
def peers_watched(acc: Accelerator, resume_hint: str = "") -> Iterator[None]:
    """Turn a collective failing on a dead or hung peer into peer_failure's one line (see there);
    `resume_hint` (how to continue) is said by that line and by a SIGTERM's."""
    previous = _HINT["text"]
    _HINT["text"] = resume_hint or previous
    try:
        yield
    except RuntimeError as e:
        error = peer_failure(e, acc.process_index, acc.num_processes, resume_hint)
        if error is None:
            raise
        # this process is on its way out with its own line: the launcher's SIGTERM, which follows
        # the first failure, must not replace that line with its own
        if _SIGTERM["pid"] == os.getpid() and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise error from None
    finally:
        _HINT["text"] = previous


_SIGTERM = {"pid": None}


def _ignore(signum: int, frame: object) -> None:
    """A handler that does nothing (SIG_IGN would make Python report a signal already pending)."""


class Stopped(SystemExit):
    """The exit (status 128 + SIGTERM) that stop_on_sigterm's handler raises once its line is out. The
    `finally` blocks run as it unwinds (locks released, temporary files removed); the CLI then ends
    the process at once (os._exit), as after a PeerFailure: the process group it leaves is broken."""


def stop_on_sigterm(process: int, processes: int) -> None:
    """On SIGTERM, print one line and exit with 143 (128 + SIGTERM), running `finally` blocks (locks
    released, temporary files removed). torchrun and `accelerate launch` end every process with
    SIGTERM when one fails, and a batch scheduler does so at its time limit: the process's own
    line then says why it stopped, where Python would die silently. Installed once, from the main
    thread, and only over the default handler (a handler of the caller's is kept); forked children
    (data-loader workers) get the default behaviour back."""
    if _SIGTERM["pid"] == os.getpid() or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    _SIGTERM["pid"] = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != _SIGTERM["pid"]:  # a forked child: die as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        import sys

        print(f"kdkit: process {process} of {processes} stopped by SIGTERM (a launcher sends it to every process "
              f"when one fails, a scheduler at its time limit; the first failure is in the other processes' logs "
              f"or the launcher's report). {_HINT['text'][0].upper()}{_HINT['text'][1:]}", file=sys.stderr, flush=True)
        # the data loader's workers got the same SIGTERM (a launcher signals the process group) and die:
        # torch's SIGCHLD handler would raise "DataLoader worker ... killed" over this exit
        signal.signal(signal.SIGCHLD, _ignore)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stopped(128 + signum)

    signal.signal(signal.SIGTERM, stop)
