"""Continuous-batching scheduling: requests, sampling parameters, the scheduler, policies."""

from servekit.sched.errors import (
    DuplicateRequestError,
    QueueFull,
    SchedulerStateError,
    UnknownRequestError,
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
    "QueueFull",
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
