"""How a model pools: read once at start-up from the model directory's sentence-transformers
config (``modules.json`` + ``1_Pooling/config.json``), else from ``pooler_config`` /
``override_pooler_config`` (vLLM's names), else decoder defaults (last token, normalized)."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class PoolingType(str, enum.Enum):
    LAST = "LAST"
    MEAN = "MEAN"
    CLS = "CLS"

    @property
    def needs_all_positions(self) -> bool:
        """MEAN and CLS read positions a prefix-cache hit would skip computing, so their requests
        do not read the prefix cache (vLLM's ``skip_reading_prefix_cache``)."""
        return self is not PoolingType.LAST


# sentence-transformers' 1_Pooling/config.json keys -> our pooling type
_ST_MODES = {
    "pooling_mode_lasttoken": PoolingType.LAST,
    "pooling_mode_mean_tokens": PoolingType.MEAN,
    "pooling_mode_cls_token": PoolingType.CLS,
}
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


@dataclass
class PoolerConfig:
    pooling_type: PoolingType = PoolingType.LAST
    normalize: bool = True
    # Matryoshka: requests may ask for fewer dimensions (config.json's is_matryoshka /
    # matryoshka_dimensions); None: ``dimensions`` is refused
    matryoshka_dimensions: list[int] | None = None
    is_matryoshka: bool = False
    source: str = "default"  # where it came from, for the start-up log and errors

    @property
    def allows_dimensions(self) -> bool:
        return self.is_matryoshka or bool(self.matryoshka_dimensions)

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> "PoolerConfig":
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"pooler_config has unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        kw = dict(raw)
        if "pooling_type" in kw:
            kw["pooling_type"] = _pooling_type(kw["pooling_type"])
        return cls(**kw, source=source)


def _pooling_type(name: Any) -> PoolingType:
    try:
        return PoolingType(str(name).upper())
    except ValueError:
        raise ValueError(
            f"pooling_type must be one of {[t.value for t in PoolingType]}, got {name!r}"
        ) from None


def _from_sentence_transformers(model_dir: Path) -> PoolerConfig | None:
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling_dir, normalize = None, False
    for m in modules:
        kind = m.get("type", "")
        if kind.endswith("models.Pooling"):
            pooling_dir = model_dir / m.get("path", "")
        elif kind.endswith("models.Normalize"):
            normalize = True
    if pooling_dir is None:
        return None
    cfg = json.loads((pooling_dir / "config.json").read_text())
    bad = [k for k in _ST_UNSUPPORTED if cfg.get(k)]
    if bad:
        raise ValueError(f"{pooling_dir / 'config.json'}: pooling mode {bad[0]} is not supported (LAST, MEAN, CLS are)")
    chosen = [t for k, t in _ST_MODES.items() if cfg.get(k)]
    if len(chosen) != 1:
        raise ValueError(f"{pooling_dir / 'config.json'}: exactly one of {sorted(_ST_MODES)} must be true")
    return PoolerConfig(chosen[0], normalize, source=str(modules_file))


def resolve_pooler_config(model_dir: Path, hf_config: Any, pooler_config: dict | None = None,
                          override_pooler_config: dict | None = None) -> PoolerConfig:
    """The sentence-transformers config when the model has one, else ``pooler_config``, else the
    decoder default; ``override_pooler_config`` then replaces single fields of whichever applied."""
    base = _from_sentence_transformers(Path(model_dir))
    if base is None and pooler_config is not None:
        base = PoolerConfig.from_dict(pooler_config, "pooler_config")
    if base is None:
        base = PoolerConfig()
    if base.matryoshka_dimensions is None and not base.is_matryoshka:
        base.matryoshka_dimensions = getattr(hf_config, "matryoshka_dimensions", None)
        base.is_matryoshka = bool(getattr(hf_config, "is_matryoshka", False))
    if override_pooler_config:
        merged = {f.name: getattr(base, f.name) for f in fields(PoolerConfig) if f.name != "source"}
        unknown = set(override_pooler_config) - set(merged)
        if unknown:
            raise ValueError(f"override_pooler_config has unknown key(s) {sorted(unknown)}; known: {sorted(merged)}")
        merged.update(override_pooler_config)
        base = PoolerConfig.from_dict(merged, f"{base.source} + override_pooler_config")
    return base
