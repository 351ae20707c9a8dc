"""The netem tests' topology: main = {a1, a2}, secondary = {b1}, every service a seqprobe.

Built once per session (services cost about half a second each in user-mode-linux) and
restored by the plugin before every test, so each test starts with every connection allowed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from netemkit import rtts, service

from pytest_enclave import Enclave

SERVICES = {"a1": "main", "a2": "main", "b1": "secondary"}


@pytest.fixture(scope="session")
def enclave_services() -> Callable[[Enclave], None]:
    def run(enclave: Enclave) -> None:
        for name, subnetwork in SERVICES.items():
            enclave.add_service(name, service(subnetwork))
        for src in SERVICES:  # neighbours resolved before anything is measured
            for dst in SERVICES:
                if src != dst:
                    rtts(enclave, src, dst, 1)

    return run


def pytest_report_header() -> str:
    from pytest_enclave.caps import has_netem

    missing = has_netem()
    return f"kernel {os.uname().release}: " + ("has sch_netem" if missing is None else missing)
