"""The rotary strategies against transformers' own frequency functions, and the typed errors for
configurations that would change the maths in a way the engine does not compute."""
from __future__ import annotations

import json

import pytest
import torch

from engine.errors import UnsupportedModelError
from engine.layers.rope_scaling import rope_freqs

HEAD_DIM, MAX_POS = 16, 64


def _hf(config, seq_len=None):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = config.rope_parameters["rope_type"]
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len) if seq_len else ROPE_INIT_FUNCTIONS[kind](config, "cpu")


def _llama(rope: dict, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=MAX_POS,
                       rope_parameters=dict(rope, rope_theta=10000.0), **kw)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.7, "mscale_all_dim": 1.0,
     "beta_fast": 16, "beta_slow": 2},
])
def test_fixed_strategies_equal_transformers(rope):
    config = _llama(rope)
    inv, factor = _hf(config)
    freqs, ours = rope_freqs(HEAD_DIM, MAX_POS, 10000.0, config.rope_parameters, MAX_POS)
    torch.testing.assert_close(freqs, torch.outer(torch.arange(MAX_POS).float(), inv), rtol=0, atol=0)
    assert ours == pytest.approx(factor)


def test_dynamic_ntk_grows_per_position_as_transformers_does():
    config = _llama({"rope_type": "dynamic", "factor": 2.0})
    freqs, _ = rope_freqs(HEAD_DIM, 2 * MAX_POS, 10000.0, config.rope_parameters, MAX_POS)
    base_inv, _ = _hf(config)
    torch.testing.assert_close(freqs[:MAX_POS], torch.outer(torch.arange(MAX_POS).float(), base_inv))
    for p in (MAX_POS, MAX_POS + 17, 2 * MAX_POS - 1):  # a sequence of p + 1 tokens
        inv, _ = _hf(config, seq_len=p + 1)
        torch.testing.assert_close(freqs[p], p * inv)


def test_longrope_short_then_long_factors():
    from transformers import Phi3Config

    short = [1.0 + 0.1 * i for i in range(8)]
    config = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=4 * MAX_POS,
                        original_max_position_embeddings=MAX_POS,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                                         "long_factor": [3 * f for f in short]})
    freqs, factor = rope_freqs(HEAD_DIM, 4 * MAX_POS, 10000.0, config.rope_parameters, 4 * MAX_POS)
    short_inv, hf_factor = _hf(config)
    long_inv, _ = _hf(config, seq_len=MAX_POS + 1)
    assert factor == pytest.approx(hf_factor) and factor > 1
    torch.testing.assert_close(freqs[MAX_POS - 1], (MAX_POS - 1) * short_inv)
    torch.testing.assert_close(freqs[MAX_POS + 5], (MAX_POS + 5) * long_inv)


def _config_dir(tmp_path, **fields):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=64).to_dict()
    config.update(architectures=["LlamaForCausalLM"], **fields)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("fields,named", [
    ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "fancy", "factor": 2.0}}, "rope_type"),
    ({"hidden_act": "relu2"}, "hidden_act"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
])
def test_unsupported_fields_raise_typed_errors(tmp_path, fields, named):
    from engine.models.hf_config import load_hf_config

    with pytest.raises(UnsupportedModelError, match=named):
        load_hf_config(_config_dir(tmp_path, **fields))


def test_unknown_architecture_lists_the_supported(tmp_path):
    from engine.models.hf_config import load_hf_config

    path = _config_dir(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="Gemma2ForCausalLM.*MixtralForCausalLM.*Qwen3MoeForCausalLM"):
        load_hf_config(path)


@pytest.mark.parametrize("arch,loads", [("qwen3", "Qwen3ForCausalLM"), ("gemma2", "Gemma2ForCausalLM"),
                                        ("phi3", "Phi3ForCausalLM"), ("falcon", None)])
def test_gguf_architecture_is_checked_before_conversion(tmp_path, arch, loads):
    import gguf

    from engine.models.default_model import resolve_model_path
    from engine.models.gguf_arch import check_gguf

    path = tmp_path / f"tiny-{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32("general.quantization_version", 2)
    writer.add_array("tokenizer.ggml.scores", [0.5, 0.25])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    if loads is not None:
        assert check_gguf(path) == loads
        return
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'falcon'.*gemma2.*llama.*qwen3"):
        resolve_model_path(path)
