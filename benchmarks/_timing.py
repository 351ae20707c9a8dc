"""What both benchmark scripts share: timing a callable over runs."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(fn: Callable[[], object], runs: int, warm: bool = True) -> list[float]:
    """Seconds per call of ``fn`` over ``runs`` calls (after one untimed call if ``warm``)."""
    if warm:
        fn()  # imports, caches, the engine's image layers
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples
