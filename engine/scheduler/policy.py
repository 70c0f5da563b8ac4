"""Scheduling policies: the order in which requests are served and who may displace whom.

The scheduler asks its policy three things and never which policy it is:

* :meth:`SchedulingPolicy.sort_key`: the order of the waiting queue and of the running list;
* :meth:`SchedulingPolicy.step_order`: the order one step visits running and waiting requests in;
* :meth:`SchedulingPolicy.may_displace`: whether a request being admitted may preempt a running one
  (for KV blocks or a ``max_num_seqs`` slot).

:data:`POLICIES` is the one registry of policy names; ``EngineArgs`` validates against it.
"""
from __future__ import annotations

import heapq
from abc import ABC, abstractmethod

from engine.request import Request


class SchedulingPolicy(ABC):
    """The interface the scheduler relies on."""

    name: str = "base"

    @abstractmethod
    def sort_key(self, request: Request) -> tuple:
        """Requests are kept (waiting and running alike) in ascending order of this key."""

    def waiting_insert_index(self, waiting: list[Request], request: Request) -> int:
        """Where ``request`` goes in ``waiting``: after every entry whose key is not larger (stable)."""
        key = self.sort_key(request)
        for i, other in enumerate(waiting):
            if key < self.sort_key(other):
                return i
        return len(waiting)

    @abstractmethod
    def step_order(self, running: list[Request], waiting: list[Request]) -> list[Request]:
        """The order one scheduling step serves requests in (both lists are in policy order)."""

    @abstractmethod
    def may_displace(self, incoming: Request, running: Request) -> bool:
        """Whether ``incoming``, being admitted, may preempt ``running``.

        Must be monotone along the running list: the scheduler scans it from the back (the last in
        policy order) and stops at the first request this refuses."""


class FcfsPolicy(SchedulingPolicy):
    """fcfs: arrival order. Running requests are served first, then waiting ones; an arrival never
    preempts a running request (only growth of running requests does, from the back)."""

    name = "fcfs"

    def sort_key(self, request: Request) -> tuple:
        return (request.arrival_time, request.request_id)

    def step_order(self, running: list[Request], waiting: list[Request]) -> list[Request]:
        return running + waiting

    def may_displace(self, incoming: Request, running: Request) -> bool:
        return False


class PriorityPolicy(FcfsPolicy):
    """priority: lower ``priority`` value first, ties broken by arrival (stable). Running and
    waiting requests are served in one merged order, and an arrival may preempt running requests
    of strictly lower priority (a larger value)."""

    name = "priority"

    def sort_key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time, request.request_id)

    def step_order(self, running: list[Request], waiting: list[Request]) -> list[Request]:
        return list(heapq.merge(running, waiting, key=self.sort_key))

    def may_displace(self, incoming: Request, running: Request) -> bool:
        return running.priority > incoming.priority


POLICIES: dict[str, type[SchedulingPolicy]] = {
    FcfsPolicy.name: FcfsPolicy,
    PriorityPolicy.name: PriorityPolicy,
}


def policy_names() -> list[str]:
    """The registered policy names, in registration order."""
    return list(POLICIES)


def make_policy(name: str) -> SchedulingPolicy:
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduling policy {name!r}; use {' or '.join(map(repr, POLICIES))}")
    return cls()
