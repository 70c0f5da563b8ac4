"""The fp32 C kernels (engine/kernels/cpu) against torch, in one run, on SmolLM2-135M's shapes.

    python benchmarks/cpu_kernels.py            # about a minute
    python benchmarks/cpu_kernels.py --quick

- matmuls: the 120 linear layers of one step (30 x qkv 960x576, o 576x576, gate_up 3072x576, down
  576x1536) and the 49,152 x 576 LM head, for 1..2048 rows: the packed GEMM the engine uses
  (fp32_gemm.c) against the row-major C kernel it replaced and torch's ``F.linear`` with the
  column-major weights the engine gives it when the kernels are off; GB/s of weights streamed at one
  row, GFLOP/s at more;
- decode attention over a paged cache (9 query / 3 KV heads of 64, 30 layers): the C kernel against
  the torch backend (gather each request's blocks, then SDPA), and the KV bytes it reads per second;
  the C kernel over an int8 cache (``kv_cache_dtype="int8"``: 68 bytes per token and head, not 256)
  against the fp32 one;
- prefill attention (one request, 9 / 3 heads of 64, per layer): the C kernel against the gather +
  SDPA path it replaced, fresh prompts of 128..2,048 tokens and a 24-token suffix on a cached
  1,000-token prefix;
- int8 matmuls (``--int8``, or ``--int8-only``): the W8A8 kernel (engine/layers/quantization/int8_cpu.c)
  on the same 120 layers against the packed fp32 GEMM, on AMX tiles where the CPU has them and on
  AVX512-VNNI / AVX2 vectors (the same bits), 1..512 rows;
- read bandwidth and the fp32 2048^3 matmul rate measured in the same run, as the ceilings.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ceilings import best_time, measure  # noqa: E402

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def bench_matmuls(kernels, rows: list[int], repeats: int) -> None:
    torch.manual_seed(0)
    layers = [torch.randn(n, k) for _ in range(30) for n, k in LAYER_SHAPES]
    layers_cm = [w.t().contiguous().t() for w in layers]
    packed = [kernels.pack(w) for w in layers]
    head = torch.randn(49152, 576)
    head_cm, head_packed = head.t().contiguous().t(), kernels.pack(head)
    layer_bytes = sum(w.numel() * 4 for w in layers)
    print(f"\n{'rows':>5s} | {'120 layers: torch':>18s} {'row-major C':>12s} {'packed':>9s} {'vs torch':>8s} {'vs C':>6s}"
          f" | {'LM head: torch':>15s} {'packed':>9s} {'vs torch':>8s} | packed at this size")
    for m in rows:
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        r = 1 if m >= 512 else repeats
        t_torch = best_time(lambda: [F.linear(xs[w.shape[1]], w) for w in layers_cm], r)
        t_c = best_time(lambda: [kernels.linear(xs[w.shape[1]], w) for w in layers], r)
        t_p = best_time(lambda: [kernels.gemm_packed(xs[w.shape[1]], p, w.shape[0]) for w, p in zip(layers, packed)], r)
        h_torch = best_time(lambda: F.linear(xs[576], head_cm), r)
        h_p = best_time(lambda: kernels.gemm_packed(xs[576], head_packed, 49152), r)
        flops = 2 * m * layer_bytes / 4
        rate = f"{layer_bytes / t_p / 1e9:5.1f} GB/s of weights" if m == 1 else f"{flops / t_p / 1e9:5.0f} GFLOP/s"
        print(f"{m:5d} | {t_torch * 1e3:15.2f} ms {t_c * 1e3:9.2f} ms {t_p * 1e3:6.2f} ms {t_torch / t_p:7.2f}x "
              f"{t_c / t_p:5.2f}x | {h_torch * 1e3:12.2f} ms {h_p * 1e3:6.2f} ms {h_torch / h_p:7.2f}x | {rate}")


def bench_attention(kernels, configs: list[tuple[int, int]], repeats: int) -> None:
    from engine.attention.backends.torch_backend import TorchAttentionBackend
    from engine.attention.kv_format import Int8KVFormat
    from engine.attention.metadata import AttentionMetadata

    bs, h, kvh, d, layers = 16, 9, 3, 64, 30
    int8 = Int8KVFormat(torch.float32)
    print(f"\n{'batch':>5s} {'context':>8s} | {'torch backend':>14s} {'C kernel':>9s} {'C x':>6s} | C reads KV at"
          f" | {'int8 KV: C':>10s} {'vs fp32':>7s}")
    for b, ctx in configs:
        rng = random.Random(b * ctx)
        lens = [rng.randint(max(1, ctx // 2), ctx) for _ in range(b)]
        nblocks = [-(-n // bs) for n in lens]
        total = sum(nblocks) + 1
        perm = torch.randperm(total).tolist()
        tables = torch.zeros(b, max(nblocks), dtype=torch.int32)
        i = 0
        for r, nb in enumerate(nblocks):
            tables[r, :nb] = torch.tensor(perm[i : i + nb], dtype=torch.int32)
            i += nb
        k_cache, v_cache = torch.randn(total, bs, kvh, d), torch.randn(total, bs, kvh, d)
        q = torch.randn(b, h, d)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.full((b,), -1, dtype=torch.int64), query_start_loc=torch.arange(b + 1, dtype=torch.int32),
            seq_lens=seq_lens, block_tables=tables, num_decodes=b, max_query_len=1, max_seq_len=max(lens),
            max_decode_seq_len=max(lens), block_size=bs, query_start_loc_host=list(range(b + 1)), seq_lens_host=lens,
        )
        torch_backend = TorchAttentionBackend()
        kv = torch.empty(b, kvh, d)
        out = torch.empty(b, h, d)
        t_torch = best_time(lambda: [torch_backend.forward(q, kv, kv, k_cache, v_cache, meta, d**-0.5)
                                   for _ in range(layers)], repeats)
        t_c = best_time(lambda: [kernels.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, d**-0.5, out)
                               for _ in range(layers)], repeats)
        k8, v8 = int8.store(k_cache.flatten(0, 1)).view(total, bs, kvh, -1), int8.store(v_cache.flatten(0, 1)).view(
            total, bs, kvh, -1)
        t_8 = best_time(lambda: [kernels.paged_decode_attention_int8(q, k8, v8, tables, seq_lens, d**-0.5, out)
                                 for _ in range(layers)], repeats)
        kv_bytes = layers * sum(lens) * kvh * d * 4 * 2
        print(f"{b:5d} {ctx:8d} | {t_torch * 1e3:11.2f} ms {t_c * 1e3:6.2f} ms {t_torch / t_c:5.2f}x | "
              f"{kv_bytes / t_c / 1e9:5.1f} GB/s     | {t_8 * 1e3:7.2f} ms {t_c / t_8:6.2f}x")


def bench_prefill(kernels, cases: list[tuple[int, int]], repeats: int) -> None:
    from engine.kernels import torch_ref

    bs, h, kvh, d = 16, 9, 3, 64
    print(f"\n{'context':>8s} {'queries':>8s} | {'gather + SDPA':>14s} {'C kernel':>9s} {'C x':>6s}   (one layer)")
    gen = torch.Generator().manual_seed(0)
    for ctx, qlen in cases:
        nb = -(-ctx // bs) + 1
        k_cache, v_cache = torch.randn(nb, bs, kvh, d, generator=gen), torch.randn(nb, bs, kvh, d, generator=gen)
        tables = torch.arange(1, nb, dtype=torch.int32)[None]
        q = torch.randn(qlen, h, d, generator=gen)
        fresh = qlen == ctx
        key, value = (torch.randn(qlen, kvh, d) if fresh else None for _ in range(2))
        out = torch.empty(qlen, h, d)
        lens, starts = torch.tensor([ctx], dtype=torch.int32), torch.tensor([0, qlen], dtype=torch.int32)
        t_sdpa = best_time(lambda: torch_ref.paged_prefill_attention(q, k_cache, v_cache, tables, [0, qlen], [ctx],
                                                                     d**-0.5, key=key, value=value), repeats)
        t_c = best_time(lambda: kernels.paged_prefill_attention(q, k_cache, v_cache, tables, lens, starts, d**-0.5, out),
                        repeats)
        print(f"{ctx:8d} {qlen:8d} | {t_sdpa * 1e3:11.2f} ms {t_c * 1e3:6.2f} ms {t_sdpa / t_c:5.2f}x")


def bench_int8_matmuls(kernels, rows: list[int], repeats: int) -> None:
    from engine.layers.quantization import cpu_kernels, quantize_rows

    q8 = cpu_kernels.load()
    if q8 is None:
        print("\nthe int8 C kernels could not be built here: no int8 table")
        return
    torch.manual_seed(0)
    layers = [torch.randn(n, k) for _ in range(30) for n, k in LAYER_SHAPES]
    packed = [kernels.pack(w) for w in layers]
    packed8 = [q8.pack(*quantize_rows(w), None, 64) for w in layers]
    amx = q8.uses_amx
    print(f"\nint8 W8A8 ({q8.isa} build{', AMX tiles from ' + str(q8.amx_min_rows) + ' rows' if amx else ''}), "
          f"120 layers, against the packed fp32 GEMM (same run)")
    print(f"{'rows':>5s} | {'fp32 packed':>11s} | {'int8 ' + q8.isa:>18s} {'vs fp32':>7s}" + (
          f" | {'int8 AMX':>9s} {'vs fp32':>7s} {'vs ' + q8.isa:>15s}" if amx else "") + " | int8 best")
    try:
        for m in rows:
            xs = {k: torch.randn(m, k) for k in (576, 1536)}
            r = 1 if m >= 512 else repeats
            t_f = best_time(lambda: [kernels.gemm_packed(xs[w.shape[1]], p, w.shape[0]) for w, p in zip(layers, packed)], r)
            q8.set_amx(False)
            t_v = best_time(lambda: [q8.w8a8(xs[w.shape[1]], p) for w, p in zip(layers, packed8)], r)
            line = f"{m:5d} | {t_f * 1e3:8.2f} ms | {t_v * 1e3:15.2f} ms {t_f / t_v:6.2f}x"
            best = t_v
            if amx:
                q8.set_amx(True)
                t_a = best_time(lambda: [q8.w8a8(xs[w.shape[1]], p) for w, p in zip(layers, packed8)], r)
                best = min(best, t_a)
                line += f" | {t_a * 1e3:6.2f} ms {t_f / t_a:6.2f}x {t_v / t_a:14.2f}x"
            ops = 2 * m * sum(w.numel() for w in layers)
            print(line + f" | {ops / best / 1e9:5.0f} GOP/s")
    finally:
        q8.set_amx(True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--attention-only", action="store_true", help="only the decode attention table")
    p.add_argument("--int8", action="store_true", help="add the int8 W8A8 matmul table")
    p.add_argument("--int8-only", action="store_true", help="only the int8 W8A8 matmul table")
    args = p.parse_args()
    from engine.kernels.cpu.ops import load
    from engine.worker.cpu_runtime import configure_cpu_runtime

    configure_cpu_runtime()
    kernels = load()
    if kernels is None:
        print("the fp32 C kernels could not be built here (no gcc?): nothing to compare")
        return
    c = measure(quick=True)
    print(f"{kernels.isa} build (GEMM tiles: {kernels.gemm_isa}), {torch.get_num_threads()} threads; ceilings in this run: read {c.read_gbps:.1f} GB/s, "
          f"fp32 matmul {c.fp32_gflops:.0f} GFLOP/s")
    repeats = 2 if args.quick else 5
    prefill_cases = [(128, 128), (256, 256), (512, 512), (1024, 1024), (1024, 24), (2048, 2048)]
    if args.attention_only:
        bench_attention(kernels, [(1, 2048), (16, 512), (64, 256), (64, 512), (64, 2048)], repeats)
        bench_prefill(kernels, prefill_cases, repeats)
        return
    int8_rows = [1, 16, 64] if args.quick else [1, 8, 16, 32, 64, 128, 256, 512]
    if args.int8_only:
        bench_int8_matmuls(kernels, int8_rows, repeats)
        return
    bench_matmuls(kernels, [1, 4, 16, 64] if args.quick else [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512, 2048], repeats)
    bench_attention(kernels, [(1, 512), (64, 256)] if args.quick else [(1, 128), (1, 2048), (16, 512), (64, 256),
                                                                       (64, 512), (64, 2048)], repeats)
    bench_prefill(kernels, prefill_cases[:3] if args.quick else prefill_cases, repeats)
    if args.int8:
        bench_int8_matmuls(kernels, int8_rows, repeats)


if __name__ == "__main__":
    main()
