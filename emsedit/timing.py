"""Named phase timers, recorded in every result (the paper's training-time breakdown, spec §10.7)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class PhaseTimer:
    """Accumulates wall seconds per named phase; nested phases are allowed and counted separately."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body of a ``with`` block under ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        """Add seconds measured elsewhere (e.g. restored from a checkpoint)."""
        self.seconds[name] += seconds

    def as_dict(self) -> dict[str, float]:
        """All phases plus ``total`` (wall seconds since the timer was created)."""
        out = {k: round(v, 6) for k, v in sorted(self.seconds.items())}
        out["total"] = round(time.perf_counter() - self._start + self.seconds.get("_restored", 0.0), 6)
        out.pop("_restored", None)
        return out
