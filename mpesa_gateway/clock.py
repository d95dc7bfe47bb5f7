"""Time for the whole app, in one injectable object.

Owns the two clocks the gateway reads: `wall()` (epoch seconds: ledger stamps,
reconciliation schedules) and `monotonic()` (token expiry, rate limits, health
caching).  `build_services` hands one clock to every part, so a test moves time
for all of them at once instead of swapping private attributes.
"""

import time


class SystemClock:
    """The real clocks."""

    @staticmethod
    def wall():
        return time.time()

    @staticmethod
    def monotonic():
        return time.monotonic()
