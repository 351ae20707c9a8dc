"""Rate: a connection's bandwidth caps what crosses it, each way, and only there."""

from __future__ import annotations

import pytest
from netemkit import Arrival, blast, log, needs_netem, netems

from pytest_enclave import Enclave

pytestmark = needs_netem

PAYLOAD = 1000
FRAME = PAYLOAD + 8 + 20 + 14  # UDP, IPv4 and Ethernet headers: netem counts frame bytes


def throughput_kbit(arrivals: list[Arrival]) -> float:
    """Frame bits per second between the first and the last arrival, in kbit/s."""
    times = sorted(a.arrived_ms for a in arrivals)
    return (len(times) - 1) * FRAME * 8 / (times[-1] - times[0])  # bits/ms = kbit/s


@pytest.mark.connection("main", "secondary", rate_kbit=1000.0)
def test_rate_caps_throughput_each_way(enclave: Enclave) -> None:
    """200 datagrams sent as fast as the sender can: they leave netem at 1000 kbit/s, one
    1042-byte frame every 8.34 ms; the kernel's arrival stamps give the rate within 2 %
    (timer slack on 199 intervals of 8.3 ms). Unshaped pairs go far faster."""
    there = throughput_kbit(blast(enclave, "a1", "b1", 200, size=PAYLOAD, settle=2.5))
    back = throughput_kbit(blast(enclave, "b1", "a1", 200, size=PAYLOAD, settle=2.5))
    inside = throughput_kbit(blast(enclave, "a1", "a2", 200, size=PAYLOAD))
    log(f"rate 1000 kbit: a1->b1 {there:.1f} kbit/s, b1->a1 {back:.1f}, a1->a2 {inside:.0f}")
    assert there == pytest.approx(1000, rel=0.02)
    assert back == pytest.approx(1000, rel=0.02)
    assert inside > 10_000
    for netem in netems(enclave, "b1"):
        assert netem["options"]["rate"]["rate"] == 125000  # bytes/s, read back with tc
