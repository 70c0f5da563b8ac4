"""Runs one benchmark against two checkouts of the engine, alternating, and prints their figures
side by side: the way to show that a change does not slow the engine down (the machine is shared
and noisy, so both sides are measured in the same run, round after round).

    git worktree add ../prev HEAD~1
    python benchmarks/ab_compare.py --base ../prev --rounds 2 -- benchmarks/throughput.py --baselines none
    python benchmarks/ab_compare.py --base ../prev -- benchmarks/spec_decode.py --repeats 1 --threads 1

Each run gets ``--json FILE`` appended and its checkout first on PYTHONPATH (so ``import engine``
takes that checkout's code); every numeric field of the JSON is reported as the median over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def flatten(obj, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON object, keyed by their dotted path."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix[:-1]] = float(obj)
    return out


def run_once(checkout: Path, script: str, args: list[str], timeout_s: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, PYTHONPATH=f"{checkout}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        cmd = [sys.executable, str(checkout / script), *args, "--json", str(out)]
        print(f"[{checkout.name}] {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=checkout, env=env, check=True, timeout=timeout_s)
        return flatten(json.loads(out.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the other checkout (e.g. a git worktree of the previous commit)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=3600, help="per benchmark run")
    ap.add_argument("--keys", default="", help="comma-separated substrings: report only matching fields")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...], relative to a checkout")
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("give the benchmark after --, e.g. -- benchmarks/throughput.py --baselines none")
    sides = {"base": Path(a.base).resolve(), "this": HERE}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for r in range(a.rounds):
        order = list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))  # alternate who goes first
        for name, checkout in order:
            results[name].append(run_once(checkout, cmd[0], cmd[1:], a.timeout_s))
    wanted = [k for k in a.keys.split(",") if k]
    keys = sorted(set(results["base"][0]) & set(results["this"][0]))
    keys = [k for k in keys if not k.startswith("args.") and (not wanted or any(w in k for w in wanted))]
    print(f"\n{'field':60s} {'base':>12s} {'this':>12s} {'this/base':>10s}   (median of {a.rounds} round(s))")
    for k in keys:
        b = statistics.median(r[k] for r in results["base"])
        t = statistics.median(r[k] for r in results["this"])
        ratio = f"{t / b:10.3f}" if b else f"{'-':>10s}"
        print(f"{k:60s} {b:12.4g} {t:12.4g} {ratio}")


if __name__ == "__main__":
    main()
