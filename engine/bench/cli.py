"""``python -m engine bench {throughput,latency,serve,prefix,structured}``."""
from __future__ import annotations

import argparse
from pathlib import Path

from engine.bench import latency, prefix, serve, structured, throughput
from engine.bench.common import peer_names, resolve_lengths
from engine.bench.report import Report

COMMANDS = {
    "throughput": (throughput, "offline throughput: the engine and its peers on one workload"),
    "latency": (latency, "end-to-end latency of one batch, over repeated passes"),
    "serve": (serve, "a server under a workload at each concurrency, and the peers' servers"),
    "prefix": (prefix, "the prefix-repetition workload with the prefix cache on and off"),
    "structured": (structured, "the cost of a JSON-schema constraint per token"),
}


def add_bench_parser(sub: argparse._SubParsersAction, add_engine_args) -> None:
    bench = sub.add_parser("bench", help="benchmarks with plots, against peers measured in the same run")
    cmds = bench.add_subparsers(dest="bench_command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = cmds.add_parser(name, help=help_text, description=module.__doc__)
        add_engine_args(p)
        module.add_args(p)
        p.set_defaults(func=run_bench)


def run_bench(ns: argparse.Namespace) -> int:
    module = COMMANDS[ns.bench_command][0]
    peer_names(ns)  # a bad --peers fails before anything loads
    resolve_lengths(ns)
    skip = {"func", "default_input_len", "default_output_len"}
    args = {k: v for k, v in vars(ns).items() if k not in skip and k != "api_key"}
    report = Report(ns.bench_command, Path(ns.result_dir), args)
    module.run(ns, report)
    out = report.write()
    report.print_table()
    print(f"wrote {out} and {', '.join(report.files)}")
    return 0
