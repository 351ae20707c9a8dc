"""Find and remove what killed runs left behind (and enclaves kept for inspection)."""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import suppress

from . import _linux

__all__ = ["clean"]


def clean(include_kept: bool = True) -> list[str]:
    """Reap every slot whose lock is free; returns what was removed."""
    from .backends.netns import reap_slot

    removed: list[str] = []
    if not os.path.isdir(_linux.STATE_DIR):
        return removed
    for number in range(_linux.Slot.COUNT):
        marker = os.path.join(_linux.STATE_DIR, f"slot-{number}.kept")
        kept = os.path.exists(marker)
        if kept and not include_kept:
            continue
        lock = os.path.join(_linux.STATE_DIR, f"slot-{number}.lock")
        if not os.path.exists(lock) and not kept:
            continue
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # in use by a live enclave
            removed += [f"network namespace {n}" for n in reap_slot(number)]
            removed += _reap_docker(number)
            if kept:
                with open(marker) as f:
                    run_dir = f.read().strip()
                if run_dir.startswith("/tmp/pytest-enclave-"):
                    shutil.rmtree(run_dir, ignore_errors=True)
                os.unlink(marker)
                removed.append(f"kept enclave pe{number}")
        finally:
            os.close(fd)
    return removed


def _reap_docker(number: int) -> list[str]:
    with suppress(ImportError):
        from .backends.docker import reap_slot as reap_docker  # type: ignore[import-not-found,unused-ignore]

        return list(reap_docker(number))  # type: ignore[no-any-return,unused-ignore]
    return []
