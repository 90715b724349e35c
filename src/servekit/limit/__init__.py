"""servekit.limit: token-bucket rate limits per key, in memory or in Redis.

Several named limits per key (RPM, TPM, RPD) checked and taken atomically; reserve at admission
and settle on completion; sync ``try_acquire`` and async FIFO ``acquire``; OpenAI's headers.
Nothing here imports torch; the Redis store imports ``redis`` only when it is created.
"""

from servekit.limit.bucket import Limit, LimitSet, TokenBucket
from servekit.limit.decision import Decision, LimitStatus, Reservation
from servekit.limit.errors import (
    InvalidCostError,
    LimitConfigError,
    RateLimitExceeded,
    RequestTooLargeError,
    ReservationError,
    StoreFullError,
    StoreUnavailableError,
)
from servekit.limit.headers import format_duration, openai_headers
from servekit.limit.limiter import Cost, Limiter
from servekit.limit.store import MemoryStore, Store, TakeResult, store_from_url

__all__ = [
    "Cost",
    "Decision",
    "InvalidCostError",
    "Limit",
    "LimitConfigError",
    "LimitSet",
    "LimitStatus",
    "Limiter",
    "MemoryStore",
    "RateLimitExceeded",
    "RedisStore",
    "RequestTooLargeError",
    "Reservation",
    "ReservationError",
    "Store",
    "StoreFullError",
    "StoreUnavailableError",
    "TakeResult",
    "TokenBucket",
    "format_duration",
    "openai_headers",
    "store_from_url",
]


def __getattr__(name: str) -> object:
    if name == "RedisStore":  # keep `redis` out of plain imports of servekit.limit
        from servekit.limit.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module 'servekit.limit' has no attribute {name!r}")
