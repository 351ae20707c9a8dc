"""Ready conditions: small checks that ``add_service`` waits for (with tenacity).

Each is a frozen object with ``check(probe) -> bool``; a condition's own ``timeout`` (or the
service's ``ready_timeout``) bounds how long it is retried. Write your own by giving any object
a ``check`` method and a ``describe`` method.
"""

from __future__ import annotations

import http.client
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import tenacity

from .config import Duration, seconds
from .errors import ReadyTimeoutError, ServiceError

__all__ = ["Exec", "HttpGet", "LogLine", "ReadyCondition", "ReadyProbe", "TcpPort", "wait_ready"]


class ReadyProbe(Protocol):
    """What a condition may look at: the service's address, a command inside it, its log."""

    name: str
    ip: str

    def exec_status(self, argv: Sequence[str], timeout: float) -> int: ...

    def log_text(self) -> str: ...

    def exited(self) -> int | None: ...


class ReadyCondition(Protocol):
    timeout: Duration | None

    def check(self, probe: ReadyProbe) -> bool: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class TcpPort:
    """The service accepts TCP connections on ``port`` (checked from the test process)."""

    port: int
    timeout: Duration | None = None

    def check(self, probe: ReadyProbe) -> bool:
        try:
            with socket.create_connection((probe.ip, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def describe(self) -> str:
        return f"TCP port {self.port} accepting connections"


@dataclass(frozen=True)
class HttpGet:
    """``GET path`` on ``port`` answers with ``status`` (checked from the test process)."""

    port: int
    path: str = "/"
    status: int = 200
    timeout: Duration | None = None

    def check(self, probe: ReadyProbe) -> bool:
        conn = http.client.HTTPConnection(probe.ip, self.port, timeout=1.0)
        try:
            conn.request("GET", self.path)
            return conn.getresponse().status == self.status
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def describe(self) -> str:
        return f"GET :{self.port}{self.path} answering {self.status}"


@dataclass(frozen=True)
class Exec:
    """``argv`` run inside the service exits with status 0."""

    argv: Sequence[str]
    timeout: Duration | None = None

    def check(self, probe: ReadyProbe) -> bool:
        return probe.exec_status(self.argv, timeout=5.0) == 0

    def describe(self) -> str:
        return f"command {list(self.argv)!r} succeeding"


@dataclass(frozen=True)
class LogLine:
    """A line of the service's output matches the regular expression ``pattern``."""

    pattern: str
    timeout: Duration | None = None

    def check(self, probe: ReadyProbe) -> bool:
        return re.search(self.pattern, probe.log_text(), re.MULTILINE) is not None

    def describe(self) -> str:
        return f"log line matching {self.pattern!r}"


def log_tail(text: str, lines: int = 20) -> str:
    tail = text.splitlines()[-lines:]
    return "\n".join(f"    | {line}" for line in tail) if tail else "    | (no output)"


def wait_ready(
    probe: ReadyProbe,
    conditions: Sequence[ReadyCondition],
    default_timeout: float,
    sleep: Callable[[float], None] | None = None,
) -> None:
    """Wait until every condition holds; raise ServiceError/ReadyTimeoutError with the log tail.

    Conditions are checked in order; those without a ``timeout`` of their own share
    ``default_timeout`` (seconds) between them, from the start of the wait.
    """
    deadline = time.monotonic() + default_timeout
    for condition in conditions:
        if condition.timeout is None:
            limit, budget = max(0.0, deadline - time.monotonic()), default_timeout
        else:
            limit = budget = seconds(condition.timeout, "timeout")

        def attempt(condition: ReadyCondition = condition) -> bool:
            status = probe.exited()
            if status is not None:
                raise ServiceError(
                    f"service {probe.name!r} exited with status {status} before "
                    f"{condition.describe()}; last lines of its log:\n{log_tail(probe.log_text())}"
                )
            return condition.check(probe)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_delay(limit),
            wait=tenacity.wait_exponential(multiplier=0.002, max=0.1),
            retry=tenacity.retry_if_result(lambda ok: not ok),
            retry_error_callback=lambda state: False,
            sleep=sleep or time.sleep,
        )
        if not retrying(attempt):
            raise ReadyTimeoutError(
                f"service {probe.name!r} did not get ready within {budget:g}s: waited for "
                f"{condition.describe()}; last lines of its log:\n{log_tail(probe.log_text())}"
            )
