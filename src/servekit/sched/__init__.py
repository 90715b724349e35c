"""Continuous-batching scheduling: requests, sampling parameters, the scheduler, policies."""

# deprecated alias of QueueFullError, removed in the next release
from servekit._deprecation import moved_names
from servekit.sched.errors import QueueFull as QueueFull
from servekit.sched.errors import QueueFullError
from servekit.sched.output import SchedulerOutput, UpdateResult
from servekit.sched.params import GuidedDecoding, InvalidParameterError, SamplingParams
from servekit.sched.policy import FairSharePolicy, FCFSPolicy, PriorityPolicy, SchedulingPolicy
from servekit.sched.request import FinishReason, Request, RequestStatus
from servekit.sched.scheduler import Scheduler

__all__ = [
    "FCFSPolicy",
    "FairSharePolicy",
    "FinishReason",
    "GuidedDecoding",
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


# Names that were exported here before and now live only in their modules: they still resolve,
# with a DeprecationWarning, for one release.
_moved = moved_names(__name__, {
    "DuplicateRequestError": "servekit.sched.errors",
    "SchedulerStateError": "servekit.sched.errors",
    "UnknownRequestError": "servekit.sched.errors",
    "make_policy": "servekit.sched.policy",
})
__getattr__ = _moved
