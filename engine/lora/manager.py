"""The worker's adapters: ``max_loras`` resident slots in every LoRA layer, an LRU of host copies
(``max_cpu_loras``), and each step's :class:`LoRAContext` (which token rows use which slot).

The scheduler never puts more distinct adapters in one step than there are slots
(engine/lora/admission.py), so a step's adapters always fit: a missing one takes a free slot or
the least recently used slot no row of this step needs.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch

from engine.lora.adapter import LoRAAdapter, load_adapter
from engine.lora.config import LoRAConfig
from engine.lora.layers import LoRAContext, LoRALinearMethod, attach_lora
from engine.lora.ops import LoRABatch
from engine.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAModelManager:
    def __init__(self, model: torch.nn.Module, config: LoRAConfig, hf_config: Any, device: torch.device) -> None:
        self.config = config
        self.hf_config = hf_config
        self.device = device
        self.layers: dict[tuple[int, str], LoRALinearMethod] = attach_lora(model, config.max_loras,
                                                                           config.max_lora_rank)
        self.slots: list[int | None] = [None] * config.max_loras  # adapter id held by each slot
        self.slot_used: list[int] = [0] * config.max_loras  # last step that used each slot
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # LRU of loaded adapters
        self.requests: dict[str, LoRARequest] = {}  # req id -> its adapter (base-model requests absent)
        self.step = 0
        self.num_loads = 0  # adapters read from disk (tests check the LRU with it)

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, req_id: str, lora_request: LoRARequest | None) -> None:
        if lora_request is not None:
            self.requests[req_id] = lora_request

    def forget(self, req_ids: set[str]) -> None:
        for rid in req_ids:
            self.requests.pop(rid, None)

    # ---- per step --------------------------------------------------------------------------
    def prepare(self, req_ids: list[str], query_start_loc: list[int]) -> LoRAContext | None:
        """The step's context, after making every adapter it needs resident; None when no row
        uses an adapter."""
        self.step += 1
        rows_of: dict[int, list[tuple[int, int]]] = {}
        for i, rid in enumerate(req_ids):
            lr = self.requests.get(rid)
            if lr is not None:
                rows_of.setdefault(lr.lora_int_id, []).append((query_start_loc[i], query_start_loc[i + 1]))
        if not rows_of:
            return None
        if len(rows_of) > len(self.slots):
            raise RuntimeError(f"a step uses {len(rows_of)} adapters but there are {len(self.slots)} slots: "
                               "the scheduler's adapter admission rule was broken")
        wanted = set(rows_of)
        slot_of_row = [-1] * query_start_loc[len(req_ids)]
        for lora_id, spans in rows_of.items():
            slot = self._activate(self._request_for(lora_id, req_ids), wanted)
            for s, e in spans:
                slot_of_row[s:e] = [slot] * (e - s)
        return LoRAContext(LoRABatch.build(slot_of_row, self.device))

    def _request_for(self, lora_id: int, req_ids: list[str]) -> LoRARequest:
        for rid in req_ids:
            lr = self.requests.get(rid)
            if lr is not None and lr.lora_int_id == lora_id:
                return lr
        raise KeyError(lora_id)

    def _activate(self, lr: LoRARequest, wanted: set[int]) -> int:
        """The slot holding ``lr``'s adapter, loading it there if needed."""
        lora_id = lr.lora_int_id
        if lora_id in self.slots:
            slot = self.slots.index(lora_id)
        else:
            free = [s for s, held in enumerate(self.slots) if held is None]
            if free:
                slot = free[0]
            else:
                evictable = [s for s, held in enumerate(self.slots) if held not in wanted]
                slot = min(evictable, key=lambda s: self.slot_used[s])
            adapter = self._host_copy(lr)
            for (layer_idx, _), method in self.layers.items():
                method.set_slot(slot, [adapter.weights.get((layer_idx, m)) for m in method.modules])
            self.slots[slot] = lora_id
        self.slot_used[slot] = self.step
        return slot

    def _host_copy(self, lr: LoRARequest) -> LoRAAdapter:
        adapter = self.host.get(lr.lora_int_id)
        if adapter is not None:
            self.host.move_to_end(lr.lora_int_id)
            return adapter
        adapter = load_adapter(lr.lora_int_id, lr.lora_path, self.hf_config, self.config.max_lora_rank)
        self.num_loads += 1
        self.host[lr.lora_int_id] = adapter
        while len(self.host) > self.config.max_cpu_loras:
            evicted, _ = self.host.popitem(last=False)
            logger.debug("LoRA host cache: dropped adapter %d", evicted)
        return adapter

    def resident(self) -> list[int | None]:
        return list(self.slots)


def make_lora_manager(config: Any, model: torch.nn.Module, device: torch.device) -> LoRAModelManager | None:
    """The runner's LoRA manager when the engine was started with enable_lora, else None."""
    lora: LoRAConfig | None = config.lora_config
    if lora is None:
        return None
    logger.info("LoRA: %d slots of rank <= %d, %d host copies; steps with adapter rows run eagerly "
                "(decode-step replays hold no LoRA delta), base-only steps still replay",
                lora.max_loras, lora.max_lora_rank, lora.max_cpu_loras)
    return LoRAModelManager(model, lora, config.model.hf_config, device)
