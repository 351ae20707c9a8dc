"""Configuration values: services, ports and connections (pure, no I/O).

Names follow Kurtosis where the concept exists (``ServiceConfig``, ``ConnectionConfig``,
``packet_loss_percentage``, ``UniformPacketDelayDistribution`` ...). Every value is validated
when it is built, so a bad value fails where it is written, not when it is applied.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Literal, Union

from .errors import ConfigError

if TYPE_CHECKING:
    from .ready import ReadyCondition

__all__ = [
    "ALLOWED",
    "BLOCKED",
    "DEFAULT_SUBNETWORK",
    "ConnectionConfig",
    "NormalPacketDelayDistribution",
    "PacketDelayDistribution",
    "PortSpec",
    "ServiceConfig",
    "UniformPacketDelayDistribution",
    "UpdateServiceConfig",
    "check_name",
    "seconds",
]

DEFAULT_SUBNETWORK = "default"

# Names become hostnames inside services (/etc/hosts), network namespace and container names.
# Underscores are allowed because Kurtosis's own examples use them (cassandra_node_1) and
# glibc's files database resolves them.
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")

Duration = Union[float, int, timedelta]


def seconds(value: Duration, what: str) -> float:
    """Return a duration given as seconds or ``timedelta`` as float seconds (>= 0)."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{what}={value!r} is not allowed: give seconds >= 0 or a timedelta")
    return float(value)


def check_name(kind: str, name: object) -> str:
    """Validate a service or subnetwork name and return it."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.isdigit():
        raise ConfigError(
            f"{kind} name {name!r} is not allowed: use 1-63 letters, digits, '-' or '_', "
            "starting and ending with a letter or digit (it becomes a hostname)"
        )
    return name


def _percentage(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{what}={value!r} is not allowed: give a number from 0 to 100")
    if not 0.0 <= float(value) <= 100.0:
        raise ConfigError(f"{what}={value!r} is not allowed: percentages go from 0 to 100")
    return float(value)


def _non_negative(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{what}={value!r} is not allowed: give a number >= 0")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Delay distributions


Distribution = Literal["uniform", "normal", "pareto", "paretonormal"]
_DISTRIBUTIONS = ("uniform", "normal", "pareto", "paretonormal")


@dataclass(frozen=True)
class PacketDelayDistribution:
    """A netem delay: ``mean_ms`` each way, varied by ``jitter_ms``.

    ``distribution`` is netem's table for the variation: None (netem's default, uniform within
    +-jitter), "uniform", "normal", "pareto" or "paretonormal". ``correlation`` (0-100 %) makes
    the next packet's variation depend on the previous one's.
    """

    mean_ms: float
    jitter_ms: float = 0.0
    correlation: float = 0.0
    distribution: Distribution | None = None

    def __post_init__(self) -> None:
        _non_negative("mean_ms", self.mean_ms)
        _non_negative("jitter_ms", self.jitter_ms)
        _percentage("correlation", self.correlation)
        if self.distribution is not None and self.distribution not in _DISTRIBUTIONS:
            raise ConfigError(
                f"distribution={self.distribution!r} is not allowed: "
                f"use one of {', '.join(_DISTRIBUTIONS)} or None"
            )
        if self.distribution is not None and not self.jitter_ms:
            raise ConfigError(
                f"distribution={self.distribution!r} needs jitter_ms > 0 (netem shapes the "
                "variation around the mean, and there is none)"
            )


def UniformPacketDelayDistribution(ms: float) -> PacketDelayDistribution:  # noqa: N802
    """Kurtosis's constant delay: every packet is delayed by ``ms`` milliseconds each way."""
    return PacketDelayDistribution(mean_ms=ms)


def NormalPacketDelayDistribution(  # noqa: N802
    mean_ms: float, std_dev_ms: float, correlation: float = 0.0
) -> PacketDelayDistribution:
    """Kurtosis's normal delay: ``mean_ms`` +- ``std_dev_ms`` (normal), with ``correlation`` %."""
    return PacketDelayDistribution(
        mean_ms=mean_ms, jitter_ms=std_dev_ms, correlation=correlation, distribution="normal"
    )


# ---------------------------------------------------------------------------------------------
# Connections


