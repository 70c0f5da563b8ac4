"""A pipeline stage's forward pass over the layers it holds (engine/pipeline/partition.py).

The model files stay as they are: a stage wraps the cut-down model and runs the same sequence the
families' ``forward`` runs (embed, prepare rotary, layers, norm), split at its ends. What enters
and what leaves a stage are objects chosen once when it is built, so the pass itself has no branch:
the first stage embeds token ids, the others take the previous stage's ``Intermediate``; the last
stage applies the final norm, the others hand on (hidden, residual).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.errors import UnsupportedModelError
from engine.layers.rotary import RotaryEmbedding
from engine.pipeline.partition import LayerRange


@dataclass
class Intermediate:
    """What passes from one stage to the next: the residual stream, split as the layers keep it."""

    hidden: torch.Tensor
    residual: torch.Tensor


class _Embed:
    def __init__(self, embed: nn.Module) -> None:
        self.embed = embed

    def __call__(self, input_ids: torch.Tensor, intermediate: Intermediate | None):
        return self.embed(input_ids), None


class _Receive:
    def __call__(self, input_ids: torch.Tensor, intermediate: Intermediate | None):
        if intermediate is None:
            raise RuntimeError("a later pipeline stage ran without the previous stage's hidden states")
        return intermediate.hidden, intermediate.residual


class _Norm:
    def __init__(self, norm: nn.Module) -> None:
        self.norm = norm

    def __call__(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden, residual)[0]


class _Send:
    def __call__(self, hidden: torch.Tensor, residual: torch.Tensor) -> Intermediate:
        return Intermediate(hidden, residual)


def _check_shape(model: nn.Module) -> None:
    """The split below is the families' forward only if the inner model's forward is one of theirs."""
    from engine.models.gemma import GemmaModel
    from engine.models.llama import LlamaModel

    forward = type(model.model).forward
    if forward not in (LlamaModel.forward, GemmaModel.forward):
        raise UnsupportedModelError(
            f"{type(model).__name__}'s forward pass is not the Llama/Gemma layer stack that pipeline stages "
            "split; use tensor parallelism for it"
        )


class PipelineStageModel(nn.Module):
    """``forward(input_ids, positions, intermediate)``: the hidden states of every scheduled token
    (last stage) or the Intermediate for the next stage. ``compute_logits`` on the last stage only."""

    def __init__(self, model: nn.Module, rng: LayerRange) -> None:
        super().__init__()
        _check_shape(model)
        self.lm = model
        self.rng = rng
        inner = model.model
        self._layers = [inner.layers[i] for i in range(rng.start, rng.end)]  # plain list: registered once, in lm
        self._rotaries = list(dict.fromkeys(m for m in inner.modules() if isinstance(m, RotaryEmbedding)))
        self._entry = _Embed(inner.embed_tokens) if rng.is_first else _Receive()
        self._exit = _Norm(inner.norm) if rng.is_last else _Send()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        hidden, residual = self._entry(input_ids, intermediate)
        for rotary in self._rotaries:
            rotary.prepare(positions)
        for layer in self._layers:
            hidden, residual = layer(hidden, residual)
        return self._exit(hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.compute_logits(hidden)
