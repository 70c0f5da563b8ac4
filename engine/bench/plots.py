"""The benchmark plots, drawn with matplotlib's Agg backend (no display) at a fixed size:
``FIG_SIZE_PX`` wide and high, so results from different runs line up side by side."""
from __future__ import annotations

from pathlib import Path

FIG_SIZE_IN = (8.0, 4.5)
DPI = 100
FIG_SIZE_PX = (int(FIG_SIZE_IN[0] * DPI), int(FIG_SIZE_IN[1] * DPI))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def peers_bar(path: Path, values: dict[str, float], ylabel: str, title: str) -> Path:
    """One bar per system measured in this run (the engine first)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIG_SIZE_IN)
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color=["#2f5bea"] + ["#8c95a8"] * (len(names) - 1))
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=15)
    return _save(fig, path)


def throughput_vs_concurrency(path: Path, series: dict[str, list[tuple[int, float]]], ylabel: str,
                              xlabel: str = "concurrent requests") -> Path:
    """One line per system: ``(concurrency, rate)`` points (a serving sweep, or an offline run's
    rate by the number of running requests)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIG_SIZE_IN)
    for name, points in series.items():
        xs, ys = zip(*sorted(points)) if points else ((), ())
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 2, 4 ... rather than 2^0, 2^1
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("Throughput vs concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def latency_cdf(path: Path, panels: dict[str, dict[str, list[float]]]) -> Path:
    """One panel per metric (e.g. TTFT, ITL), one CDF per system or setting, in milliseconds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=FIG_SIZE_IN, squeeze=False)
    for ax, (metric, series) in zip(axes[0], panels.items()):
        for name, values in series.items():
            xs = sorted(1000 * v for v in values)
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(f"{metric} CDF")
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    return _save(fig, path)


def timeline(path: Path, times: list[float], tokens_per_s: list[float], kv_usage: list[float], title: str) -> Path:
    """Generation tokens/s and the fraction of KV-cache blocks in use over the run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIG_SIZE_IN)
    ax.plot(times, tokens_per_s, color="#2f5bea", label="generated tokens/s")
    ax.set_xlabel("seconds")
    ax.set_ylabel("generated tokens/s", color="#2f5bea")
    kv = ax.twinx()
    kv.plot(times, [100 * u for u in kv_usage], color="#c83a3a", label="KV cache in use")
    kv.set_ylabel("KV cache in use (%)", color="#c83a3a")
    kv.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = Path(path).read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
