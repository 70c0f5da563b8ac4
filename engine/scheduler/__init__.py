from engine.scheduler.output import SchedulerOutput
from engine.scheduler.scheduler import Scheduler

__all__ = ["Scheduler", "SchedulerOutput"]
