"""Where start-up time goes: phases from the start of the process to the first token.

Each phase is marked where it ends (``STARTUP.mark("weights")``); ``python -m engine generate
--log-level debug`` logs the breakdown once the run is done. One timer per process: start-up
happens once, and the marks come from layers (CLI, engine, executor) that do not pass objects
to each other for this.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that is unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class StartupTimer:
    """Phase marks on the monotonic clock; the first phase runs from process start (when known)."""

    origin: float = field(default_factory=time.perf_counter)  # when this module was imported
    age_at_origin: float | None = field(default_factory=process_age_s)
    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.perf_counter()))

    def phases(self) -> list[tuple[str, float]]:
        """(phase, seconds) in order; "interpreter and first imports" covers the time before the
        engine was imported."""
        out = [("interpreter and first imports", self.age_at_origin)] if self.age_at_origin is not None else []
        last = self.origin
        for name, t in self.marks:
            out.append((name, t - last))
            last = t
        return out

    def report(self) -> str:
        phases = self.phases()
        total = sum(s for _, s in phases)
        rows = [f"{name}: {s:.2f} s" for name, s in phases]
        return f"start-up to here {total:.2f} s = " + ", ".join(rows)


STARTUP = StartupTimer()
