"""Atomic writes of files and whole folders: readers see the old version or the complete new one.

Shared by every package (checkpoints, caches, saved students, reports); it imports nothing of kdkit
but the error type.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kdkit.registry import KdkitError


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
