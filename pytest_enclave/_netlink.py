"""The boundary to pyroute2's errors, shared by the modules that talk netlink."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pyroute2.netlink.exceptions import NetlinkError

from .errors import BackendError

T = TypeVar("T")


def netlink_call(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn``; a NetlinkError becomes a BackendError saying what failed."""
    try:
        return fn()
    except NetlinkError as exc:
        raise BackendError(f"{what} failed: {exc}") from exc
