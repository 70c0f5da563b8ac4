"""A model's resolved config, kept as JSON so that a warm start reads it without transformers.

Importing transformers' config classes costs 1.5-1.7 s of a 4 s start (their validators import
``transformers.activations``, which pulls in ``torch.distributed.tensor``). The first load of a
model directory goes through ``AutoConfig`` as always; its result is then written down with every
public attribute it answers (defaults, derived fields and aliases included), and later starts
read that back as a :class:`CachedConfig` with the same attribute values. The key is the bytes of
config.json and the transformers version, so an edited config or an upgraded transformers is
resolved afresh. Configs holding sub-configs (multimodal, encoder-decoder) are not cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when what is stored changes
# attributes not kept: deprecated aliases (reading them logs a warning; "dtype" and "return_dict"
# hold the values) and transformers' view of per-layer overrides, which no engine model reads
SKIPPED = frozenset({"torch_dtype", "use_return_dict", "per_layer_config"})


class CachedConfig(SimpleNamespace):
    """The attributes of a transformers config, read from the cache."""


def _key(config_text: str) -> str:
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        version = "none"
    return hashlib.sha256(f"{FORMAT}\0{version}\0{config_text}".encode()).hexdigest()[:24]


def _file(config_text: str) -> Path:
    from engine.models.default_model import cache_root

    return cache_root() / "configs" / f"{_key(config_text)}.json"


def _encode(value: Any) -> Any:
    """A JSON value; a torch dtype, a set or a dict with int keys as a one-key tagged dict. Raises
    TypeError for anything else (a sub-config, an object)."""
    import torch

    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted(_encode(v) for v in value)}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, dict) and all(isinstance(k, int) for k in value):
        return {"__int_keys__": [[k, _encode(v)] for k, v in value.items()]}
    raise TypeError(type(value).__name__)


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__dtype__"}:
            import torch

            return getattr(torch, value["__dtype__"])
        if set(value) == {"__set__"}:
            return {_decode(v) for v in value["__set__"]}
        if set(value) == {"__int_keys__"}:
            return {k: _decode(v) for k, v in value["__int_keys__"]}
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def resolved_attributes(config: Any) -> dict[str, Any] | None:
    """Every public, non-callable attribute of ``config`` as JSON values; None when one is not
    representable (the config then is not cached)."""
    out: dict[str, Any] = {}
    for name in dir(config):
        if name.startswith("_") or name in SKIPPED:
            continue
        try:
            value = getattr(config, name)
        except Exception:  # a property that raises for this config: not an attribute it has
            continue
        if callable(value):
            continue
        try:
            out[name] = _encode(value)
        except TypeError:
            return None
    return out


def load_cached_config(config_text: str) -> CachedConfig | None:
    path = _file(config_text)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return CachedConfig(**{k: _decode(v) for k, v in stored.items()})


def store_config(config_text: str, config: Any) -> None:
    attrs = resolved_attributes(config)
    if attrs is None:
        return
    path = _file(config_text)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(attrs))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    except OSError as e:  # a read-only cache only costs the next start its speed
        logger.debug("could not cache the resolved config in %s: %s", path, e)
