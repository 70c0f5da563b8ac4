"""What this machine can do at best, and what that means for one model (engine/bench/ceilings.py).

    python benchmarks/ceilings.py                 # the embedded SmolLM2
    python benchmarks/ceilings.py --model PATH    # any local model directory

``python -m engine bench throughput`` measures the same ceilings before and after the engine in
one run and reports its figures as fractions of them. Importers (cpu_kernels.py,
gguf_quantized.py, moe_decode.py) get the measuring functions from here.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

from engine.bench.ceilings import (  # noqa: F401  (re-exported for the other benchmarks)
    SIZES, Ceilings, ModelCosts, best_time, measure, measure_bandwidth, measure_matmul, model_costs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    p.add_argument("--quick", action="store_true", help="smaller buffers and matrices")
    p.add_argument("--size", default=None, choices=list(SIZES), help="measurement size (overrides --quick)")
    p.add_argument("--wait-quiet-s", type=float, default=60.0, help="wait up to this long for a quiet machine")
    args = p.parse_args(argv)
    from engine.config import load_hf_config
    from engine.models.default_model import resolve_model_path

    hf_config = load_hf_config(resolve_model_path(args.model))
    c = measure(args.quick, args.wait_quiet_s, args.size)
    print(f"threads {c.threads}")
    print(f"memory read   {c.read_gbps:7.1f} GB/s    copy {c.copy_gbps:.1f} GB/s (read + written)")
    print(f"matmul fp32   {c.fp32_gflops:7.1f} GFLOP/s    FMA peak {c.fp32_peak_gflops:.1f} GFLOP/s (registers only)")
    print(f"matmul bf16   {c.bf16_gflops:7.1f} GFLOP/s")
    print(f"matmul int8   {c.int8_gops:7.1f} GOP/s")
    for name, bpp in (("fp32", 4.0), ("int8", 1.0)):
        m = model_costs(hf_config, bpp)
        floor = m.decode_floor_s(c)
        print(f"{name} weights {m.weight_bytes / 1e6:7.1f} MB: decode step floor {floor * 1e3:.1f} ms "
              f"(<= {1 / floor:.0f} tokens/s for one request)")
    m = model_costs(hf_config)
    print(f"{m.flops_per_token / 1e6:.0f} MFLOP per token: fp32 compute ceiling {m.compute_ceiling_tps(c):.0f} tokens/s "
          f"(context 0), {m.compute_ceiling_tps(c, 512):.0f} tokens/s (context 512)")
    print(asdict(c))


if __name__ == "__main__":
    main()
