"""The OAuth access token cache: one token per process, fetched by one caller at a time.

Owns when a token is fetched, reused and dropped.  It knows nothing of HTTP: it
calls a `fetch()` function that returns `(access_token, expires_in)`.  Guarded
by a `threading.Lock` with single flight: however many threads find the cache
cold or stale, exactly one calls `fetch()` and the others wait for that same
result (or that same failure), for at most `wait_s` (the longest the fetch can
take under its call policy): a waiter never parks without a bound.  The clock
and the way a waiter parks are injectable for tests.
"""

import threading
import time


class TokenError(Exception):
    """The token endpoint answered something that is not a usable token."""


def expires_in_seconds(value):
    """Daraja's `expires_in`: a number or, usually, a string such as "3599"."""
    if isinstance(value, bool):
        raise TokenError("expires_in is not a number")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise TokenError("expires_in is not a number") from None
    if not 0 < seconds < 10 * 24 * 3600:
        raise TokenError("expires_in is out of range")
    return seconds


class TokenWaitTimeout(TokenError):
    """The fetch this caller waited for did not finish within `wait_s`."""


class _Flight:
    """One fetch in progress; waiters block on `done` and share its result."""

    __slots__ = ("done", "token", "error")

    def __init__(self):
        self.done = threading.Event()
        self.token = None
        self.error = None


def _park(done, timeout):
    return done.wait(timeout)


class TokenCache:
    def __init__(self, fetch, margin_s, clock=time.monotonic, wait_s=None, park=_park):
        self._fetch = fetch
        self._wait_s = wait_s  # None: as long as the fetch takes
        # park(done, timeout): how a caller waits for another's fetch (a seam for tests,
        # which count the callers parked there)
        self._park = park
        self._margin = margin_s
        self._clock = clock
        self._lock = threading.Lock()
        self._token = None
        self._fetched_at = None
        self._refresh_at = 0.0
        self._flight = None

    def get(self):
        """Return a token that is not about to expire, fetching one if needed."""
        with self._lock:
            if self._token is not None and self._clock() < self._refresh_at:
                return self._token
            flight = self._flight
            leader = flight is None
            if leader:
                flight = self._flight = _Flight()
        if not leader:
            # The leader's fetch is bounded by its call policy; so is this wait.
            if not self._park(flight.done, self._wait_s):
                raise TokenWaitTimeout("the token fetch in flight took too long")
            if flight.error is not None:
                raise flight.error
            return flight.token
        try:
            token, expires_in = self._fetch()
            if not isinstance(token, str) or not token:
                raise TokenError("no access_token in the answer")
            ttl = expires_in_seconds(expires_in)
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            now = self._clock()
            with self._lock:
                self._token = token
                self._fetched_at = now
                # Refresh `margin` early; a TTL shorter than the margin is used for half its life.
                self._refresh_at = now + max(ttl - self._margin, ttl / 2)
            flight.token = token
            return token
        finally:
            with self._lock:
                self._flight = None
            flight.done.set()

    def invalidate(self, token):
        """Drop `token` after Daraja called it invalid, unless it was already replaced."""
        with self._lock:
            if token is not None and token == self._token:
                self._token = None
                self._refresh_at = 0.0

    def age(self):
        """Seconds since the cached token was fetched, or None when there is none."""
        with self._lock:
            if self._token is None:
                return None
            return self._clock() - self._fetched_at
