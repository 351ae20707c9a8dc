"""Shared test helpers: probes in services, kernel state read independently of our code."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from pytest_enclave import Enclave, ServiceConfig, probe

ROOT = os.geteuid() == 0


def add_probes(enclave: Enclave, *names: str, subnetwork: str = "main") -> None:
    for name in names:
        enclave.add_service(
            name,
            ServiceConfig(cmd=probe.command(), ports={"probe": probe.PORT}, subnetwork=subnetwork),
        )


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    """Bounds on the observed loss fraction for n trials at loss p (``sigmas`` wide)."""
    sd = math.sqrt(p * (1 - p) / n)
    return p - sigmas * sd, p + sigmas * sd


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


def host_state() -> dict[str, object]:
    """What the host has, read with the kernel's own tools (not our code)."""
    nft = json.loads(sh("nft -j list ruleset") or "{}")
    routes = json.loads(sh("ip -j route"))
    links = [link["ifname"] for link in json.loads(sh("ip -j link"))]
    netns = sorted(n.split()[0] for n in sh("ip netns list").splitlines())
    return {"nft": nft, "routes": routes, "links": links, "netns": netns}


def foreign(state: dict[str, object]) -> dict[str, object]:
    """A host state without any enclave's resources (other xdist workers make some too)."""
    import re

    # pe<N>h/pe<N>d: enclaves' host links and Docker bridges; veth + 7 hex: Docker's own
    # host ends of containers' links (the docker backend's tests may run in other workers)
    mine = re.compile(r"pe\d+(h|d|-.*)$|veth[0-9a-f]{7}$")
    return {
        "nft": [x for x in state["nft"]["nftables"] if not _docker_or_enclave(x)],  # type: ignore[index]
        "routes": [r for r in state["routes"] if not mine.match(r.get("dev", ""))],  # type: ignore[union-attr]
        "links": [x for x in state["links"] if not mine.match(x)],  # type: ignore[union-attr]
        "netns": [x for x in state["netns"] if not mine.match(x)],  # type: ignore[union-attr]
    }


def _docker_or_enclave(entry: dict[str, dict[str, object]]) -> bool:
    """nft entries that Docker rewrites as networks come and go (iptables-nft's ip filter and
    nat tables), or that belong to some enclave of the docker backend."""
    import re

    kind, body = next(iter(entry.items()))
    if kind == "metainfo":
        return False
    table = str(body["name"] if kind == "table" else body.get("table", ""))
    if body.get("family") in ("ip", "ip6") and table in ("filter", "nat"):
        return True
    return re.match(r"pytest_enclave_pe\d+", table) is not None


def ours(state: dict[str, object]) -> dict[str, list[str]]:
    """The parts of a host state that pytest-enclave would have made."""
    import re

    return {
        "links": [x for x in state["links"] if re.fullmatch(r"pe\d+h", x)],  # type: ignore[union-attr]
        "netns": [x for x in state["netns"] if re.match(r"pe\d+-", x)],  # type: ignore[union-attr]
    }


def tcp_client_script(peer: str, port: int, go_file: str) -> list[str]:
    """A client that opens a TCP connection, proves it works, waits for ``go_file``, then
    sends again and prints whether the echo came back."""
    code = f"""
import os, socket, sys, time
s = socket.create_connection(({peer!r}, {port}), timeout=5)
s.sendall(b"hello\\n"); assert s.recv(100) == b"hello\\n"
print("connected", flush=True)
while not os.path.exists({go_file!r}):
    time.sleep(0.01)
s.settimeout(2.0)
try:
    s.sendall(b"again\\n"); data = s.recv(100)
    print("got", data, flush=True)
except OSError as exc:
    print("timeout", type(exc).__name__, flush=True)
time.sleep(1000)
"""
    return [sys.executable, "-c", code]
