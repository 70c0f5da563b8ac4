"""Decode-attention benchmark: the Triton paged kernel against a torch baseline (gather K/V + SDPA).

On a CUDA machine it sweeps batch x context, times both in the same run, and reports achieved bandwidth
against the bytes decode attention must read (every request's K and V, plus q and the output), next to a
device-copy bandwidth measured in the same run as the practical ceiling:

    python benchmarks/attention_kernels.py                      # Llama-3-8B-like heads: 32 q / 8 kv, dim 128, bf16
    python benchmarks/attention_kernels.py --heads 9 --kv-heads 3 --head-dim 64   # the default SmolLM2-135M shape

Without a GPU it says so and exits 0; ``--interpreter-check`` then runs a tiny configuration through the
same code in Triton's CPU interpreter (correctness only: interpreter timings mean nothing).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--num-splits", type=int, default=None, help="force the context split count (default: heuristic)")
    p.add_argument("--no-baseline", action="store_true", help="skip the torch gather + SDPA baseline")
    p.add_argument("--interpreter-check", action="store_true", help="without a GPU: tiny correctness run")
    return p.parse_args(argv)


def make_inputs(batch: int, context: int, shape: Shape, device: torch.device, seed: int = 0):  # type: ignore[no-untyped-def]
    """A paged cache holding ``batch`` requests of ``context`` tokens in shuffled blocks."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    per_req = math.ceil(context / shape.block_size)
    num_blocks = batch * per_req + 1
    cache_shape = (num_blocks, shape.block_size, shape.kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, dtype=shape.dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=shape.dtype, device=device)
    tables = (torch.randperm(num_blocks - 1, generator=gen)[: batch * per_req] + 1).view(batch, per_req)
    tables = tables.to(device=device, dtype=torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn((batch, shape.heads, shape.head_dim), dtype=shape.dtype, device=device)
    return query, k_cache, v_cache, tables, seq_lens


def bytes_to_read(batch: int, context: int, shape: Shape) -> int:
    """The minimum traffic of decode attention: all K and V of every context, q in, output out."""
    elem = torch.tensor([], dtype=shape.dtype).element_size()
    kv = 2 * batch * context * shape.kv_heads * shape.head_dim * elem
    qo = 2 * batch * shape.heads * shape.head_dim * elem
    return kv + qo


def cuda_timer(fn: Callable[[], object]) -> float:
    """Median milliseconds per call (CUDA-event timed, L2 flushed between calls by do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def wall_timer(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def copy_bandwidth_gbs(device: torch.device, timer: Callable[[Callable[[], object]], float], nbytes: int) -> float:
    """Device memory copy bandwidth (bytes read + written) in this run: the practical ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run(args: argparse.Namespace, device: torch.device, timer: Callable[[Callable[[], object]], float]) -> list[dict]:
    from engine.kernels import torch_ref
    from engine.kernels.decode_attention import default_num_splits, paged_decode_attention

    shape = Shape(args.heads, args.kv_heads, args.head_dim, args.block_size, DTYPES[args.dtype])
    scale = 1.0 / math.sqrt(shape.head_dim)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            try:
                q, kc, vc, bt, sl = make_inputs(batch, context, shape, device)
            except torch.OutOfMemoryError:
                print(f"batch {batch} context {context}: cache does not fit, skipped", flush=True)
                continue
            splits = args.num_splits or default_num_splits(batch, shape.kv_heads, context, device)
            run_triton = lambda: paged_decode_attention(q, kc, vc, bt, sl, scale, context, splits)  # noqa: E731
            out = run_triton()
            row = dict(batch=batch, context=context, splits=splits, bytes=bytes_to_read(batch, context, shape))
            row["triton_ms"] = timer(run_triton)
            row["triton_gbs"] = row["bytes"] / (row["triton_ms"] * 1e-3) / 1e9
            if not args.no_baseline:
                run_torch = lambda: torch_ref.paged_decode_attention(q, kc, vc, bt, sl, scale, context)  # noqa: E731
                try:
                    ref = run_torch()
                    row["max_abs_diff"] = float((out.float() - ref.float()).abs().max())
                    row["torch_ms"] = timer(run_torch)
                    row["torch_gbs"] = row["bytes"] / (row["torch_ms"] * 1e-3) / 1e9
                except torch.OutOfMemoryError:
                    row["torch_ms"] = None
            rows.append(row)
            print(format_row(row), flush=True)
            del q, kc, vc, bt, sl, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


HEADER = (
    f"{'batch':>5} {'context':>7} {'splits':>6} {'MiB read':>9} {'triton ms':>10} {'GB/s':>7} "
    f"{'torch ms':>9} {'GB/s':>7} {'speedup':>7} {'max|diff|':>9}"
)


def format_row(r: dict) -> str:
    torch_ms = r.get("torch_ms")
    tail = (
        f"{torch_ms:9.3f} {r['torch_gbs']:7.1f} {torch_ms / r['triton_ms']:6.2f}x {r['max_abs_diff']:9.2e}"
        if torch_ms
        else f"{'-':>9} {'-':>7} {'-':>7} {'-':>9}"
    )
    return (
        f"{r['batch']:5d} {r['context']:7d} {r['splits']:6d} {r['bytes'] / 2**20:9.1f} "
        f"{r['triton_ms']:10.3f} {r['triton_gbs']:7.1f} {tail}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention_kernels.py needs a CUDA GPU: no GPU is visible, nothing was timed.")
        if not args.interpreter_check:
            print("(--interpreter-check runs a tiny configuration through the same code in Triton's CPU interpreter)")
            return 0
        os.environ["TRITON_INTERPRET"] = "1"  # before any engine kernel module imports triton
        args.batches, args.contexts = [1, 3], [1, 40]
        args.heads, args.kv_heads, args.head_dim, args.dtype = 4, 2, 32, "fp32"
        args.num_splits = args.num_splits or 2  # exercise the split + reduce path too
        print("interpreter check (correctness only; timings are the interpreter's):")
        print(HEADER)
        rows = run(args, torch.device("cpu"), wall_timer)
        worst = max(r["max_abs_diff"] for r in rows)
        print(f"max |triton - torch| = {worst:.2e}")
        return 0 if worst < 1e-4 else 1
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    shape_desc = f"heads {args.heads}/{args.kv_heads} dim {args.head_dim} block {args.block_size} {args.dtype}"
    print(f"{props.name}, {props.multi_processor_count} SMs; {shape_desc}")
    ceiling = copy_bandwidth_gbs(device, cuda_timer, 1 << 30)
    print(f"device copy bandwidth (read + write, 1 GiB): {ceiling:.0f} GB/s")
    print(HEADER)
    run(args, device, cuda_timer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
