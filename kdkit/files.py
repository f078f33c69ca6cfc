"""Atomic writes of files and whole folders (readers see the old version or the complete new one),
and an exclusive lock on a folder (one writer at a time).

Shared by every package (checkpoints, caches, saved students, reports); it imports nothing of kdkit
but the error type (and the console, lazily, for a lock's notes).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from kdkit.console import console
from kdkit.registry import KdkitError


def check_new_output(path: str | Path, overwrite: bool, hint: str) -> bool:
    """Refuse to write at `path` when something is there already (a file, or a folder with more
    than a lock file in it), unless `overwrite`: nothing finished is written over unless the
    command says so. The refusal names the path, then `hint` (what to do instead). Returns
    whether something is there (and is to be replaced)."""
    path = Path(path)
    there = path.exists() and (not path.is_dir() or any(p.name != LOCK_NAME for p in path.iterdir()))
    if there and not overwrite:
        raise KdkitError(f"{path} exists: {hint}")
    return there


def clear_folder(folder: Path) -> None:
    """Remove everything in `folder` but its lock file (held by the caller)."""
    for p in folder.iterdir():
        if p.name != LOCK_NAME:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def disk_full(e: BaseException) -> bool:
    """Whether `e` is "no space left on device" (or a disk quota exceeded)."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def out_of_space(path: Path, kept: str) -> KdkitError:
    return KdkitError(f"out of disk space writing {path}; {kept} is intact (temporary files removed): "
                      f"free some space and run again (--resume RUN continues a run)")


def fsync_dir(folder: str | Path) -> None:
    """Make new entries and renames in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Any) -> Path:
    """Write via `write(tmp_path)` to a temporary file beside `path`, fsync, then rename over `path`:
    readers see the old file or the complete new one, never a partial one. Out of disk space is a
    KdkitError; the temporary file is removed and the previous `path` left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files (and writers may recreate them)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(e):
            raise out_of_space(path, "the previous version of the file") from None
        raise
    fsync_dir(path.parent)
    return path


def atomic_folder(path: str | Path, write: Any) -> Path:
    """Write a whole folder via `write(tmp_folder)` into a temporary folder beside `path`, fsync every
    file and the folder, then rename it to `path` (replacing a folder of that name). A crash leaves
    no `path` or a complete one, plus at most a hidden `.NAME.*.tmp` folder (see
    remove_stale_temporaries). Out of disk space is a KdkitError, as in atomic_write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders
        write(tmp)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if path.exists():  # the same position written again: swap the new one in, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise out_of_space(path, "the previous checkpoint") from None
        raise
    fsync_dir(path.parent)
    return path


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete the hidden `.NAME.*.tmp` files and folders that a crash inside atomic_write or
    atomic_folder left in `folder`."""
    folder = Path(folder)
    for p in folder.glob(".*.tmp") if folder.is_dir() else ():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


LOCK_NAME = ".kdkit.lock"


@contextmanager
def exclusive_lock(folder: str | Path, purpose: str) -> Iterator[Path]:
    """Hold FOLDER/.kdkit.lock for the body: a second holder, in another process or this one, is
    refused with a KdkitError naming the holder (its purpose, pid, host, start time and command).
    `folder` is created if needed, and removed again on exit if this call created it and it is
    empty; the lock file is removed on exit, exception or not. Yields the lock file's path.

    The lock is filelock's FileLock (flock on an open file, on Unix): the kernel releases it when
    the process holding it dies (SIGKILL, OOM, a crashed node's NFS lease), so a killed holder's
    lock is recovered by the next taker with no guessing from pids; filelock also takes a file
    whose inode a releasing holder unlinked as not held, and falls back to a marker file where the
    file system has no flock (with a warning). The file carries the holder's description (JSON),
    written once the lock is held; one left by a killed process is taken over with a note. Caveats:
    the lock is per open file, so fork()ed children (DataLoader workers) share it and hold it until
    they exit; on NFS, Linux maps flock to NFS byte-range locks, which do exclude other hosts (NFSv4,
    or v3 with lockd), unless the mount uses `nolock`/`local_lock=flock`, where only this host is
    excluded: a lock file left by another host is then taken over with a warning to make sure
    nothing runs there.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise KdkitError(f"{folder} is a file, not a folder: choose another path")
    created = not folder.exists()
    lock = _acquire(folder, purpose)
    try:
        yield folder / LOCK_NAME
    finally:
        _release(lock, folder, created)


def _acquire(folder: Path, purpose: str) -> FileLock:
    path = folder / LOCK_NAME
    me = {"purpose": purpose, "pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)[:300]}
    previous: dict = {}

    def describe(fd: int) -> None:  # filelock calls it with the lock file's descriptor, once held
        previous.update(_read_holder(fd))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)

    for _ in range(20):
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, timeout=0, thread_local=False, on_acquired=describe)
        try:
            lock.acquire()
        except Timeout:
            holder = _read_holder_file(path)
            raise KdkitError(f"{folder} is in use by {_describe(holder)}: wait for it to finish, or choose another "
                             f"folder{_hint(holder)}") from None
        except FileNotFoundError:  # the folder was removed by a holder releasing it: make it again
            continue
        except OSError as e:
            raise KdkitError(f"cannot lock {path}: {e.strerror or e}") from None
        if previous:  # a holder that did not release: it was killed (flock is free again)
            here = previous.get("host") == socket.gethostname()
            _note(f"{'' if here else '[bold yellow]warning: '}taking over the lock of {folder} left by "
                  f"{_describe(previous)}" + ("" if here else ": that process has ended, or this file system does "
                                              "not share locks between hosts; make sure nothing runs there"))
        return lock
    raise KdkitError(f"could not lock {path}: other processes keep replacing it")


def _release(lock: FileLock, folder: Path, created: bool) -> None:
    try:
        (folder / LOCK_NAME).unlink()  # while still locked, so a waiting taker makes a fresh file
    except OSError:
        pass
    lock.release()
    if created:
        try:
            folder.rmdir()  # nothing was written under it: leave nothing behind
        except OSError:
            pass


def _read_holder_file(path: Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (starting up: it has not described itself yet)"
    command = f", `{holder['command']}`" if holder.get("command") else ""
    return (f"a kdkit {holder.get('purpose', 'process')} (pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}{command})")


def _hint(holder: dict) -> str:
    """When the holder's pid is gone on this host, the lock is held by a child it forked."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return ""
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return f" (pid {holder['pid']} has ended; a child process of it still holds the lock: retry in a few seconds)"
    except OSError:
        pass
    return ""


def _note(message: str) -> None:
    console.print(message, soft_wrap=True)  # paths stay whole, one line
