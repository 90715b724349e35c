"""Consistent-hash routing: a weighted hash ring, bounded loads, health and prefix affinity.

Usable on its own (:class:`HashRing` spreads any keys over nodes) and as the multi-replica
gateway's :class:`Router`. Nothing here imports torch.
"""

from servekit.route.bounded import (
    DEFAULT_LOAD_FACTOR,
    bounded_lookup,
    capacity,
    first_under_capacity,
)
from servekit.route.errors import (
    DuplicateNodeError,
    EmptyRingError,
    InvalidRouteParameterError,
    MissingRouteKeyError,
    NoNodeAvailableError,
    RouteError,
    UnknownNodeError,
)
from servekit.route.hashing import HashFn, hash_keys, xxh3_64, xxh64
from servekit.route.health import HealthTracker, NodeHealth
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
from servekit.route.ring import DEFAULT_VNODES, HashRing
from servekit.route.router import KEY_SOURCES, CacheIndex, Route, Router

__all__ = [
    "DEFAULT_LOAD_FACTOR",
    "DEFAULT_VNODES",
    "KEY_SOURCES",
    "CacheIndex",
    "Candidate",
    "Choice",
    "ConsistentHashPolicy",
    "DuplicateNodeError",
    "EmptyRingError",
    "HashFn",
    "HashRing",
    "HealthTracker",
    "InvalidRouteParameterError",
    "LeastLoadedPolicy",
    "MissingRouteKeyError",
    "NoNodeAvailableError",
    "NodeHealth",
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
    "UnknownNodeError",
    "bounded_lookup",
    "capacity",
    "first_under_capacity",
    "hash_keys",
    "make_routing_policy",
    "xxh3_64",
    "xxh64",
]
