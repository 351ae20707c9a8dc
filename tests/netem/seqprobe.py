"""A service program for the netem tests: the library's probe, plus one-way delay records.

Runs :func:`pytest_enclave.probe.serve` (UDP/TCP 7070, for ``rtt`` and ``counts``) and adds:

* UDP ``SEQ_PORT``: records every datagram as (source ip, sequence number, send time, arrival
  time). Arrival times are the kernel's (SO_TIMESTAMPNS, taken when the frame reaches this
  namespace), send times are the sender's clock just before ``sendto``: services share one
  kernel, so ``arrival - send`` is the one-way delay, without the receiver's scheduling;
* TCP ``CONTROL_PORT``: one JSON command per line: ``reset``, ``count``, ``records``,
  ``send`` (to, count, interval_us, size) and ``snmp`` (this namespace's /proc/net/snmp).

Stdlib and pytest_enclave only. Run as ``python seqprobe.py`` inside a service.
"""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import Any

from pytest_enclave import probe

SEQ_PORT = 7071
CONTROL_PORT = 7072
_SO_TIMESTAMPNS = 35  # SO_TIMESTAMPNS_OLD on x86_64 (not exported by Python's socket module)
_HEADER = struct.Struct("!IQ")  # sequence number, send time (ns, CLOCK_REALTIME)
_records: list[tuple[str, int, int, int]] = []
_lock = threading.Lock()


def _receive(sock: socket.socket) -> None:
    while True:
        data, ancdata, _, addr = sock.recvmsg(65536, socket.CMSG_SPACE(16))
        arrival = time.time_ns()
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(raw) >= 16:
                sec, nsec = struct.unpack("qq", raw[:16])
                arrival = sec * 1_000_000_000 + nsec
        if len(data) >= _HEADER.size:
            seq, sent = _HEADER.unpack_from(data)
            with _lock:
                _records.append((addr[0], seq, sent, arrival))


def _send(to: str, count: int, interval_us: float, size: int) -> dict[str, Any]:
    """Send ``count`` numbered datagrams of ``size`` payload bytes, one per ``interval_us``."""
    pad = b"\0" * max(0, size - _HEADER.size)
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        for seq in range(count):
            due = start + seq * interval_us / 1e6
            ahead = due - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            s.sendto(_HEADER.pack(seq, time.time_ns()) + pad, (to, SEQ_PORT))
    return {"sent": count, "elapsed_s": time.monotonic() - start}


def _snmp() -> dict[str, dict[str, int]]:
    with open("/proc/net/snmp") as f:
        lines = [line.split() for line in f]
    out = {}
    for head, values in zip(lines[::2], lines[1::2]):
        out[head[0].rstrip(":")] = {k: int(v) for k, v in zip(head[1:], values[1:])}
    return out


def handle(command: dict[str, Any]) -> dict[str, Any]:
    op = command.get("op")
    if op == "reset":
        with _lock:
            _records.clear()
        return {"ok": True}
    if op == "count":
        with _lock:
            return {"count": len(_records)}
    if op == "records":
        with _lock:
            return {"records": list(_records)}
    if op == "send":
        return _send(
            command["to"], int(command["count"]), float(command["interval_us"]), command["size"]
        )
    if op == "snmp":
        return {"snmp": _snmp()}
    return {"error": f"unknown op {op!r}"}


class _Control(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(json.dumps(handle(json.loads(line))).encode() + b"\n")
            self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: drops are the network's
    udp.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    udp.bind(("0.0.0.0", SEQ_PORT))
    threading.Thread(target=_receive, args=(udp,), daemon=True).start()
    threading.Thread(target=probe.serve, daemon=True).start()
    with _Server(("0.0.0.0", CONTROL_PORT), _Control) as server:
        print(f"seqprobe listening on {SEQ_PORT}/{CONTROL_PORT}", flush=True)
        server.serve_forever()


def command() -> list[str]:
    """The argv that runs this program inside a service."""
    return [sys.executable, __file__]


if __name__ == "__main__":
    main()
