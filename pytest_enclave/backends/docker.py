"""The docker backend: each service is a container on the enclave's own internal network.

Layout for enclave slot N (no sidecar, no helper image; the shaper works from the host)::

    host netns:   pe<N>d 198.18.x.1/24   the network's bridge (the test process's address)
                  nft bridge table pytest_enclave_pe<N>   (the shaper: per address pair)
                  nft inet table pytest_enclave_pe<N>_guard   (containers reach the host's
                                                               address on pe<N>d and no other)
    pe<N>-net:    internal docker network, fixed addresses from the lower half of the /24
    pe<N>-<svc>:  container, hostname <svc>, alias <svc>, docker-init as PID 1, no IPv6,
                  its default route deleted from the host after every (re)start

Names resolve through Docker's embedded DNS (aliases, also of services added later) and
through ``/etc/hosts`` entries for the names reserved when a container is created; unknown
names are never forwarded to the host's resolver (``dns=127.0.0.1``). Every container and
network carries the labels ``org.pytest-enclave.owner`` (host:pid) and
``org.pytest-enclave.slot`` (N), so :func:`reap_slot` can remove what a killed run left.
Only this module imports the docker SDK; its errors are mapped to ours at the boundary.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import IPAMConfig, IPAMPool
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .. import _linux
from .._linux import Slot
from ..caps import has_netem
from ..errors import BackendError, CapabilityError, ConfigError, ServiceError
from ..shapers._libnft import Nft
from ..shapers.nftables import NftablesShaper
from . import ExecResult, ServiceSpec
from .netns import mac_for

__all__ = ["OWNER_LABEL", "SLOT_LABEL", "DockerBackend", "engine_is_local", "reap_slot"]

OWNER_LABEL = "org.pytest-enclave.owner"
SLOT_LABEL = "org.pytest-enclave.slot"
T = TypeVar("T")

NO_ENGINE = (
    "no Docker engine is reachable ({detail}): start one with `dockerd &` or "
    "`systemctl start docker` (in this repository: `bash .ci/docker-up.sh`)"
)
NO_IMAGE = (
    "service {name!r}: image {image!r} is not on the Docker engine, and pytest-enclave never "
    "pulls (no registry is assumed): build or load it first, e.g. `docker import rootfs.tar "
    "{image}` or `docker load -i image.tar`; for pytest-enclave/debian:test run "
    "`bash tools/build-images.sh`"
)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def table_names(number: int) -> tuple[str, str]:
    """The host nft tables of slot ``number``: (the shaper's bridge table, the guard)."""
    return f"pytest_enclave_pe{number}", f"pytest_enclave_pe{number}_guard"


def engine_is_local(docker_host: str) -> bool:
    """Whether ``DOCKER_HOST`` names an engine on this machine (unix socket, loopback TCP)."""
    if not docker_host or docker_host.startswith("unix://"):
        return True
    if not docker_host.startswith(("tcp://", "http://", "https://")):
        return False  # ssh://, npipe:// ...: another machine, or one we cannot enter
    host = urlsplit(docker_host).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _connect() -> Any:
    """A docker client for the local engine; CapabilityError/BackendError otherwise."""
    where = os.environ.get("DOCKER_HOST", "")
    if not engine_is_local(where):
        raise CapabilityError(
            f"DOCKER_HOST={where!r} points at an engine on another machine: the shaper must "
            "enter each container's network namespace from this host, so faults there would "
            "silently not apply. Use a local engine (unset DOCKER_HOST, or `dockerd &`)"
        )
    try:
        return _client(where)
    except DockerException as exc:
        raise BackendError(NO_ENGINE.format(detail=where or "the default socket")) from exc


@functools.cache
def _api_version(docker_host: str) -> str:
    """The engine's API version, asked once per process (the question costs ~7 ms)."""
    client = docker.from_env()
    try:
        return str(client.api.api_version)
    finally:
        client.close()


def _client(docker_host: str) -> Any:
    return docker.from_env(version=_api_version(docker_host))


def _call(what: str, fn: Callable[[], T]) -> T:
    """Run a docker API call; its errors become BackendError naming ``what``."""
    try:
        return fn()
    except APIError as exc:
        raise BackendError(f"{what} failed: {exc.explanation or exc}") from exc
    except DockerException as exc:
        raise BackendError(NO_ENGINE.format(detail=f"{what}: {exc}")) from exc


@dataclass
class _Container:
    id: str
    spec: ServiceSpec
    pid: int = 0


class DockerBackend:
    """Containers on one internal docker network per enclave, shaped from the host."""

    name = "docker"

    def __init__(self) -> None:
        self._client: Any = None
        self._containers: dict[str, _Container] = {}
        self._hosts: dict[str, str] = {}
        self._network_id = ""
        self._guarded = False
        self.gateway_ip = ""

    @property
    def _api(self) -> Any:
        return self._client.api

    # -- lifecycle ------------------------------------------------------------------------

    def open(self, slot: Slot, run_dir: str) -> NftablesShaper:
        self._slot, self._run_dir = slot, run_dir
        self.network, self.bridge = f"{slot.prefix}net", f"pe{slot.number}d"
        self.gateway_ip = slot.address(1)
        self._client = _connect()
        reap_slot(slot.number)
        self._network_id = self._create_network()
        self._check_bridge_is_here()
        _host_nft(_guard_script(table_names(slot.number)[1], self.bridge, self.gateway_ip))
        self._guarded = True
        # IPv4 only: no link-local chatter from the host that would bypass the filter
        with suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6").write_text("1")
        return NftablesShaper(
            None,
            table_names(slot.number)[0],
            kernel=os.uname().release,
            netem_missing=has_netem() or "",
            netem_backend_gap=(
                "the docker backend does not drive yet (this kernel has it)"
                if has_netem() is None
                else ""
            ),
        )

    def _create_network(self) -> str:
        pool = IPAMPool(
            subnet="{}/{}".format(*self._slot.subnet()),
            iprange=f"{self._slot.address(128)}/25",  # automatic addresses: never one of ours
            gateway=self.gateway_ip,
        )
        created = _call(
            f"creating docker network {self.network}",
            lambda: self._api.create_network(
                self.network,
                driver="bridge",
                internal=True,
                check_duplicate=True,
                ipam=IPAMConfig(pool_configs=[pool]),
                options={"com.docker.network.bridge.name": self.bridge},
                labels=self._labels(),
            ),
        )
        return str(created["Id"])

    def _labels(self) -> dict[str, str]:
        return {OWNER_LABEL: _owner(), SLOT_LABEL: str(self._slot.number)}

    def _check_bridge_is_here(self) -> None:
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=self.bridge):
                return
        raise CapabilityError(
            f"the Docker engine made bridge {self.bridge} for network {self.network}, but it is "
            "not in this process's network namespace: the engine runs in another namespace, "
            "container or machine (rootless or remote Docker?), where the shaper cannot filter "
            "traffic. Run the tests where the engine runs, as root"
        )

    def close(self, keep: bool = False) -> None:
        if self._client is None:
            return
        if keep:  # containers, network and host tables stay for inspection
            self._client.close()
            self._client = None
            return
        ids = [c.id for c in self._containers.values()]
        problems = _in_threads([functools.partial(self._remove_id, i) for i in ids])
        self._containers.clear()
        if self._network_id:
            try:
                self._api.remove_network(self._network_id)
            except NotFound:
                pass
            except DockerException as exc:
                problems.append(f"network {self.network}: {exc}")
            self._network_id = ""
        if self._guarded:
            with suppress(BackendError):  # already gone (`python -m pytest_enclave clean`)
                _host_nft(f"delete table inet {table_names(self._slot.number)[1]}")
            self._guarded = False
        self._client.close()
        self._client = None
        if problems:
            raise BackendError(
                "could not remove: " + "; ".join(problems) + " (`python -m pytest_enclave clean`)"
            )

    def _remove_id(self, container_id: str) -> None:
        with suppress(NotFound):
            self._api.remove_container(container_id, force=True)

    # -- services -------------------------------------------------------------------------

    def start(self, spec: ServiceSpec) -> None:
        ctr = self._containers.get(spec.name)
        if ctr is None:
            ctr = self._containers[spec.name] = self._create(spec)
        try:
            self._api.start(ctr.id)
        except APIError as exc:
            raise ServiceError(_start_failure(spec, exc)) from exc
        except DockerException as exc:
            raise BackendError(NO_ENGINE.format(detail=str(exc))) from exc
        self._seal(ctr)

    def _create(self, spec: ServiceSpec) -> _Container:
        config, api = spec.config, self._api
        if config.image is None:
            raise ConfigError(
                f"service {spec.name!r}: the docker backend runs images: give image=... "
                "(e.g. 'pytest-enclave/debian:test', built by tools/build-images.sh)"
            )
        n = len(config.entrypoint)  # argv is entrypoint + cmd, placeholders rendered
        endpoint = api.create_endpoint_config(ipv4_address=spec.ip, aliases=[spec.name])
        try:
            created = api.create_container(
                config.image,
                command=list(spec.argv[n:]) or None,
                entrypoint=list(spec.argv[:n]) or None,
                name=f"{self._slot.prefix}{spec.name}",
                hostname=spec.name,
                environment=dict(spec.env),
                labels={**self._labels(), "org.pytest-enclave.service": spec.name},
                working_dir=config.cwd,
                mac_address=mac_for(spec.ip),
                networking_config=api.create_networking_config({self.network: endpoint}),
                host_config=self._host_config(spec),
            )
        except ImageNotFound as exc:
            raise ServiceError(NO_IMAGE.format(name=spec.name, image=config.image)) from exc
        except APIError as exc:
            raise BackendError(
                f"creating the container of service {spec.name!r} failed: {exc.explanation}"
            ) from exc
        return _Container(created["Id"], spec)

    def _host_config(self, spec: ServiceSpec) -> Any:
        return self._api.create_host_config(
            network_mode=self.network,
            # Unknown names are never forwarded to the host's resolver; with ndots set, the
            # embedded DNS answers single-label ones at once (empty) instead of forwarding.
            dns=["127.0.0.1"],
            dns_opt=["ndots:1", "timeout:1", "attempts:2"],
            sysctls={"net.ipv6.conf.all.disable_ipv6": "1"},
            init=True,  # docker-init as PID 1: SIGTERM reaches the program, as with netns
            extra_hosts={k: v for k, v in self._hosts.items() if k != spec.name},
        )

    def _seal(self, ctr: _Container) -> None:
        """Note the new PID 1 and delete the container's default route (every start)."""
        state = _call("inspecting a container", lambda: self._api.inspect_container(ctr.id))
        ctr.pid = int(state["State"]["Pid"] or 0)
        if ctr.pid:
            _drop_default_route(ctr.pid, ctr.spec.ip, self.gateway_ip)

    def remove(self, name: str) -> None:
        ctr = self._containers[name]
        _call(f"removing container of {name!r}", lambda: self._remove_id(ctr.id))
        del self._containers[name]  # only once it is gone: close() still knows it otherwise

    def _state(self, name: str) -> dict[str, Any]:
        ctr = self._containers[name]
        info = _call(f"inspecting {name!r}", lambda: self._api.inspect_container(ctr.id))
        state: dict[str, Any] = info["State"]
        return state

    def exited(self, name: str) -> int | None:
        state = self._state(name)
        return int(state["ExitCode"]) if state["Status"] in ("exited", "dead") else None

    def signal(self, name: str, signum: int) -> None:
        """SIGSTOP/SIGCONT pause and unpause (cgroup freezer); others go to every process."""
        ctr, api, state = self._containers[name], self._api, self._state(name)
        if state["Status"] == "paused" and signum in (signal.SIGCONT, signal.SIGKILL):
            _call(f"resuming {name!r}", lambda: api.unpause(ctr.id))
        if not state["Running"] or signum == signal.SIGCONT:
            return  # as with the netns backend: a stopped service has no process to signal
        if signum == signal.SIGSTOP:
            _call(f"pausing {name!r}", lambda: api.pause(ctr.id))
        elif signum == signal.SIGKILL:
            _call(f"killing {name!r}", lambda: api.kill(ctr.id, signal="SIGKILL"))
            _call(f"waiting for {name!r}", lambda: api.wait(ctr.id, 10, "not-running"))
        else:
            _signal_all_but_init(int(state["Pid"]), signum)

    def stop(self, name: str, timeout: float) -> None:
        ctr, api, state = self._containers[name], self._api, self._state(name)
        if state["Status"] == "paused":
            _call(f"resuming {name!r}", lambda: api.unpause(ctr.id))  # frozen: cannot exit
        elif not state["Running"]:
            return
        _call(f"stopping {name!r}", lambda: api.stop(ctr.id, timeout=math.ceil(timeout)))

    def exec(
        self, name: str, argv: Sequence[str], timeout: float | None, input: str | None
    ) -> ExecResult:
        ctr, api = self._containers[name], self._api
        try:
            exec_id = api.exec_create(ctr.id, list(argv), stdin=input is not None)["Id"]
            sock = api.exec_start(exec_id, socket=True)
        except APIError as exc:
            raise ServiceError(f"exec in {name!r}: {exc.explanation or exc}") from exc
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            out, err = _talk(sock, input, deadline)
        except socket.timeout as exc:
            with suppress(DockerException, OSError):
                pid = int(api.exec_inspect(exec_id)["Pid"] or 0)
                if pid > 0:  # (0 would be our own process group)
                    os.kill(pid, signal.SIGKILL)
            raise ServiceError(
                f"exec in {name!r}: {list(argv)!r} timed out after {timeout:g}s"
            ) from exc
        finally:
            with suppress(AttributeError):  # docker-py keeps the response here: release it
                sock._response.close()
            sock.close()
        code = _exit_code(api, exec_id)
        text, errs = out.decode(errors="replace"), err.decode(errors="replace")
        if code in (126, 127) and "executable file not found" in text + errs:
            raise ServiceError(f"exec in {name!r}: executable {argv[0]!r} not found")
        return ExecResult(code, text, errs)

    def _log_file(self, name: str) -> str:
        return os.path.join(self._run_dir, f"{name}.log")

    def log_path(self, name: str) -> str:
        """The service's output so far (docker logs, stdout and stderr), copied to a file."""
        ctr, path = self._containers[name], self._log_file(name)
        with suppress(DockerException):  # keep the last copy: a report must not fail here
            data = self._api.logs(ctr.id, stdout=True, stderr=True)
            with open(path, "wb") as f:
                f.write(data)
        return path

    def set_hosts(self, entries: Mapping[str, str]) -> None:
        # Containers made from now on list these in /etc/hosts; Docker's DNS has the rest.
        self._hosts = dict(entries)

    def inspect_hint(self, name: str) -> str:
        return f"docker exec -it {self._slot.prefix}{name} sh   (logs: docker logs ...)"


