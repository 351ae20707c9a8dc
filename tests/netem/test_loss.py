"""Loss (with correlation), duplicate, corrupt and reorder, counted on real datagrams.

Every rate is checked against 5-sigma bounds for the number of datagrams sent (binomial,
widened by (1 + rho) / (1 - rho) where successive outcomes are correlated), so a correct
shaper fails about once in two million runs.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from netemkit import Arrival, blast, fraction_bounds, lag1, log, needs_netem, netems, seq

from pytest_enclave import ConnectionConfig, Enclave, UniformPacketDelayDistribution
from pytest_enclave.probe import ProbeClient

pytestmark = needs_netem


def lost(arrivals: list[Arrival], count: int) -> list[int]:
    """1 for each sequence number that never arrived, 0 for those that did (send order)."""
    got = {a.seq for a in arrivals}
    return [0 if i in got else 1 for i in range(count)]


def nft_rules(enclave: Enclave) -> str:
    hub = enclave.backend.hub_name  # type: ignore[attr-defined]  # the netns backend's
    cmd = ["ip", "netns", "exec", hub, "nft", "-j", "list", "ruleset"]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@pytest.mark.connection("main", "secondary", packet_loss_percentage=20.0, loss_correlation=50.0)
def test_correlated_loss_has_its_rate_and_its_correlation(enclave: Enclave) -> None:
    """Simple Gilbert model: mean loss 20 %, lag-1 correlation 50 %, mean burst 2.5."""
    n = 6000
    marks = lost(blast(enclave, "a1", "b1", n, interval_us=200), n)
    rate, rho = sum(marks) / n, lag1(marks)
    bursts = "".join(map(str, marks)).replace("0", " ").split()
    mean_burst = sum(map(len, bursts)) / len(bursts)
    log(f"loss 20 % ~50 %: lost {rate:.4f}, lag-1 correlation {rho:.3f}, burst {mean_burst:.2f}")
    low, high = fraction_bounds(n, 0.20, inflation=(1 + 0.5) / (1 - 0.5))
    assert low <= rate <= high
    assert 0.42 <= rho <= 0.58  # the estimate's sd is about 1 / sqrt(n) = 0.013
    # 1 / P(bad -> good) = 1 / ((1 - 0.2) * (1 - 0.5)) = 2.5; ~480 geometric bursts: sd 0.09
    assert 2.05 <= mean_burst <= 2.95
    for netem in netems(enclave, "b1"):  # from a1 and from a2, read back with tc
        model = netem["options"]["loss-gemodel"]
        assert (model["p"], model["r"]) == (pytest.approx(0.10), pytest.approx(0.40))


@pytest.mark.connection(
    "main",
    "secondary",
    packet_loss_percentage=30.0,
    packet_delay_distribution=UniformPacketDelayDistribution(5),
)
def test_loss_beside_netem_fields_is_applied_once_by_netem(enclave: Enclave) -> None:
    n = 4000
    marks = lost(blast(enclave, "a1", "b1", n, interval_us=200), n)
    rate = sum(marks) / n
    log(f"loss 30 % with delay 5 ms: lost {rate:.4f} (twice applied would be 0.51)")
    low, high = fraction_bounds(n, 0.30)
    assert low <= rate <= high
    assert "numgen" not in nft_rules(enclave)  # not also in nftables
    for netem in netems(enclave, "b1"):
        assert netem["options"]["loss-random"]["loss"] == pytest.approx(0.30)


@pytest.mark.connection("main", "secondary", packet_loss_percentage=30.0)
def test_plain_loss_stays_in_nftables(enclave: Enclave) -> None:
    assert "numgen" in nft_rules(enclave)
    assert netems(enclave, "b1") == [] and netems(enclave, "a1") == []


@pytest.mark.connection("main", "secondary", duplicate_percentage=20.0)
def test_duplicates_arrive_twice(enclave: Enclave) -> None:
    """Counted by the library's probe (datagrams per source: duplicates show as > 100 %)
    and by sequence number (each duplicate is an exact second copy)."""
    n = 4000
    dst = enclave.get_service("b1").ip
    with ProbeClient(dst) as receiver, ProbeClient(enclave.get_service("a1").ip) as sender:
        receiver.call("reset")
        sender.call("blast", to=dst, count=n)
        time.sleep(0.5)
        received = receiver.counts().get(enclave.get_service("a1").ip, 0)
    arrivals = blast(enclave, "a1", "b1", n, interval_us=200)
    copies = len(arrivals) - len({a.seq for a in arrivals})
    log(f"duplicate 20 %: probe counted {received / n:.4f} of sent, {copies / n:.4f} copies")
    low, high = fraction_bounds(n, 0.20)
    assert 1 + low <= received / n <= 1 + high
    assert low <= copies / n <= high
    assert {a.seq for a in arrivals} == set(range(n))  # nothing lost


@pytest.mark.connection("main", "secondary", corrupt_percentage=10.0)
def test_corrupted_datagrams_fail_their_checksum_at_the_receiver(enclave: Enclave) -> None:
    """netem flips one bit of 10 % of the frames. With 1000-byte payloads a frame is 1042
    bytes; a flip in the 6 bytes of the source MAC goes unnoticed, every other flip makes
    the receiver drop the datagram (wrong destination MAC or EtherType, IP header checksum,
    UDP checksum). So 10 % * 1036 / 1042 are lost, and almost all of them (those past the
    IP header: 1008 / 1036) are counted by the receiving kernel as UDP checksum errors."""
    n = 4000
    with seq(enclave, "b1") as receiver:
        before = receiver.call("snmp")["snmp"]["Udp"]["InCsumErrors"]
        arrivals = blast(enclave, "a1", "b1", n, interval_us=200, size=1000)
        errors = receiver.call("snmp")["snmp"]["Udp"]["InCsumErrors"] - before
    gone = sum(lost(arrivals, n))
    log(f"corrupt 10 %: lost {gone / n:.4f}, UDP checksum errors {errors / n:.4f} of sent")
    low, high = fraction_bounds(n, 0.10 * 1036 / 1042)
    assert low <= gone / n <= high
    assert 0.9 * gone <= errors <= gone  # corrupted, not merely dropped


@pytest.mark.parametrize(("gap", "expected"), [(0, 0.25), (5, 0.125)])
def test_reorder_sends_some_datagrams_at_once(enclave: Enclave, gap: int, expected: float) -> None:
    """netem with delay 25 ms, reorder 25 %: after gap - 1 datagrams that wait the delay,
    each next one goes at once with probability 25 % (then the count restarts), so a
    fraction 1 / (gap - 1 + 1 / 0.25) goes early (gap 0 means 1: 25 %; gap 5: 12.5 %).
    Early ones overtake those sent before them (all but a few sent after the sender was
    descheduled for longer than the delay)."""
    config = ConnectionConfig(
        packet_delay_distribution=UniformPacketDelayDistribution(25),
        reorder_percentage=25.0,
        reorder_gap=gap,
    )
    enclave.set_connection(("main", "secondary"), config)
    n = 3000
    arrivals = blast(enclave, "a1", "b1", n, interval_us=300)
    early = sorted(a.seq for a in arrivals if a.delay_ms < 12.5)
    overtook = _overtakers(arrivals)
    spacing = min(b - a for a, b in zip(early, early[1:]))
    log(
        f"reorder 25 % gap {gap}: {len(early) / n:.4f} early (expected {expected}), "
        f"{len(overtook) / n:.4f} overtook, closest early ones {spacing} apart"
    )
    assert len(arrivals) == n
    low, high = fraction_bounds(n, expected)
    assert low <= len(early) / n <= high
    assert spacing >= max(1, gap)  # the gap: at least gap - 1 delayed ones in between
    assert len(set(early) - set(overtook)) <= len(early) // 50  # early ones overtook


def _overtakers(arrivals: list[Arrival]) -> set[int]:
    """Sequence numbers that arrived before some lower sequence number."""
    out, lowest_after = set(), float("inf")
    for a in reversed(arrivals):
        if a.seq > lowest_after:
            out.add(a.seq)
        lowest_after = min(lowest_after, a.seq)
    return out
