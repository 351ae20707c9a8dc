"""Jepsen-style fault helpers of the enclave: partitions, directed blocks, loss, delay, heal.

Mixed into :class:`pytest_enclave.Enclave`; every helper changes the connection matrix through
the enclave's single ``_apply`` (one kernel transaction) and returns a :class:`Fault` that
undoes just that change, also as a context manager.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from .config import ALLOWED, ConnectionConfig, PacketDelayDistribution
from .errors import ConfigError
from .faults import Fault, Timeline
from .matrix import DirectedRule, MatrixState, partition_rules

if TYPE_CHECKING:
    from .enclave import Service

__all__ = ["FaultHelpers"]


class FaultHelpers:
    """The helpers; the enclave provides the state and the one way to change it."""

    _state: MatrixState
    _services: dict[str, Service]
    _rule_ids: Iterator[int]
    _closed: bool
    timeline: Timeline

    def _apply(self, state: MatrixState) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        raise NotImplementedError

    @property
    def subnetworks(self) -> list[str]:
        raise NotImplementedError

    def set_connection(
        self,
        subnetworks: tuple[str, str] | ConnectionConfig | None = None,
        config: ConnectionConfig | None = None,
        **fields: object,
    ) -> Fault:
        raise NotImplementedError

    @staticmethod
    def _unknown(kind: str, name: object, known: Iterable[str], hint: str = "") -> ConfigError:
        raise NotImplementedError

    def partition(self, *groups: str | Iterable[str]) -> Fault:
        """Cut the groups (service or subnetwork names) from each other, both ways.

        Services not named form one more group. ``partition(["a", "b"], ["c"])``,
        ``partition("secondary")``. Returns a Fault that heals just this partition.
        """
        resolved = [self._resolve(g) for g in groups]
        if not resolved:
            raise ConfigError("partition() needs at least one group of services or subnetworks")
        seen: set[str] = set()
        for group in resolved:
            if group & seen:
                raise ConfigError(
                    f"service(s) {sorted(group & seen)} are in two partition "
                    "groups; each service may be in one group only"
                )
            seen |= group
        rest = set(self._services) - seen
        if rest:
            resolved.append(frozenset(rest))
        label = " | ".join(",".join(sorted(g)) for g in resolved)
        return self._add_rules(partition_rules(resolved, self._rule_ids, label), "partition", label)

    def isolate(self, service: str) -> Fault:
        """Cut one service (or subnetwork) from every other service, both ways."""
        return self.partition([service])

    def block(self, source: str | Iterable[str], destination: str | Iterable[str]) -> Fault:
        """Drop packets from ``source`` to ``destination`` only (one direction)."""
        src, dst = self._resolve(source), self._resolve(destination)
        label = f"{','.join(sorted(src))} -> {','.join(sorted(dst))}"
        return self._add_rules(
            (DirectedRule(next(self._rule_ids), src, dst, label),), "block", label
        )

    def set_loss(self, a: str, b: str, percentage: float) -> Fault:
        """Lose ``percentage`` % of packets each way between two subnetworks (or services)."""
        return self._shape(a, b, ConnectionConfig(packet_loss_percentage=percentage))

    def set_delay(
        self, a: str, b: str, ms: float, jitter_ms: float = 0.0, distribution: str | None = None
    ) -> Fault:
        """Delay packets by ``ms`` each way (round trip: twice that); needs netem."""
        delay = PacketDelayDistribution(mean_ms=ms, jitter_ms=jitter_ms, distribution=distribution)  # type: ignore[arg-type]
        return self._shape(a, b, ConnectionConfig(packet_delay_distribution=delay))

    def _shape(self, a: str, b: str, config: ConnectionConfig) -> Fault:
        if a in self.subnetworks and b in self.subnetworks and a not in self._services:
            return self.set_connection((a, b), config)
        src, dst = self._resolve(a), self._resolve(b)
        label = f"{','.join(sorted(src))} <-> {','.join(sorted(dst))}: {config.describe()}"
        rules = partition_rules([src, dst], self._rule_ids, label, config)
        return self._add_rules(rules, "shape", label)

    def heal(self) -> Fault:
        """Make the network whole (Jepsen's heal): no rules, no overrides, default ALLOWED.

        Services stay in their subnetworks. The returned Fault puts the faults back.
        """
        self._check_open()
        before = self._state
        self._apply(replace(before, default=ALLOWED, overrides={}, rules=()))
        self.timeline.record("heal", "all rules and overrides removed, default allowed")

        def unheal() -> None:
            if self._closed:
                return
            self._apply(
                replace(
                    self._state,
                    default=before.default,
                    overrides=before.overrides,
                    rules=before.rules,
                )
            )
            self.timeline.record("unheal", "faults from before heal() restored")

        return Fault("heal", unheal)

    def _resolve(self, names: str | Iterable[str]) -> frozenset[str]:
        items = [names] if isinstance(names, str) else list(names)
        found: set[str] = set()
        for item in items:
            if item in self._services:
                found.add(item)
            elif item in self._state.subnetworks.values():
                found |= {s for s, n in self._state.subnetworks.items() if n == item}
            else:
                raise self._unknown(
                    "service or subnetwork", item, [*self._services, *self.subnetworks]
                )
        if not found:
            raise ConfigError(f"{names!r} names no service")
        return frozenset(found)

    def _add_rules(self, rules: tuple[DirectedRule, ...], kind: str, label: str) -> Fault:
        self._check_open()
        self._apply(replace(self._state, rules=self._state.rules + rules))
        self.timeline.record(kind, label)
        ids = {r.rule_id for r in rules}

        def undo() -> None:
            if self._closed or not any(r.rule_id in ids for r in self._state.rules):
                return
            kept = tuple(r for r in self._state.rules if r.rule_id not in ids)
            self._apply(replace(self._state, rules=kept))
            self.timeline.record("undo " + kind, label)

        return Fault(f"{kind} {label}", undo)
