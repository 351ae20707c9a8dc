"""The netns backend: each service is an ordinary process in its own network namespace.

Layout for enclave slot N (no helper process per service, no ``ip`` subprocess)::

    host netns:   pe<N>h 198.18.x.1/24 ──┐          (the test process reaches services here)
    pe<N>-hub:    up0 ── br0 ── p1 p2 ...           (bridge + nft bridge table: the shaper)
    pe<N>-<svc>:  eth0 198.18.x.k/24 , lo           (one per service; no default route)

A service runs with its network namespace and a private mount namespace in which the
enclave's hosts file is bound over /etc/hosts (every service's name resolves, also names
added later), and its own UTS namespace with its name as hostname. Deleting the namespaces
removes every link inside them; the host link is deleted explicitly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .. import _linux
from .._linux import Slot
from .._netlink import netlink_call as _netlink
from ..caps import has_netem
from ..errors import ServiceError
from ..shapers.netem import NetemShaper
from ..shapers.nftables import NftablesShaper
from . import ExecResult, ServiceSpec

__all__ = ["NetnsBackend", "reap_slot"]


@dataclass
class _Service:
    spec: ServiceSpec
    netns: str
    port: str
    proc: subprocess.Popen[bytes] | None = None


def _enter(netns_path: str, hosts: str, hostname: str) -> Callable[[], None]:
    """A preexec function: join the service's namespaces in the forked child."""

    def enter() -> None:
        fd = os.open(netns_path, os.O_RDONLY)
        _linux.setns(fd, _linux.CLONE_NEWNET)
        os.close(fd)
        _linux.unshare(_linux.CLONE_NEWNS | _linux.CLONE_NEWUTS)
        _linux.mount(None, "/", None, _linux.MS_REC | _linux.MS_PRIVATE)  # nothing leaks out
        _linux.mount(hosts, "/etc/hosts", None, _linux.MS_BIND)
        _linux.sethostname(hostname)

    return enter


