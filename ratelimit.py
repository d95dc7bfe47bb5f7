"""Per-API-key rate limiting: one token bucket per key, in process memory.

Owns the bucket arithmetic and its lock. A bucket holds up to `burst` tokens
and refills at `rate` per second; a request takes one token or is told how long
to wait. The clock is injectable for tests. Limits are per process: behind
several processes, nginx's `limit_req` is the shared limit.
"""

import threading
import time


class RateLimiter:
    def __init__(self, rate, burst, clock=time.monotonic):
        self._rate = float(rate)
        self._burst = float(burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets = {}  # key → (tokens, last refill time)

    def acquire(self, key):
        """Take one token for `key`: 0.0 if allowed, else seconds until one is free."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._rate
