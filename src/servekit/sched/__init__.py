"""Continuous-batching scheduling: requests, sampling parameters, the scheduler, policies."""

# deprecated alias of QueueFullError, removed in the next release
from servekit.sched.errors import QueueFull as QueueFull
from servekit.sched.errors import QueueFullError
from servekit.sched.output import SchedulerOutput, UpdateResult
from servekit.sched.params import InvalidParameterError, SamplingParams
from servekit.sched.policy import FairSharePolicy, FCFSPolicy, PriorityPolicy, SchedulingPolicy
from servekit.sched.request import FinishReason, Request, RequestStatus
from servekit.sched.scheduler import Scheduler

__all__ = [
    "FCFSPolicy",
    "FairSharePolicy",
    "FinishReason",
    "InvalidParameterError",
    "PriorityPolicy",
    "QueueFullError",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "Scheduler",
    "SchedulerOutput",
    "SchedulingPolicy",
    "UpdateResult",
]
