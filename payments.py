"""The payment flows, and the services they run over.

Owns `Services` (config, ledger, Daraja client, metrics, rate limiter,
reconciler and clock, built once by `build_services`) and the flows every web
layer calls: start a payment, read one, list them, receive a callback, health,
metrics, and the per-request accounting (metrics and the one access line).
Flows take plain values and return `(status, body[, headers])`; anything else is
raised as an `errors.ApiError`.  The raw WSGI app and the Flask and Falcon
versions in bench/ call the same flows over the same `Services`, so only
routing, parsing and rendering differ between them.

The order of a payment is the promise: the row is committed before Daraja is
called, and once a prompt may have been sent no path answers 500: the merchant
gets `202` with the transaction id and the status as far as it is known.
"""

import atexit
import functools
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass

import config as settings
import daraja
import fleet
import ledger as store
import logs
import metrics
import ratelimit
import reconciler
import settlement
import sources
import validation
import webhooks
from clock import SystemClock
import resources
from resources import transaction_resource
from errors import (
    BadRequest, Conflict, Forbidden, NotFound, ServiceUnavailable, TooManyRequests, Unauthorized,
    Unprocessable, UpstreamRejected, retry_after,
)

log = logging.getLogger(__name__)

CALLBACK_ACK = {"ResultCode": 0, "ResultDesc": "Accepted"}
SIGNATURE_HEX_CHARS = 32
RETRY_AFTER_BUSY_S = 60  # Daraja: wait at least a minute after "unable to lock subscriber"
RETRY_AFTER_UNAVAILABLE_S = 30
MAX_ID_LENGTH = 64
MAX_IDEMPOTENCY_KEY = 255
HEALTH_CHECK_EVERY_S = 1.0  # /health may be hit thousands of times a second; write once a second
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")
REPLAYED = [("Idempotent-Replayed", "true")]
RETRY_AFTER_GATEWAY_BUSY_S = 1
# Every method the API serves; metrics and access lines say `other` for any other, so an
# invented method can never add a label value (or megabytes of one).
API_METHODS = frozenset({"GET", "POST"})


# --- pure helpers ---------------------------------------------------------------


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def decode_json(raw):
    """Strict UTF-8 JSON (no NaN/Infinity); any failure is 400 invalid_json."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("the body is not valid UTF-8 JSON", code="invalid_json") from None


def dumps(body):
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Caller:
    """Who is calling: the owner name of their API key, or an operator (admin) key."""

    owner: str | None  # None for an admin key
    admin: bool = False

    def sees(self, row):
        """A row is the caller's if their name made it; rows from before owners existed
        belong to `default`. Admin keys see every row."""
        if self.admin:
            return True
        return (row.get("owner") or settings.DEFAULT_OWNER) == self.owner


def _legacy_scope(api_key):
    """How idempotency keys were scoped before owner names: a hash of the API key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def bearer_token(authorization):
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    scheme, _, presented = (authorization or "").partition(" ")
    return presented.strip() if scheme.lower() == "bearer" else None


def authenticate(authorization, config):
    """Return the Caller of an Authorization header value; 401 unless a key matches,
    compared in constant time."""
    token = bearer_token(authorization)
    presented = (token or "").encode()
    matched = None
    for name, key in config.api_keys:
        # Compare against every key, so timing does not tell which one nearly matched.
        if hmac.compare_digest(presented, key.encode()):
            matched = Caller(name)
    for key in config.admin_keys:
        if hmac.compare_digest(presented, key.encode()):
            matched = Caller(None, admin=True)
    if matched is None or token is None:
        raise Unauthorized(headers=[("WWW-Authenticate", 'Bearer realm="mpesa-wsgi"')])
    return matched


def idempotency_for(key, scope, push):
    """The request's Idempotency-Key (None if absent), bound to its owner and content."""
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII"
                         " characters", code="invalid_idempotency_key")
    canonical = json.dumps([push.phone, push.amount, push.reference, push.description])
    return store.Idempotency(scope, key, hashlib.sha256(canonical.encode()).hexdigest())


def callback_signature(secret, tx_id):
    """The path secret that proves a callback URL was made by this gateway."""
    digest = hmac.new(secret.encode(), tx_id.encode(), hashlib.sha256).hexdigest()
    return digest[:SIGNATURE_HEX_CHARS]


# --- the services -------------------------------------------------------------------


