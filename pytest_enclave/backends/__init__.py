"""Backends run services and give each an address on the enclave's network.

The enclave needs little from a backend (the :class:`Backend` protocol below): start and
signal services, run commands inside them, publish names, hand out the shaper that filters
the enclave's bridge, and remove exactly what it made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..config import ServiceConfig

if TYPE_CHECKING:
    from .._linux import Slot
    from ..shapers import Shaper

__all__ = ["Backend", "ExecResult", "ServiceSpec", "get_backend"]


@dataclass(frozen=True)
class ServiceSpec:
    """A service as the backend sees it: placeholders already substituted."""

    name: str
    ip: str
    config: ServiceConfig
    argv: tuple[str, ...]
    env: Mapping[str, str]


@dataclass(frozen=True)
class ExecResult:
    """The outcome of ``Enclave.exec``: like ``subprocess.CompletedProcess``, text output."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Backend(Protocol):
    name: str
    gateway_ip: str  # the test process's own address on the enclave network

    def open(self, slot: Slot, run_dir: str) -> Shaper: ...

    def start(self, spec: ServiceSpec) -> None: ...

    def exited(self, name: str) -> int | None: ...

    def signal(self, name: str, signum: int) -> None: ...

    def stop(self, name: str, timeout: float) -> None: ...

    def exec(
        self, name: str, argv: Sequence[str], timeout: float | None, input: str | None
    ) -> ExecResult: ...

    def log_path(self, name: str) -> str: ...

    def set_hosts(self, entries: Mapping[str, str]) -> None: ...

    def remove(self, name: str) -> None: ...

    def inspect_hint(self, name: str) -> str: ...

    def close(self, keep: bool = False) -> None: ...


def get_backend(name: str) -> Backend:
    """The backend called ``name`` ("netns" or "docker")."""
    from ..errors import ConfigError

    if name == "netns":
        from .netns import NetnsBackend

        return NetnsBackend()
    if name == "docker":
        from .docker import DockerBackend  # type: ignore[import-not-found,unused-ignore]

        return DockerBackend()  # type: ignore[no-any-return,unused-ignore]
    raise ConfigError(f"backend={name!r} is not allowed: use 'netns' (default) or 'docker'")
