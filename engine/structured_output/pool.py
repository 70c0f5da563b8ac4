"""A small pool of daemon threads for grammar compiles.

Not concurrent.futures.ThreadPoolExecutor: its threads are joined at interpreter exit, so one
pathological compile would hang shutdown. A compile that outlives the timeout is abandoned: its
thread is written off and a fresh one takes its place, so the other compiles keep flowing.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class CompilePool:
    def __init__(self, num_threads: int, name: str = "grammar-compile") -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._count = 0
        self._lock = threading.Lock()
        self._stopped = False
        for _ in range(num_threads):
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            self._count += 1
            t = threading.Thread(target=self._work, name=f"{self._name}-{self._count}", daemon=True)
        t.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                fut.set_exception(e)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        if self._stopped:
            fut.set_exception(RuntimeError("the grammar compile pool is shut down"))
        else:
            self._queue.put((fut, fn, args))
        return fut

    def replace_stuck_thread(self) -> None:
        """A compile ran past its limit: its thread is left to finish alone; add a fresh one."""
        if not self._stopped:
            self._spawn()

    def shutdown(self) -> None:
        self._stopped = True
        for _ in range(self._count):
            self._queue.put(None)
