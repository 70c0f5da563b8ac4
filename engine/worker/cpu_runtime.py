"""Process settings that decide CPU inference speed: the allocator and the thread count."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

import torch

logger = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper bound for the mmap threshold on 64-bit
_TRIM_THRESHOLD = 1 << 30

_configured = False


def keep_freed_memory() -> bool:
    """Makes glibc keep freed blocks of up to 32 MiB in the heap instead of returning them to the OS.

    A forward pass allocates and frees the same multi-MB activations every layer. By default glibc
    serves those with fresh mmaps, so each one page-faults in again: that doubled the time of a decode
    step at batch 64 (measured; docs/performance.md). Returns whether the setting took effect."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(ok)


def configure_cpu_runtime(num_threads: int | None = None) -> None:
    """Once per process: the allocator setting above, and ``num_threads`` torch threads when given
    (else torch's default, one per core this process may run on)."""
    global _configured
    if num_threads is not None:
        torch.set_num_threads(max(1, num_threads))
    if _configured:
        return
    _configured = True
    kept = keep_freed_memory()
    logger.info("CPU runtime: %d torch threads, %s", torch.get_num_threads(),
                "freed memory kept for reuse" if kept else "default allocator settings")