@dataclass(frozen=True)
class ConnectionConfig:
    """How packets between two subnetworks (or two services) are treated, each way.

    Kurtosis fields first: ``packet_loss_percentage`` and ``packet_delay_distribution``. The rest
    are netem's: loss ``loss_correlation`` (%), ``duplicate_percentage``,
    ``corrupt_percentage``, ``reorder_percentage`` with ``reorder_gap`` (needs a delay),
    ``rate_kbit`` (bandwidth in kbit/s). ``reject`` makes a 100 % loss fail fast (TCP reset /
    ICMP unreachable) instead of a black hole. ``BLOCKED`` and ``ALLOWED`` are constants.
    """

    packet_loss_percentage: float = 0.0
    packet_delay_distribution: PacketDelayDistribution | None = None
    loss_correlation: float = 0.0
    duplicate_percentage: float = 0.0
    corrupt_percentage: float = 0.0
    reorder_percentage: float = 0.0
    reorder_gap: int = 0
    rate_kbit: float = 0.0
    reject: bool = False

    def __post_init__(self) -> None:
        for name in (
            "packet_loss_percentage",
            "loss_correlation",
            "duplicate_percentage",
            "corrupt_percentage",
            "reorder_percentage",
        ):
            object.__setattr__(self, name, _percentage(name, getattr(self, name)))
        if 0 < self.packet_loss_percentage < 0.01:
            raise ConfigError(
                f"packet_loss_percentage={self.packet_loss_percentage!r} is not allowed: the "
                "resolution is 0.01 %; give 0 or at least 0.01"
            )
        delay = self.packet_delay_distribution
        if delay is not None and not isinstance(delay, PacketDelayDistribution):
            raise ConfigError(
                f"packet_delay_distribution={delay!r} is not allowed: use "
                "UniformPacketDelayDistribution(ms) or NormalPacketDelayDistribution(...)"
            )
        if isinstance(self.reorder_gap, bool) or not isinstance(self.reorder_gap, int):
            raise ConfigError(f"reorder_gap={self.reorder_gap!r} is not allowed: give an int")
        if self.reorder_gap < 0:
            raise ConfigError(f"reorder_gap={self.reorder_gap!r} is not allowed: give >= 0")
        if self.reorder_percentage and not (delay and delay.mean_ms):
            raise ConfigError(
                f"reorder_percentage={self.reorder_percentage!r} needs a packet delay: netem "
                "reorders by sending some packets at once while the rest wait the delay"
            )
        object.__setattr__(self, "rate_kbit", _non_negative("rate_kbit", self.rate_kbit))
        if self.reject and self.packet_loss_percentage != 100.0:
            raise ConfigError(
                f"reject=True needs packet_loss_percentage=100 (got "
                f"{self.packet_loss_percentage!r}): a reset is how a full block fails fast"
            )

    @property
    def is_allowed(self) -> bool:
        """True when this connection changes nothing."""
        return self == ALLOWED

    @property
    def is_blocked(self) -> bool:
        """True when nothing passes."""
        return self.packet_loss_percentage == 100.0

    @property
    def needs_netem(self) -> tuple[str, ...]:
        """The fields set here that only netem can honour (nftables does loss and blocks)."""
        names = []
        if self.is_blocked:
            return ()
        if self.packet_delay_distribution is not None and (
            self.packet_delay_distribution.mean_ms or self.packet_delay_distribution.jitter_ms
        ):
            names.append("packet_delay_distribution")
        for name in ("loss_correlation", "duplicate_percentage", "corrupt_percentage"):
            if getattr(self, name):
                names.append(name)
        if self.reorder_percentage:
            names.append("reorder_percentage")
        if self.rate_kbit:
            names.append("rate_kbit")
        return tuple(names)

    def describe(self) -> str:
        """A short human summary, e.g. ``loss 90%`` or ``blocked``."""
        if self.is_allowed:
            return "allowed"
        if self.is_blocked:
            return "blocked (reject)" if self.reject else "blocked"
        parts = []
        if self.packet_loss_percentage:
            corr = f" ~{self.loss_correlation:g}%" if self.loss_correlation else ""
            parts.append(f"loss {self.packet_loss_percentage:g}%{corr}")
        d = self.packet_delay_distribution
        if d is not None and (d.mean_ms or d.jitter_ms):
            jitter = f" +-{d.jitter_ms:g}ms" if d.jitter_ms else ""
            dist = f" {d.distribution}" if d.distribution else ""
            parts.append(f"delay {d.mean_ms:g}ms{jitter}{dist}")
        for name, label in (
            ("duplicate_percentage", "duplicate"),
            ("corrupt_percentage", "corrupt"),
            ("reorder_percentage", "reorder"),
        ):
            if getattr(self, name):
                parts.append(f"{label} {getattr(self, name):g}%")
        if self.rate_kbit:
            parts.append(f"rate {self.rate_kbit:g}kbit")
        return ", ".join(parts)


BLOCKED = ConnectionConfig(packet_loss_percentage=100.0)
ALLOWED = ConnectionConfig()

