"""Changing connections while traffic flows: never unshaped, never wrongly shaped, no EEXIST."""

from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time

import pytest
from netemkit import Background, classes, log, needs_netem, netems, rtts, service, summary

from pytest_enclave import (
    BLOCKED,
    ConnectionConfig,
    Enclave,
    PacketDelayDistribution,
    UniformPacketDelayDistribution,
)

pytestmark = needs_netem

EARLY = 0.05  # ms of clock-read slack: netem never sends before the delay


def delay(ms: float, **fields: float) -> ConnectionConfig:
    return ConnectionConfig(packet_delay_distribution=UniformPacketDelayDistribution(ms), **fields)


def ifbs(enclave: Enclave) -> list[str]:
    """The ifb devices in the enclave's hub namespace (read with ip)."""
    hub = enclave.backend.hub_name  # type: ignore[attr-defined]  # the netns backend's
    cmd = ["ip", "-n", hub, "-j", "link", "show", "type", "ifb"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [link["ifname"] for link in json.loads(out or "[]")]


def test_changes_never_leave_a_pair_unshaped(enclave: Enclave) -> None:
    """Datagrams flow both ways (one every 1.5 ms) and echoes go round while the connection
    alternates between 50 and 80 ms each way, ~25 times: every datagram is delayed at
    least 50 ms, none is lost (old classes are deleted only once their queue is empty), and
    the kernel keeps only the classes in force, with ids that are reused (double buffering)."""
    enclave.set_connection(("main", "secondary"), delay(50))
    flows = [
        Background(enclave, "a1", "b1", count=2500, interval_us=1500, settle=0.5),
        Background(enclave, "b1", "a2", count=2500, interval_us=1500, settle=0.5),
    ]
    echoes: list[float] = []
    echo = threading.Thread(target=lambda: echoes.extend(rtts(enclave, "a2", "b1", 25)))
    echo.start()
    changes, deadline = 0, time.monotonic() + 3.4
    while time.monotonic() < deadline:
        enclave.set_connection(("main", "secondary"), delay(80 if changes % 2 == 0 else 50))
        changes += 1
        time.sleep(0.12)
    enclave.set_connection(("main", "secondary"), delay(50))
    results = [flow.join() for flow in flows]
    echo.join()
    for arrivals, label in zip(results, ("a1->b1", "b1->a2")):
        delays = [a.delay_ms for a in arrivals]
        log(f"{changes} changes 50 <-> 80 ms, one-way {label}: {summary(delays)}")
        assert len(arrivals) == 2500 and {a.seq for a in arrivals} == set(range(2500))
        assert min(delays) >= 50 - EARLY  # never unshaped, not for one datagram
        # 50 or 80 ms, nothing else: 90 % within 5 ms of one of them (a busy host delays
        # some frames further; a wrong class would put a cluster elsewhere)
        near = sum(50 - EARLY <= d <= 55 or 80 - EARLY <= d <= 85 for d in delays)
        assert near >= 0.9 * len(delays)
        assert sum(d >= 80 - EARLY for d in delays) > 100  # both classes took turns
    log(f"echoes a2->b1 meanwhile: {summary(echoes)}")
    assert min(echoes) >= 100 - EARLY

    time.sleep(0.2)  # the last retired classes drain; the next change deletes them
    enclave.set_connection(("main", "secondary"), delay(50))
    in_force = classes(enclave, "b1")
    log(f"classes towards b1 after {changes + 2} changes: {in_force}")
    assert len(in_force) == 2  # a1 -> b1 and a2 -> b1; every retired one is gone
    assert len(classes(enclave, "a1")) == 1 and len(classes(enclave, "a2")) == 1
    assert max(int(c.split(":")[1], 16) for c in in_force) <= 0x15  # ids are reused


def test_repeated_changes_never_fail_and_leave_only_what_is_in_force(enclave: Enclave) -> None:
    cycle = [
        lambda: enclave.set_connection(("main", "secondary"), delay(50)),
        lambda: enclave.set_connection(("main", "secondary"), delay(50)),  # the same again
        lambda: enclave.set_connection(("main", "secondary"), delay(80, duplicate_percentage=5)),
        lambda: enclave.set_loss("main", "secondary", 30),  # nftables only
        lambda: enclave.set_connection(("main", "secondary"), BLOCKED),
        lambda: enclave.set_delay("main", "secondary", 10, jitter_ms=5, distribution="normal"),
        lambda: enclave.set_connection(
            config=ConnectionConfig(
                packet_loss_percentage=10,
                loss_correlation=25,
                packet_delay_distribution=PacketDelayDistribution(5),
                rate_kbit=5000,
            )
        ),
        lambda: enclave.block("a1", "b1"),
        lambda: enclave.partition("a2"),
        enclave.heal,
    ]
    started = time.perf_counter()
    for _ in range(8):
        for change in cycle:
            change()
    elapsed = time.perf_counter() - started
    log(f"{8 * len(cycle)} changes in {elapsed:.2f} s ({elapsed / 80 * 1000:.1f} ms each)")
    for name in ("a1", "a2", "b1"):  # healed: nothing of ours is left but the HTB roots
        assert classes(enclave, name) == [] and netems(enclave, name) == []
    assert ifbs(enclave) == []  # nor the devices of duplicating netems


def test_a_service_added_later_is_shaped_from_its_first_packet(enclave: Enclave) -> None:
    enclave.set_connection(("main", "secondary"), delay(30))
    enclave.add_service("b2", service("secondary"))
    first = rtts(enclave, "a1", "b2", 1)[0]  # the very first packet, ARP included
    more = rtts(enclave, "b2", "a2", 10)
    log(f"new service b2: first rtt {first:.2f} ms, then {summary(more)}")
    assert first >= 60 - EARLY and min(more) >= 60 - EARLY
    assert len(classes(enclave, "b2")) == 2  # from a1 and from a2
    enclave.remove_service("b2")
    enclave.set_connection(("main", "secondary"), delay(40))
    assert min(rtts(enclave, "a1", "b1", 5)) >= 80 - EARLY


@pytest.mark.subnetwork("secondary", "a2")
@pytest.mark.connection("main", "secondary", packet_delay_distribution=PacketDelayDistribution(25))
def test_moving_a_service_moves_its_shaping(enclave: Enclave) -> None:
    moved, stayed = rtts(enclave, "a1", "a2", 10), rtts(enclave, "a2", "b1", 10)
    log(f"a2 moved to secondary: a1<->a2 {summary(moved)}; a2<->b1 {summary(stayed)}")
    assert min(moved) >= 50 - EARLY
    assert statistics.median(stayed) < 2


def test_set_delay_undoes_itself(enclave: Enclave) -> None:
    with enclave.set_delay("main", "secondary", 30):
        during = rtts(enclave, "a1", "b1", 5)
    after = rtts(enclave, "a1", "b1", 5)
    log(f"set_delay 30 ms: during {summary(during)}; after {summary(after)}")
    assert min(during) >= 60 - EARLY and statistics.median(after) < 2
    assert classes(enclave, "b1") == []
