"""Errors the scheduler raises: a full waiting queue, unknown and duplicate request ids."""

from __future__ import annotations

from servekit.errors import ServekitError


class QueueFullError(ServekitError):
    """The waiting queue is over its bound; front ends answer 503 with ``retry_after`` seconds.

    ``limit`` names the bound that was hit: ``"max_waiting_requests"`` or ``"max_waiting_tokens"``.
    """

    def __init__(self, limit: str, message: str, retry_after: float) -> None:
        super().__init__(f"{limit}: {message}")
        self.limit = limit
        self.retry_after = retry_after


#: Deprecated alias of :class:`QueueFullError` (removed in the next release).
QueueFull = QueueFullError


class UnknownRequestError(ServekitError, KeyError):
    """No request with this id was ever added (or it finished too long ago to be remembered)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"unknown request id {request_id!r}")
        self.request_id = request_id

    def __str__(self) -> str:
        return str(self.args[0])


class DuplicateRequestError(ServekitError, ValueError):
    """A request with this id is already waiting or running."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request id {request_id!r} is already in the scheduler")
        self.request_id = request_id


class SchedulerStateError(ServekitError, RuntimeError):
    """The scheduler was driven out of order (e.g. two schedule() calls without an update())."""