class Services:
    """Everything the flows need, built once by `build_services` and passed in."""

    def __init__(self, config, ledger, client, metrics_registry, *, reconcile=None,
                 clock=None, slots=None, sender=None, outbox=None, limiter=None):
        self.config = config
        self.outbox = outbox or webhooks.Outbox(config)
        self.sender = sender
        self.ledger = ledger
        self.daraja = client
        self.metrics = metrics_registry
        self.clock = clock or SystemClock()
        self.limiter = limiter or ratelimit.RateLimiter(config.rate, config.burst,
                                                        clock=self.clock.monotonic)
        self.slots = slots or ratelimit.PushSlots(config.push_slots)
        self.reconciler = reconcile
        with open(OPENAPI_PATH, "rb") as f:
            self.openapi = f.read()
        self._secret = config.secret
        self._health = (float("-inf"), None)  # (checked at, checks): shared, replaced whole
        self.health_answer = None  # (second, checks, status, body): replaced whole

    def callback_url(self, tx_id):
        return (f"{self.config.callback_base_url}/callback/{tx_id}/"
                f"{callback_signature(self._secret, tx_id)}")

    def signature_ok(self, tx_id, sig):
        expected = callback_signature(self._secret, tx_id)
        return hmac.compare_digest(sig.encode(), expected.encode())

    def account(self, method, route, status, elapsed, tx_id=None, phone=None):
        """Metrics and the one access line: route template, never the raw callback path;
        a method the API does not serve is `other`."""
        if method not in API_METHODS:
            method = "other"
        self.metrics.requests.inc(route, method, str(status))
        self.metrics.request_seconds.observe(elapsed, route)
        masked = validation.mask_phone(phone) if phone else "-"
        ms = elapsed * 1000
        logs.access(f"request method={method} route={route} status={status} ms={ms:.1f}"
                    f" tx={tx_id or '-'} phone={masked}",
                    {"method": method, "route": route, "status": status,
                     "ms": round(ms, 1), "tx": tx_id, "phone": masked})

    def health_checks(self):
        """Ledger writable, token age, pending/unknown counts, push slots, reconciler
        refusals; refreshed at most once a second."""
        checked_at, checks = self._health
        now = self.clock.monotonic()
        if checks is None or now - checked_at >= HEALTH_CHECK_EVERY_S:
            writable = self.ledger.writable()
            try:  # a ledger that cannot be written may still be read (SQLite) or not (a
                #     PostgreSQL server that is down): then its counts are unknown
                counts = self.ledger.count_by_status() if writable else None
            except self.ledger.Error:
                counts = None
            age = self.daraja.tokens.age()
            checks = {
                "ledger_writable": writable,
                "token_age_s": None if age is None else round(age, 1),
                "pending": None if counts is None else counts.get(store.PENDING, 0),
                "unknown": None if counts is None else counts.get(store.UNKNOWN, 0),
                "push_slots": self.slots.total,
                "push_slots_in_use": self.slots.in_use(),
            }
            if self.reconciler is not None:
                checks["reconcile_query_refusals"] = self.reconciler.refusals
            if self.config.webhook_urls:
                backlog, oldest = self.ledger.outbox_backlog() if counts is not None else (
                    None, None)
                checks["webhook_backlog"] = backlog
                checks["webhook_oldest_s"] = (None if oldest is None
                                              else round(self.clock.wall() - oldest, 1))
            self._health = (now, checks)
        return checks

    def close_background(self):
        """Stop the reconciler and the webhook sender, letting the current query and the
        current delivery finish (each bounded)."""
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.sender is not None:
            self.sender.stop()

    def close(self):
        self.close_background()
        atexit.unregister(self.close_background)
        self.ledger.close()
        self.daraja.close()


