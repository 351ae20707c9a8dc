"""Helpers of the netem tests: traffic through :mod:`seqprobe`, statistics, kernel state.

Kernel state is read with iproute2's own ``tc -j`` and ``ip -j`` in the enclave's namespaces,
not by asking our code what it did.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import seqprobe

from pytest_enclave import Enclave, PortSpec, ServiceConfig
from pytest_enclave.probe import PORT, ProbeClient

# The plugin's own marker: skipped, with the reason and the fix, where netem is missing (on
# such a host, run them in user-mode-linux: tox -e netem).
needs_netem = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the netem tests need root"),
    pytest.mark.enclave_requires("netem"),
]


def log(text: str) -> None:
    """A measurement line on stderr (shown with ``-s``; kept in the report of the run)."""
    print(f"[netem] {text}", file=sys.stderr, flush=True)


def service(subnetwork: str) -> ServiceConfig:
    """A service running :mod:`seqprobe` (the library's probe with one-way delay records)."""
    return ServiceConfig(
        cmd=seqprobe.command(),
        ports={"probe": PORT, "control": PortSpec(seqprobe.CONTROL_PORT)},
        subnetwork=subnetwork,
    )


class Seq(ProbeClient):
    """The control channel of one service's seqprobe (the probe's client, another port)."""

    def __init__(self, enclave: Enclave, name: str) -> None:
        super().__init__(enclave.get_service(name).ip, seqprobe.CONTROL_PORT, timeout=120)


@contextmanager
def seq(enclave: Enclave, name: str) -> Iterator[Seq]:
    client = Seq(enclave, name)
    try:
        yield client
    finally:
        client.close()


@dataclass(frozen=True)
class Arrival:
    """One datagram as received: its sequence number, one-way delay and arrival time (ms)."""

    seq: int
    delay_ms: float
    arrived_ms: float  # the kernel's receive stamp (CLOCK_REALTIME)


def blast(
    enclave: Enclave,
    src: str,
    dst: str,
    count: int,
    interval_us: float = 0.0,
    size: int = 64,
    settle: float = 0.5,
) -> list[Arrival]:
    """Send ``count`` numbered datagrams ``src`` -> ``dst``; the arrivals, in arrival order."""
    with seq(enclave, dst) as receiver, seq(enclave, src) as sender:
        receiver.call("reset")
        sender.call("send", to=receiver.ip, count=count, interval_us=interval_us, size=size)
        time.sleep(settle)  # the last ones are still being delayed
        _until_drained(receiver)
        records = receiver.call("records")["records"]
    src_ip = enclave.get_service(src).ip
    return [
        Arrival(s, (got - sent) / 1e6, got / 1e6) for ip, s, sent, got in records if ip == src_ip
    ]


def _until_drained(receiver: Seq, quiet: float = 0.3) -> None:
    """Wait until the receiver has recorded everything (its count holds still ``quiet`` s):
    on one CPU its Python loop can lag the kernel by a thousand datagrams."""
    count, still_since = -1, time.monotonic()
    while time.monotonic() - still_since < quiet:
        time.sleep(0.05)
        now = receiver.call("count")["count"]
        if now != count:
            count, still_since = now, time.monotonic()


class Background:
    """``blast`` in a thread, for traffic that flows while the test changes connections."""

    def __init__(self, enclave: Enclave, src: str, dst: str, **kwargs: Any) -> None:
        self.result: list[Arrival] = []
        self._thread = threading.Thread(
            target=lambda: self.result.extend(blast(enclave, src, dst, **kwargs))
        )
        self._thread.start()

    def join(self) -> list[Arrival]:
        self._thread.join()
        return self.result


def rtts(enclave: Enclave, src: str, dst: str, count: int, timeout: float = 2.0) -> list[float]:
    """Echo round trips ``src`` -> ``dst`` -> ``src`` (ms) measured by the library's probe."""
    with ProbeClient(enclave.get_service(src).ip) as client:
        to = enclave.get_service(dst).ip
        got = client.call("rtt", to=to, count=count, timeout=timeout)["rtt_ms"]
    lost = sum(1 for x in got if x is None)
    assert not lost, f"{lost} of {count} echoes {src} -> {dst} were lost"
    return [float(x) for x in got]


# -- statistics -------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> str:
    q = statistics.quantiles(values, n=20)
    median = statistics.median(values)
    return (
        f"n={len(values)} min={min(values):.2f} p5={q[0]:.2f} median={median:.2f}"
        f" p95={q[-1]:.2f} max={max(values):.2f} mean={statistics.fmean(values):.2f}"
        f" sd={statistics.pstdev(values):.2f}"
    )


def fraction_bounds(n: int, p: float, inflation: float = 1.0, sigmas: float = 5.0) -> tuple:
    """Bounds on an observed fraction over n trials at rate p; ``inflation`` scales the
    variance (a positively correlated sequence has less information than n independent
    trials: (1 + rho) / (1 - rho) for a Markov chain with lag-1 correlation rho)."""
    sd = math.sqrt(p * (1 - p) * inflation / n)
    return p - sigmas * sd, p + sigmas * sd


def lag1(xs: Sequence[int]) -> float:
    """The lag-1 autocorrelation of a 0/1 sequence."""
    mean = statistics.fmean(xs)
    var = sum((x - mean) ** 2 for x in xs)
    cov = sum((a - mean) * (b - mean) for a, b in zip(xs, xs[1:]))
    return cov / var


def dist_table(name: str) -> list[int]:
    """iproute2's netem table ``name`` (read here, independently of the library)."""
    for directory in ("/usr/lib/x86_64-linux-gnu/tc", "/usr/lib/tc", "/usr/lib64/tc"):
        path = os.path.join(directory, f"{name}.dist")
        if os.path.exists(path):
            with open(path) as f:
                return [int(v) for line in f if not line.startswith("#") for v in line.split()]
    raise FileNotFoundError(f"{name}.dist")


def ks_distance(sample: Sequence[float], model: Sequence[float]) -> float:
    """Kolmogorov-Smirnov distance between two samples' empirical distributions."""
    a, b = sorted(sample), sorted(model)
    i = j = 0
    worst = 0.0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            i += 1
        else:
            j += 1
        worst = max(worst, abs(i / len(a) - j / len(b)))
    return worst


# -- kernel state, read with iproute2 ----------------------------------------------------------


def _json(cmd: list[str]) -> Any:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out or "[]")


