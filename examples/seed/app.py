"""Tiny stdlib-only HTTP app that stores keys in etcd through its v3 JSON gateway.

Usage:  python3 app.py --name app_service_1 --listen 0.0.0.0:8000 \
            --etcd http://198.18.250.11:2379,http://198.18.250.13:2379
Every option also reads an env var: APP_NAME, APP_LISTEN, APP_ETCD, APP_CONNECT_TIMEOUT,
APP_READ_TIMEOUT. Endpoints are tried in order; the first one that answers wins.

  GET /health          -> 200 "ok <name>"
  PUT /kv/<key>        -> 200 {"served_by", "etcd", "revision"}  (body = value)
  GET /kv/<key>        -> 200 {"value", "served_by", "etcd"} | 404; linearizable read
  GET /kv/<key>?local=1 -> same, but a serializable read (answered by one etcd node)
  errors               -> 503 {"error", "served_by", "tried"}
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Etcd:
    """Client for etcd's /v3 gateway that falls back to the next endpoint on any failure."""

    def __init__(self, endpoints: list[str], connect_timeout: float, read_timeout: float) -> None:
        self.endpoints = endpoints
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    def _post(self, endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = urlsplit(endpoint)
        conn = http.client.HTTPConnection(
            url.hostname or "", url.port or 2379, timeout=self.connect_timeout
        )
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self.read_timeout)
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}: {data[:200]!r}")
        result: dict[str, Any] = json.loads(data)
        return result

    def call(self, path: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        errors: list[str] = []
        for endpoint in self.endpoints:
            try:
                return endpoint, self._post(endpoint, path, body)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                errors.append(f"{endpoint}: {type(exc).__name__}: {exc}")
        raise LookupError("; ".join(errors))


class Handler(BaseHTTPRequestHandler):
    name = "app"
    etcd: Etcd
    wbufsize = 1 << 16  # headers + body leave in one send (flushed by handle_one_request)

    def handle(self) -> None:
        # haproxy health checks close with RST right after reading the status line.
        with contextlib.suppress(ConnectionError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if os.environ.get("APP_LOG"):
            super().log_message(format, *args)

    def _send(self, status: int, payload: dict[str, Any] | str) -> None:
        is_text = isinstance(payload, str)
        data = (payload if is_text else json.dumps(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if is_text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _key(self) -> tuple[str | None, bool]:
        url = urlsplit(self.path)
        if not url.path.startswith("/kv/") or len(url.path) == 4:
            return None, False
        local = parse_qs(url.query).get("local", ["0"])[0] not in ("", "0")
        return unquote(url.path[4:]), local

    def _fail(self, exc: Exception) -> None:
        self._send(503, {"error": "etcd unavailable", "served_by": self.name, "tried": str(exc)})

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, f"ok {self.name}\n")
            return
        key, local = self._key()
        if key is None:
            self._send(404, {"error": "not found", "served_by": self.name})
            return
        try:
            used, res = self.etcd.call("/v3/kv/range", {"key": b64(key), "serializable": local})
        except LookupError as exc:
            self._fail(exc)
            return
        kvs = res.get("kvs") or []
        if not kvs:
            self._send(404, {"error": "no such key", "served_by": self.name, "etcd": used})
            return
        value = base64.b64decode(kvs[0].get("value", "")).decode(errors="replace")
        self._send(200, {"value": value, "served_by": self.name, "etcd": used})

    def do_PUT(self) -> None:
        key, _ = self._key()
        length = int(self.headers.get("Content-Length") or 0)
        value = self.rfile.read(length).decode(errors="replace")
        if key is None:
            self._send(404, {"error": "not found", "served_by": self.name})
            return
        try:
            used, res = self.etcd.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})
        except LookupError as exc:
            self._fail(exc)
            return
        revision = int(res.get("header", {}).get("revision", 0))
        self._send(200, {"served_by": self.name, "etcd": used, "revision": revision})


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=env("APP_NAME", "app"))
    parser.add_argument("--listen", default=env("APP_LISTEN", "0.0.0.0:8000"), help="HOST:PORT")
    parser.add_argument(
        "--etcd",
        default=env("APP_ETCD", "http://127.0.0.1:2379"),
        help="comma-separated etcd client URLs, tried in order",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=float(env("APP_CONNECT_TIMEOUT", "0.3"))
    )
    parser.add_argument("--read-timeout", type=float, default=float(env("APP_READ_TIMEOUT", "0.8")))
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    Handler.name = args.name
    endpoints = [e.strip().rstrip("/") for e in args.etcd.split(",") if e.strip()]
    Handler.etcd = Etcd(endpoints, args.connect_timeout, args.read_timeout)
    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    server.daemon_threads = True
    print(f"{args.name} listening on {args.listen}, etcd={endpoints}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
