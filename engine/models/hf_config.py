"""Reads a model directory's config.json, refusing architectures the engine has no class for.

Its own module so that the engine config and the speculative-decoding config (which loads a draft
model's config) both import it without importing each other. A config resolved once by
transformers is read back from engine/models/config_cache.py on later starts."""
from __future__ import annotations

import json
from types import SimpleNamespace
from pathlib import Path
from typing import Any

from engine.errors import ModelNotFoundError
from engine.models.config_cache import load_cached_config, store_config
from engine.models.registry import check_architecture, check_model_config


def load_hf_config(path: Path) -> Any:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelNotFoundError(f"{cfg_file} is missing: a model directory needs config.json, *.safetensors and tokenizer files")
    text = cfg_file.read_text()
    raw = json.loads(text)
    archs = raw.get("architectures") or []
    check_architecture(archs[0] if archs else None)
    check_model_config(SimpleNamespace(**raw))  # before transformers' own validation can mask the field
    config = load_cached_config(text)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
        store_config(text, config)
    check_model_config(config)
    return config
