"""LoRA adapters on the OpenAI server (vLLM's surface): ``--lora-modules name=path`` at start-up,
the adapter picked by a request's ``model`` field, adapters listed by /v1/models (``parent`` = the
base model), and ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` at run time, only
with ``--allow-runtime-lora-updating`` or ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.

Unloading an adapter that unfinished requests use is refused (409): they keep streaming, and the
caller retries once they are done. Each loaded adapter gets a fresh ``lora_int_id``, so a name
loaded again (with another path) never reuses an old adapter's slots, host copy or cached KV.
"""
from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from engine.entrypoints.openai.protocol import OpenAIError
from engine.lora.adapter import LoRAError, LoRANotFoundError
from engine.lora.request import LoRARequest

RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_updating_allowed(flag: bool) -> bool:
    return flag or os.environ.get(RUNTIME_ENV, "").strip().lower() in ("1", "true")


@dataclass(frozen=True)
class LoRAModulePath:
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(text: str) -> LoRAModulePath:
    """``name=path`` or vLLM's JSON form ``{"name": .., "path": .., "base_model_name": ..}``."""
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--lora-modules {text!r} is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("path"), str):
            raise ValueError(f"--lora-modules {text!r}: the JSON form needs string 'name' and 'path'")
        return LoRAModulePath(obj["name"], obj["path"], obj.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules {text!r}: expected name=path or a JSON object")
    return LoRAModulePath(name, path)


@dataclass
class LoRAModules:
    """The adapters this server serves, by name. ``check`` runs the engine's adapter checks (a
    LoRAError for a bad one); ``users`` lists the unfinished requests of an adapter id."""

    base_model_name: str
    check: Callable[[LoRARequest], Any]
    users: Callable[[int], list[str]]
    allow_runtime_updating: bool = False
    modules: dict[str, LoRARequest] = field(default_factory=dict)
    next_id: int = 1

    @classmethod
    def for_engine(cls, engine: Any, base_model_name: str, allow_runtime_updating: bool = False) -> "LoRAModules":
        """Bound to an engine client's adapter checks (EngineClient.check_lora / lora_users)."""
        return cls(base_model_name, engine.check_lora, engine.lora_users, runtime_updating_allowed(allow_runtime_updating))

    def add(self, module: LoRAModulePath) -> LoRARequest:
        """Checks and registers an adapter (start-up and the load route); raises LoRAError."""
        if module.name in self.modules or module.name == self.base_model_name:
            raise ValueError(f"--lora-modules: the name {module.name!r} is given twice (or is the base model's)")
        lr = LoRARequest(module.name, self.next_id, module.path, module.base_model_name or self.base_model_name)
        self.check(lr)
        self.next_id += 1
        self.modules[module.name] = lr
        return lr

    def resolve(self, model: str) -> LoRARequest | None:
        return self.modules.get(model)

    def model_cards(self, created: int, max_model_len: int) -> list[dict]:
        return [{"id": lr.lora_name, "object": "model", "created": created, "owned_by": "paged-engine",
                 "root": lr.lora_path, "parent": lr.base_model_name or self.base_model_name,
                 "max_model_len": max_model_len} for lr in self.modules.values()]


def _names(data: Any, *fields: str) -> list[str]:
    if not isinstance(data, dict):
        raise OpenAIError("The request body must be a JSON object")
    out = []
    for f in fields:
        v = data.get(f)
        if not isinstance(v, str) or not v:
            raise OpenAIError(f"'{f}' is required and must be a non-empty string", param=f)
        out.append(v)
    return out


def _check_allowed(mods: LoRAModules) -> None:
    if not mods.allow_runtime_updating:
        raise OpenAIError("Loading and unloading LoRA adapters at run time is disabled: start the server with "
                          f"--allow-runtime-lora-updating (or {RUNTIME_ENV}=True)", status=403,
                          code="runtime_lora_updating_disabled")


def add_lora_routes(app: web.Application, mods: LoRAModules,
                    read_json: Callable[[web.Request], Awaitable[Any]]) -> None:
    """POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter {"lora_name"}."""
    lock = asyncio.Lock()

    async def load(request: web.Request) -> web.Response:
        _check_allowed(mods)
        name, path = _names(await read_json(request), "lora_name", "lora_path")
        async with lock:
            if name in mods.modules or name == mods.base_model_name:
                raise OpenAIError(f"The lora adapter '{name}' has already been loaded.", param="lora_name",
                                  code="lora_adapter_exists")
            try:  # reads the adapter's config and safetensors header: off the event loop
                lr = LoRARequest(name, mods.next_id, path, mods.base_model_name)
                await asyncio.to_thread(mods.check, lr)
            except LoRANotFoundError as e:
                raise OpenAIError(str(e), status=404, param="lora_path", code="lora_adapter_not_found") from None
            except LoRAError as e:
                raise OpenAIError(str(e), param="lora_path", code="invalid_lora_adapter") from None
            mods.next_id += 1
            mods.modules[name] = lr
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(request: web.Request) -> web.Response:
        _check_allowed(mods)
        (name,) = _names(await read_json(request), "lora_name")
        async with lock:
            lr = mods.modules.get(name)
            if lr is None:
                raise OpenAIError(f"The lora adapter '{name}' cannot be found.", status=404, param="lora_name",
                                  code="lora_adapter_not_found")
            busy = mods.users(lr.lora_int_id)
            if busy:
                raise OpenAIError(f"The lora adapter '{name}' is in use by {len(busy)} unfinished request(s); "
                                  "unload it after they finish (or abort them)", status=409, param="lora_name",
                                  code="lora_adapter_in_use")
            del mods.modules[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_post("/v1/unload_lora_adapter", unload)
