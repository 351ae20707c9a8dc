"""A traffic probe to run inside services: measures what really crosses the network.

Stdlib only, one file, so it also runs in a container as ``python3 -c "$(cat probe.py)"``.
Each probe listens on UDP ``PORT`` (a sink counting datagrams per source address and
echoing back when asked) and on TCP ``PORT`` (a control channel taking one JSON command per
line, and also a plain TCP echo when the first line is not JSON). The test process talks to
the control channel directly; that traffic is not shaped.

Commands: ``{"op": "counts"}`` -> {source ip: datagrams received}; ``{"op": "reset"}``;
``{"op": "blast", "to": ip, "count": n}`` sends n numbered datagrams to another probe;
``{"op": "rtt", "to": ip, "count": n, "timeout": s}`` -> echo round trips in ms (None: lost).
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from typing import Any

PORT = 7070
_counts: Counter[str] = Counter()
_lock = threading.Lock()


def _udp_sink(sock: socket.socket) -> None:
    while True:
        data, addr = sock.recvfrom(2048)
        if data.startswith(b"E"):
            sock.sendto(data, addr)  # echo request: answer, do not count
            continue
        with _lock:
            _counts[addr[0]] += 1


def _blast(to: str, count: int) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(count):
            s.sendto(b"D%08d" % i, (to, PORT))
            if i % 50 == 49:
                time.sleep(0.0005)  # pace, so no socket buffer overflows masquerade as loss
    return {"sent": count}


def _rtt(to: str, count: int, timeout: float) -> dict[str, Any]:
    samples: list[float | None] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for i in range(count):
            payload = b"E%08d" % i
            start = time.perf_counter()
            s.sendto(payload, (to, PORT))
            samples.append(_await_echo(s, payload, start, timeout))
    return {"rtt_ms": samples}


def _await_echo(s: socket.socket, payload: bytes, start: float, timeout: float) -> float | None:
    while True:
        try:
            data, _ = s.recvfrom(2048)
        except OSError:
            return None
        if data == payload:
            return (time.perf_counter() - start) * 1000.0
        if time.perf_counter() - start > timeout:
            return None


def handle(command: dict[str, Any]) -> dict[str, Any]:
    op = command.get("op")
    if op == "counts":
        with _lock:
            return {"counts": dict(_counts)}
    if op == "reset":
        with _lock:
            _counts.clear()
        return {"ok": True}
    if op == "blast":
        return _blast(command["to"], int(command["count"]))
    if op == "rtt":
        return _rtt(command["to"], int(command["count"]), float(command.get("timeout", 1.0)))
    return {"error": f"unknown op {op!r}"}


class _Control(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            try:
                command = json.loads(line)
            except ValueError:
                self.wfile.write(line)  # plain TCP echo
                self.wfile.flush()
                continue
            self.wfile.write(json.dumps(handle(command)).encode() + b"\n")
            self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(host: str = "0.0.0.0", port: int = PORT) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # room for bursts: drops must come from the network, not from our buffer
        udp.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (root)
    except OSError:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    udp.bind((host, port))
    threading.Thread(target=_udp_sink, args=(udp,), daemon=True).start()
    with _Server((host, port), _Control) as server:
        print(f"probe listening on {host}:{port} (pid {os.getpid()})", flush=True)
        server.serve_forever()


class ProbeClient:
    """Talks to a probe's control channel from the test process."""

    def __init__(self, ip: str, port: int = PORT, timeout: float = 60.0) -> None:
        self.ip = ip
        self._sock = socket.create_connection((ip, port), timeout=timeout)
        self._file = self._sock.makefile("rwb")

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self._file.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        self._file.flush()
        answer: dict[str, Any] = json.loads(self._file.readline())
        return answer

    def counts(self) -> dict[str, int]:
        return dict(self.call("counts")["counts"])

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ProbeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def command(python: str = sys.executable) -> list[str]:
    """The argv that runs a probe inside a service (with this interpreter)."""
    return [python, "-m", "pytest_enclave.probe"]


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else "0.0.0.0")
