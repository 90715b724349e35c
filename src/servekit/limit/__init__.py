"""servekit.limit: token-bucket rate limits per key, in memory or in Redis.

Several named limits per key (RPM, TPM, RPD) checked and taken atomically; reserve at admission
and settle on completion; sync ``try_acquire`` and async FIFO ``acquire``; OpenAI's headers.
API keys (:class:`KeyStore`) and per-key RPM/TPM (:class:`KeyLimits`) for the server and the
gateway's edge.
Nothing here imports torch; the Redis store imports ``redis`` only when it is created.
"""

from servekit._deprecation import moved_names
from servekit.limit.bucket import Limit, LimitSet, TokenBucket
from servekit.limit.decision import Decision, LimitStatus, RateLimitExceededError, Reservation

# deprecated alias of RateLimitExceededError, removed in the next release
from servekit.limit.decision import RateLimitExceeded as RateLimitExceeded
from servekit.limit.errors import LimitConfigError, StoreUnavailableError
from servekit.limit.headers import openai_headers
from servekit.limit.keyed import Admission, KeyLimits
from servekit.limit.keys import ApiKey, KeyConfigError, KeyStore
from servekit.limit.limiter import Limiter
from servekit.limit.store import MemoryStore, Store, store_from_url

__all__ = [
    "Admission",
    "ApiKey",
    "Decision",
    "KeyConfigError",
    "KeyLimits",
    "KeyStore",
    "Limit",
    "LimitConfigError",
    "LimitSet",
    "LimitStatus",
    "Limiter",
    "MemoryStore",
    "RateLimitExceededError",
    "RedisStore",
    "Reservation",
    "Store",
    "StoreUnavailableError",
    "TokenBucket",
    "openai_headers",
    "store_from_url",
]


# Names that were exported here before and now live only in their modules: they still resolve,
# with a DeprecationWarning, for one release.
_moved = moved_names(__name__, {
    "Cost": "servekit.limit.limiter",
    "InvalidCostError": "servekit.limit.errors",
    "RequestTooLargeError": "servekit.limit.errors",
    "ReservationError": "servekit.limit.errors",
    "StoreFullError": "servekit.limit.errors",
    "TakeResult": "servekit.limit.store",
    "format_duration": "servekit.limit.headers",
})


def __getattr__(name: str) -> object:
    if name == "RedisStore":  # keep `redis` out of plain imports of servekit.limit
        from servekit.limit.redis import RedisStore

        return RedisStore
    return _moved(name)
