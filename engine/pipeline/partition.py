"""Which layers a pipeline stage holds, and cutting a built model down to them.

A stage keeps a contiguous range of decoder layers; the first also keeps the token embedding, the
last the final norm and the LM head (and, with tied embeddings, the embedding that is the LM head's
weight). Everything else is dropped right after the model is built, before any weight is read, so
a stage reads and holds only its own part of the checkpoint (the other layers' tensors were made
with ``torch.empty`` and never touched; on CPU their pages are never even mapped in).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from engine.errors import UnsupportedModelError


class PPMissingLayer(nn.Module):
    """Stands where a layer of another stage is, so the remaining layers keep their indices (and
    their checkpoint names). Holds nothing; never called."""

    def forward(self, *args, **kwargs):  # pragma: no cover - a stage only runs its own layers
        raise RuntimeError("this layer belongs to another pipeline stage")


@dataclass(frozen=True)
class LayerRange:
    """Layers [start, end) of ``num_layers``, for stage ``stage`` of ``num_stages``."""

    start: int
    end: int
    num_layers: int
    stage: int
    num_stages: int

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def owns(self, param_name: str, tied_embeddings: bool) -> bool:
        """Whether a parameter (our name, e.g. ``model.layers.7.mlp.down_proj.weight``) is this stage's."""
        parts = param_name.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                return self.start <= int(parts[i + 1]) < self.end
        if "embed_tokens" in parts:
            return self.is_first or (self.is_last and tied_embeddings)
        if parts[0] == "lm_head" or (parts[-2:-1] == ["norm"] and "layers" not in parts):
            return self.is_last
        return True


def stage_layer_range(num_layers: int, num_stages: int, stage: int) -> LayerRange:
    """Equal contiguous ranges; a layer count the stages do not divide is a start-up error."""
    if num_stages > num_layers or num_layers % num_stages:
        divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
        raise UnsupportedModelError(
            f"pipeline_parallel_size={num_stages} does not divide the model's {num_layers} layers into equal "
            f"stages; use one of {divisors}"
        )
    per = num_layers // num_stages
    return LayerRange(stage * per, (stage + 1) * per, num_layers, stage, num_stages)


def partition_model(model: nn.Module, rng: LayerRange) -> nn.Module:
    """Drops from ``model`` (a CausalLM whose ``model`` holds embed_tokens / layers / norm) what
    stage ``rng`` does not hold; returns it."""
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no embed_tokens / layers / norm to split into pipeline stages; "
            "use tensor parallelism for it"
        )
    tied = bool(getattr(model, "tie_word_embeddings", False))
    for i in range(len(inner.layers)):
        if not rng.start <= i < rng.end:
            inner.layers[i] = PPMissingLayer()
    if not rng.owns("model.embed_tokens.weight", tied):
        inner.embed_tokens = None
    if not rng.is_last:
        inner.norm = None
        model.lm_head = None
    return model
