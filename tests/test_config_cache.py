"""Warm starts without transformers' config classes (engine/models/config_cache.py) and the direct
tokenizer load (engine/core/llm_engine.py): the same attribute values and the same tokenizer as
transformers' Auto classes, a fresh resolve when config.json changes, and no cache for a config
that holds sub-configs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from engine.models import config_cache
from engine.models.hf_config import load_hf_config


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGED_ENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _same_attributes(cached, resolved: dict) -> None:
    for name, value in resolved.items():
        assert config_cache._encode(getattr(cached, name)) == value, name


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_a_cached_config_answers_what_transformers_answered(which, own_cache, default_model_path, tiny_model_path):
    from transformers import AutoConfig

    path = default_model_path if which == "default" else tiny_model_path
    first = load_hf_config(path)  # resolved by transformers, then written down
    assert not isinstance(first, config_cache.CachedConfig)
    assert len(list((own_cache / "configs").glob("*.json"))) == 1
    second = load_hf_config(path)
    assert isinstance(second, config_cache.CachedConfig)
    resolved = config_cache.resolved_attributes(AutoConfig.from_pretrained(str(path)))
    assert resolved is not None and len(resolved) > 30
    _same_attributes(second, resolved)
    for name in ("hidden_size", "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "architectures",
                 "tie_word_embeddings", "eos_token_id", "max_position_embeddings", "dtype"):
        assert getattr(second, name) == getattr(first, name), name


def test_an_edited_config_is_resolved_again(own_cache, tiny_model_path, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    load_hf_config(model)
    raw = json.loads((model / "config.json").read_text())
    raw["rms_norm_eps"] = 1e-3
    (model / "config.json").write_text(json.dumps(raw))
    edited = load_hf_config(model)
    assert not isinstance(edited, config_cache.CachedConfig) and edited.rms_norm_eps == 1e-3
    assert len(list((own_cache / "configs").glob("*.json"))) == 2
    assert load_hf_config(model).rms_norm_eps == 1e-3


def test_a_config_with_sub_configs_is_not_cached():
    from transformers import LlavaConfig

    assert config_cache.resolved_attributes(LlavaConfig()) is None


def test_a_warm_start_imports_no_transformers_config_class(own_cache, default_model_path):
    """In a fresh process with the cache filled: the config loads without importing transformers."""
    load_hf_config(default_model_path)
    code = ("import sys; from pathlib import Path; from engine.models.hf_config import load_hf_config; "
            f"c = load_hf_config(Path({str(default_model_path)!r})); "
            "print(type(c).__name__, 'transformers' in sys.modules, c.hidden_size)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PAGED_ENGINE_CACHE": str(own_cache)})
    assert out.stdout.split() == ["CachedConfig", "False", "576"], out.stdout + out.stderr


def test_the_direct_tokenizer_is_the_auto_tokenizer(default_model_path):
    from transformers import AutoTokenizer

    from engine.core.llm_engine import load_tokenizer

    class _Model:
        path = default_model_path

    class _Config:
        tokenizer = None
        model = _Model

    direct = load_tokenizer(_Config)
    auto = AutoTokenizer.from_pretrained(str(default_model_path))
    assert type(direct) is type(auto)
    texts = ["Hello world", "  spaces,\ttabs\n\nand new lines", "émoji 🤖 中文", "<|im_start|>user\nhi<|im_end|>",
             "def f(x):\n    return x ** 2"]
    for text in texts:
        ids = auto.encode(text)
        assert direct.encode(text) == ids
        assert direct.decode(ids) == auto.decode(ids)
        assert direct.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
        assert direct.convert_ids_to_tokens(ids) == auto.convert_ids_to_tokens(ids)
    chat = [{"role": "user", "content": "hi"}]
    assert direct.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == auto.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    assert (direct.eos_token_id, direct.bos_token_id, len(direct)) == (auto.eos_token_id, auto.bos_token_id, len(auto))


def test_the_generate_command_prints_its_answer_and_the_startup_breakdown(tiny_model_path):
    """``python -m engine generate`` as a user runs it: it shuts its engine down, then exits
    without the interpreter's teardown (engine/__main__.py), so its output must be flushed first."""
    out = subprocess.run([sys.executable, "-m", "engine", "generate", "Hello", "--model", str(tiny_model_path),
                          "--max-tokens", "3", "--log-level", "debug"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("--- prompt: 'Hello'\n") and len(out.stdout.splitlines()) >= 2, out.stdout
    breakdown = next(line for line in out.stderr.splitlines() if "start-up to here" in line)
    for phase in ("imports:", "config:", "tokenizer:", "workers and weights:", "generation (3 tokens):"):
        assert phase in breakdown, breakdown
