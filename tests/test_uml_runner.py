"""Tests for :mod:`pytest_enclave.uml` (commands run inside a User-mode Linux guest)."""

from __future__ import annotations

import io
import os
import sys
import time

import pytest

from pytest_enclave.uml import EXIT_TIMEOUT, run_in_uml, uml_available

_UNAVAILABLE = uml_available()

pytestmark = [
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"UML unusable: {_UNAVAILABLE}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the UML runner tests need root"),
]


class _TimedBytes(io.BytesIO):
    """A byte buffer that remembers when each chunk was written."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[tuple[float, bytes]] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.chunks.append((time.monotonic(), bytes(data)))
        return super().write(data)


def test_exit_status_propagates() -> None:
    assert run_in_uml(["sh", "-c", "exit 7"], modules=()) == 7


def test_output_reaches_host_fds(capfd: pytest.CaptureFixture[str]) -> None:
    status = run_in_uml(["sh", "-c", "echo to-stdout; echo to-stderr >&2"], modules=())
    out, err = capfd.readouterr()
    assert status == 0
    assert out == "to-stdout\n"
    assert err == "to-stderr\n"


def test_output_is_streamed_while_running(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _TimedBytes()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8"))
    status = run_in_uml(["sh", "-c", "echo first; sleep 2; echo second"], modules=())
    assert status == 0
    assert raw.getvalue() == b"first\nsecond\n"
    first = next(t for t, data in raw.chunks if b"first" in data)
    second = next(t for t, data in raw.chunks if b"second" in data)
    assert second - first > 1.5, "stdout was buffered instead of streamed"


def test_guest_kernel_has_netem(capfd: pytest.CaptureFixture[str]) -> None:
    script = (
        "cat /proc/sys/kernel/osrelease"
        " && modprobe sch_netem"
        " && tc qdisc add dev lo root netem delay 10ms"
        " && tc qdisc show dev lo"
    )
    status = run_in_uml(["sh", "-c", script])
    out, err = capfd.readouterr()
    assert status == 0, err
    release, _, qdiscs = out.partition("\n")
    assert release.startswith("6.1")
    assert "netem" in qdiscs and "delay 10ms" in qdiscs


def test_timeout_kills_guest(capfd: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    assert run_in_uml(["sleep", "600"], modules=(), timeout=8) == EXIT_TIMEOUT
    assert time.monotonic() - started < 30
    assert "timed out" in capfd.readouterr().err
