"""Leaving no Ray process behind: the executors are shut down at interpreter exit (before Ray's own
exit hook) and on SIGTERM, and when this process started the local Ray cluster, every process of
that cluster is gone afterwards (Ray's dashboard and runtime-env agents can outlive ``ray.shutdown``).
An attached cluster (RAY_ADDRESS, ``ray start``) is left running: only the engine's actors are killed.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from typing import Any, Callable

logger = logging.getLogger(__name__)

_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()  # executors not yet shut down


def _shutdown_all() -> None:
    for ex in list(_LIVE):
        try:
            ex.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway
            logger.debug("executor shutdown at exit failed", exc_info=True)


def track(executor: Any) -> None:
    """Shut ``executor`` down at exit. Registered again on every call so that it runs before the
    exit hook ``ray.init`` registered (atexit runs hooks last-in, first-out)."""
    _LIVE.add(executor)
    atexit.unregister(_shutdown_all)
    atexit.register(_shutdown_all)
    _install_sigterm()


def untrack(executor: Any) -> None:
    _LIVE.discard(executor)


def _on_sigterm(signum: int, frame: Any) -> None:
    # unwinds the main thread (finally blocks, atexit: the executors shut down), exit status 143
    raise SystemExit(128 + signum)


def _install_sigterm() -> None:
    """SIGTERM exits through Python's normal shutdown (status 143) instead of killing the process,
    unless the program handles SIGTERM itself (the server does, through its event loop).

    ``ray.init`` sets a Python handler (``sys.exit``), but Ray's core worker then installs a C-level
    crash handler over it, which makes SIGTERM abort the driver (status -6) with the workers
    still up; setting the Python handler again, after ray.init, replaces that one."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        current = signal.getsignal(signal.SIGTERM)
        ours_to_replace = current in (signal.SIG_DFL, None, _on_sigterm) or \
            str(getattr(current, "__module__", "")).startswith("ray.")
        if ours_to_replace:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        pass


def child_pids() -> set[int]:
    try:
        import psutil
    except ImportError:
        return set()
    try:
        return {c.pid for c in psutil.Process().children(recursive=False)}
    except psutil.Error:
        return set()


def descendants(pids: set[int]) -> list[Any]:
    """The processes ``pids`` and all their descendants (psutil.Process objects), while they live."""
    try:
        import psutil
    except ImportError:
        return []
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.append(p)
            out += p.children(recursive=True)
        except psutil.Error:
            pass
    return out


def reap(procs: list[Any], grace_s: float = 3.0) -> list[int]:
    """Waits up to ``grace_s`` for ``procs`` to exit, then kills the rest; returns the killed pids."""
    if not procs:
        return []
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2.0)
    if alive:
        logger.info("Ray: killed %d leftover process(es) of the local cluster: %s", len(alive),
                    [p.pid for p in alive])
    return [p.pid for p in alive]


def started_cluster(connect: Callable[[], bool]) -> tuple[bool, set[int]]:
    """Runs ``connect`` (ray.init); returns its result and the pids of the processes it started
    (empty when it attached to a running cluster)."""
    before = child_pids()
    owns = connect()
    new = child_pids() - before if owns else set()
    new.discard(os.getpid())
    return owns, new


def wait_gone(pids: set[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    try:
        import psutil
    except ImportError:
        return True
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) for p in pids):
            return True
        time.sleep(0.1)
    return False
