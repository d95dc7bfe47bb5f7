"""Admission of pushes: a token bucket per owner, and the push slots.

Owns the bucket arithmetic and its lock: a bucket holds up to `burst` tokens
and refills at `rate` per second; a request takes one token or is told how long
to wait. The clock is injectable for tests. On SQLite limits are per process;
on PostgreSQL `fleet.SharedRateLimiter` keeps one bucket per owner for every process.

Owns the push slots too: a fixed number of pushes may be at Daraja at once, so
the rest of the server's threads always serve callbacks, reads and health. A
push that finds no free slot is refused at once, never queued.
"""

import threading
import time

# Redeliveries an owner may ask for (POST /events/<id>/redeliver): a burst, then one a
# second, so a script cannot keep the sender busy with one merchant's old events.
REDELIVERIES_PER_S = 1.0
REDELIVERY_BURST = 10


class RateLimiter:
    def __init__(self, rate, burst, clock=time.monotonic, max_keys=None):
        self._rate = float(rate)
        self._burst = float(burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets = {}  # key → (tokens, last refill time)
        # Keyed by something callers choose (a client address): past this many keys, the
        # buckets that have refilled (as good as new) are forgotten.
        self._max_keys = max_keys

    def acquire(self, key):
        """Take one token for `key`: 0.0 if allowed, else seconds until one is free."""
        now = self._clock()
        with self._lock:
            if self._max_keys is not None and len(self._buckets) >= self._max_keys:
                self._buckets = {k: (t, at) for k, (t, at) in self._buckets.items()
                                 if t + (now - at) * self._rate < self._burst}
                if len(self._buckets) >= self._max_keys:  # that many callers at once:
                    self._buckets = {}  # memory stays bounded; the limit starts afresh
            tokens, last = self._buckets.get(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._rate


class PushSlots:
    """At most `total` pushes at once; `try_acquire` never waits."""

    def __init__(self, total):
        self.total = total
        self._lock = threading.Lock()
        self._in_use = 0

    def try_acquire(self):
        with self._lock:
            if self._in_use >= self.total:
                return False
            self._in_use += 1
            return True

    def release(self):
        with self._lock:
            self._in_use -= 1

    def in_use(self):
        with self._lock:
            return self._in_use
