"""Command line: ``python -m engine generate ...``, ``python -m engine serve ...`` and
``python -m engine bench ...`` (engine/bench/)."""
from __future__ import annotations

import argparse
import logging
import sys

from engine.attention.backends.selector import BACKENDS
from engine.attention.kv_format import KV_CACHE_DTYPES
from engine.config import EngineArgs, PreemptionMode
from engine.errors import EngineError
from engine.layers.quantization import quantization_methods
from engine.scheduler.policy import policy_names


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags with vLLM's names (``--max-model-len``, ``--block-size``, ...)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="local HF model directory or .gguf (default: embedded SmolLM2)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="debug: also where start-up time went (generate)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--swap-space", type=float, default=0, help="GiB of host memory for swapped-out KV blocks")
    g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="int8: K/V stored as int8 with a scale per token and head, ~3.8x the tokens of an fp32 "
                   "cache (docs/performance.md gives its accuracy cost)")
    g.add_argument("--preemption-mode", choices=[m.value for m in PreemptionMode], default=PreemptionMode.RECOMPUTE.value)
    g.add_argument("--scheduling-policy", choices=policy_names(), default="fcfs")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--attention-backend", default="auto", choices=list(BACKENDS))
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the layers into this many stages, one Ray actor each (docs/ray.md)")
    g.add_argument("--pipeline-micro-batches", type=int, default=0,
                   help="a pipeline step's requests in this many groups in flight, so stages overlap (0: one per stage)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine replicas on Ray behind this one server, routed by load and prefix (docs/ray.md)")
    g.add_argument("--distributed-executor-backend", default=None, choices=["ray", "uni"])
    g.add_argument("--quantization", default=None, choices=quantization_methods())
    g.add_argument("--device", default=None)
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters per request (docs/lora.md)")
    g.add_argument("--max-loras", type=int, default=1, help="adapters resident at once (slots; adapters per step)")
    g.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank accepted")
    g.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept as host copies (default: --max-loras)")
    g.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs (they are GPU-only anyway)")
    g.add_argument(
        "--speculative-config", type=_json_dict, default=None,
        help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
        'or \'{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}\'',
    )
    g.add_argument(
        "--structured-outputs-config", type=_json_dict, default=None,
        help='structured outputs as JSON, e.g. \'{"backend": "xgrammar", "compile_timeout_s": 10}\' (docs/structured_outputs.md)',
    )
    # pooling (docs/embeddings.md): any model can also embed; --runner pooling serves embeddings only
    g.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling"])
    g.add_argument("--task", default=None, choices=["auto", "generate", "embed"], help="embed: same as --runner pooling")
    g.add_argument("--pooler-config", type=_json_dict, default=None,
                   help='pooling when the model has no sentence-transformers config, e.g. \'{"pooling_type": "MEAN", '
                   '"normalize": true}\'')
    g.add_argument("--override-pooler-config", type=_json_dict, default=None,
                   help="JSON fields that replace those of the model's pooler config")


def _json_dict(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    names = EngineArgs.field_names()
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in names})


def cmd_generate(ns: argparse.Namespace) -> int:
    from engine.core.startup import STARTUP
    from engine.entrypoints.llm import LLM
    from engine.sampling_params import SamplingParams

    STARTUP.mark("imports")

    args = engine_args_from(ns)
    kwargs = {k: v for k, v in vars(args).items() if k != "model"}
    llm = LLM(args.model, **kwargs)
    params = SamplingParams(
        temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, max_tokens=ns.max_tokens, seed=ns.sample_seed,
        n=ns.n, min_p=ns.min_p, repetition_penalty=ns.repetition_penalty, presence_penalty=ns.presence_penalty,
        frequency_penalty=ns.frequency_penalty, stop=ns.stop, min_tokens=ns.min_tokens,
    )
    prompts = ns.prompt or ["Write a haiku about paged attention."]
    try:
        if ns.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outs = llm.generate(prompts, params)
        STARTUP.mark(f"generation ({sum(len(c.token_ids) for o in outs for c in o.outputs)} tokens)")
    finally:
        llm.shutdown()  # before engine/__main__.py's fast exit, which runs no atexit handler
    logging.getLogger("engine.startup").debug(STARTUP.report())
    for p, out in zip(prompts, outs):
        print(f"--- prompt: {p!r}")
        for c in out.outputs:
            if len(out.outputs) > 1:
                print(f"[sample {c.index}]")
            print(c.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description="paged-engine: LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline")
    gen.add_argument("prompt", nargs="*", help="prompt(s); several run as one batch")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", default=None, help="model (same as --model)")
    add_engine_args(serve)
    try:
        from engine.entrypoints.openai.cli_args import add_server_args

        add_server_args(serve)
    except ImportError:
        pass

    def run_serve(ns: argparse.Namespace) -> int:
        from engine.entrypoints.openai.server import run_server

        if ns.model_tag and not ns.model:
            ns.model = ns.model_tag
        return run_server(ns, engine_args_from(ns))

    serve.set_defaults(func=run_serve)

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["bench"]:  # its sub-commands import plotting and HTTP clients: only when asked for
        from engine.bench.cli import add_bench_parser

        add_bench_parser(sub, add_engine_args)
    else:
        sub.add_parser("bench", help="benchmarks with plots, against peers measured in the same run "
                                     "(python -m engine bench -h)")

    ns = parser.parse_args(argv)
    level = getattr(logging, getattr(ns, "log_level", "info").upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError, EngineError) as e:  # EngineError: e.g. Ray workers could not start
        print(f"error: {e}", file=sys.stderr)
        return 2
