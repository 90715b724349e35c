"""The replica proxy's error mapping (no cluster): a replica's own error comes back as itself,
a dead replica or Ray's back-pressure is a 503 with retry-after."""

from __future__ import annotations

from tests._servers import require_module

require_module("ray", "pip install 'servekit[ray]'")

from ray.exceptions import ActorDiedError, RayTaskError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

from servekit.deploy.ray.proxy import _unwrap  # noqa: E402
from servekit.protocol.errors import ServiceUnavailableError  # noqa: E402
from servekit.sched.errors import QueueFullError  # noqa: E402


def test_a_replicas_error_comes_back_as_itself() -> None:
    cause = QueueFullError("max_waiting_requests", "8 requests already wait", retry_after=2.0)
    wrapped = RayTaskError("generate", "Traceback ...", cause)
    assert _unwrap(wrapped) is cause
    assert _unwrap(wrapped.as_instanceof_cause()) is cause


def test_a_dead_replica_is_a_503() -> None:
    err = _unwrap(ActorDiedError())
    assert isinstance(err, ServiceUnavailableError)
    assert err.status == 503 and err.headers["retry-after"] == "1"
    assert b"replica_failed" in err.body()


def test_back_pressure_is_a_503() -> None:
    err = _unwrap(BackPressureError(num_queued_requests=5, max_queued_requests=5))
    assert isinstance(err, ServiceUnavailableError) and err.status == 503


def test_anything_else_passes_through() -> None:
    exc = ValueError("x")
    assert _unwrap(exc) is exc
