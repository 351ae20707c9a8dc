"""Timeline events and the handles that undo a fault (as context managers too)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["Event", "Fault", "Timeline"]


@dataclass(frozen=True)
class Event:
    """One change to the enclave: ``at`` is ``time.monotonic()`` seconds."""

    at: float
    kind: str
    detail: str

    def line(self, origin: float) -> str:
        return f"+{self.at - origin:8.3f}s  {self.kind:<16} {self.detail}"


@dataclass
class Timeline:
    """Every change, in order, with monotonic timestamps (``origin`` is the enclave's start)."""

    origin: float = field(default_factory=time.monotonic)
    events: list[Event] = field(default_factory=list)

    def record(self, kind: str, detail: str) -> Event:
        event = Event(time.monotonic(), kind, detail)
        self.events.append(event)
        return event

    def __iter__(self):  # type: ignore[no-untyped-def]  # Iterator[Event]
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def __getitem__(self, index: int) -> Event:
        return self.events[index]

    def render(self, since: int = 0) -> str:
        """The events from index ``since`` on, one line each, times relative to ``origin``."""
        return "\n".join(e.line(self.origin) for e in self.events[since:]) or "(no events)"


class Fault:
    """A change that can be undone: call ``undo()``, or use it as a context manager.

    Undoing twice, or after ``heal()`` already removed the change, does nothing.
    """

    def __init__(self, description: str, undo: Callable[[], None]) -> None:
        self.description = description
        self._undo: Callable[[], None] | None = undo

    def undo(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()

    @property
    def active(self) -> bool:
        return self._undo is not None

    def __enter__(self) -> Fault:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"<Fault {self.description}{'' if self.active else ' (undone)'}>"
