"""Chooses the attention backend once at start-up.

``auto`` is Triton on CUDA, the C kernels on CPU where they build (``cpu``), and torch otherwise.
An int8 KV cache (``kv_cache_dtype="int8"``, engine/attention/kv_format.py) has kernels in the
``cpu`` backend and runs anywhere on the ``torch`` one; ``auto`` with it on CUDA is ``torch``.
Backend modules are imported lazily: only the chosen one is loaded, so triton (whose interpreter mode
is fixed when it is imported) and the optional xformers are never pulled in by a CPU run.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch

from engine.attention.backends.base import AttentionBackend
from engine.attention.kv_format import KVCacheFormat

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cpu", "torch", "xformers")


def triton_interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _torch_backend(kv: KVCacheFormat | None) -> AttentionBackend:
    from engine.attention.backends.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend(kv)


def _cpu_backend(device: torch.device, required: bool, kv: KVCacheFormat | None) -> AttentionBackend | None:
    if device.type != "cpu":
        if required:
            raise ValueError(f"attention_backend='cpu' runs on CPU, not {device.type}; use 'auto'")
        return None
    from engine.kernels.cpu.ops import load

    kernels = load()
    if kernels is None:
        if required:
            raise ValueError("attention_backend='cpu' needs the C kernels, which could not be built here (is gcc "
                             "on PATH? is ENGINE_CPU_KERNELS=0 set?); use 'torch' or 'auto'")
        return None
    from engine.attention.backends.cpu_backend import CpuAttentionBackend

    return CpuAttentionBackend(kernels, kv)


def _triton_backend(device: torch.device) -> AttentionBackend:
    if not _triton_installed():
        raise ValueError("attention_backend='triton' needs the triton package, which is not installed")
    if device.type != "cuda" and not triton_interpreter_requested():
        raise ValueError(
            f"attention_backend='triton' runs on CUDA devices, not {device.type}; use 'torch' (or 'auto'), "
            "or set TRITON_INTERPRET=1 before start-up to run the kernels in Triton's (slow) CPU interpreter"
        )
    from engine.attention.backends.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend()


def _xformers_backend(device: torch.device) -> AttentionBackend:
    if device.type != "cuda":
        raise ValueError(
            f"attention_backend='xformers' needs a CUDA device (xformers has no {device.type} kernels); "
            "use 'torch' or 'auto'"
        )
    from engine.attention.backends.xformers_backend import load_xformers

    try:
        api = load_xformers()
    except ImportError as e:
        raise ValueError(
            f"attention_backend='xformers' but xformers is not importable ({e}); install the optional "
            "xformers extra or use 'auto'"
        ) from e
    from engine.attention.backends.xformers_backend import XFormersAttentionBackend

    return XFormersAttentionBackend(api)


def get_attention_backend(name: str, device: torch.device, kv: KVCacheFormat | None = None) -> AttentionBackend:
    """Returns the backend for ``name`` on ``device`` with a cache in format ``kv`` (None: the
    model's dtype); a ValueError says why a choice cannot run here."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"unknown attention_backend={name!r}; choose one of {', '.join(BACKENDS)}")
    quantized = kv is not None and not kv.exact
    if quantized and name in ("triton", "xformers"):
        raise ValueError(f"kv_cache_dtype={kv.name!r} is implemented by the 'cpu' and 'torch' attention backends, "
                         f"not {name!r}; use attention_backend='torch' (or 'auto'), or kv_cache_dtype='auto'")
    if name == "auto":
        if device.type == "cuda" and _triton_installed() and not quantized:
            return _triton_backend(device)
        if device.type == "cuda" and quantized:
            logger.info("kv_cache_dtype=%r on CUDA: the torch attention backend (the Triton kernels read the "
                        "model's dtype only)", kv.name)
        return _cpu_backend(device, required=False, kv=kv) or _torch_backend(kv)
    if name == "cpu":
        return _cpu_backend(device, required=True, kv=kv)
    if name == "torch":
        return _torch_backend(kv)
    if name == "triton":
        return _triton_backend(device)
    return _xformers_backend(device)
