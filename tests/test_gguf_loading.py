"""Loading GGUF files kept quantized: tiny llama files written with the gguf package's writer load
into the engine's layers (fused QKV / gate-up, rotary row order, tied or separate LM head,
tensor-parallel shards) with exactly the values the fp32 checkpoint path gives; bad files fail at
load with the tensor's name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.distributed.parallel_state import set_tp_group
from engine.errors import UnsupportedModelError
from engine.layers.embedding import VocabParallelEmbedding
from engine.layers.linear import LinearBase
from engine.layers.quantization.gguf import GGUFLinearMethod, GGUFPartsLinearMethod, dequantized_weight, gguf_rows
from engine.layers.quantization.gguf_blocks import KERNEL_TYPES, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, dequantize, quantize_reference
from engine.layers.quantization.gguf_loader import load_gguf_weights
from engine.layers.quantization.gguf_reader import GGUFFormatError
from engine.models.loader import build_model, load_weights

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, LAYERS = 64, 4, 2, 128, 96, 2
_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def tiny_config(tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=tied,
                       architectures=["LlamaForCausalLM"])


def llama_cpp_row_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The rotary interleave llama.cpp's converter applies to q/k rows (HF -> GGUF)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, types: dict[str, int], tied: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Writes a random tiny llama GGUF; ``types`` maps a GGUF name suffix (``attn_q``, ``token_embd``...)
    to a GGML type (default Q4_1; raw random bytes for types we do not quantize). Returns the
    dequantized weights under their Hugging Face names (the reference checkpoint)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    g = torch.Generator().manual_seed(seed)
    hf: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
                                   "model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g)}
    if not tied:
        hf["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g) * 0.1
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV_HEADS * 16, HIDDEN),
              "self_attn.v_proj": (KV_HEADS * 16, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
    for i in range(LAYERS):
        for n in ("input_layernorm", "post_attention_layernorm"):
            hf[f"model.layers.{i}.{n}.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        for n, shape in shapes.items():
            hf[f"model.layers.{i}.{n}.weight"] = torch.randn(*shape, generator=g) * 0.1
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    reference = {}
    for name, w in hf.items():
        parts = name.split(".")
        if name.startswith("model.layers."):
            module = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{_GGUF[module]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        key = gname.split(".")[-2]
        if w.dim() == 1:
            writer.add_tensor(gname, w.numpy().astype(np.float32))
            reference[name] = w
            continue
        stored = w
        if key in ("attn_q", "attn_k"):
            stored = llama_cpp_row_order(w, HEADS if key == "attn_q" else KV_HEADS)
        type_id = types.get(key, Q4_1)
        if type_id in KERNEL_TYPES:
            blocks = quantize_reference(stored, type_id)
            deq = dequantize(blocks, type_id, w.shape[1])
            reference[name] = deq if stored is w else _undo(deq, key)
            data = blocks.numpy()
        else:  # random bytes of the right size for a type the test only expects to be refused
            from gguf.constants import GGML_QUANT_SIZES

            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            data = np.random.default_rng(0).integers(0, 256, (w.shape[0], w.shape[1] // block * size), dtype=np.uint8)
        writer.add_tensor(gname, data, raw_dtype=GGMLQuantizationType(type_id))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def _undo(w: torch.Tensor, key: str) -> torch.Tensor:
    heads = HEADS if key == "attn_q" else KV_HEADS
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reference_model(tmp_path: Path, reference: dict[str, torch.Tensor], tied: bool) -> nn.Module:
    from safetensors.torch import save_file

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in reference.items()}, str(ckpt / "model.safetensors"))
    model = build_model(tiny_config(tied), torch.float32, torch.device("cpu"))
    load_weights(model, ckpt, show_progress=False)
    return model


def _assert_same_weights(gguf_model: nn.Module, ref_model: nn.Module) -> int:
    ref = dict(ref_model.named_modules())
    kept = 0
    for name, module in gguf_model.named_modules():
        if isinstance(module, (LinearBase, VocabParallelEmbedding)):
            if getattr(module, "gguf_k", None) is not None:
                kept += 1
                assert torch.equal(dequantized_weight(module), ref[name].weight.data), name
            else:
                assert torch.equal(module.weight.data, ref[name].weight.data), name
    for (name, p), (_, q) in zip(gguf_model.named_parameters(), ref_model.named_parameters()):
        if p.dim() == 1 and p.dtype != torch.uint8:  # norms (a uint8 one is a fused layer's parts)
            assert torch.equal(p, q), name
    return kept


@pytest.mark.parametrize("tied", [False, True], ids=["separate-head", "tied"])
def test_tiny_file_loads_with_the_checkpoint_values(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    reference = write_tiny_gguf(path, {"token_embd": Q8_0, "attn_v": Q4_0, "ffn_down": Q8_0, "attn_output": Q5_0,
                                       "ffn_gate": Q5_1, "ffn_up": Q5_1}, tied=tied)
    model = build_model(tiny_config(tied), torch.float32, torch.device("cpu"))
    kept = load_gguf_weights(model, path, tiny_config(tied))
    ref_model = _reference_model(tmp_path, reference, tied)
    # 2 layers x (qkv, o, gate_up, down) + embedding (+ head)
    assert kept == LAYERS * 4 + (1 if tied else 2)
    assert _assert_same_weights(model, ref_model) == LAYERS * 4 + 2  # a tied head shares the embedding
    assert isinstance(model.lm_head.linear_method, GGUFLinearMethod)
    qkv = model.model.layers[0].self_attn.qkv_proj  # q and k in Q4_1, v in Q4_0: each part in its own type
    assert isinstance(qkv.linear_method, GGUFPartsLinearMethod)
    q_rows, kv_rows = HIDDEN, KV_HEADS * 16
    assert [(p.start, p.stop, p.type_id) for p in qkv.gguf_parts] == [
        (0, q_rows, Q4_1), (q_rows, q_rows + kv_rows, Q4_1), (q_rows + kv_rows, q_rows + 2 * kv_rows, Q4_0)]
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.uint8
    ids = torch.tensor([0, 5, 95])
    assert torch.equal(model.model.embed_tokens(ids), ref_model.model.embed_tokens(ids))
    x = torch.randn(3, HIDDEN)
    ref_qkv = ref_model.model.layers[0].self_attn.qkv_proj
    for m in (1, 3, 300):  # the C kernel per part, and the dequantized slabs past its rows
        xm = torch.randn(m, HIDDEN)
        torch.testing.assert_close(qkv(xm), ref_qkv(xm), rtol=1e-5, atol=1e-5)
    # the fp32 path's packed GEMM sums each output in one chain over k, the GGUF kernel in 8 lanes: the
    # two agree to fp32 summation error, not bit for bit
    torch.testing.assert_close(model.lm_head(x), ref_model.lm_head(x), rtol=1e-5, atol=1e-5)


def test_tensor_parallel_shards_fall_on_whole_blocks(tmp_path):
    path = tmp_path / "tp.gguf"
    reference = write_tiny_gguf(path, {"attn_v": Q8_0})  # a fused qkv of two types, kept in parts
    try:
        for rank in range(2):
            set_tp_group(rank, 2)
            model = build_model(tiny_config(False), torch.float32, torch.device("cpu"))
            assert load_gguf_weights(model, path, tiny_config(False)) == LAYERS * 4 + 2
            assert _assert_same_weights(model, _reference_model(tmp_path, reference, False)) == LAYERS * 4 + 2
        set_tp_group(0, 4)  # o_proj would keep 16 of 64 input values: half a block
        model = build_model(tiny_config(False), torch.float32, torch.device("cpu"))
        with pytest.raises(GGUFFormatError, match=r"o_proj.*whole number of 32-value"):
            load_gguf_weights(model, path, tiny_config(False))
    finally:
        set_tp_group(0, 1)


def test_unsupported_type_names_it_and_the_supported_list(tmp_path):
    from gguf import GGMLQuantizationType

    from engine.layers.quantization.gguf import unsupported_reason

    path = tmp_path / "k.gguf"
    write_tiny_gguf(path, {"ffn_down": int(GGMLQuantizationType.IQ4_NL)})
    model = build_model(tiny_config(False), torch.float32, torch.device("cpu"))
    with pytest.raises(UnsupportedModelError,
                       match=r"blk\.0\.ffn_down\.weight is IQ4_NL.*Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0"):
        load_gguf_weights(model, path, tiny_config(False))
    assert "IQ4_NL" in unsupported_reason(path)


def test_truncated_and_corrupt_files_fail_with_the_tensor_name(tmp_path):
    path = tmp_path / "ok.gguf"
    write_tiny_gguf(path, {})
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 3000])
    model = build_model(tiny_config(False), torch.float32, torch.device("cpu"))
    with pytest.raises(GGUFFormatError, match="truncated"):
        load_gguf_weights(model, cut, tiny_config(False))
    # NaN scales in the last tensor's first block
    from gguf import GGUFReader

    last = GGUFReader(str(path)).tensors[-1]
    bad = bytearray(data)
    bad[last.data_offset : last.data_offset + 2] = np.float16(np.nan).tobytes()
    corrupt = tmp_path / "nan.gguf"
    corrupt.write_bytes(bytes(bad))
    with pytest.raises(GGUFFormatError, match=rf"{last.name}.*non-finite"):
        load_gguf_weights(model, corrupt, tiny_config(False))
    with pytest.raises(GGUFFormatError, match="not a readable GGUF"):
        garbage = tmp_path / "garbage.gguf"
        garbage.write_bytes(b"GGUF" + b"\xff" * 64)
        load_gguf_weights(model, garbage, tiny_config(False))


def test_embedding_rows_in_torch_without_kernels(monkeypatch, tmp_path):
    from engine.kernels.cpu import gguf_ops

    module = nn.Module()
    w = torch.randn(10, 64)
    module.weight = nn.Parameter(quantize_reference(w, Q8_0), requires_grad=False)
    module.gguf_type, module.gguf_k = Q8_0, 64
    expected = dequantize(module.weight.data, Q8_0, 64)[[1, 9]]
    monkeypatch.setattr(gguf_ops, "load", lambda: None)
    assert torch.equal(gguf_rows(module, torch.tensor([1, 9])), expected)
