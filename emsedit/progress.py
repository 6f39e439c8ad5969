"""Progress of the long loops (meta-training turns, editing turns, evaluation batches).

On a terminal: a tqdm bar. Otherwise (a Snakemake job's log file, a SLURM job): a ``logging`` line
when the loop starts, at most every ``INTERVAL_S`` seconds while it runs, and when it ends, e.g.
``meta-train malmen: 3/10 turns (30 %), 12.4 s, ~29 s left``. The CLI configures logging so these
lines reach stderr, which the workflow redirects into the job's log.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("emsedit.progress")
INTERVAL_S = 30.0  # the least time between two log lines of one loop


class Progress:
    """Count the units of one loop; report on a terminal bar or in log lines (see the module)."""

    def __init__(self, desc: str, total: int, *, unit: str = "turns", initial: int = 0,
                 enabled: bool = True) -> None:
        self.desc, self.total, self.unit, self.done, self.initial = desc, total, unit, initial, initial
        self.enabled = enabled and total > 0
        self._bar = None
        self._start = self._last = time.monotonic()
        if not self.enabled:
            return
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, file=sys.stderr)
        else:
            resumed = f", resuming after {initial}" if initial else ""
            log.info("%s: %d %s%s", desc, total, unit, resumed)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= INTERVAL_S and self.done < self.total:
            self._last = now
            log.info("%s", self._line(now))

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            log.info("%s", self._line(time.monotonic()))
        self.enabled = False

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        line = f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f} %), {elapsed:.1f} s"
        if self.initial < self.done < self.total:  # the rate of this process's units (not a resume's)
            line += f", ~{elapsed / (self.done - self.initial) * (self.total - self.done):.0f} s left"
        return line

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
