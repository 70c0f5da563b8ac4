"""The engine process's view of adapters: checks each LoRARequest once against the base model
(before it reaches a worker) and remembers which requests use it, so an unload can be refused
while any of them is unfinished."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from engine.lora.adapter import LoRAAdapter, LoRAError, inspect_adapter
from engine.lora.config import LoRAConfig
from engine.lora.request import LoRARequest


class LoRARegistry:
    def __init__(self, lora_config: LoRAConfig | None, hf_config: Any) -> None:
        self.config = lora_config
        self.hf_config = hf_config
        self.checked: dict[int, tuple[LoRARequest, LoRAAdapter]] = {}
        self._users: dict[int, set[str]] = {}  # adapter id -> ids of requests added with it

    @property
    def enabled(self) -> bool:
        return self.config is not None

    def check(self, lr: LoRARequest) -> LoRAAdapter:
        """The checked adapter; raises LoRAError (a 400) for one this engine cannot serve."""
        if not isinstance(lr, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, not {type(lr).__name__}")
        if self.config is None:
            raise LoRAError("LoRA adapters are not enabled: start the engine with enable_lora=True (--enable-lora)")
        known = self.checked.get(lr.lora_int_id)
        if known is not None:
            if known[0].lora_path != lr.lora_path:
                raise LoRAError(f"lora_int_id {lr.lora_int_id} already names the adapter at {known[0].lora_path!r}; "
                                "give a different adapter a different lora_int_id")
            return known[1]
        adapter = inspect_adapter(lr.lora_int_id, lr.lora_path, self.hf_config, self.config.max_lora_rank)
        self.checked[lr.lora_int_id] = (lr, adapter)
        return adapter

    def attach(self, inputs: Any, lora_request: LoRARequest | None, request_id: str) -> Any:
        """``inputs`` (a ProcessedInput) carrying the checked adapter: ``lora_request``, else the
        one it already names; unchanged for the base model."""
        lr = lora_request if lora_request is not None else inputs.lora_request
        if lr is None:
            return inputs
        self.check(lr)
        self._users.setdefault(lr.lora_int_id, set()).add(request_id)
        return inputs if inputs.lora_request is lr else replace(inputs, lora_request=lr)

    def users(self, lora_int_id: int, unfinished: Callable[[str], bool]) -> list[str]:
        """Ids of requests added with the adapter that ``unfinished`` says are still running
        (finished ones are forgotten). Safe to call from another thread."""
        ids = self._users.get(lora_int_id)
        if not ids:
            return []
        live = [rid for rid in list(ids) if unfinished(rid)]
        ids.difference_update(set(ids) - set(live))
        return live

    def forget(self, lora_int_id: int) -> None:
        """An unloaded adapter: its id may not come back with another path unchecked."""
        self.checked.pop(lora_int_id, None)
