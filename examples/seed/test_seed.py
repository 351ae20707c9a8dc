"""The seed scenario ("simulating a networking failure") as a test suite, with real software.

etcd_node_2 and app_service_2 are the services the seed moves to the second subnetwork.
"""

from __future__ import annotations

import time
import uuid

import pytest
import topology as topo
from seedlib import APPS, ETCD, MAIN, PROXY, SECONDARY, Client, etcdctl

from pytest_enclave import BLOCKED, Enclave


def _key() -> str:
    return f"k-{uuid.uuid4().hex[:8]}"


def _until(predicate, timeout: float = 15.0, every: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def _serializable_get(enclave: Enclave, node: str, key: str) -> str | None:
    code, out = etcdctl(enclave, node, "get", key, "--consistency=s", "--print-value-only")
    return out.strip() if code == 0 and out.strip() else None


def _load(proxy: Client, count: int) -> tuple[float, set[str]]:
    """PUT then GET ``count`` keys through the proxy: success ratio and which apps served."""
    ok, served = 0, set()
    for _ in range(count):
        key = _key()
        status, body = proxy.put(key, "v")
        if status == 200:
            served.add(body["served_by"])
            status, body = proxy.get(key)
            if status == 200:
                served.add(body["served_by"])
                ok += body.get("value") == "v"
    return ok / count, served


def test_all_healthy_requests_succeed_and_writes_reach_every_node(enclave, proxy) -> None:
    ratio, served = _load(proxy, 40)
    assert ratio == 1.0
    assert served == set(APPS)  # the proxy balances across both apps
    key = _key()
    assert proxy.put(key, "replicated")[0] == 200
    for node in ETCD:
        value = _until(lambda node=node: _serializable_get(enclave, node, key))
        assert value == "replicated", node


@pytest.mark.subnetwork(SECONDARY, "etcd_node_2", "app_service_2")
def test_moving_two_services_with_the_default_connection_changes_nothing(enclave, proxy):
    assert enclave.get_service("etcd_node_2").subnetwork == SECONDARY
    assert enclave.get_service(PROXY).subnetwork == MAIN
    ratio, served = _load(proxy, 40)
    assert ratio == 1.0 and served == set(APPS)
    key = _key()
    proxy.put(key, "x")
    assert _until(lambda: _serializable_get(enclave, "etcd_node_2", key)) == "x"


@pytest.mark.subnetwork(SECONDARY, "etcd_node_2", "app_service_2")
@pytest.mark.connection(MAIN, SECONDARY, packet_loss_percentage=90.0)
def test_90_percent_loss_the_proxy_keeps_serving_and_secondary_degrades(
    enclave, proxy, record_property
):
    ratio, _ = _load(proxy, 60)
    record_property("proxy_success_ratio", ratio)
    assert ratio >= 0.95, f"success ratio through the proxy under 90% loss: {ratio:.2f}"
    # writes still commit: a linearizable read from the majority side sees them
    key = _key()
    assert proxy.put(key, "committed")[0] == 200
    code, out = etcdctl(enclave, "etcd_node_1", "get", key, "--print-value-only")
    assert code == 0 and out.strip() == "committed"
    # the secondary side, asked directly, is measurably worse than the proxy
    app2 = Client(enclave.get_service("app_service_2").ip, topo.APP_PORT, timeout=3.0)
    direct = sum(app2.put(_key(), "v")[0] == 200 for _ in range(8)) / 8
    record_property("app_service_2_direct_success_ratio", direct)
    print(f"under 90% loss: via proxy {ratio:.2f} succeeded, app_service_2 directly {direct:.2f}")
    assert direct < ratio, f"app_service_2 directly: {direct:.2f}, via proxy: {ratio:.2f}"


@pytest.mark.subnetwork(SECONDARY, "etcd_node_2", "app_service_2")
@pytest.mark.connection(MAIN, SECONDARY, BLOCKED)
def test_blocked_minority_cannot_serve_quorum_reads_and_catches_up_after_heal(enclave, proxy):
    key = _key()
    assert proxy.put(key, "during-partition")[0] == 200
    # the majority serves linearizable reads
    code, out = etcdctl(enclave, "etcd_node_1", "get", key, "--print-value-only")
    assert code == 0 and out.strip() == "during-partition"
    # the cut-off member cannot: a quorum read times out, and it has not seen the write
    code, out = etcdctl(enclave, "etcd_node_2", "get", key, "--print-value-only", timeout="1s")
    assert code != 0, out
    assert _serializable_get(enclave, "etcd_node_2", key) is None
    # requests through the proxy still succeed
    ratio, served = _load(proxy, 20)
    assert ratio == 1.0 and served == {"app_service_1"}
    enclave.heal()
    assert _until(lambda: _serializable_get(enclave, "etcd_node_2", key)) == "during-partition"
    code, _ = _until(
        lambda: (lambda r: r if r[0] == 0 else None)(etcdctl(enclave, "etcd_node_2", "get", key)),
        timeout=15,
    ) or (1, "")
    assert code == 0
