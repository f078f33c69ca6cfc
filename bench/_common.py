"""Helpers the benchmarks share: which CPU ran them, and which kdkit was measured."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def kdkit_source() -> dict:
    """Which kdkit was measured: its folder, a digest of its .py files and, inside a git checkout,
    the commit and how many files under kdkit/ differ from it (a working tree mid-change)."""
    import hashlib
    import subprocess

    import kdkit

    where = Path(kdkit.__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(where.rglob("*.py")):
        digest.update(f.relative_to(where).as_posix().encode() + b"\0" + f.read_bytes())
    info: dict = {"path": str(where), "version": getattr(kdkit, "__version__", None),
                  "py_sha256": digest.hexdigest()[:16]}
    try:
        r = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            changed = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--", "."],
                                     capture_output=True, text=True, timeout=10).stdout
            info.update(commit=r.stdout.strip(), kdkit_changed_files=len(changed.splitlines()))
    except (OSError, subprocess.SubprocessError):
        pass
    return info
