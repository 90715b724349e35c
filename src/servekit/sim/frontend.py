"""The serving front end's CPU cost, charged against a replica's time.

A server's front end (HTTP parsing, tokenizing, the chat template, detokenizing and writing each
streamed token) runs on the same cores, and in servekit's server the same event loop, as the
engine: its work delays the next engine step. :class:`FrontendCost` models it as
``per_request`` seconds to admit each request and ``per_token`` seconds to stream each output
token, done serially by the replica between its steps (see ``docs/sim.md``), so time to first
token grows with load and capacity saturates at ``1 / (per_request + n · per_token + engine
seconds per request)`` for n output tokens.

:func:`~servekit.sim.steptime.fit_with_frontend` fits both coefficients, jointly with the
step-time profile, from a server's ``step_log`` (``servekit sim profile --step-log``).
"""

from __future__ import annotations

from attrs import frozen

from servekit.sim._check import join, known_keys, number, table

__all__ = ["FrontendCost", "frontend_from"]


@frozen(slots=True)
class FrontendCost:
    """Replica seconds the front end spends per admitted request and per streamed token."""

    per_request: float = 0.0
    per_token: float = 0.0

    def __attrs_post_init__(self) -> None:
        for key in ("per_request", "per_token"):
            number(join("frontend", key), getattr(self, key), minimum=0.0)

    def to_dict(self) -> dict[str, float]:
        """JSON/TOML-ready form (what :func:`frontend_from` reads)."""
        return {"per_request": self.per_request, "per_token": self.per_token}


def frontend_from(spec: object, name: str = "frontend") -> FrontendCost:
    """A :class:`FrontendCost` from its table (``per_request``, ``per_token``; seconds >= 0)."""
    data = table(name, spec)
    known_keys(name, data, {"per_request", "per_token"})
    return FrontendCost(*(number(join(name, k), data.get(k, 0.0), minimum=0.0)
                          for k in ("per_request", "per_token")))
