"""What every ``bench`` sub-command leaves behind: ``<command>.json`` and its PNG plots in
``--result-dir``, and a table on stdout saying which peer ran with which settings."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.bench.peers import PeerResult

# keys every result JSON has (tests/test_bench_cli.py checks them)
RESULT_KEYS = ("command", "args", "machine", "engine", "peers", "files")


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
                "peers": [p.to_dict() for p in self.peers], "files": self.files + [out.name], **self.extra}
        out.write_text(json.dumps(_finite(body), indent=2))
        return out

    def print_table(self) -> None:
        print(f"\n{self.command}: {len(self.peers)} systems, results in {self.result_dir}")
        print(f"{'system':<34}{'output tok/s':>13}{'other cores':>12}  settings / reason")
        for p in self.peers:
            other = "n/a" if p.other_cores is None else f"{p.other_cores:.2f}"
            if p.ran:
                print(f"{p.name:<34}{p.tokens_per_s:>13.1f}{other:>12}  {p.settings}")
            else:
                print(f"{p.name:<34}{'skipped':>13}{'':>12}  {p.reason}")


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
