"""What every ``bench`` sub-command leaves behind: ``<command>.json`` and its PNG plots in
``--result-dir``, and a table on stdout saying which peer ran with which settings, how it compares
with the first row (the engine), and how many cores other processes used in each timed region."""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.bench.machine import OtherLoad
from engine.bench.peers import PeerResult

# keys every result JSON has (tests/test_bench_cli.py checks them)
RESULT_KEYS = ("command", "args", "machine", "engine", "peers", "regions", "files")


@dataclass
class Region:
    """A timed region that is not a peer's run (ceilings, single-request decode), and the cores other
    processes kept busy during it."""
    name: str
    seconds: float
    other_cores: float | None


@dataclass
class Report:
    command: str
    result_dir: Path
    args: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    peers: list[PeerResult] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # lines printed under the table (ceilings, ratios)

    def path(self, suffix: str) -> Path:
        """Where a plot named ``suffix`` goes; recorded in ``files``."""
        self.result_dir.mkdir(parents=True, exist_ok=True)
        name = f"{self.command}_{suffix}.png"
        self.files.append(name)
        return self.result_dir / name

    def write(self) -> Path:
        self.result_dir.mkdir(parents=True, exist_ok=True)
        out = self.result_dir / f"{self.command}.json"
        body = {"command": self.command, "args": self.args, "machine": self.machine, "engine": self.engine,
                "peers": [{**p.to_dict(), "engine_is": self.ratio(p)} for p in self.peers],
                "regions": [vars(r) for r in self.regions],
                "files": self.files + [out.name], **self.extra}
        out.write_text(json.dumps(_finite(body), indent=2))
        return out

    def ratio(self, p: PeerResult) -> float | None:
        """The first row's (the engine's) output rate over ``p``'s: how many times faster it is."""
        first = self.peers[0] if self.peers else None
        if first is None or p is first or not (first.ran and p.ran and p.tokens_per_s):
            return None
        return first.tokens_per_s / p.tokens_per_s

    @contextmanager
    def timed(self, name: str, pids: list[int] | None = None) -> Iterator[None]:
        """Records the block as a Region: its seconds and other processes' cores."""
        t0 = time.perf_counter()
        with OtherLoad(list(pids or [])) as load:
            yield
        self.regions.append(Region(name, time.perf_counter() - t0, load.cores))

    def print_table(self) -> None:
        print(f"\n{self.command}: {len(self.peers)} systems, results in {self.result_dir}")
        print(f"{'system':<34}{'requests':>9}{'seconds':>9}{'output tok/s':>13}{'engine is':>10}{'other cores':>12}"
              "  settings / reason")
        for p in self.peers:
            other = "n/a" if p.other_cores is None else f"{p.other_cores:.2f}"
            if p.ran:
                r = self.ratio(p)
                ratio = "" if r is None else f"{r:.2f}x"
                print(f"{p.name:<34}{p.requests:>9}{p.seconds:>9.2f}{p.tokens_per_s:>13.1f}{ratio:>10}{other:>12}"
                      f"  {p.settings}")
            else:
                print(f"{p.name:<34}{'':>9}{'':>9}{'skipped':>13}{'':>10}{'':>12}  {p.reason}")
        if self.regions:
            print("other timed regions: " + "; ".join(
                f"{r.name} {r.seconds:.1f} s, other cores {'n/a' if r.other_cores is None else f'{r.other_cores:.2f}'}"
                for r in self.regions))
        for line in self.notes:
            print(line)


def machine_info(other_cores_before: float | None) -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "other_cores_before": other_cores_before}


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: those become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
