"""The working state of one ``Scheduler.schedule()`` call, and how a waiting request may start."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from engine.block_manager.kv_cache_manager import KVBlock
from engine.request import Request


@dataclass
class StepState:
    """What one schedule() call has decided so far."""

    budget: int
    decodes: list[tuple[Request, int]] = field(default_factory=list)
    prefills: list[tuple[Request, int]] = field(default_factory=list)
    scheduled: set[str] = field(default_factory=set)
    preempted: list[Request] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    growth_preempted: bool = False


class AdmissionKind(str, Enum):
    """How a waiting request starts running."""

    NEW = "new"  # an ordinary start (or restart after recompute), with a prefix-cache lookup
    FORK = "fork"  # share computed blocks: an n > 1 sibling's prompt, or a finished beam's tokens
    SWAP_IN = "swap_in"  # copy its swapped-out blocks back from host memory


@dataclass
class Admission:
    """A plan to start a waiting request this step."""

    kind: AdmissionKind
    num_new: int
    need: int  # free blocks it consumes
    computed: list[KVBlock] = field(default_factory=list)
    source: Request | None = None
    num_shared: int = 0  # FORK: how many of the source's computed tokens it shares
