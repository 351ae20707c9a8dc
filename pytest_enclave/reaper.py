"""Find and remove what killed runs left behind (and enclaves kept for inspection)."""

from __future__ import annotations

import fcntl
import os
from contextlib import suppress

from . import _linux
from .errors import ConfigError

__all__ = ["clean"]


def clean(include_kept: bool = True, enclave_ids: list[str] | None = None) -> list[str]:
    """Reap every slot whose lock is free (or only those of ``enclave_ids``, e.g. "pe12").

    Returns what was removed. A slot held by a live enclave is never touched.
    """
    from .backends.netns import reap_slot

    removed: list[str] = []
    if not os.path.isdir(_linux.STATE_DIR):
        return removed
    for number in _slots(enclave_ids):
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
            removed += [f"run directory {d}" for d in _linux.remove_run_dirs(number)]
            if kept:
                os.unlink(marker)
                removed.append(f"kept enclave pe{number}")
        finally:
            os.close(fd)
    return removed


def _slots(enclave_ids: list[str] | None) -> list[int]:
    if enclave_ids is None:
        return list(range(_linux.Slot.COUNT))
    numbers = []
    for enclave_id in enclave_ids:
        digits = enclave_id[2:] if enclave_id.startswith("pe") else enclave_id
        if not digits.isdigit() or not 0 <= int(digits) < _linux.Slot.COUNT:
            raise ConfigError(
                f"enclave id {enclave_id!r} is not allowed: give ids like pe12 "
                f"(pe0 to pe{_linux.Slot.COUNT - 1}), as printed for kept enclaves"
            )
        numbers.append(int(digits))
    return numbers


def _reap_docker(number: int) -> list[str]:
    with suppress(ImportError):
        from .backends.docker import reap_slot as reap_docker  # type: ignore[import-not-found,unused-ignore]

        return list(reap_docker(number))  # type: ignore[no-any-return,unused-ignore]
    return []
