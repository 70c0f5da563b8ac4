"""How busy the machine is: the cores other processes use during a timed region, and waiting for a
quiet machine before timing (two shared cores make every figure depend on the neighbours)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_jiffies() -> int | None:
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
    except OSError:
        return None
    vals = [int(v) for v in parts]
    return sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # all but idle and iowait


def _tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (a server we started, its engine thread's workers)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _own_jiffies(roots: list[int]) -> int:
    total = 0
    for root in roots:
        for pid in _tree_pids(root):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                # utime + stime, and cutime + cstime: children that ended and were waited for
                total += sum(int(v) for v in fields[11:15])
            except (OSError, ValueError, IndexError):
                continue
    return total


@dataclass
class OtherLoad:
    """``with OtherLoad() as load: ...`` then ``load.cores``: the average number of cores that
    processes outside ours (this one, its children and ``extra_pids``' trees) kept busy."""
    extra_pids: list[int] = field(default_factory=list)
    cores: float | None = None

    def __enter__(self) -> "OtherLoad":
        self._t0, self._busy0 = time.monotonic(), _busy_jiffies()
        self._own0 = _own_jiffies([os.getpid(), *self.extra_pids])
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _busy_jiffies()
        if busy is None or self._busy0 is None:
            return
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        own = _own_jiffies([os.getpid(), *self.extra_pids])
        # a process of ours that ended inside the region takes its jiffies with it: never below 0
        self.cores = max(0.0, ((busy - self._busy0) - (own - self._own0)) / _TICKS / elapsed)


def wait_for_quiet(max_cores: float = 0.3, timeout_s: float = 120.0, window_s: float = 2.0) -> float | None:
    """Waits until other processes use under ``max_cores`` over a ``window_s`` window, at most
    ``timeout_s``; returns the last measured load (None where /proc is unavailable)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with OtherLoad() as load:
            time.sleep(window_s)
        if load.cores is None or load.cores < max_cores or time.monotonic() > deadline:
            return load.cores
