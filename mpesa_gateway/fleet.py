"""State the fleet shares through the PostgreSQL ledger: one OAuth token, one rate limit.

Owns the two things that must be one for every process on every host once the ledger
is PostgreSQL (on SQLite each process keeps its own, as before):

- `SharedTokens`: the Daraja OAuth token. A process that needs one reads the fleet's;
  if it is missing or due, one process takes a fetch lease, calls Daraja and stores the
  token with its expiry, while the others poll for it (at most one lease). So N
  processes on M hosts make one OAuth call per token lifetime. Each process still keeps
  the token in its own `TokenCache`, so a push does not read the database for it.
- `SharedRateLimiter`: the per-owner token bucket, one `INSERT … ON CONFLICT DO UPDATE …
  RETURNING` per push on the server's clock, so two hosts together allow the configured
  rate, not twice it. A push takes its token inside begin_push's round trip (`bucket`);
  other limited calls (a QR code) take one with `acquire`.
"""

import time

from token_cache import TokenWaitTimeout

POLL_S = 0.05  # how often a process waiting for another's fetch looks again


class SharedTokens:
    def __init__(self, ledger, margin_s, lease_s, *, wait=time.sleep, clock=time.monotonic):
        self._ledger = ledger
        self._margin_s = margin_s
        self._lease_s = lease_s  # the longest one fetch can take (its call policy)
        self._wait, self._clock = wait, clock

    def get(self, fetch):
        """(token, seconds left): the fleet's, or a new one from `fetch()` if this process
        is the one to fetch it. Bounded by one lease, like a process's own fetch: a caller
        fetches only if it can take the lease at once, and otherwise waits for the holder
        at most a lease; if the holder died, the next caller takes over. So the longest
        push (and nginx's and systemd's timeouts, which follow it) are the same as on
        SQLite."""
        deadline = self._clock() + self._lease_s
        first = True
        while True:
            found = self._ledger.fleet_token(self._margin_s)
            if found is not None:
                return found
            if first and self._ledger.take_token_lease(self._lease_s, self._margin_s):
                try:
                    token, expires_in = fetch()
                except BaseException:
                    self._ledger.release_token_lease()  # the next caller tries at once
                    raise
                self._ledger.put_token(token, expires_in)
                return token, expires_in
            first = False
            if self._clock() > deadline:
                raise TokenWaitTimeout("another process's token fetch took too long")
            self._wait(POLL_S)

    def drop(self, token):
        self._ledger.drop_token(token)


class SharedRateLimiter:
    """admission.RateLimiter's interface, with the buckets in the PostgreSQL ledger."""

    def __init__(self, ledger, rate, burst):
        self._ledger, self._rate, self._burst = ledger, float(rate), float(burst)

    in_ledger = True  # a push's token is taken by begin_push, in its own round trip

    def acquire(self, key):
        return self._ledger.take_rate_token(key, self._rate, self._burst)

    def bucket(self, key):
        """begin_push's `rate` argument for `key`."""
        return key, self._rate, self._burst
