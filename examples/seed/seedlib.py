"""The seed topology with real software: 3 etcd nodes (Raft), 2 app services, 1 haproxy.

Shared by conftest.py (the fixtures) and the tests.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys

import topology as topo

from pytest_enclave import Enclave, Exec, HttpGet, ServiceConfig, TcpPort

ETCD = ["etcd_node_1", "etcd_node_2", "etcd_node_3"]
APPS = ["app_service_1", "app_service_2"]
PROXY = "single_port_proxy"
MAIN = "main"
SECONDARY = "secondary"
IMAGE = "pytest-enclave/debian:test"  # built by tools/build-images.sh, for --enclave-backend=docker


def missing_tools() -> list[str]:
    return [t for t in ("etcd", "etcdctl", "haproxy") if shutil.which(t) is None]


def _files(enclave: Enclave) -> str:
    """Where services keep files: the enclave's run dir (netns) or the container's /tmp."""
    return enclave.run_dir if enclave.backend.name == "netns" else "/tmp"


def _shell_writing(path: str, content_var: str, then: list[str]) -> list[str]:
    """argv that writes $content_var to path, then execs ``then`` (works in any backend)."""
    return ["sh", "-c", f'printf "%s" "${content_var}" > {path} && exec "$@"', "sh", *then]


def build_topology(enclave: Enclave) -> None:
    docker = enclave.backend.name == "docker"
    image = IMAGE if docker else None
    python = "python3" if docker else sys.executable
    files = _files(enclave)
    peers = {name: f"{{{{ip:{name}}}}}" for name in ETCD}  # placeholders, resolved per service
    for i, name in enumerate(ETCD):
        cmd = topo.etcd_cmd(name, peers[name], peers, os.path.join(files, f"{name}.etcd"))
        last = i == len(ETCD) - 1
        ready = [TcpPort(topo.ETCD_PEER_PORT)]
        if last:  # the cluster has a quorum once the third member is up
            ready.append(
                Exec(["etcdctl", "--endpoints", "http://127.0.0.1:2379", "endpoint", "health"])
            )
        enclave.add_service(
            name,
            ServiceConfig(
                image=image, cmd=cmd, subnetwork=MAIN, ready_conditions=ready, ready_timeout=60
            ),
        )
    for i, name in enumerate(APPS):
        # each app prefers "its" etcd node and falls back to the others
        order = [ETCD[1]] + [ETCD[0], ETCD[2]] if i == 1 else [ETCD[0], ETCD[2], ETCD[1]]
        ips = [enclave.address_of(n) for n in order]
        app = topo.APP_PY.read_text()
        cmd = topo.app_cmd(name, "0.0.0.0", ips, python=python)
        if docker:  # no volumes: the app's source travels in the environment
            cmd = _shell_writing("/tmp/app.py", "APP_SOURCE", [python, "/tmp/app.py", *cmd[2:]])
        enclave.add_service(
            name,
            ServiceConfig(
                image=image,
                cmd=cmd,
                env_vars={"APP_SOURCE": app} if docker else {},
                subnetwork=MAIN,
                ready_conditions=[HttpGet(topo.APP_PORT, "/health")],
            ),
        )
    cfg_path = os.path.join(files, "haproxy.cfg")
    cfg = topo.haproxy_cfg({name: name for name in APPS})
    enclave.add_service(
        PROXY,
        ServiceConfig(
            image=image,
            cmd=_shell_writing(cfg_path, "HAPROXY_CFG", topo.haproxy_cmd(cfg_path)),
            env_vars={"HAPROXY_CFG": cfg},
            subnetwork=MAIN,
            ports={"http": topo.PROXY_PORT},
        ),
    )


class Client:
    """Requests from the test process (unshaped) to a service's HTTP port."""

    def __init__(self, ip: str, port: int, timeout: float = 3.0) -> None:
        self.ip, self.port, self.timeout = ip, port, timeout

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.ip, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, {"raw": raw.decode(errors="replace")}
        except OSError as exc:
            return 0, {"error": repr(exc)}
        finally:
            conn.close()

    def put(self, key: str, value: str) -> tuple[int, dict]:
        return self.request("PUT", f"/kv/{key}", value)

    def get(self, key: str, local: bool = False) -> tuple[int, dict]:
        return self.request("GET", f"/kv/{key}{'?local=1' if local else ''}")


def etcdctl(
    enclave: Enclave, node: str, *args: str, timeout: str = "2s", endpoint: str | None = None
) -> tuple[int, str]:
    """etcdctl run inside ``node`` against ``endpoint`` (default: that node itself)."""
    ip = enclave.get_service(endpoint or node).ip
    result = enclave.exec(node, topo.etcdctl_cmd([ip], *args, timeout=timeout), timeout=30)
    return result.returncode, result.stdout + result.stderr
