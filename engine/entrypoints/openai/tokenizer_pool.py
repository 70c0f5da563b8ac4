"""Tokenizer work off the event loop, on threads sized to the machine, in two lanes.

HF fast tokenizers must not be used from two threads at once, so every thread works on its own
copy (``PerThreadTokenizer``). Work is routed by size: inputs of more than ``long_input`` units
(characters or token ids) go to the long lane, everything else to the short lane, so a 2 MB prompt
or a huge /detokenize call waits behind other long inputs, never in front of short prompts.
"""
from __future__ import annotations

import asyncio
import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

LONG_INPUT = 32768  # characters or token ids
# CPU priority (nice) of the lanes' threads: tokenizing a huge input must not take the cores from
# the engine's step, which every stream waits on (Linux threads take their own nice value)
SHORT_NICE, LONG_NICE = 2, 10


def _lower_priority(nice: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the normal priority
        pass


class PerThreadTokenizer:
    """A tokenizer that is a separate copy of ``base`` on every thread that uses it. ``base`` is
    copied at once (call this before another thread uses it, e.g. before the engine starts); the
    copies are made from that private copy, which nothing else touches."""

    def __init__(self, base: Any) -> None:
        object.__setattr__(self, "_base", copy.deepcopy(base))
        object.__setattr__(self, "_local", threading.local())
        object.__setattr__(self, "_copy_lock", threading.Lock())

    def current(self) -> Any:
        tok = getattr(self._local, "tok", None)
        if tok is None:
            with self._copy_lock:  # deepcopy reads the base: one copy at a time
                tok = copy.deepcopy(self._base)
            self._local.tok = tok
        return tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current(), name)

    def __len__(self) -> int:
        return len(self.current())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)


def default_num_threads() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(2, min(cpus, 16))


@dataclass
class TokenizerPool:
    """The short and long lanes. ``num_threads`` is split between them (at least one each)."""

    num_threads: int = 0
    long_input: int = LONG_INPUT

    def __post_init__(self) -> None:
        n = self.num_threads or default_num_threads()
        long_threads = max(1, n // 2)
        self.short = ThreadPoolExecutor(max(1, n - long_threads), thread_name_prefix="tokenize",
                                        initializer=_lower_priority, initargs=(SHORT_NICE,))
        self.long = ThreadPoolExecutor(long_threads, thread_name_prefix="tokenize-long",
                                       initializer=_lower_priority, initargs=(LONG_NICE,))

    async def run(self, fn: Callable[..., Any], *args: Any, size: int = 0) -> Any:
        lane = self.long if size > self.long_input else self.short
        return await asyncio.get_running_loop().run_in_executor(lane, fn, *args)

    def warm_up(self, tokenizer: PerThreadTokenizer, timeout: float = 120.0) -> None:
        """Starts every thread and makes its tokenizer copy now: a copy holds the GIL for a few
        hundred ms, which on a first request would stall the event loop (and every stream)."""
        for lane in (self.short, self.long):
            n = lane._max_workers
            barrier = threading.Barrier(n, timeout=timeout)  # n tasks at once: n distinct threads

            def copy_here() -> None:
                tokenizer.current()
                barrier.wait()

            for fut in [lane.submit(copy_here) for _ in range(n)]:
                fut.result(timeout)

    def shutdown(self) -> None:
        for lane in (self.short, self.long):
            lane.shutdown(wait=False, cancel_futures=True)


_POOL: TokenizerPool | None = None
_POOL_LOCK = threading.Lock()


def shared_pool() -> TokenizerPool:
    """The process's pool (every serving shares it)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = TokenizerPool()
        return _POOL
