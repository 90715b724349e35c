"""Consistent-hash routing: a weighted hash ring, bounded loads, health and prefix affinity.

Usable on its own (:class:`HashRing` spreads any keys over nodes) and as the multi-replica
gateway's :class:`Router`. Nothing here imports torch.
"""

from servekit.route.errors import NoNodeAvailableError, RouteError
from servekit.route.health import HealthTracker
from servekit.route.keys import PrefixKey
from servekit.route.policy import (
    ConsistentHashPolicy,
    LeastLoadedPolicy,
    PowerOfTwoChoicesPolicy,
    RoundRobinPolicy,
    RoutingPolicy,
)
from servekit.route.ring import HashRing
from servekit.route.router import Route, Router

__all__ = [
    "ConsistentHashPolicy",
    "HashRing",
    "HealthTracker",
    "LeastLoadedPolicy",
    "NoNodeAvailableError",
    "PowerOfTwoChoicesPolicy",
    "PrefixKey",
    "RoundRobinPolicy",
    "Route",
    "RouteError",
    "Router",
    "RoutingPolicy",
]
