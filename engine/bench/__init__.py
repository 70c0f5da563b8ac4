"""``python -m engine bench throughput | latency | serve | prefix | structured``: benchmarks that
measure the engine and the peers a user would pick instead in one run, and save JSON and plots."""
