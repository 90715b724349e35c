"""Continuous-batching scheduling: requests, sampling parameters, the scheduler, policies."""

from servekit.sched.params import InvalidParameterError, SamplingParams

__all__ = ["InvalidParameterError", "SamplingParams"]
