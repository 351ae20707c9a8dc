"""The enclave: services in subnetworks, the connection matrix between them, and faults.

Every change of the matrix is compiled (``matrix.compile_policies``) and applied by the
backend's shaper as one kernel transaction before this module's state is updated, so a change
that the kernel refuses leaves the enclave as it was.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import tempfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Literal

from . import _linux
from .backends import Backend, ExecResult, ServiceSpec, get_backend
from .config import (
    ConnectionConfig,
    Duration,
    ServiceConfig,
    UpdateServiceConfig,
    check_name,
    connection_from,
    seconds,
)
from .errors import ConfigError, EnclaveClosedError, ServiceError, UnknownNameError
from .faults import Fault, Timeline
from .matrix import MatrixState, PolicyTable, compile_policies
from .partitions import FaultHelpers
from .ready import ReadyCondition, TcpPort, log_tail, wait_ready
from .shapers import Shaper

__all__ = ["Checkpoint", "Enclave", "Service"]

Status = Literal["running", "stopped", "paused", "exited"]
_PLACEHOLDER = re.compile(r"\{\{\s*(ip|name)\s*(?::\s*([A-Za-z0-9_-]+)\s*)?\}\}")
_open_enclaves: weakref.WeakSet[Enclave] = weakref.WeakSet()


class Service:
    """A service of an enclave: ``name``, ``ip`` (its address), live ``subnetwork``/``status``."""

    def __init__(self, enclave: Enclave, name: str, ip: str, config: ServiceConfig) -> None:
        self._enclave = enclave
        self.name = name
        self.ip = ip
        self.config = config
        self.status: Status = "running"

    @property
    def subnetwork(self) -> str:
        return self._enclave._state.subnetworks[self.name]

    @property
    def ports(self) -> dict[str, int]:
        """Port id -> number, as given in the config."""
        return {k: v.number for k, v in self.config.ports.items()}  # type: ignore[union-attr]

    def exec(self, argv: Sequence[str], timeout: float | None = 60.0) -> ExecResult:
        return self._enclave.exec(self.name, argv, timeout=timeout)

    def logs(self) -> str:
        return self._enclave.logs(self.name)

    def __repr__(self) -> str:
        return f"<Service {self.name} {self.ip} subnetwork={self.subnetwork} {self.status}>"


@dataclass(frozen=True)
class Checkpoint:
    """What ``Enclave.restore`` brings back: the matrix, and which services exist."""

    state: MatrixState
    services: Mapping[str, ServiceConfig]


class _Probe:
    """What ready conditions see of one service."""

    def __init__(self, enclave: Enclave, name: str, ip: str) -> None:
        self.enclave, self.name, self.ip = enclave, name, ip

    def exec_status(self, argv: Sequence[str], timeout: float) -> int:
        try:
            return self.enclave.exec(self.name, argv, timeout=timeout).returncode
        except ServiceError:
            return -1

    def log_text(self) -> str:
        return self.enclave.logs(self.name)

    def exited(self) -> int | None:
        return self.enclave._backend.exited(self.name)


class Enclave(FaultHelpers):
    """An isolated network of services, in subnetworks, with connections between them.

    Use it as a context manager (or call ``close()``): closing removes every namespace, link,
    nft table and process it made, also when a block raised or was interrupted.
    ``backend`` is "netns" (processes in network namespaces, the default) or "docker".
    """

    def __init__(self, backend: str | Backend = "netns") -> None:
        _linux.require_privileges()
        self._backend: Backend = get_backend(backend) if isinstance(backend, str) else backend
        self._services: dict[str, Service] = {}
        self._reserved: dict[str, str] = {}
        self._host_ids = itertools.count(2)
        self._rule_ids = itertools.count(1)
        self._state = MatrixState()
        self._policies = PolicyTable()
        self.timeline = Timeline()
        self._closed = False
        self._slot = _linux.Slot.acquire()
        self.run_dir = tempfile.mkdtemp(prefix=_linux.run_dir_prefix(self._slot.number))
        shaper: Shaper | None = None
        try:
            shaper = self._backend.open(self._slot, self.run_dir)
            shaper.apply(self._policies, {})
        except BaseException:
            if shaper is not None:
                with suppress(Exception):  # the original error is the one to see
                    shaper.close()
            self._backend.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self._slot.release()
            raise
        self._shaper: Shaper = shaper
        self.id = f"pe{self._slot.number}"
        _open_enclaves.add(self)
        self.timeline.record("open", f"enclave {self.id} ({self._backend.name} backend)")

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Enclave:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, keep: bool = False) -> None:
        """Remove everything the enclave made (``keep=True``: leave it for inspection)."""
        if self._closed:
            return
        self._closed = True
        _open_enclaves.discard(self)
        if keep:
            with open(self._slot.keep_marker(), "w") as f:
                f.write(self.run_dir + "\n")
            self._shaper.close(keep=True)
            self._backend.close(keep=True)
            self._slot.release()
            return
        try:
            self._shaper.close()
        finally:
            try:
                self._backend.close()
            finally:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self._slot.release()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def gateway_ip(self) -> str:
        """The test process's own address on the enclave network."""
        return self._backend.gateway_ip

    @property
    def backend(self) -> Backend:
        return self._backend

    # -- services -------------------------------------------------------------------------

    def address_of(self, name: str) -> str:
        """The address of service ``name``, reserving one if it is not added yet."""
        check_name("service", name)
        if name not in self._reserved:
            host = next(self._host_ids)
            if host > 254:
                raise ConfigError(f"enclave {self.id} is full: at most 253 service addresses")
            self._reserved[name] = self._slot.address(host)
            self._backend.set_hosts(self._reserved)
        return self._reserved[name]

    def add_service(self, name: str, config: ServiceConfig) -> Service:
        """Start a service and wait until it is ready; on failure nothing of it remains."""
        self._check_open()
        check_name("service", name)
        if name in self._services:
            raise ConfigError(
                f"service {name!r} already exists in enclave {self.id}: "
                "names are unique; remove_service it first or pick another"
            )
        if not isinstance(config, ServiceConfig):
            raise ConfigError(f"config={config!r} is not allowed: give a ServiceConfig")
        spec = self._spec(name, config)
        old = self._state
        self._apply(old.with_service(name, config.subnetwork))
        try:
            self._backend.start(spec)
            service = Service(self, name, spec.ip, config)
            self._services[name] = service
            self._wait_ready(service)
        except BaseException:
            self._services.pop(name, None)
            self._remove_quietly(name)
            self._apply(old)
            raise
        self.timeline.record("add_service", f"{name} {spec.ip} subnetwork={config.subnetwork}")
        return service

    def _spec(self, name: str, config: ServiceConfig) -> ServiceSpec:
        ip = self.address_of(name)
        if config.image is not None and self._backend.name == "netns":
            raise ConfigError(
                f"service {name!r}: image={config.image!r} needs the docker backend; the netns "
                "backend runs cmd as a process (use Enclave(backend='docker') or drop image)"
            )
        if self._backend.name == "netns" and not (config.entrypoint or config.cmd):
            raise ConfigError(f"service {name!r}: cmd is empty; give the program to run")

        def render(text: str) -> str:
            def sub(m: re.Match[str]) -> str:
                target = m.group(2) or name
                return self.address_of(target) if m.group(1) == "ip" else target

            return _PLACEHOLDER.sub(sub, text)

        env = {**os.environ} if self._backend.name == "netns" else {}
        env.update(ENCLAVE_SERVICE_NAME=name, ENCLAVE_SERVICE_IP=ip, ENCLAVE_ID=self.id)
        env.update({k: render(v) for k, v in config.env_vars.items()})
        argv = tuple(render(a) for a in (*config.entrypoint, *config.cmd))
        return ServiceSpec(name=name, ip=ip, config=config, argv=argv, env=env)

    def _wait_ready(self, service: Service) -> None:
        config = service.config
        conditions: list[ReadyCondition] = [
            TcpPort(p.number, timeout=None if p.wait is True else p.wait)  # type: ignore
            for p in config.ports.values()  # (ports hold PortSpecs once validated)
            if p.transport_protocol == "TCP" and p.wait is not None  # type: ignore[union-attr]
        ]
        conditions += config.ready_conditions
        wait_ready(
            _Probe(self, service.name, service.ip),
            conditions,
            seconds(config.ready_timeout, "ready_timeout"),
        )

    def _remove_quietly(self, name: str) -> None:
        with suppress(KeyError):  # the backend never got to create it
            self._backend.remove(name)

    def get_service(self, name: str) -> Service:
        try:
            return self._services[name]
        except KeyError:
            raise self._unknown("service", name, self._services) from None

    @property
    def services(self) -> dict[str, Service]:
        return dict(self._services)

    def remove_service(self, name: str) -> None:
        self._check_open()
        self.get_service(name)
        self._backend.remove(name)
        del self._services[name]
        self._apply(self._state.without_service(name))
        self.timeline.record("remove_service", name)

    def update_service(self, name: str, config: UpdateServiceConfig) -> Service:
        """Move a running service to another subnetwork; its address and process are kept."""
        self._check_open()
        service = self.get_service(name)
        if config.subnetwork is not None and config.subnetwork != service.subnetwork:
            self._apply(self._state.with_service(name, config.subnetwork))
            self.timeline.record("update_service", f"{name} -> subnetwork {config.subnetwork}")
        return service

    def exec(
        self, name: str, argv: Sequence[str], timeout: float | None = 60.0, input: str | None = None
    ) -> ExecResult:
        """Run ``argv`` inside the service's namespaces; returns code, stdout and stderr."""
        self._check_open()
        self.get_service(name)
        return self._backend.exec(name, argv, timeout, input)

    def logs(self, name: str) -> str:
        """Everything the service wrote to stdout and stderr so far."""
        self.get_service(name)
        try:
            with open(self._backend.log_path(name), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # -- node faults ----------------------------------------------------------------------

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` (default SIGKILL) to every process of the service."""
        self._node_fault(
            name,
            "kill",
            lambda: self._backend.signal(name, signum),
            "stopped" if signum == signal.SIGKILL else None,
        )

    def stop(self, name: str, timeout: Duration = 10.0) -> None:
        """SIGTERM the service, SIGKILL what is left after ``timeout`` seconds."""
        limit = seconds(timeout, "timeout")
        self._node_fault(name, "stop", lambda: self._backend.stop(name, limit), "stopped")

    def start(self, name: str) -> None:
        """Start a stopped service again (same address, same config) and wait until ready."""
        service = self.get_service(name)
        if self._backend.exited(name) is None and service.status != "stopped":
            raise ConfigError(f"service {name!r} is {service.status}; stop it before start")
        self._node_fault(name, "start", lambda: self._start_again(service), "running")

    def _start_again(self, service: Service) -> None:
        self._backend.start(self._spec(service.name, service.config))
        self._wait_ready(service)

    def restart(self, name: str, timeout: Duration = 10.0) -> None:
        self.stop(name, timeout)
        self.start(name)

    def pause(self, name: str) -> Fault:
        """Freeze every process of the service (SIGSTOP); undo or ``resume`` thaws them."""
        self._node_fault(
            name, "pause", lambda: self._backend.signal(name, signal.SIGSTOP), "paused"
        )
        return Fault(f"pause {name}", lambda: None if self._closed else self.resume(name))

    def resume(self, name: str) -> None:
        self._node_fault(
            name, "resume", lambda: self._backend.signal(name, signal.SIGCONT), "running"
        )

    def _node_fault(self, name: str, kind: str, action: object, status: Status | None) -> None:
        self._check_open()
        service = self.get_service(name)
        action()  # type: ignore[operator]  # a zero-argument callable
        if status is not None:
            service.status = status
        self.timeline.record(kind, name)

    def status(self, name: str) -> Status:
        """running / stopped / paused, or exited if its main process ended by itself."""
        service = self.get_service(name)
        if service.status == "running" and self._backend.exited(name) is not None:
            return "exited"
        return service.status

    # -- connections ----------------------------------------------------------------------

    def set_connection(
        self,
        subnetworks: tuple[str, str] | ConnectionConfig | None = None,
        config: ConnectionConfig | None = None,
        **fields: object,
    ) -> Fault:
        """Set the connection between two subnetworks, or the default one (no pair given).

        ``config`` is a ConnectionConfig (``BLOCKED``, ``ALLOWED``, ...) or keyword fields
        (``packet_loss_percentage=90.0``). The returned Fault restores what was there before.
        """
        self._check_open()
        if isinstance(subnetworks, ConnectionConfig) and config is None:
            subnetworks, config = None, subnetworks
        conn = connection_from(config, **fields)
        if subnetworks is None:
            before = self._state.default
            self._apply(replace(self._state, default=conn))
            self.timeline.record("set_connection", f"default: {conn.describe()}")
            return Fault(
                f"default connection {conn.describe()}", lambda: self._restore_default(before, conn)
            )
        pair = self._pair(subnetworks)
        previous = self._state.overrides.get(pair)
        self._apply(self._state.with_override(pair, conn))
        a, b = sorted(pair)
        self.timeline.record("set_connection", f"{a} <-> {b}: {conn.describe()}")
        return Fault(
            f"{a} <-> {b} {conn.describe()}",
            lambda: self._restore_override(pair, previous, conn),
        )

    def _restore_default(self, previous: ConnectionConfig, mine: ConnectionConfig) -> None:
        # Only while what this Fault set is still in force: after heal() or a later change,
        # undoing it must not bring an older setting back.
        if self._closed or self._state.default != mine:
            return
        self._apply(replace(self._state, default=previous))
        self.timeline.record("restore", f"default: {previous.describe()}")

    def _restore_override(
        self, pair: frozenset[str], previous: ConnectionConfig | None, mine: ConnectionConfig
    ) -> None:
        if self._closed or self._state.overrides.get(pair) != mine:
            return
        self._apply(self._state.with_override(pair, previous))
        a, b = sorted(pair)
        self.timeline.record(
            "restore", f"{a} <-> {b}: {previous.describe() if previous else 'default'}"
        )

    def remove_connection(self, subnetworks: tuple[str, str]) -> None:
        """Drop the override for a pair: the default connection applies to it again."""
        self._check_open()
        pair = self._pair(subnetworks, must_exist=False)
        if pair not in self._state.overrides:
            a, b = sorted(pair)
            raise ConfigError(
                f"no connection is set between {a!r} and {b!r}; set ones are: "
                f"{self._override_names() or 'none'}"
            )
        self._apply(self._state.with_override(pair, None))
        self.timeline.record("remove_connection", " <-> ".join(sorted(pair)))

    def connection(self, a: str, b: str) -> ConnectionConfig:
        """The connection in force between subnetworks ``a`` and ``b``."""
        return self._state.connection(a, b)

    @property
    def subnetworks(self) -> list[str]:
        return self._state.subnetwork_names

    @property
    def policies(self) -> PolicyTable:
        """The compiled directed policies in force now."""
        return self._policies

    def _pair(self, subnetworks: object, must_exist: bool = True) -> frozenset[str]:
        if (
            isinstance(subnetworks, str)
            or not isinstance(subnetworks, (tuple, list))
            or len(subnetworks) != 2
        ):
            raise ConfigError(
                f"subnetworks={subnetworks!r} is not allowed: give a pair of "
                "subnetwork names, e.g. ('main', 'secondary')"
            )
        a, b = (check_name("subnetwork", s) for s in subnetworks)
        if a == b:
            raise ConfigError(
                f"subnetworks=({a!r}, {b!r}) names the same subnetwork twice: "
                "services in one subnetwork always talk freely"
            )
        if must_exist:
            for s in (a, b):
                if s not in self.subnetworks:
                    raise self._unknown(
                        "subnetwork",
                        s,
                        self.subnetworks,
                        hint=(
                            "move services there first with update_service(name, "
                            "UpdateServiceConfig(subnetwork=...))"
                        ),
                    )
        return frozenset((a, b))

    def _override_names(self) -> str:
        return ", ".join(" <-> ".join(sorted(p)) for p in self._state.overrides)

    # -- state ----------------------------------------------------------------------------

    def _apply(self, state: MatrixState) -> None:
        """Compile and apply ``state`` in one transaction; only then make it current."""
        policies = compile_policies(state)
        self._shaper.check(policies)
        addresses = {name: self._reserved[name] for name in state.subnetworks}
        self._shaper.apply(policies, addresses)
        self._state, self._policies = state, policies

    def checkpoint(self) -> Checkpoint:
        """A snapshot of the matrix and the services, for ``restore``."""
        return Checkpoint(self._state, {n: s.config for n, s in self._services.items()})

    def restore(self, checkpoint: Checkpoint) -> None:
        """Bring the enclave back to ``checkpoint``: services, subnetworks, connections.

        Services added since are removed, removed ones added again, stopped or exited ones
        started, paused ones resumed.
        """
        self._check_open()
        for name in [n for n in self._services if n not in checkpoint.services]:
            self.remove_service(name)
        current = {n for n in self._services}
        base = replace(
            checkpoint.state,
            subnetworks={n: s for n, s in checkpoint.state.subnetworks.items() if n in current},
        )
        self._apply(base)
        for name, config in checkpoint.services.items():
            if name in self._services and self._services[name].config != config:
                self.remove_service(name)  # removed and added again with another config
            if name not in self._services:
                self.add_service(name, config)
                continue
            status = self.status(name)
            if status == "paused":
                self.resume(name)
            elif status in ("stopped", "exited"):
                self._backend.stop(name, 1.0)
                self.start(name)
        self._apply(checkpoint.state)
        self.timeline.record("restore", "services and connections as checkpointed")

    def _check_open(self) -> None:
        if self._closed:
            raise EnclaveClosedError(f"enclave {getattr(self, 'id', '?')} is closed")

    @staticmethod
    def _unknown(kind: str, name: object, known: Iterable[str], hint: str = "") -> ConfigError:
        names = ", ".join(sorted(known)) or "none"
        extra = f"; {hint}" if hint else ""
        return UnknownNameError(f"unknown {kind} {name!r}: known are {names}{extra}")

    # -- reports --------------------------------------------------------------------------

    def describe(self, log_lines: int = 10, since: int = 0) -> str:
        """Services, connection matrix, timeline (from event ``since``) and log tails."""
        parts = [f"enclave {self.id} ({self._backend.name} backend), gateway {self.gateway_ip}"]
        parts.append("services:")
        for s in self._services.values():
            parts.append(f"  {s.name:<24} {s.ip:<15} {s.subnetwork:<20} {self.status(s.name)}")
        parts.append("connections:")
        parts.append(f"  default: {self._state.default.describe()}")
        for pair, conn in self._state.overrides.items():
            parts.append(f"  {' <-> '.join(sorted(pair))}: {conn.describe()}")
        # a partition or set_loss between services is several directed rules with one label
        for label, config in dict.fromkeys((r.label, r.config) for r in self._state.rules):
            parts.append(f"  rule: {label}: {config.describe()}")
        parts.append("timeline:" + (f" (from event {since} on)" if since else ""))
        parts.append("  " + self.timeline.render(since).replace("\n", "\n  "))
        if log_lines:
            for s in self._services.values():
                parts.append(f"log of {s.name} (last {log_lines} lines):")
                parts.append(log_tail(self.logs(s.name), log_lines))
        return "\n".join(parts)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._services)} services"
        return f"<Enclave {getattr(self, 'id', '?')} {self._backend.name} {state}>"


@atexit.register
def _close_leftovers() -> None:
    for enclave in list(_open_enclaves):
        enclave.close()
