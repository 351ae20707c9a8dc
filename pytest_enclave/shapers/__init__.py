"""Shapers make a compiled policy table real in the kernel, each change one transaction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from ..matrix import PolicyTable

__all__ = ["Shaper"]


class Shaper(Protocol):
    """What the enclave needs from a shaper: check, apply whole tables, clean up."""

    def check(self, table: PolicyTable) -> None:
        """Raise CapabilityError if ``table`` asks for what this shaper cannot do here."""

    def apply(self, table: PolicyTable, addresses: Mapping[str, str]) -> None:
        """Replace everything in force by ``table`` (service names mapped by ``addresses``)."""

    def close(self, keep: bool = False) -> None:
        """Remove everything this shaper added to the kernel (``keep``: leave it in force,
        only free threads and sockets)."""