def build_services(config=None, *, clock=None):
    """Build the services once: config (from the environment unless given), ledger, Daraja
    client, metrics, limiter and, if configured, the reconciler thread."""
    if config is None:
        config = settings.load_config(os.environ)
    clock = clock or SystemClock()
    # Pooled (PostgreSQL) to one connection per server thread and background worker.
    ledger = store.open_ledger(config.db_path, clock=clock.wall,
                               pool_size=config.threads + 4, wait_s=config.db_wait_s)

    def by_status():  # at scrape time; no series while the ledger cannot be read
        try:
            counts = ledger.count_by_status()
        except ledger.Error:
            return {}
        counts.setdefault(store.PENDING, 0)  # the series a dashboard watches, even at 0
        return {(status,): n for status, n in counts.items()}

    def oldest_undelivered_s():
        try:
            _, oldest = ledger.outbox_backlog()
        except ledger.Error:
            return None
        return 0.0 if oldest is None else max(0.0, clock.wall() - oldest)

    slots = ratelimit.PushSlots(config.push_slots)
    registry = metrics.GatewayMetrics(settings.VERSION, by_status, slots, oldest_undelivered_s,
                                      commit_counts=lambda: ledger.commit_counts)
    shared_tokens = limiter = None
    if ledger.FLEET:  # PostgreSQL: one token and one rate limit for every process and host
        oauth_s = daraja.call_policies(config)["oauth"].longest_s
        shared_tokens = fleet.SharedTokens(ledger, config.token_margin_s, oauth_s)
        limiter = fleet.SharedRateLimiter(ledger, config.rate, config.burst)
    client = daraja.DarajaClient(config, daraja.build_pool(config), clock=clock.monotonic,
                                 observer=registry.daraja_call, shared_tokens=shared_tokens)
    outbox = webhooks.Outbox(config)  # one, for pushes, callbacks and the reconciler alike
    # A row still `submitting` after the longest a push can take was cut off mid-push.
    ledger.recover_interrupted(client.longest_push_s, event=outbox.event_for)
    for name, key in config.api_keys:  # keys stored before owner names: keep them findable
        ledger.rename_scope(_legacy_scope(key), name)
    bare = sum(1 for name, _ in config.api_keys if name == settings.DEFAULT_OWNER)
    if bare > 1:
        log.warning("GATEWAY_API_KEYS has %d keys named default: they share their payments,"
                    " rate limit and idempotency keys; name each merchant's (name:KEY)", bare)
    background = sender = None
    if config.reconcile:
        background = reconciler.Reconciler(ledger, client, config, clock=clock.wall,
                                           observer=registry.reconcile.inc,
                                           on_refusal=registry.reconcile_refusals.inc,
                                           events=outbox.event_for)
        background.start()
    if config.webhook_urls and config.webhook_sender:
        sender = webhooks.Sender(ledger, config, clock=clock.wall,
                                 observer=registry.webhook_deliveries.inc)
        sender.start()
    services = Services(config, ledger, client, registry, reconcile=background, clock=clock,
                        slots=slots, sender=sender, outbox=outbox, limiter=limiter)
    # Under waitress-serve --call or gunicorn nobody calls close(): stop the reconciler
    # (its current query finishes) when the process exits.
    atexit.register(services.close_background)
    return services


# --- flows: plain values in, (status, body[, headers]) out, errors raised. `note` is where
#     a flow leaves what the access log should say (tx_id, phone). ------------------------


JSON = [("Content-Type", "application/json")]


def health_status(services):
    """GET /health: the checks (refreshed at most once a second) and the time to the
    second, so the rendered answer is the same bytes for a whole second: made once."""
    checks = services.health_checks()
    second = int(services.clock.wall())
    cached = services.health_answer
    if cached is None or cached[0] != second or cached[1] is not checks:
        ok = checks["ledger_writable"]
        body = dumps({"status": "ok" if ok else "degraded",
                      "timestamp": store.iso_utc(second),
                      "version": settings.VERSION, "checks": checks})
        cached = services.health_answer = (second, checks, 200 if ok else 503, body)
    return cached[2], cached[3], JSON


def metrics_text(services, authorization):
    token = services.config.metrics_token
    if token is not None:
        presented = bearer_token(authorization)
        if presented is None or not hmac.compare_digest(presented.encode(), token.encode()):
            raise Unauthorized("GET /metrics needs 'Authorization: Bearer <GATEWAY_METRICS_TOKEN>'",
                               headers=[("WWW-Authenticate", 'Bearer realm="metrics"')])
    return 200, services.metrics.render().encode(), [("Content-Type", metrics.CONTENT_TYPE)]


def ledger_unavailable(message):
    """The 503 for a ledger that cannot be read or written, with Retry-After."""
    return ServiceUnavailable(message, code="ledger_unavailable",
                              headers=retry_after(RETRY_AFTER_UNAVAILABLE_S))


def ledger_read(flow):
    """A flow that reads the ledger: a ledger that cannot be reached (a PostgreSQL server
    that is down) is 503 ledger_unavailable with Retry-After, never a 500."""
    @functools.wraps(flow)
    def guarded(services, *args):
        try:
            return flow(services, *args)
        except services.ledger.Error:
            log.exception("ledger unavailable route_flow=%s", flow.__name__)
            raise ledger_unavailable("the ledger cannot be reached; retry shortly") from None
    return guarded