def port_of(enclave: Enclave, name: str) -> str:
    """The hub-side interface of service ``name``'s link (found through its peer index)."""
    backend: Any = enclave.backend
    eth0 = _json(["ip", "-n", backend.netns_of(name), "-j", "link", "show", "dev", "eth0"])[0]
    links = _json(["ip", "-n", backend.hub_name, "-j", "link", "show"])
    return next(link["ifname"] for link in links if link["ifindex"] == eth0["link_index"])


def tc(enclave: Enclave, what: str, name: str) -> list[dict[str, Any]]:
    """``tc -j -s <what> show`` on the hub port towards service ``name``."""
    hub = enclave.backend.hub_name  # type: ignore[attr-defined]  # the netns backend's
    dev = port_of(enclave, name)
    return _json(["ip", "netns", "exec", hub, "tc", "-j", "-s", what, "show", "dev", dev])


def classes(enclave: Enclave, name: str) -> list[str]:
    """The HTB class ids on the port towards ``name`` (``tc class show``: iproute2 6.1 has no
    JSON for classes)."""
    hub = enclave.backend.hub_name  # type: ignore[attr-defined]  # the netns backend's
    cmd = ["ip", "netns", "exec", hub, "tc", "class", "show", "dev", port_of(enclave, name)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return sorted(line.split()[2] for line in out.splitlines() if line.startswith("class htb"))


def netems(enclave: Enclave, name: str) -> list[dict[str, Any]]:
    """The netem qdiscs on the port towards ``name``."""
    return [q for q in tc(enclave, "qdisc", name) if q["kind"] == "netem"]