class NetnsBackend:
    """Processes in network namespaces on a bridge in the enclave's own namespace."""

    name = "netns"

    def __init__(self) -> None:
        self._services: dict[str, _Service] = {}
        self._slot: Slot | None = None
        self._hub: IPRoute | None = None
        self._next_port = 1
        self._netem: NetemShaper | None = None
        self.gateway_ip = ""

    # -- lifecycle ------------------------------------------------------------------------

    def open(self, slot: Slot, run_dir: str) -> NftablesShaper:
        self._slot = slot
        self._run_dir = run_dir
        self._hosts = os.path.join(run_dir, "hosts")
        self.set_hosts({})
        reap_slot(slot.number)
        self.hub_name = f"{slot.prefix}_hub"  # "_" cannot start a service name
        self.host_link = f"pe{slot.number}h"
        hub_path = _linux.create_netns(self.hub_name)
        self._hub = IPRoute(fileno=_linux.netlink_socket_in(hub_path))
        hub = self._hub
        self.gateway_ip = slot.address(1)
        _netlink(
            "creating the enclave bridge", lambda: hub.link("add", ifname="br0", kind="bridge")
        )
        br = self._bridge = hub.link_lookup(ifname="br0")[0]
        hub.link("set", index=hub.link_lookup(ifname="lo")[0], state="up")
        fd = os.open(hub_path, os.O_RDONLY)
        try:
            with IPRoute() as host:
                _netlink(
                    f"creating host link {self.host_link}",
                    lambda: host.link(
                        "add",
                        ifname=self.host_link,
                        kind="veth",
                        peer={"ifname": "up0", "net_ns_fd": fd},
                    ),
                )
                idx = host.link_lookup(ifname=self.host_link)[0]
                host.addr("add", index=idx, address=self.gateway_ip, prefixlen=24)
                host.link("set", index=idx, state="up")
        finally:
            os.close(fd)
        hub.link("set", index=hub.link_lookup(ifname="up0")[0], master=br, state="up")
        hub.link("set", index=br, state="up")
        # netem (when this kernel has it) shapes on the bridge ports, marked by the nft table
        missing, release = has_netem(), os.uname().release
        if missing is None:
            self._netem = NetemShaper(hub_path, self._port_of, release, drop_on_close=False)
        return NftablesShaper(
            hub_path,
            "pytest_enclave",
            kernel=release,
            drop_on_close=False,
            netem=self._netem,
            netem_missing=missing or "",
        )

    def _port_of(self, name: str) -> str | None:
        """The hub-side interface through which frames leave the bridge towards ``name``."""
        svc = self._services.get(name)
        return svc.port if svc is not None else None

    def close(self, keep: bool = False) -> None:
        if keep:
            if self._hub is not None:
                self._hub.close()
                self._hub = None
            return
        names = [s.netns for s in self._services.values()] + [getattr(self, "hub_name", "")]
        _kill_in(names)
        for svc in self._services.values():
            if svc.proc is not None:
                with suppress(subprocess.TimeoutExpired):
                    svc.proc.wait(timeout=5)
        if self._hub is not None:
            # Deleting the hub end of the host link removes both ends, through the socket we
            # already have (a new host socket would cost more than the deletion itself).
            with suppress(NetlinkError, IndexError):
                self._hub.link("del", index=self._hub.link_lookup(ifname="up0")[0])
            self._hub.close()
            self._hub = None
        if self._slot is not None:
            _delete_host_link(f"pe{self._slot.number}h")  # only if the above failed
        for name in names:
            if name:
                _linux.delete_netns(name)
        self._services.clear()

    # -- services -------------------------------------------------------------------------

    def start(self, spec: ServiceSpec) -> None:
        svc = self._services.get(spec.name)
        if svc is None:
            svc = self._create_netns(spec)
            with open(self.log_path(spec.name), "wb"):
                pass  # a new service starts a new log (a restart appends)
        svc.spec = spec
        executable = shutil.which(spec.argv[0], path=spec.env.get("PATH"))
        if executable is None:
            raise ServiceError(
                f"service {spec.name!r}: executable {spec.argv[0]!r} not found (PATH="
                f"{spec.env.get('PATH', '')!r}); give an absolute path or install it"
            )
        log = open(self.log_path(spec.name), "ab")  # noqa: SIM115  # the child keeps it
        try:
            svc.proc = subprocess.Popen(
                [executable, *spec.argv[1:]],
                env=dict(spec.env),
                cwd=spec.config.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_enter(_linux.netns_path(svc.netns), self._hosts, spec.name),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ServiceError(f"service {spec.name!r} could not be started: {exc}") from exc
        finally:
            log.close()

    def _create_netns(self, spec: ServiceSpec) -> _Service:
        assert self._hub is not None and self._slot is not None
        hub = self._hub
        netns = f"{self._slot.prefix}{spec.name}"
        port = f"p{self._next_port}"
        self._next_port += 1
        path = _linux.create_netns(netns)
        svc = _Service(spec=spec, netns=netns, port=port)
        self._services[spec.name] = svc
        fd = os.open(path, os.O_RDONLY)
        try:
            # One request: the hub end is created enslaved and up, the service end lands in
            # its namespace with a known index (1 is lo there) and a stable MAC.
            peer = {"ifname": "eth0", "net_ns_fd": fd, "address": mac_for(spec.ip), "index": 2}
            _netlink(
                f"creating the link of service {spec.name!r}",
                lambda: hub.link(
                    "add", ifname=port, kind="veth", master=self._bridge, state="up", peer=peer
                ),
            )
        finally:
            os.close(fd)
        if self._netem is not None:  # shaped before its eth0 is up: no frame passes unshaped
            self._netem.attach(spec.name)
        with IPRoute(fileno=_linux.netlink_socket_in(path)) as ns:
            ns.link("set", index=1, state="up")
            ns.addr("add", index=2, address=spec.ip, prefixlen=24)
            ns.link("set", index=2, state="up")
        return svc

    def remove(self, name: str) -> None:
        svc = self._services.pop(name)
        _kill_in([svc.netns])
        if svc.proc is not None:
            with suppress(subprocess.TimeoutExpired):
                svc.proc.wait(timeout=5)
        if self._hub is not None:
            with suppress(NetlinkError, IndexError):
                self._hub.link("del", index=self._hub.link_lookup(ifname=svc.port)[0])
        if self._netem is not None:
            self._netem.detach(name)
        _linux.delete_netns(svc.netns)

    def exited(self, name: str) -> int | None:
        proc = self._services[name].proc
        return None if proc is None else proc.poll()

    def signal(self, name: str, signum: int) -> None:
        """Send ``signum`` to every process of the service (all of its network namespace)."""
        svc = self._services[name]
        _kill_in([svc.netns], signum)
        if signum in (signal.SIGKILL,) and svc.proc is not None:
            with suppress(subprocess.TimeoutExpired):
                svc.proc.wait(timeout=5)

    def stop(self, name: str, timeout: float) -> None:
        svc = self._services[name]
        if svc.proc is None or svc.proc.poll() is not None:
            _kill_in([svc.netns])  # stray children of an exited main process
            return
        _kill_in([svc.netns], signal.SIGCONT)  # a paused service cannot handle SIGTERM
        with suppress(ProcessLookupError):
            os.killpg(svc.proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            svc.proc.wait(timeout=timeout)
        _kill_in([svc.netns])
        with suppress(subprocess.TimeoutExpired):
            svc.proc.wait(timeout=5)

    def exec(
        self, name: str, argv: Sequence[str], timeout: float | None, input: str | None
    ) -> ExecResult:
        svc = self._services[name]
        try:
            done = subprocess.run(
                list(argv),
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=dict(svc.spec.env),
                preexec_fn=_enter(_linux.netns_path(svc.netns), self._hosts, name),
            )
        except FileNotFoundError as exc:
            raise ServiceError(f"exec in {name!r}: executable {argv[0]!r} not found") from exc
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(
                f"exec in {name!r}: {list(argv)!r} timed out after {timeout:g}s"
            ) from exc
        return ExecResult(done.returncode, done.stdout, done.stderr)

    def log_path(self, name: str) -> str:
        return os.path.join(self._run_dir, f"{name}.log")

    def set_hosts(self, entries: Mapping[str, str]) -> None:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{ip}\t{name}" for name, ip in entries.items()]
        # Rewritten in place: services have this very inode bound over their /etc/hosts.
        with open(self._hosts, "w") as f:
            f.write("\n".join(lines) + "\n")

    def inspect_hint(self, name: str) -> str:
        svc = self._services[name]
        return f"nsenter --net=/run/netns/{svc.netns} sh   (or: ip netns exec {svc.netns} sh)"

    def netns_of(self, name: str) -> str:
        return self._services[name].netns


def mac_for(ip: str) -> str:
    """A locally administered MAC derived from the address: a service removed and added again
    gets the same one, so no peer's neighbour cache points at a vanished interface."""
    a, b, c, d = (int(x) for x in ip.split("."))
    return f"02:70:{a:02x}:{b:02x}:{c:02x}:{d:02x}"


def _kill_in(netns_names: Sequence[str], signum: int = signal.SIGKILL) -> None:
    inodes = {i for n in netns_names if n for i in [_linux.netns_inode(_linux.netns_path(n))] if i}
    if not inodes:
        return
    for pid in _linux.pids_in_netns(inodes):
        if pid != os.getpid():
            with suppress(ProcessLookupError):
                os.kill(pid, signum)


def _delete_host_link(ifname: str) -> None:
    if not os.path.exists(f"/sys/class/net/{ifname}"):
        return
    with IPRoute() as host:
        for idx in host.link_lookup(ifname=ifname):
            with suppress(NetlinkError):
                host.link("del", index=idx)


def reap_slot(number: int) -> list[str]:
    """Remove what a killed run left in slot ``number``: processes, namespaces, host link."""
    names = _linux.list_netns(f"pe{number}-")
    _kill_in(names)
    if names:
        time.sleep(0.01)
    for name in names:
        _linux.delete_netns(name)
    _delete_host_link(f"pe{number}h")
    return names
