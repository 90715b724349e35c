"""Errors raised by :mod:`servekit.route`; each names the node or parameter at fault."""

from __future__ import annotations

from servekit.errors import ServekitError


class RouteError(ServekitError):
    """Base class of every routing error."""


class DuplicateNodeError(RouteError, ValueError):
    """A node was added twice."""

    def __init__(self, node: str) -> None:
        super().__init__(f"node {node!r} is already on the ring")
        self.node = node


class UnknownNodeError(RouteError, KeyError):
    """A node that is not on the ring (or not known to the router) was named."""

    def __init__(self, node: str) -> None:
        super().__init__(f"node {node!r} is not on the ring")
        self.node = node

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class InvalidRouteParameterError(RouteError, ValueError):
    """A parameter is out of range; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class EmptyRingError(RouteError, LookupError):
    """A lookup on a ring with no nodes."""


class NoNodeAvailableError(RouteError, LookupError):
    """Every node is ejected, marked down or otherwise not eligible for this request."""


class MissingRouteKeyError(RouteError, ValueError):
    """A key-based policy was asked to route a request that has no routing key."""
