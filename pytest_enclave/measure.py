"""Measure real loss between services that run :mod:`pytest_enclave.probe`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .probe import ProbeClient

if TYPE_CHECKING:
    from .enclave import Enclave

__all__ = ["loss_matrix", "render_loss_matrix"]


def loss_matrix(
    enclave: Enclave, names: Sequence[str], count: int = 2000, settle: float = 0.3
) -> dict[tuple[str, str], float]:
    """Send ``count`` datagrams along every directed pair; return the fraction lost (0..1).

    Every source sends to its destinations one after another, all sources at once; each
    destination counts per source address, so the directions are measured separately.
    """
    ips = {n: enclave.get_service(n).ip for n in names}
    clients: dict[str, ProbeClient] = {}
    errors: list[BaseException] = []
    try:
        for n in names:
            clients[n] = ProbeClient(ips[n])
            clients[n].call("reset")

        def send(src: str) -> None:
            try:
                with ProbeClient(ips[src]) as own:  # one connection per thread
                    for dst in names:
                        if dst != src:
                            answer = own.call("blast", to=ips[dst], count=count)
                            if answer != {"sent": count}:
                                raise RuntimeError(f"probe in {src!r} answered {answer!r}")
            except BaseException as exc:  # a probe that failed must not read as 100 % loss
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        time.sleep(settle)  # the last datagrams are still in flight
        result = {}
        for dst in names:
            got = clients[dst].counts()
            for src in names:
                if src != dst:
                    result[(src, dst)] = 1.0 - got.get(ips[src], 0) / count
        return result
    finally:
        for client in clients.values():
            client.close()


def render_loss_matrix(loss: dict[tuple[str, str], float], names: Iterable[str]) -> str:
    """A table: rows are sources, columns destinations, cells the measured loss in %."""
    names = list(names)
    width = max(len(n) for n in names) + 2
    head = "from \\ to".ljust(width) + "".join(n.rjust(width) for n in names)
    rows = [head]
    for src in names:
        cells = "".join(
            "-".rjust(width) if src == dst else f"{loss[(src, dst)] * 100:.1f}%".rjust(width)
            for dst in names
        )
        rows.append(src.ljust(width) + cells)
    return "\n".join(rows)