@ledger_read
def transactions_page(services, authorization, query_string):
    caller = authenticate(authorization, services.config)
    try:
        query = validation.parse_list_query(query_string)
    except validation.ValidationError as exc:
        raise BadRequest(exc.message, code=exc.code, field=exc.field) from None
    owner = None if caller.admin else caller.owner
    rows, more = services.ledger.list_page(
        status=query.status, since=query.since, after=query.after, limit=query.limit,
        owner=owner, with_unowned=owner == settings.DEFAULT_OWNER)
    cursor = validation.encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
    return 200, {"data": [transaction_resource(r) for r in rows], "next_cursor": cursor}


def start_payment(services, note, authorization, load_body, idempotency_key):
    """POST /stkpush: `load_body()` returns the decoded JSON body (or raises 413/415/400)."""
    cfg = services.config
    caller = authenticate(authorization, cfg)
    if caller.admin:
        raise Forbidden("admin keys read payments; start one with a merchant key",
                        code="admin_key")
    if not services.slots.try_acquire():
        # Refused at once, like 429: nothing sent, no row, no key. The reserve threads stay
        # free for callbacks, reads and health.
        services.metrics.busy.inc()
        raise ServiceUnavailable("every push slot is taken; retry in a second; nothing was"
                                 " sent", code="gateway_busy",
                                 headers=retry_after(RETRY_AFTER_GATEWAY_BUSY_S))
    try:
        return _start_payment(services, note, caller, load_body, idempotency_key)
    finally:
        services.slots.release()


def _start_payment(services, note, caller, load_body, idempotency_key):
    cfg = services.config
    try:
        wait = services.limiter.acquire(caller.owner)  # before idempotency, as Stripe does
    except services.ledger.Error:  # the fleet's buckets live in the ledger
        log.exception("ledger read failed for the rate limit")
        raise ledger_unavailable("the ledger cannot be reached; nothing was sent") from None
    if wait:
        raise TooManyRequests(f"at most {cfg.rate:g} payments per second per API key name",
                              headers=retry_after(wait))
    try:
        push = validation.validate_push(load_body(), cfg.max_amount,
                                        cfg.default_reference, cfg.default_description)
    except validation.ValidationError as exc:
        raise BadRequest(exc.message, code=exc.code, field=exc.field) from None
    note.phone = push.phone
    idem = idempotency_for(idempotency_key, caller.owner, push)  # never for a 400
    try:
        # Committed before Daraja is called: a crash from here on leaves a trace.
        begun = services.ledger.begin_push(
            phone=push.phone, amount=push.amount, reference=push.reference,
            description=push.description, idempotency=idem, phone_lock_s=cfg.phone_lock_s,
            owner=caller.owner)
    except services.ledger.Error:
        log.exception("ledger write failed before push")
        raise ledger_unavailable("the ledger cannot be written; nothing was sent") from None
    if begun.kind != "new":
        return answer_without_push(note, begun, caller)
    row = begun.row
    note.tx_id = row["id"]
    try:
        accepted = services.daraja.stk_push(
            phone=push.phone, amount=push.amount, reference=push.reference,
            description=push.description, callback_url=services.callback_url(row["id"]))
    except daraja.DarajaError as exc:
        return push_not_accepted(services, row, exc, idem)
    except Exception:  # noqa: BLE001 - a bug after the row: the push may have gone out
        log.exception("push failed unexpectedly tx=%s", row["id"])
        return push_not_accepted(
            services, row, daraja.DarajaError("stk_push", daraja.UNKNOWN, "internal_error"), idem)
    try:
        row = record_outcome(services.ledger, row["id"], idem, lambda pin: (
            services.ledger.mark_accepted(row["id"], accepted.checkout_request_id,
                                          accepted.merchant_request_id, pin=pin)))
    except Exception:  # noqa: BLE001 - the prompt is out: never a 500 from here on
        # The row stays `submitting`, so recovery makes it `unknown` and its signed callback
        # URL still finds it; a retry with the key finds the row itself. Tell the merchant
        # what we know.
        log.exception("ledger write failed after push tx=%s", row["id"])
        row = dict(row, status=store.PENDING, checkout_request_id=accepted.checkout_request_id,
                   merchant_request_id=accepted.merchant_request_id)
    return 202, transaction_resource(row)


LEDGER_RETRIES_S = (0.05, 0.25)  # a lock that outlasted the busy timeout rarely lasts longer


