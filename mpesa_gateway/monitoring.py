"""What operators watch: the /health checks and answer, each request's accounting, and
whether the ledger answers.

Owns the health checks (ledger writable, token age, pending and unknown counts, push
slots, the spool, reconciler refusals, webhook backlog; refreshed at most once a second,
since /health may be hit thousands of times a second) with the answer rendered once per
second; the per-request accounting every web layer calls: the request metrics and the
one access line (route template, never the raw callback path; phone masked); and
`LedgerWatch`: an outage of the ledger is one WARNING when it starts and one INFO when
it ends, however many calls fail meanwhile (each counted in /metrics, its traceback at
DEBUG only).
"""

import logging
import threading
import time

import config as settings
import mpesa_ledger as store
import validation
from mpesa_gateway import logs
from mpesa_gateway.wire import Reply, dumps

log = logging.getLogger(__name__)

HEALTH_CHECK_EVERY_S = 1.0
JSON = (("Content-Type", "application/json"),)
# Every method the API serves; metrics and access lines say `other` for any other, so an
# invented method can never add a label value (or megabytes of one).
API_METHODS = frozenset({"GET", "POST"})


class Health:
    """The checks and the rendered answer of one gateway; each replaced whole, so readers
    on other threads never see half of one."""

    def __init__(self, services):
        self._services = services
        self._checks = (float("-inf"), None)  # (checked at, checks)
        self._answer = None  # (second, checks, Reply)

    def checks(self):
        """Ledger writable, token age, pending/unknown counts, push slots, the spool's depth
        and oldest entry, reconciler refusals, webhook backlog; refreshed at most once a
        second."""
        s = self._services
        checked_at, checks = self._checks
        now = s.clock.monotonic()
        if checks is None or now - checked_at >= HEALTH_CHECK_EVERY_S:
            writable = s.ledger.writable()
            if writable:
                s.ledger_watch.answered()
            try:  # a ledger that cannot be written may still be read (SQLite) or not (a
                #     PostgreSQL server that is down): then its counts are unknown
                counts = s.ledger.count_by_status() if writable else None
            except s.ledger.Error:
                counts = None
            age = s.daraja.tokens.age()
            checks = {
                "ledger_writable": writable,
                "token_age_s": None if age is None else round(age, 1),
                "pending": None if counts is None else counts.get(store.PENDING, 0),
                "unknown": None if counts is None else counts.get(store.UNKNOWN, 0),
                "push_slots": s.slots.total,
                "push_slots_in_use": s.slots.in_use(),
                "spool_depth": s.spool.depth(),
                "spool_oldest_s": None if (age := s.spool.oldest_age()) is None
                else round(age, 1),
            }
            if s.reconciler is not None:
                checks["reconcile_query_refusals"] = s.reconciler.refusals
            if s.config.webhook_urls:
                backlog, oldest = s.ledger.outbox_backlog() if counts is not None else (
                    None, None)
                checks["webhook_backlog"] = backlog
                checks["webhook_oldest_s"] = (None if oldest is None
                                              else round(s.clock.wall() - oldest, 1))
            self._checks = (now, checks)
        return checks

    def answer(self):
        """GET /health: the checks and the time to the second, so the answer is the same
        bytes for a whole second: rendered once."""
        checks = self.checks()
        second = int(self._services.clock.wall())
        cached = self._answer
        if cached is None or cached[0] != second or cached[1] is not checks:
            ok = checks["ledger_writable"]
            body = dumps({"status": "ok" if ok else "degraded",
                          "timestamp": store.iso_utc(second),
                          "version": settings.VERSION, "checks": checks})
            cached = self._answer = (second, checks, Reply(200 if ok else 503, body, JSON))
        return cached[2]


def account(registry, method, route, status, elapsed, tx_id=None, phone=None):
    """Metrics and the one access line of a request: route template, never the raw
    callback path; a method the API does not serve is `other`."""
    if method not in API_METHODS:
        method = "other"
    registry.requests.inc(route, method, str(status))
    registry.request_seconds.observe(elapsed, route)
    masked = validation.mask_phone(phone) if phone else "-"
    ms = elapsed * 1000
    logs.access(f"request method={method} route={route} status={status} ms={ms:.1f}"
                f" tx={tx_id or '-'} phone={masked}",
                {"method": method, "route": route, "status": status,
                 "ms": round(ms, 1), "tx": tx_id, "phone": masked})


class LedgerWatch:
    """Whether the ledger answers, told once per change: a WARNING when calls start to
    fail, an INFO when one succeeds again. Every failure is counted by where it happened
    (`observer(where)`, the metrics); its traceback goes to DEBUG."""

    def __init__(self, observer=None, clock=time.monotonic):
        self._observer = observer or (lambda where: None)
        self._clock = clock
        self._lock = threading.Lock()
        self.down_since = None  # monotonic time of the first failure of this outage

    def failed(self, where, exc):
        self._observer(where)
        with self._lock:
            first = self.down_since is None
            if first:
                self.down_since = self._clock()
        if first:
            log.warning("ledger unavailable where=%s error=%s: ledger calls fail (503"
                        " ledger_unavailable; what Daraja does meanwhile goes to the spool)"
                        " until it answers again", where, type(exc).__name__)
        log.debug("ledger call failed where=%s", where, exc_info=exc)

    def answered(self):
        """A ledger call succeeded: the end of an outage, if there was one."""
        if self.down_since is None:  # the usual case: no lock
            return
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is not None:
            log.info("ledger available again after %.1f s", self._clock() - since)


def one_pass(work, ledger, watch, what):
    """Run a background worker's pass (`work()`) so that nothing ends its thread: a ledger
    outage is `watch`'s to tell, once; anything else is logged with its traceback."""
    try:
        work()
    except ledger.Error as exc:
        watch.failed(what, exc)
    except Exception:  # noqa: BLE001 - the loop must outlive one bad pass
        log.exception("%s pass failed", what)
    else:
        watch.answered()