_KURTOSIS_KEYS = {f for f in ConnectionConfig.__dataclass_fields__}


def connection_from(
    value: ConnectionConfig | Mapping[str, object] | None = None, **kwargs: object
) -> ConnectionConfig:
    """Build a ConnectionConfig from a config, a mapping of its field names, or keywords."""
    if isinstance(value, ConnectionConfig) and not kwargs:
        return value
    if value is None:
        fields: dict[str, object] = {}
    elif isinstance(value, Mapping):
        fields = dict(value)
    else:
        raise ConfigError(
            f"connection {value!r} is not allowed: give a ConnectionConfig, BLOCKED, ALLOWED "
            "or keyword fields such as packet_loss_percentage=90.0"
        )
    fields.update(kwargs)
    unknown = sorted(set(fields) - _KURTOSIS_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown connection field(s) {', '.join(unknown)}: allowed are "
            f"{', '.join(sorted(_KURTOSIS_KEYS))}"
        )
    return ConnectionConfig(**fields)  # type: ignore[arg-type]  # validated by the dataclass


# ---------------------------------------------------------------------------------------------
# Services


@dataclass(frozen=True)
class PortSpec:
    """A port a service listens on (Kurtosis's PortSpec).

    ``wait`` is how long ``add_service`` waits for a TCP port to accept connections: True (the
    default, as in Kurtosis where every TCP port is waited for) means the service's
    ``ready_timeout``, a number or timedelta is its own limit, None does not wait.
    """

    number: int
    transport_protocol: Literal["TCP", "UDP"] = "TCP"
    application_protocol: str = ""
    wait: Duration | bool | None = True

    def __post_init__(self) -> None:
        if (
            isinstance(self.number, bool)
            or not isinstance(self.number, int)
            or not (1 <= self.number <= 65535)
        ):
            raise ConfigError(f"port number={self.number!r} is not allowed: use 1-65535")
        if self.transport_protocol not in ("TCP", "UDP"):
            raise ConfigError(
                f"transport_protocol={self.transport_protocol!r} is not allowed: use TCP or UDP"
            )
        if self.wait is False:
            object.__setattr__(self, "wait", None)
        if self.wait is not None and self.wait is not True:
            seconds(self.wait, "wait")


@dataclass(frozen=True)
class ServiceConfig:
    """How to run one service.

    ``cmd`` is the program and its arguments (netns backend), or the container's command
    (Docker backend, with ``image`` and ``entrypoint``). ``cmd``, ``entrypoint`` and
    ``env_vars`` may contain placeholders: ``{{ip}}`` (this service's address), ``{{name}}``,
    and ``{{ip:OTHER}}`` (another service's address, reserved now if OTHER is not added yet).
    ``ports`` maps a port id to a number or :class:`PortSpec`; TCP ports are waited for.
    ``ready_conditions`` are extra checks (see :mod:`pytest_enclave.ready`), and
    ``ready_timeout`` bounds them all (seconds or timedelta).
    """

    image: str | None = None
    cmd: Sequence[str] = ()
    entrypoint: Sequence[str] = ()
    env_vars: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, PortSpec | int] = field(default_factory=dict)
    ready_conditions: Sequence[ReadyCondition] = ()
    subnetwork: str = DEFAULT_SUBNETWORK
    cwd: str | None = None
    ready_timeout: Duration = 30.0

    def __post_init__(self) -> None:
        for what in ("cmd", "entrypoint"):
            value = getattr(self, what)
            if isinstance(value, str) or not all(isinstance(a, str) for a in value):
                raise ConfigError(
                    f"{what}={value!r} is not allowed: give a list of strings, e.g. "
                    '["sh", "-c", "..."]'
                )
            object.__setattr__(self, what, tuple(value))
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env_vars.items()):
            raise ConfigError(f"env_vars={self.env_vars!r} is not allowed: keys and values are str")
        ports = {}
        for port_id, spec in self.ports.items():
            ports[port_id] = spec if isinstance(spec, PortSpec) else PortSpec(number=spec)
        object.__setattr__(self, "ports", ports)
        object.__setattr__(self, "env_vars", dict(self.env_vars))
        object.__setattr__(self, "ready_conditions", tuple(self.ready_conditions))
        check_name("subnetwork", self.subnetwork)
        seconds(self.ready_timeout, "ready_timeout")


@dataclass(frozen=True)
class UpdateServiceConfig:
    """What ``update_service`` changes: for now, the subnetwork (address and process are kept)."""

    subnetwork: str | None = None

    def __post_init__(self) -> None:
        if self.subnetwork is not None:
            check_name("subnetwork", self.subnetwork)
