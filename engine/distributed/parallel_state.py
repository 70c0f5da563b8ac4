"""The tensor-parallel group of this process. With one rank every collective is a no-op."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object = None  # a torch.distributed subgroup (a pipeline stage's ranks); None: the whole world

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates each rank's ``x`` along ``dim`` (every rank gets the result)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


_TP = TPGroup()


def set_tp_group(rank: int, size: int, group: object = None) -> None:
    global _TP
    _TP = TPGroup(rank, size, group)


def get_tp_group() -> TPGroup:
    return _TP


# ---- process-group set-up (one process per rank) -----------------------------------------------
DEFAULT_TIMEOUT_S = 120.0  # a collective or the rendezvous waiting longer than this fails


def dist_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("PAGED_ENGINE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))


def create_store(init_method: str, rank: int, world_size: int) -> torch.distributed.Store:
    """The rendezvous store: ``file://PATH`` (ranks on one host: no socket, no port to collide on)
    or ``tcp://HOST:PORT`` (rank 0 listens; PORT 0 binds a free port atomically, read it back
    from ``store.port``). A taken port or an unreachable host raises ``EngineStartupError``."""
    from engine.errors import EngineStartupError

    if init_method.startswith("file://"):
        return torch.distributed.FileStore(init_method[len("file://"):], world_size)
    if not init_method.startswith("tcp://"):
        raise ValueError(f"distributed init method must be file:// or tcp://, got {init_method!r}")
    host, _, port = init_method[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    try:
        if rank != 0:
            return torch.distributed.TCPStore(host, int(port), world_size, False, timeout=dist_timeout())
        # rank 0 listens on its own address only: TCPStore alone would bind every interface
        sock = _listen_socket(host, int(port))
        store = torch.distributed.TCPStore(host, sock.getsockname()[1], world_size, True, timeout=dist_timeout(),
                                           wait_for_workers=False, master_listen_fd=sock.fileno())
        _LISTENING.append(sock)  # the store serves on this fd: keep the socket object alive
        return store
    except (RuntimeError, OSError) as e:  # torch raises DistNetworkError (a RuntimeError)
        what = f"listen on port {port}" if rank == 0 else f"reach rank 0 at {host}:{port}"
        raise EngineStartupError(f"tensor-parallel rank {rank} could not {what}: {e}") from e


_LISTENING: list = []  # rank 0's rendezvous sockets, closed by destroy_distributed


def _listen_socket(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(256)
    except OSError:
        sock.close()
        raise
    return sock


def init_distributed(store: torch.distributed.Store, rank: int, world_size: int, backend: str) -> None:
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=dist_timeout())
    set_tp_group(rank, world_size)


def destroy_distributed() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    set_tp_group(0, 1)
    while _LISTENING:
        _LISTENING.pop().close()
