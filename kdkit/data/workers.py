"""What every data-loader worker does first: die with the process that started it, and leave what
it inherited out of the garbage collector's reach (`start_worker`, kdkit's worker_init_fn)."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies


def die_with_parent(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: on Linux, have the kernel SIGKILL this worker the moment its
    parent process dies (prctl PR_SET_PDEATHSIG); elsewhere nothing.

    A forked worker holds copies of its parent's file descriptors, the sockets of the run's process
    group among them. When the parent is SIGKILLed (out of memory, a scheduler, a test), those
    sockets stay open in its orphaned workers until torch's watchdog notices (it polls every 5 s),
    and the other processes of the run wait in their collectives as if it were alive, beyond the
    reach of their SIGTERM handler. Dying with the parent closes them at once."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # no prctl (a libc without it): torch's watchdog still ends the worker, later
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def freeze_inherited_objects(worker_id: int) -> None:
    """The objects a worker inherits from the main process leave the garbage collector's reach
    (gc.freeze). A collection visits every object it tracks, writing to the page of each, so a
    forked worker would otherwise copy the main process's whole heap bit by bit."""
    gc.freeze()


def start_worker(worker_id: int) -> None:
    """kdkit's DataLoader `worker_init_fn`: die_with_parent, then freeze_inherited_objects."""
    die_with_parent(worker_id)
    freeze_inherited_objects(worker_id)
