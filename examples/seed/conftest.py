"""Fixtures for the seed scenario: the topology is started once per module (etcd takes about
a second to form a cluster); the plugin puts every service back in ``main`` and every
connection back to allowed between the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import topology as topo
from seedlib import PROXY, Client, build_topology, missing_tools

from pytest_enclave import Enclave


@pytest.fixture(scope="module")
def enclave_services() -> Callable[[Enclave], None]:
    missing = missing_tools()
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: apt-get install etcd-server "
            "etcd-client haproxy (./dev setup does it)"
        )
    return build_topology


@pytest.fixture
def proxy(enclave: Enclave) -> Client:
    return Client(enclave.get_service(PROXY).ip, topo.PROXY_PORT)
