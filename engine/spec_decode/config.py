"""``speculative_config``: parsed and validated once, when the engine config is built."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16

_ALLOWED_KEYS = {
    "ngram": {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"},
    "draft_model": {"method", "num_speculative_tokens", "model"},
}


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None  # draft_model: the draft checkpoint as given
    draft_path: Path | None = None  # ... resolved to a local directory
    draft_hf_config: Any = None

    @property
    def uses_draft_model(self) -> bool:
        return self.method == "draft_model"

    @property
    def num_lookahead_slots(self) -> int:
        """KV slots past a request's scheduled tokens that its proposer writes before the next
        step: a draft model writes K/V for the proposals it feeds back to itself."""
        return self.num_speculative_tokens if self.uses_draft_model else 0

    @classmethod
    def from_dict(cls, raw: Any, target_hf_config: Any = None) -> "SpeculativeConfig":
        """Raises ValueError naming the offending field."""
        if isinstance(raw, SpeculativeConfig):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(raw).__name__}")
        method = raw.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(METHODS)}, got {method!r}")
        unknown = set(raw) - _ALLOWED_KEYS[method]
        if unknown:
            raise ValueError(
                f"speculative_config has unknown key(s) {sorted(unknown)} for method {method!r}; "
                f"allowed: {sorted(_ALLOWED_KEYS[method])}"
            )
        k = raw.get("num_speculative_tokens")
        if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"speculative_config.num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}"
            )
        cfg = cls(method=method, num_speculative_tokens=k)
        if method == "ngram":
            lo, hi = raw.get("prompt_lookup_min", 1), raw.get("prompt_lookup_max", 4)
            if not _is_int(lo) or lo < 1:
                raise ValueError(f"speculative_config.prompt_lookup_min must be an integer >= 1, got {lo!r}")
            if not _is_int(hi) or hi < lo:
                raise ValueError(
                    f"speculative_config.prompt_lookup_max must be an integer >= prompt_lookup_min ({lo}), got {hi!r}"
                )
            cfg.prompt_lookup_min, cfg.prompt_lookup_max = lo, hi
            return cfg
        model = raw.get("model")
        if not isinstance(model, (str, Path)) or not str(model):
            raise ValueError("speculative_config.model must be the path of the draft model (method 'draft_model')")
        cfg.model = str(model)
        cfg.draft_path, cfg.draft_hf_config = _load_draft_config(cfg.model, target_hf_config)
        return cfg


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _load_draft_config(model: str, target_hf_config: Any) -> tuple[Path, Any]:
    from engine.models.hf_config import load_hf_config
    from engine.models.default_model import resolve_model_path

    try:
        path = resolve_model_path(model)
        hf_config = load_hf_config(path)
    except (OSError, ValueError) as e:  # missing files, unsupported architecture
        raise ValueError(f"speculative_config.model: cannot load the draft model {model!r}: {e}") from e
    if target_hf_config is not None and hf_config.vocab_size != target_hf_config.vocab_size:
        raise ValueError(
            f"speculative_config.model: the draft's vocabulary ({hf_config.vocab_size}) differs from the "
            f"target's ({target_hf_config.vocab_size}); the draft must share the target's tokenizer"
        )
    return path, hf_config
