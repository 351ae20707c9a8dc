"""The plugin's markers as plain data: parsed, validated and applied without pytest.

``subnetwork(name, *services)`` and ``connection([a, b,] config | **fields)`` are parsed into
frozen dataclasses by one function each (like pytest's ``skipping.py``); the plugin collects
them from a test item, farthest first, and turns :class:`MarkerError` into a failed test and
:class:`UnsupportedMarkError` into a skip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, cast

from .config import (
    BLOCKED,
    ConnectionConfig,
    PacketDelayDistribution,
    UpdateServiceConfig,
    check_name,
    connection_from,
)
from .enclave import Enclave
from .errors import CapabilityError, ConfigError, EnclaveError

__all__ = [
    "ConnectionMark",
    "EnclaveMarks",
    "MarkLike",
    "MarkerError",
    "SubnetworkMark",
    "UnsupportedMarkError",
    "apply_marks",
    "connection_mark",
    "subnetwork_mark",
]


class MarkLike(Protocol):
    """What a marker is made of (``pytest.Mark`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def args(self) -> tuple[object, ...]: ...

    @property
    def kwargs(self) -> Mapping[str, object]: ...


@dataclass(frozen=True)
class SubnetworkMark:
    """``@pytest.mark.subnetwork(name, *services)``: move ``services`` to ``subnetwork``."""

    subnetwork: str
    services: tuple[str, ...]
    source: str  # the marker as written, for messages


@dataclass(frozen=True)
class ConnectionMark:
    """``@pytest.mark.connection(...)``: ``pair`` None means the default connection."""

    pair: tuple[str, str] | None
    config: ConnectionConfig
    skip_unsupported: bool
    source: str


@dataclass(frozen=True)
class EnclaveMarks:
    """A test's enclave markers, farthest first (the order they are applied in)."""

    subnetworks: tuple[SubnetworkMark, ...] = ()
    connections: tuple[ConnectionMark, ...] = ()
    skip_unsupported: bool = False


class MarkerError(Exception):
    """A marker that cannot be parsed or applied: ``str()`` names the marker and the reason."""

    def __init__(self, source: str, cause: BaseException) -> None:
        super().__init__(f"{source}: {cause}")
        self.source, self.cause = source, cause


class UnsupportedMarkError(MarkerError):
    """A marker this machine cannot honour, on a test that allows skipping for that."""


def subnetwork_mark(mark: MarkLike) -> SubnetworkMark:
    source = _render(mark)
    try:
        if mark.kwargs:
            raise ConfigError(f"takes no keyword arguments (got {', '.join(mark.kwargs)})")
        if not mark.args:
            raise ConfigError('give a subnetwork and its services, e.g. ("secondary", "db2")')
        name, *rest = mark.args
        services: list[object] = []
        for arg in rest:
            services.extend(arg if isinstance(arg, (list, tuple, set, frozenset)) else [arg])
        if not services:
            raise ConfigError(f"names no service to move to subnetwork {name!r}")
        check_name("subnetwork", name)
        for service in services:
            check_name("service", service)
    except ConfigError as exc:
        raise MarkerError(source, exc) from exc
    return SubnetworkMark(cast(str, name), tuple(cast("list[str]", services)), source)


def connection_mark(mark: MarkLike) -> ConnectionMark:
    source = _render(mark)
    args, kwargs = list(mark.args), dict(mark.kwargs)
    skip = kwargs.pop("skip_unsupported", False)
    config = kwargs.pop("config", None)
    try:
        if not isinstance(skip, bool):
            raise ConfigError(f"skip_unsupported={skip!r} is not allowed: give True or False")
        pair = _pair_from(args)
        if len(args) > 1 or (args and config is not None):
            raise ConfigError("give one connection: a config argument or keyword fields")
        if args:
            config = args[0]
        if config is None and not kwargs:
            raise ConfigError(
                "give a connection: BLOCKED, ALLOWED, a ConnectionConfig, or fields such as "
                "packet_loss_percentage=90.0"
            )
        if isinstance(config, ConnectionConfig) and kwargs:  # BLOCKED, reject=True
            config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        conn = connection_from(config, **kwargs)  # type: ignore[arg-type]  # checked there
    except ConfigError as exc:
        raise MarkerError(source, exc) from exc
    return ConnectionMark(pair, conn, skip, source)


def _pair_from(args: list[object]) -> tuple[str, str] | None:
    """Take the subnetwork pair off the front of ``args``: ("a", "b", ...) or (("a", "b"), ...)."""
    first = args[0] if args else None
    if isinstance(first, (tuple, list)):
        args.pop(0)
        if len(first) != 2 or not all(isinstance(s, str) for s in first):
            raise ConfigError(f"subnetworks={first!r} is not allowed: give two subnetwork names")
        return first[0], first[1]
    if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        a, b = args.pop(0), args.pop(0)
        return cast(str, a), cast(str, b)
    if args and isinstance(args[0], str):
        raise ConfigError(
            f"names one subnetwork ({args[0]!r}): give two, e.g. ('main', 'secondary', BLOCKED), "
            "or none to set the default connection"
        )
    return None


def _render(mark: MarkLike) -> str:
    parts = [_render_value(a) for a in mark.args]
    parts += [f"{k}={_render_value(v)}" for k, v in mark.kwargs.items()]
    return f"@pytest.mark.{mark.name}({', '.join(parts)})"


def _render_value(value: object) -> str:
    """Config values as a user writes them: BLOCKED, UniformPacketDelayDistribution(50), ..."""
    if isinstance(value, ConnectionConfig):
        if value.is_allowed:
            return "ALLOWED"
        if value == BLOCKED:
            return "BLOCKED"
    if isinstance(value, PacketDelayDistribution) and value == PacketDelayDistribution(
        value.mean_ms
    ):
        return f"UniformPacketDelayDistribution({value.mean_ms!r})"
    if isinstance(value, (ConnectionConfig, PacketDelayDistribution)):
        changed = [
            f"{f.name}={_render_value(getattr(value, f.name))}"
            for f in dataclasses.fields(value)
            if getattr(value, f.name) != f.default
        ]
        return f"{type(value).__name__}({', '.join(changed)})"
    return repr(value)


def apply_marks(enclave: Enclave, marks: EnclaveMarks) -> None:
    """Apply ``marks`` in order; raise MarkerError (UnsupportedMarkError if it may skip)."""
    for sub in marks.subnetworks:
        with marker_errors(sub.source, marks.skip_unsupported):
            for service in sub.services:
                enclave.update_service(service, UpdateServiceConfig(subnetwork=sub.subnetwork))
    for conn in marks.connections:
        with marker_errors(conn.source, marks.skip_unsupported or conn.skip_unsupported):
            if conn.pair is None:
                enclave.set_connection(conn.config)
            else:
                enclave.set_connection(conn.pair, conn.config)


@contextmanager
def marker_errors(source: str, skip_unsupported: bool) -> Iterator[None]:
    """Turn the library's errors while applying marker ``source`` into MarkerErrors."""
    try:
        yield
    except CapabilityError as exc:
        if skip_unsupported:
            raise UnsupportedMarkError(source, exc) from exc
        raise MarkerError(source, exc) from exc
    except EnclaveError as exc:
        raise MarkerError(source, exc) from exc