# -- helpers ------------------------------------------------------------------------------


def _start_failure(spec: ServiceSpec, exc: APIError) -> str:
    detail = str(exc.explanation or exc)
    if "executable file not found" in detail or "no such file or directory" in detail:
        program = spec.argv[0] if spec.argv else "(the image's command)"
        return (
            f"service {spec.name!r}: executable {program!r} not found in image "
            f"{spec.config.image!r}; give a path that exists there ({detail})"
        )
    return f"service {spec.name!r} could not be started: {detail}"


def _drop_default_route(pid: int, ip: str, gateway: str) -> None:
    """Delete the route Docker gives every container, from the host: no way out."""
    try:
        fd = _linux.netlink_socket_in(f"/proc/{pid}/ns/net")
    except OSError:
        return  # it exited already: nothing to seal
    with IPRoute(fileno=fd) as ns:
        if ip not in {a.get_attr("IFA_ADDRESS") for a in ns.get_addr(family=socket.AF_INET)}:
            raise CapabilityError(
                f"process {pid} of this host does not have the container's address {ip}: the "
                "Docker engine runs in another PID namespace or machine, where the shaper "
                "cannot enter its containers. Run the tests where the engine runs"
            )
        with suppress(NetlinkError):  # none there (yet): nothing to delete
            ns.route("del", dst="0.0.0.0/0", gateway=gateway)