def with_retries(ledger, write):
    """Run a ledger write that must not be lost (a push has been answered), retrying a
    failure twice; the last failure is raised."""
    for pause in LEDGER_RETRIES_S:
        try:
            return write()
        except ledger.Error:
            log.warning("ledger write failed; retrying in %.2f s", pause)
            time.sleep(pause)
    return write()


def record_outcome(ledger, tx_id, idem, write):
    """`write(pin)` records a push's outcome; with a key, the 202 answer (made from the row
    as that write leaves it) is stored in the same commit. If that fails, the outcome
    alone: a retry with the key then finds the row itself."""
    if idem is not None:
        pin = (idem, lambda row: (202, dumps(transaction_resource(row))))
        try:
            return with_retries(ledger, lambda: write(pin))
        except Exception:  # noqa: BLE001 - the outcome still has to be recorded
            log.exception("ledger write failed storing the idempotent answer tx=%s", tx_id)
    return with_retries(ledger, lambda: write(None))


def answer_without_push(note, begun, caller):
    """The ledger decided no new push is needed: replay, conflict, or phone lock."""
    if begun.kind == "reused":
        raise Unprocessable("this Idempotency-Key was used with a different request",
                            code="idempotency_key_reused")
    if begun.kind == "phone_busy":
        # The lock spans every owner (it protects the customer); the id is named only to
        # the merchant who owns it.
        which = f"transaction {begun.row['id']}" if caller.sees(begun.row) else "a payment"
        raise Conflict(f"{which} for this phone may still have a prompt open; wait for its"
                       " result", code="payment_in_progress")
    note.tx_id = begun.row["id"]
    if begun.kind == "replay":
        return begun.status_code, json.loads(begun.body), REPLAYED
    if begun.row["status"] == store.SUBMITTING:  # in flight: the first request is still at Daraja
        raise Conflict("a request with this Idempotency-Key is still in progress; retry shortly",
                       code="idempotency_key_in_use", headers=retry_after(1))
    # In flight on paper, but its row moved on (its answer was never pinned): say so.
    return 202, transaction_resource(begun.row), REPLAYED


def push_not_accepted(services, row, exc, idem):
    """Record a push Daraja did not accept, then answer per SPEC §2 outcomes."""
    ledger = services.ledger
    if exc.outcome == daraja.UNKNOWN:
        # It may have reached the customer: never resend; the callback or a query settles it.
        try:
            row = record_outcome(ledger, row["id"], idem, lambda pin: ledger.mark_not_accepted(
                row["id"], store.UNKNOWN, exc.reason, event=services.outbox.event_for, pin=pin))
        except Exception:  # noqa: BLE001 - it may have reached the customer: never a 500
            # Still `submitting` in the ledger, so recovery makes it `unknown` too.
            log.exception("ledger write failed after an unanswered push tx=%s", row["id"])
            row = dict(row, status=store.UNKNOWN, reason=exc.reason)
        return 202, transaction_resource(row)
    # Nothing reached the customer: the idempotency key is released with the row's update,
    # so the merchant may retry with the same key.
    if exc.outcome == daraja.REJECTED and exc.subscriber_locked:
        _refused(ledger, row, "subscriber_busy", exc, idem)
        raise Conflict(f"the customer has another M-Pesa prompt open; transaction {row['id']}"
                       " was not sent", code="subscriber_busy",
                       headers=retry_after(RETRY_AFTER_BUSY_S))
    if exc.outcome == daraja.REJECTED and exc.reason == "wrong_base_url":
        _refused(ledger, row, "daraja_rejected", exc, idem)
        raise UpstreamRejected("Daraja's address answered with an HTML page, not the STK"
                               " service: the base URL (MPESA_BASE_URL or MPESA_ENVIRONMENT)"
                               f" looks wrong; transaction {row['id']} is rejected")
    if exc.outcome == daraja.REJECTED:
        _refused(ledger, row, "daraja_rejected", exc, idem)
        raise UpstreamRejected(f"Daraja refused the request ({exc.error_code}); transaction"
                               f" {row['id']} is rejected")
    _refused(ledger, row, "upstream_unavailable", exc, idem)
    raise ServiceUnavailable(f"Daraja is unavailable ({exc.reason}); transaction {row['id']}"
                             " was not sent", headers=retry_after(RETRY_AFTER_UNAVAILABLE_S))


