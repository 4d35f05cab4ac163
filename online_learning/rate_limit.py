"""Per-client token buckets for /v1/feedback, held by the learner so the budget is app-wide.

One bucket per client for the whole application (not per replica: N replicas must not mean N
budgets), plus a slower bucket for failed authentications so a token cannot be guessed at the
request rate. Memory is bounded: past `max_clients` the least recently seen client is forgotten;
a client that keeps sending stays recent, so cycling through fresh keys forgets only idle ones.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict


class TokenBuckets:
    """`rate` requests/s sustained and `burst` at once, per key; LRU-bounded."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000):
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one token for `key`: 0 if allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1
        self._buckets[key] = (tokens - 1 if allowed else tokens, now)  # now the most recent
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return 0.0 if allowed else (1 - tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


class FeedbackLimiter:
    """Every request spends from the client's bucket; a failed authentication also from a slower one."""

    def __init__(self, rate: float, burst: int, auth_fail_rate: float, auth_fail_burst: int,
                 max_clients: int = 10_000):
        self.requests = TokenBuckets(rate, burst, max_clients)
        self.auth_failures = TokenBuckets(auth_fail_rate, auth_fail_burst, max_clients)

    def admit(self, client: str, auth_ok: bool) -> int:
        """0 to go on, else the whole seconds to put in Retry-After (at least 1)."""
        wait = self.requests.take(client)
        if not auth_ok:
            wait = max(wait, self.auth_failures.take(client))
        return 0 if wait == 0 else max(1, math.ceil(wait))
