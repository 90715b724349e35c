"""Continuous-batching scheduling: requests, sampling parameters, the scheduler, policies."""

from servekit.sched.errors import (
    DuplicateRequestError,
    QueueFullError,
    SchedulerStateError,
    UnknownRequestError,
)
from servekit.sched.errors import (
    QueueFull as QueueFull,  # deprecated alias of QueueFullError
)
from servekit.sched.output import SchedulerOutput, UpdateResult
from servekit.sched.params import InvalidParameterError, SamplingParams
from servekit.sched.policy import (
    FairSharePolicy,
    FCFSPolicy,
    PriorityPolicy,
    SchedulingPolicy,
    make_policy,
)
from servekit.sched.request import FinishReason, Request, RequestStatus
from servekit.sched.scheduler import Scheduler

__all__ = [
    "DuplicateRequestError",
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
    "SchedulerStateError",
    "SchedulingPolicy",
    "UnknownRequestError",
    "UpdateResult",
    "make_policy",
]