def _refused(ledger, row, reason, exc, idem):
    """Mark a push that reached no customer `rejected` and free its key, in one commit.

    If the ledger cannot record it even after retries, the row stays `submitting` (so
    recovery will call it `unknown`) and the key stays taken: say exactly that, rather
    than promise a retry with the same key that would be refused."""
    try:
        with_retries(ledger, lambda: ledger.mark_not_accepted(
            row["id"], store.REJECTED, reason, exc.error_code, exc.error_message, release=idem))
    except ledger.Error:
        log.exception("ledger write failed after a refused push tx=%s", row["id"])
        raise ledger_unavailable(
            f"Daraja did not take the request, so nothing was sent, but the ledger could not"
            f" record it: transaction {row['id']} will show as unknown; do not retry with the"
            " same Idempotency-Key") from None


@ledger_read
def events_page(services, authorization, query_string):
    """GET /events: the caller's webhook events, newest first (admin keys: everyone's)."""
    caller = authenticate(authorization, services.config)
    try:
        status, limit, after = validation.parse_events_query(query_string)
    except validation.ValidationError as exc:
        raise BadRequest(exc.message, code=exc.code, field=exc.field) from None
    rows, more = services.ledger.event_page(owner=None if caller.admin else caller.owner,
                                            status=status, after=after, limit=limit)
    return 200, {"data": [resources.event_resource(r) for r in rows],
                 "next_cursor": rows[-1]["id"] if more else None}


def _own_event(services, caller, event_id):
    row = services.ledger.event(event_id) if validation.event_id_ok(event_id) else None
    if row is None or not (caller.admin or row["owner"] == caller.owner):
        raise NotFound("no such event")  # another owner's event does not exist here
    return row


@ledger_read
def read_event(services, authorization, event_id):
    """GET /events/<id>: one event with its delivery attempts."""
    caller = authenticate(authorization, services.config)
    return 200, resources.event_resource(_own_event(services, caller, event_id), True)


@ledger_read
def redeliver_event(services, authorization, event_id):
    """POST /events/<id>/redeliver: send it again at the sender's next pass."""
    caller = authenticate(authorization, services.config)
    _own_event(services, caller, event_id)
    row = services.ledger.redeliver(event_id)
    return 202, resources.event_resource(row)


@ledger_read
def read_transaction(services, note, authorization, ref):
    caller = authenticate(authorization, services.config)
    row = services.ledger.get(ref) if 0 < len(ref) <= MAX_ID_LENGTH else None
    if row is None or not caller.sees(row):  # another owner's payment does not exist here
        raise NotFound("no transaction with that id or CheckoutRequestID")
    note.tx_id, note.phone = row["id"], row["phone"]
    return 200, transaction_resource(row)


def receive_callback(services, note, tx_id, sig, environ, load_raw):
    """Safaricom's STK result: stored and applied in one commit, then acknowledged.
    `load_raw()` returns the raw body, bounded (or raises 413)."""
    if not services.signature_ok(tx_id, sig):
        # First, before anything is logged: a scanner's request is just an unknown path.
        raise NotFound()
    cfg = services.config
    source = sources.client_address(environ, cfg.trusted_proxies)
    policy = cfg.callback_ip_policy
    if policy != "off" and not sources.within(source, cfg.callback_ips):
        log.warning("callback source_not_allowed tx=%s ip=%s policy=%s", tx_id, source, policy)
        if policy == "enforce":
            raise Forbidden("callbacks are accepted from Safaricom's addresses only",
                            code="forbidden_source")
    note.tx_id = tx_id
    raw = load_raw()
    try:
        result = validation.parse_stk_callback(decode_json(raw))
    except (BadRequest, validation.ValidationError):
        result = None
    outcome = settlement.from_callback(result) if result is not None else None
    try:
        name, row = settlement.apply(services.ledger, tx_id, outcome,
                                     callback=settlement.CallbackRecord(raw, source),
                                     events=services.outbox.event_for)
    except services.ledger.Error:
        # Not stored, so not acknowledged; the reconciler's query settles it if it never returns.
        log.exception("ledger write failed for callback tx=%s", tx_id)
        raise ledger_unavailable("the callback could not be stored") from None
    if row is not None:
        note.phone = row["phone"]
    services.metrics.callbacks.inc(name)
    log.info("callback tx=%s outcome=%s result_code=%s", tx_id, name,
             result.result_code if result else None)
    if result is None:
        raise BadRequest("the callback is not a valid STK result (it was stored)",
                         code="invalid_callback")
    return 200, CALLBACK_ACK