def _signal_all_but_init(pid: int, signum: int) -> None:
    inode = _linux.netns_inode(f"/proc/{pid}/ns/net")
    if inode is None or inode == _linux.netns_inode("/proc/self/ns/net"):
        return  # gone, or (never) the host's own namespace
    for other in _linux.pids_in_netns({inode}):
        if other != pid:
            with suppress(ProcessLookupError):
                os.kill(other, signum)


def _talk(sock: Any, input: str | None, deadline: float | None) -> tuple[bytes, bytes]:
    """Send ``input`` to an exec's stdin and read its multiplexed stdout/stderr to the end."""
    conn = socket.socket(fileno=os.dup(sock.fileno()))
    streams = {1: bytearray(), 2: bytearray()}
    buf = bytearray()
    try:
        if input is not None:
            conn.sendall(input.encode())
            conn.shutdown(socket.SHUT_WR)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise socket.timeout("exec timed out")
            conn.settimeout(left)
            chunk = conn.recv(65536)
            if not chunk:
                return bytes(streams[1]), bytes(streams[2])
            buf += chunk
            while len(buf) >= 8:  # frames: 1 byte stream, 3 zero, 4 bytes big-endian size
                kind, size = struct.unpack(">BxxxL", buf[:8])
                if len(buf) < 8 + size:
                    break
                streams.get(kind, streams[1]).extend(buf[8 : 8 + size])
                del buf[: 8 + size]
    finally:
        conn.close()


