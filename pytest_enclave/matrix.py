"""The connection matrix and its compiler to directed pair policies (pure, no I/O).

State: every service's subnetwork, the default connection, per-pair overrides (unordered:
a connection applies each way) and directed rules (``block``, ``partition``, ``isolate``:
sets of source services cut from sets of destination services). :func:`compile_policies`
turns that into a :class:`PolicyTable`: for each class of sources that behave alike, the
connection towards each destination that is not plainly allowed. Shapers apply a table whole.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from .config import ALLOWED, BLOCKED, ConnectionConfig

__all__ = [
    "DirectedRule",
    "MatrixState",
    "PolicyTable",
    "SourceClass",
    "compile_policies",
    "partition_rules",
]

Pair = frozenset[str]


@dataclass(frozen=True)
class DirectedRule:
    """Packets from any of ``sources`` to any of ``destinations`` get ``config`` (by service).

    A blocking rule wins over every other; otherwise the newest matching rule wins over older
    ones and over the subnetworks' connection.
    """

    rule_id: int
    sources: frozenset[str]
    destinations: frozenset[str]
    label: str = ""
    config: ConnectionConfig = BLOCKED


@dataclass(frozen=True)
class MatrixState:
    """An immutable snapshot of everything that decides how packets flow."""

    subnetworks: Mapping[str, str] = field(default_factory=dict)  # service -> subnetwork
    default: ConnectionConfig = ALLOWED
    overrides: Mapping[Pair, ConnectionConfig] = field(default_factory=dict)
    rules: tuple[DirectedRule, ...] = ()

    def with_service(self, service: str, subnetwork: str) -> MatrixState:
        return replace(self, subnetworks={**self.subnetworks, service: subnetwork})

    def without_service(self, service: str) -> MatrixState:
        subnets = {k: v for k, v in self.subnetworks.items() if k != service}
        rules = []
        for rule in self.rules:
            src, dst = rule.sources - {service}, rule.destinations - {service}
            if src and dst:
                rules.append(replace(rule, sources=src, destinations=dst))
        return replace(self, subnetworks=subnets, rules=tuple(rules))

    def with_override(self, pair: Pair, config: ConnectionConfig | None) -> MatrixState:
        overrides = dict(self.overrides)
        if config is None:
            overrides.pop(pair, None)
        else:
            overrides[pair] = config
        return replace(self, overrides=overrides)

    def connection(self, a: str, b: str) -> ConnectionConfig:
        """The configured connection between subnetworks ``a`` and ``b`` (ALLOWED if equal)."""
        if a == b:
            return ALLOWED
        return self.overrides.get(frozenset((a, b)), self.default)

    def policy(self, src: str, dst: str) -> ConnectionConfig:
        """The effective connection for packets from service ``src`` to service ``dst``."""
        matching = [r for r in self.rules if src in r.sources and dst in r.destinations]
        return _winner(matching) or self.connection(self.subnetworks[src], self.subnetworks[dst])

    @property
    def subnetwork_names(self) -> list[str]:
        names = set(self.subnetworks.values())
        for pair in self.overrides:
            names |= pair
        return sorted(names)


@dataclass(frozen=True)
class SourceClass:
    """Sources that treat every destination alike, and how: destination -> connection."""

    sources: tuple[str, ...]
    towards: Mapping[str, ConnectionConfig]


@dataclass(frozen=True)
class PolicyTable:
    """The compiled matrix: only pairs whose connection is not ALLOWED appear."""

    classes: tuple[SourceClass, ...] = ()

    def pairs(self) -> Iterable[tuple[str, str, ConnectionConfig]]:
        """Every directed (source, destination, connection) that is not ALLOWED."""
        for cls in self.classes:
            for src in cls.sources:
                for dst, config in cls.towards.items():
                    if dst != src:
                        yield src, dst, config

    def get(self, src: str, dst: str) -> ConnectionConfig:
        for cls in self.classes:
            if src in cls.sources:
                return cls.towards.get(dst, ALLOWED)
        return ALLOWED

    @property
    def configs(self) -> set[ConnectionConfig]:
        return {c for cls in self.classes for c in cls.towards.values()}


def compile_policies(state: MatrixState) -> PolicyTable:
    """Compile ``state`` into directed policies, grouping sources that behave alike.

    Services with the same subnetwork and the same rule memberships send alike, so the work
    is (classes x services), not (services x services): a change at 200 services in two
    subnetworks computes two rows.
    """
    rules = state.rules
    groups: dict[tuple[str, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for name, subnet in state.subnetworks.items():
        as_src = tuple(i for i, r in enumerate(rules) if name in r.sources)
        as_dst = tuple(i for i, r in enumerate(rules) if name in r.destinations)
        groups.setdefault((subnet, as_src, as_dst), []).append(name)

    # A destination's treatment depends only on its own group key, so rows are computed per
    # (source group, destination group) and spread over the destination group's members.
    keys = list(groups)
    classes = []
    for skey in keys:
        towards: dict[str, ConnectionConfig] = {}
        for dkey in keys:
            config = _group_policy(state, skey, dkey)
            if not config.is_allowed:
                towards.update(dict.fromkeys(groups[dkey], config))
        if towards:
            classes.append(SourceClass(sources=tuple(groups[skey]), towards=towards))
    return PolicyTable(classes=tuple(classes))


def _group_policy(
    state: MatrixState,
    skey: tuple[str, tuple[int, ...], tuple[int, ...]],
    dkey: tuple[str, tuple[int, ...], tuple[int, ...]],
) -> ConnectionConfig:
    common = set(skey[1]) & set(dkey[2])
    winner = _winner([state.rules[i] for i in sorted(common)])
    return winner or state.connection(skey[0], dkey[0])


def _winner(rules: list[DirectedRule]) -> ConnectionConfig | None:
    """The connection decided by the rules matching one pair (None: no rule matches)."""
    for rule in rules:
        if rule.config.is_blocked:
            return rule.config
    return rules[-1].config if rules else None


def partition_rules(
    groups: Iterable[Iterable[str]],
    ids: Iterator[int],
    label: str,
    config: ConnectionConfig = BLOCKED,
) -> tuple[DirectedRule, ...]:
    """Directed rules giving ``config`` between every group and every other, both ways."""
    frozen = [frozenset(g) for g in groups]
    return tuple(
        DirectedRule(next(ids), a, b, label, config)
        for a, b in itertools.permutations(frozen, 2)
        if a and b
    )
