"""Every Triton kernel compiles for Hopper (sm_90) without a GPU: triton.compile runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for an explicit target. This catches what the CPU interpreter
cannot: tl.dot shapes below 16, type errors in the lowering, kernels that need more shared memory than an
H100 SM has. ptxas' resource report (``ptxas -v``, shipped with triton) also checks that the launch
configurations the wrappers use do not spill registers to local memory.

The compiles run in one subprocess without TRITON_INTERPRET: in this pytest process conftest.py turned the
interpreter on before triton was imported, which makes triton's own library functions (tl.sum, tl.max, ...)
interpreter objects the code generator cannot compile.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

H100_MAX_SHARED = 227 * 1024  # bytes of shared memory one block may use on sm_90
FLOAT_ARGS = {"qk_scale", "eps", "softcap"}
ROOT = Path(__file__).resolve().parents[2]


def _p(dtype: str) -> str:
    return "*" + dtype


Case = tuple[str, str, dict[str, str], dict[str, object], dict[str, int]]


def _cases() -> dict[str, Case]:
    """case id -> (module, kernel, pointer argument types, constexpr values, compile options)."""
    from engine.kernels import decode_attention, prefill_attention, rmsnorm

    cases: dict[str, Case] = {}
    for dt in ("fp32", "bf16", "fp16"):
        p = _p(dt)
        cases[f"kv_write-{dt}"] = (
            "kv_write", "_kv_write_kernel",
            dict(key_ptr=p, value_ptr=p, k_cache_ptr=p, v_cache_ptr=p, slot_ptr="*i64"),
            dict(BLOCK_SIZE=16, BLOCK_H=4, BLOCK_D=128), {},
        )
        cases[f"rotary-{dt}"] = (
            "rotary", "_rotary_kernel",
            dict(pos_ptr="*i64", q_ptr=p, k_ptr=p, cos_sin_ptr="*fp32"),
            dict(BLOCK_H=16, BLOCK_KH=4, BLOCK_HALF=64), {},
        )
        cases[f"rms_norm-{dt}"] = (
            "rmsnorm", "_rms_norm_kernel",
            dict(x_ptr=p, residual_ptr=p, weight_ptr=p, out_ptr=p, residual_out_ptr=p),
            dict(HAS_RESIDUAL=dt != "fp32", BLOCK=1024), dict(num_warps=rmsnorm.num_warps_for(1024)),
        )
    cases["rms_norm-bf16-8192"] = (
        "rmsnorm", "_rms_norm_kernel",
        dict(x_ptr="*bf16", residual_ptr="*bf16", weight_ptr="*bf16", out_ptr="*bf16", residual_out_ptr="*bf16"),
        dict(HAS_RESIDUAL=True, BLOCK=8192), dict(num_warps=rmsnorm.num_warps_for(8192)),
    )
    for dt, d, group, splits in (("bf16", 128, 4, 1), ("fp16", 64, 3, 8), ("fp32", 128, 1, 4), ("fp32", 64, 4, 1)):
        p = _p(dt)
        part = "*fp32" if splits > 1 else p
        block_n, num_warps = decode_attention.launch_config(d)
        cases[f"decode-{dt}-d{d}-g{group}-s{splits}"] = (
            "decode_attention", "_decode_kernel",
            dict(q_ptr=p, k_cache_ptr=p, v_cache_ptr=p, block_tables_ptr="*i32", seq_lens_ptr="*i32",
                 out_ptr=p, part_out_ptr=part, part_lse_ptr=part),
            dict(GROUP=group, BLOCK_G=16, BLOCK_D=d, BLOCK_SIZE=16, BLOCK_N=block_n, NUM_SPLITS=splits,
                 PRECISION="ieee" if dt == "fp32" else "tf32", SOFTCAP=dt == "bf16"),
            dict(num_warps=num_warps),
        )
    cases["decode_reduce-bf16"] = (
        "decode_attention", "_decode_reduce_kernel",
        dict(part_out_ptr="*fp32", part_lse_ptr="*fp32", out_ptr="*bf16"),
        dict(NUM_SPLITS=5, BLOCK_S=8, BLOCK_D=128), {},
    )
    for dt, d in (("bf16", 128), ("fp16", 64), ("fp32", 64), ("fp32", 128)):
        p = _p(dt)
        block_m, block_n, num_warps = prefill_attention.launch_config(d, fp32=dt == "fp32")
        cases[f"prefill-{dt}-d{d}"] = (
            "prefill_attention", "_prefill_kernel",
            dict(q_ptr=p, k_cache_ptr=p, v_cache_ptr=p, block_tables_ptr="*i32", query_start_ptr="*i32",
                 seq_lens_ptr="*i32", out_ptr=p),
            dict(GROUP=3, BLOCK_D=d, BLOCK_SIZE=32, BLOCK_M=block_m, BLOCK_N=block_n,
                 PRECISION="ieee" if dt == "fp32" else "tf32", SOFTCAP=dt == "bf16"),
            dict(num_warps=num_warps),
        )
    from engine.kernels import gguf_matmul
    from engine.layers.quantization.gguf_blocks import BLOCK_BYTES

    from engine.layers.quantization.gguf_blocks import KERNEL_TYPES

    for type_id, name in ((t, n.lower()) for t, n in KERNEL_TYPES.items()):
        for dt, m in (("bf16", 1), ("fp32", 300)):
            block_m, block_n, block_k, num_warps = gguf_matmul.launch_config(m, type_id)
            cases[f"gguf_matmul-{name}-{dt}-m{m}"] = (
                "gguf_matmul", "_gguf_matmul_kernel",
                dict(x_ptr=_p(dt), w_ptr="*u8", out_ptr=_p(dt)),
                dict(QTYPE=type_id, BLOCK_BYTES=BLOCK_BYTES[type_id], BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_K=block_k),
                dict(num_warps=num_warps),
            )
    from engine.kernels import moe_matmul

    for dt in ("bf16", "fp32"):
        block_m, block_n, block_k, num_warps = moe_matmul.launch_config(dt == "fp32")
        cases[f"moe_matmul-{dt}"] = (
            "moe_matmul", "_moe_matmul_kernel",
            dict(x_ptr=_p(dt), w_ptr=_p(dt), out_ptr=_p(dt), row_index_ptr="*i32", tile_expert_ptr="*i32",
                 tile_start_ptr="*i32", tile_rows_ptr="*i32"),
            dict(PRECISION="ieee" if dt == "fp32" else "tf32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k),
            dict(num_warps=num_warps),
        )
    return cases


CASES = _cases()


def signature(arg_names: list[str], pointers: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Triton 3.6's ASTSource signature names every argument: {"x_ptr": "*bf16", "n": "i32", "BLOCK":
    "constexpr"}; the constexpr values go in a separate dict, also keyed by name."""
    sig = {}
    for name in arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name.endswith("_ptr"):
            raise AssertionError(f"pointer argument {name} has no type in the test")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from ``ptxas -v`` on the kernel's PTX."""
    import re
    import tempfile

    from triton import knobs

    target = re.search(r"^\.target (\S+)", ptx, re.M).group(1)  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [knobs.nvidia.ptxas.path, "-v", f"--gpu-name={target}", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    regs = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))  # type: ignore[union-attr]
    spills = int(re.search(r"(\d+) bytes spill stores", proc.stderr).group(1))  # type: ignore[union-attr]
    return regs, spills