def _exit_code(api: Any, exec_id: str) -> int:
    for _ in range(200):  # the stream can end a moment before the engine records the code
        info = api.exec_inspect(exec_id)
        if not info["Running"] and info["ExitCode"] is not None:
            return int(info["ExitCode"])
        time.sleep(0.005)
    raise BackendError(f"exec {exec_id[:12]} ended but the engine reports no exit code")


def _in_threads(jobs: Sequence[Callable[[], None]]) -> list[str]:
    """Run ``jobs`` at once and return their errors (plain threads: unlike an executor's,
    they also start from an atexit hook, where leftover enclaves are closed)."""
    problems: list[str] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except DockerException as exc:
            problems.append(str(exc))

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return problems


def _guard_script(table: str, bridge: str, gateway: str) -> str:
    """Host input from the bridge: only to the gateway address (also before the route goes)."""
    return (
        f"table inet {table}\ndelete table inet {table}\n"
        f"table inet {table} {{\n  chain input {{\n"
        "    type filter hook input priority 0; policy accept;\n"
        f'    iifname "{bridge}" ip daddr != {gateway} drop\n'
        f'    iifname "{bridge}" meta nfproto ipv6 drop\n  }}\n}}\n'
    )


def _host_nft(script: str) -> str:
    """Run nft commands in this thread's (the host's) network namespace."""
    nft = Nft()
    try:
        return nft.run(script)
    finally:
        nft.close()


