"""A retry budget: retries may add at most ``ratio`` of the recent requests (plus a floor).

So a failing fleet sees at most ``(1 + ratio)`` times its normal traffic from the gateway,
never a retry storm; ``min_retries`` per window keeps a quiet gateway able to retry at all.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable


class RetryBudget:
    """Counts requests and retries over the last ``window`` seconds of ``clock``."""

    def __init__(self, ratio: float = 0.2, min_retries: int = 10, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ratio >= 0 or min_retries < 0 or window <= 0:
            raise ValueError("ratio and min_retries must be >= 0 and window > 0")
        self.ratio, self.min_retries, self.window, self.clock = ratio, min_retries, window, clock
        self._requests: collections.deque[float] = collections.deque()
        self._retries: collections.deque[float] = collections.deque()

    def request(self) -> None:
        """A new request arrived."""
        self._requests.append(self.clock())

    def try_retry(self) -> bool:
        """Spend one retry if the budget allows it."""
        now = self.clock()
        for q in (self._requests, self._retries):
            while q and q[0] <= now - self.window:
                q.popleft()
        if len(self._retries) >= self.min_retries + self.ratio * len(self._requests):
            return False
        self._retries.append(now)
        return True
