"""The scheduler's adapter rule: no step holds more distinct adapters than there are slots.

A waiting request may start when its adapter is already among the running requests' (or those
admitted this step), or when fewer than ``max_loras`` adapters are in use. Otherwise it waits and,
as with a request blocked on memory, nothing behind it in policy order is admitted this step (no
starvation). Running requests are never stopped for it; when nothing runs any request fits, so
the engine never stalls.
"""
from __future__ import annotations

from collections.abc import Iterable

from engine.request import Request


class AdapterSlots:
    def __init__(self, max_loras: int | None) -> None:
        self.max_loras = max_loras  # None: LoRA off, every request fits

    def admits(self, req: Request, running: Iterable[Request], admitted: Iterable[Request]) -> bool:
        lora_id = req.lora_int_id
        if lora_id is None or self.max_loras is None:
            return True
        active = {r.lora_int_id for group in (running, admitted) for r in group} - {None}
        return lora_id in active or len(active) < self.max_loras