def _owner_is_dead(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not os.path.exists(f"/proc/{pid}")


def reap_slot(number: int) -> list[str]:
    """Remove what a killed run left in slot ``number``: containers and network whose owner
    process is dead, and the slot's host nft tables. Returns what was removed."""
    removed: list[str] = []
    where = os.environ.get("DOCKER_HOST", "")
    if engine_is_local(where):
        with suppress(DockerException):
            client = _client(where)
            try:
                removed += _reap_docker(client.api, number)
            finally:
                client.close()
    present = {line.strip() for line in _host_nft("list tables").splitlines()}
    bridge, guard = table_names(number)
    doomed = [t for t in (f"bridge {bridge}", f"inet {guard}") if f"table {t}" in present]
    if doomed:
        _host_nft("".join(f"delete table {t}\n" for t in doomed))
    return removed + [f"nft table {t}" for t in doomed]


def _reap_docker(api: Any, number: int) -> list[str]:
    removed = []
    labels = {"label": f"{SLOT_LABEL}={number}"}
    for ctr in api.containers(all=True, filters=labels):
        if _owner_is_dead(ctr["Labels"].get(OWNER_LABEL, "")):
            with suppress(NotFound):
                api.remove_container(ctr["Id"], force=True)
            removed.append(f"docker container {ctr['Names'][0].lstrip('/')}")
    for net in api.networks(filters=labels):
        if _owner_is_dead(net["Labels"].get(OWNER_LABEL, "")):
            with suppress(NotFound):
                api.remove_network(net["Id"])
            removed.append(f"docker network {net['Name']}")
    return removed
