"""Pure builders (stdlib only) for the seed scenario: 3 etcd nodes, 2 apps, 1 haproxy.

Nothing here starts a process; each function returns an argv list or a config string.
Verified with etcd 3.4.23 and HAProxy 2.6.12 (Debian 12).
"""

from __future__ import annotations

import sys
from pathlib import Path

ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
APP_PORT = 8000
PROXY_PORT = 8080
APP_PY = Path(__file__).with_name("app.py")


def etcd_cmd(
    name: str,
    ip: str,
    peers: dict[str, str],
    data_dir: str,
    *,
    token: str = "pe-seed",
    binary: str = "etcd",
    log_level: str = "warn",
) -> list[str]:
    """argv for one member of a static cluster; ``peers`` maps every member name -> IP."""
    if peers.get(name) != ip:
        raise ValueError(f"peers must contain {name}={ip}")
    cluster = ",".join(f"{n}=http://{p}:{ETCD_PEER_PORT}" for n, p in sorted(peers.items()))
    # fmt: off
    return [
        binary,
        "--name", name,
        "--data-dir", data_dir,
        "--listen-peer-urls", f"http://{ip}:{ETCD_PEER_PORT}",
        "--listen-client-urls", f"http://{ip}:{ETCD_CLIENT_PORT},http://127.0.0.1:{ETCD_CLIENT_PORT}",
        "--advertise-client-urls", f"http://{ip}:{ETCD_CLIENT_PORT}",
        "--initial-advertise-peer-urls", f"http://{ip}:{ETCD_PEER_PORT}",
        "--initial-cluster", cluster,
        "--initial-cluster-state", "new",
        "--initial-cluster-token", token,
        # Fast failure detection for tests (defaults: 100 / 1000 ms).
        "--heartbeat-interval", "50",
        "--election-timeout", "500",
        # A rejoining, partitioned member must not depose the healthy leader (3.4 default: off).
        "--pre-vote=true",
        "--snapshot-count", "10000",
        "--max-snapshots", "2",
        "--max-wals", "2",
        "--enable-v2=false",
        "--logger", "zap",
        "--log-outputs", "stderr",
        "--log-level", log_level,
    ]
    # fmt: on


def etcdctl_cmd(endpoint_ips: list[str], *args: str, timeout: str = "1s") -> list[str]:
    """argv for etcdctl (API v3 is the default in 3.4) against the given member IPs."""
    endpoints = ",".join(f"http://{ip}:{ETCD_CLIENT_PORT}" for ip in endpoint_ips)
    return [
        "etcdctl",
        "--endpoints",
        endpoints,
        "--dial-timeout",
        timeout,
        "--command-timeout",
        timeout,
        *args,
    ]


def app_cmd(
    name: str,
    listen_ip: str,
    etcd_ips: list[str],
    *,
    port: int = APP_PORT,
    python: str = sys.executable,
    connect_timeout: float = 0.3,
    read_timeout: float = 0.8,
) -> list[str]:
    """argv for app.py; ``etcd_ips`` is the fallback order (put the local node first)."""
    endpoints = ",".join(f"http://{ip}:{ETCD_CLIENT_PORT}" for ip in etcd_ips)
    return [
        python,
        str(APP_PY),
        "--name",
        name,
        "--listen",
        f"{listen_ip}:{port}",
        "--etcd",
        endpoints,
        "--connect-timeout",
        str(connect_timeout),
        "--read-timeout",
        str(read_timeout),
    ]


def haproxy_cfg(
    backends: dict[str, str],
    port: int = PROXY_PORT,
    *,
    bind_ip: str = "0.0.0.0",
    backend_port: int = APP_PORT,
    log_level: str = "notice",
) -> str:
    """haproxy.cfg text for ``haproxy -db -f FILE`` (foreground, no daemon/chroot/user).

    ``backends`` maps server name -> "IP", "hostname", or "host:port".  Hostnames are
    resolved once at start-up through libc (/etc/hosts included; default init-addr last,libc).
    """
    servers = []
    for name, addr in backends.items():
        hostport = addr if ":" in addr else f"{addr}:{backend_port}"
        servers.append(f"    server {name} {hostport} check inter 200ms fall 2 rise 2")
    return "\n".join(
        [
            "global",
            f"    log stderr format short local0 {log_level}",  # "info": one line per request
            "    maxconn 1024",
            "",
            "defaults",
            "    mode http",
            "    log global",
            "    option httplog",
            "    option dontlognull",
            "    timeout connect 500ms",
            "    timeout server 2s",
            "    timeout client 5s",
            "    timeout check 300ms",
            "    timeout http-request 5s",
            "    retries 3",
            # Redispatch to another server on every retry, not only on the last one.
            "    option redispatch 1",
            # Safe here: app PUTs are idempotent (same key, same value).
            "    retry-on conn-failure empty-response response-timeout 502 503 504",
            "",
            "frontend fe_app",
            f"    bind {bind_ip}:{port}",
            "    default_backend be_app",
            "",
            "backend be_app",
            "    balance roundrobin",
            "    option httpchk GET /health",
            "    http-check expect status 200",
            *servers,
            "",
        ]
    )


def haproxy_cmd(cfg_path: str, binary: str = "haproxy") -> list[str]:
    """Foreground haproxy (-db: no daemon, no background)."""
    return [binary, "-db", "-f", cfg_path]


if __name__ == "__main__":
    PEERS = {"etcd1": "198.18.250.11", "etcd2": "198.18.250.12", "etcd3": "198.18.250.13"}
    print(" ".join(etcd_cmd("etcd1", PEERS["etcd1"], PEERS, "/tmp/etcd1")))
    print(" ".join(app_cmd("app_service_1", "198.18.250.21", list(PEERS.values()))))
    print(haproxy_cfg({"app_service_1": "198.18.250.21", "app_service_2": "198.18.250.22"}))