def compile_all() -> None:
    """Subprocess entry point: compiles every case for sm_90 and prints one JSON object of results."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    results = {}
    for case_id, (module, kernel, pointers, constexprs, options) in CASES.items():
        fn = getattr(importlib.import_module(f"engine.kernels.{module}"), kernel)
        try:
            src = triton.compiler.ASTSource(
                fn=fn, signature=signature(fn.arg_names, pointers, constexprs), constexprs=constexprs
            )
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            ptx = compiled.asm["ptx"]
            regs, spills = ptxas_report(ptx)
            results[case_id] = dict(
                ok=True, cubin_bytes=len(compiled.asm["cubin"]), sm90=".target sm_90" in ptx,
                shared=compiled.metadata.shared, mma="mma." in ptx, regs=regs, spills=spills,
            )
        except Exception as e:  # reported per case by the tests
            results[case_id] = dict(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    print(json.dumps(results))


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", "from tests.kernels.test_compile_sm90 import compile_all; compile_all()"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", list(CASES))
def test_kernel_compiles_for_sm90(case_id: str, compiled: dict[str, dict]) -> None:
    result = compiled[case_id]
    assert result["ok"], result.get("error")
    assert result["cubin_bytes"] > 0 and result["sm90"]
    assert result["shared"] <= H100_MAX_SHARED, f"needs {result['shared']} B of shared memory"
    assert result["spills"] == 0, f"spills {result['spills']} B of registers ({result['regs']} registers/thread)"
    if case_id.startswith(("decode-bf16", "decode-fp16", "prefill-bf16", "prefill-fp16")):
        # 16-bit inputs: QK^T and PV run on tensor cores (tf32 mma), not FMA loops
        assert result["mma"]
