# test_outage.py
import pytest
from pytest_enclave import BLOCKED, ConnectionConfig, UniformPacketDelayDistribution


def reachable(enclave, src, dst):
    """Real traffic: an HTTP request from service src to service dst (names resolve)."""
    argv = ["curl", "-s", "-m", "1", "-o", "/dev/null", f"http://{dst}:8000/"]
    return enclave.exec(src, argv).returncode == 0


def test_all_connected(enclave):
    assert reachable(enclave, "app", "db_1") and reachable(enclave, "app", "db_2")


@pytest.mark.subnetwork("secondary", "db_2")
@pytest.mark.connection("main", "secondary", BLOCKED)
def test_partitioned(enclave):
    assert reachable(enclave, "app", "db_1")
    assert not reachable(enclave, "app", "db_2")
    enclave.kill("db_1")  # the next test gets it back, restarted


@pytest.mark.subnetwork("secondary", "db_2")
@pytest.mark.connection("main", "secondary", ConnectionConfig(packet_loss_percentage=90.0))
def test_lossy(enclave):
    assert enclave.connection("main", "secondary").packet_loss_percentage == 90.0


def test_faults_mid_test(enclave):
    assert reachable(enclave, "app", "db_1")  # restored: db_1 runs again
    with enclave.partition(["db_2"]):  # db_2 | everyone else, undone at the end of the block
        assert not reachable(enclave, "app", "db_2")
    enclave.pause("db_1")  # resumed before the next test
    assert reachable(enclave, "app", "db_2")


@pytest.mark.subnetwork("secondary", "db_2")
@pytest.mark.connection(
    "main", "secondary",
    packet_delay_distribution=UniformPacketDelayDistribution(50),
    skip_unsupported=True,  # skipped, with the reason, on a kernel without netem
)
def test_slow_link(enclave):
    ...
