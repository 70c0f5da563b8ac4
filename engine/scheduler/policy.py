"""Scheduling policies: the order in which requests are admitted and preempted."""
from __future__ import annotations

from engine.request import Request


class SchedulingPolicy:
    """fcfs: arrival order. Admission takes the front of the waiting queue; preemption takes the
    last entry of the running list (the most recently arrived)."""

    name = "fcfs"

    def sort_key(self, request: Request) -> tuple:
        return (request.arrival_time, request.request_id)

    def waiting_insert_index(self, waiting: list[Request], request: Request) -> int:
        key = self.sort_key(request)
        for i, other in enumerate(waiting):
            if key < self.sort_key(other):
                return i
        return len(waiting)


class PriorityPolicy(SchedulingPolicy):
    """priority: lower ``priority`` value first, ties broken by arrival (stable)."""

    name = "priority"

    def sort_key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time, request.request_id)


def make_policy(name: str) -> SchedulingPolicy:
    if name == "fcfs":
        return SchedulingPolicy()
    if name == "priority":
        return PriorityPolicy()
    raise ValueError(f"unknown scheduling policy {name!r}; use 'fcfs' or 'priority'")
