"""Consistent-hash routing: a weighted hash ring, bounded loads, health and prefix affinity.

Usable on its own (:class:`HashRing` spreads any keys over nodes) and as the multi-replica
gateway's :class:`Router`. Nothing here imports torch.
"""

from servekit._deprecation import moved_names
from servekit.route.cache_aware import CacheAwarePolicy
from servekit.route.errors import NoNodeAvailableError, RouteError
from servekit.route.health import HealthTracker
from servekit.route.keys import PrefixKey
from servekit.route.policy import (
    Candidate,
    Choice,
    ConsistentHashPolicy,
    LeastLoadedPolicy,
    PowerOfTwoChoicesPolicy,
    ReplicaLoad,
    RoundRobinPolicy,
    RouteRequest,
    RoutingPolicy,
    StatelessPolicy,
    make_routing_policy,
)
from servekit.route.ring import HashRing
from servekit.route.router import CacheIndex, Route, Router

__all__ = [
    "CacheAwarePolicy",
    "CacheIndex",
    "Candidate",
    "Choice",
    "ConsistentHashPolicy",
    "HashRing",
    "HealthTracker",
    "LeastLoadedPolicy",
    "NoNodeAvailableError",
    "PowerOfTwoChoicesPolicy",
    "PrefixKey",
    "ReplicaLoad",
    "RoundRobinPolicy",
    "Route",
    "RouteError",
    "RouteRequest",
    "Router",
    "RoutingPolicy",
    "StatelessPolicy",
    "make_routing_policy",
]


# Names that were exported here before and now live only in their modules: they still resolve,
# with a DeprecationWarning, for one release.
_moved = moved_names(__name__, {
    "DEFAULT_LOAD_FACTOR": "servekit.route.bounded",
    "DEFAULT_VNODES": "servekit.route.ring",
    "DuplicateNodeError": "servekit.route.errors",
    "EmptyRingError": "servekit.route.errors",
    "HashFn": "servekit.route.hashing",
    "InvalidRouteParameterError": "servekit.route.errors",
    "KEY_SOURCES": "servekit.route.router",
    "MissingRouteKeyError": "servekit.route.errors",
    "NodeHealth": "servekit.route.health",
    "UnknownNodeError": "servekit.route.errors",
    "bounded_lookup": "servekit.route.bounded",
    "capacity": "servekit.route.bounded",
    "first_under_capacity": "servekit.route.bounded",
    "hash_keys": "servekit.route.hashing",
    "xxh3_64": "servekit.route.hashing",
    "xxh64": "servekit.route.hashing",
})
__getattr__ = _moved
