"""mpesa-wsgi: the WSGI app, its handlers and the command line.

Owns the HTTP surface: `create_app()` (builds config, ledger, pool, Daraja
client, token cache, metrics and reconciler once and hands them to the handlers),
the payment flows (plain values in, status and body out; the framework versions in
bench/ call the same ones), the literal route table, the small WSGI callable, the
plain handler functions, the HTTP errors (exceptions carrying their status,
rendered in one place), bearer-key auth, bounded body reading, the per-transaction
callback signature, the access log, graceful serving, and
`python mpesa_wsgi.py [serve | reconcile] [--check-config | --demo]`.

Importing this module needs no environment; building the app does.
"""

import argparse
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import sqlite3
import sys
import threading
import time
from http import HTTPStatus

import config as settings
import daraja
import ledger as store
import logs
import metrics
import ratelimit
import reconciler
import sources
import validation

log = logging.getLogger("mpesa_wsgi")
access_log = logging.getLogger("mpesa_wsgi.access")

CALLBACK_ACK = {"ResultCode": 0, "ResultDesc": "Accepted"}
SIGNATURE_HEX_CHARS = 32
RETRY_AFTER_BUSY_S = 60  # Daraja: wait at least a minute after "unable to lock subscriber"
RETRY_AFTER_UNAVAILABLE_S = 30
MAX_ID_LENGTH = 64
MAX_IDEMPOTENCY_KEY = 255
SHUTDOWN_POLL_S = 0.2  # how soon the serving loop notices SIGTERM
HEALTH_CHECK_EVERY_S = 1.0  # /health may be hit thousands of times a second; write once a second
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")


# --- errors: raised by handlers, rendered once by the WSGI callable ------------


class ApiError(Exception):
    status = 500
    code = "internal_error"
    message = "the gateway failed to handle the request"

    def __init__(self, message=None, *, code=None, field=None, headers=()):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.code = code or self.code
        self.field = field
        self.headers = list(headers)

    def body(self):
        error = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class BadRequest(ApiError):
    status, code, message = 400, "invalid_request", "the request is invalid"


class Unauthorized(ApiError):
    status, code, message = 401, "unauthorized", "a valid 'Authorization: Bearer <key>' is required"


class Forbidden(ApiError):
    status, code, message = 403, "forbidden", "not allowed"


class NotFound(ApiError):
    status, code, message = 404, "not_found", "no such resource"


class MethodNotAllowed(ApiError):
    status, code, message = 405, "method_not_allowed", "method not allowed on this path"


class Conflict(ApiError):
    status, code, message = 409, "conflict", "the request conflicts with the current state"


class Unprocessable(ApiError):
    status, code, message = 422, "unprocessable", "the request cannot be processed"


class TooManyRequests(ApiError):
    status, code, message = 429, "rate_limited", "too many requests for this API key"


class PayloadTooLarge(ApiError):
    status, code, message = 413, "payload_too_large", "the request body is too large"


class UnsupportedMediaType(ApiError):
    status, code, message = 415, "unsupported_media_type", "send 'Content-Type: application/json'"


class UpstreamRejected(ApiError):
    status, code, message = 502, "daraja_rejected", "Daraja refused the request"


class ServiceUnavailable(ApiError):
    status, code, message = 503, "upstream_unavailable", "Daraja cannot be reached; try again later"


STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}

# --- request helpers ------------------------------------------------------------


class Request:
    """The WSGI environ plus what the access log should say about this request."""

    __slots__ = ("environ", "route", "tx_id", "phone")

    def __init__(self, environ):
        self.environ = environ
        self.route = None
        self.tx_id = None
        self.phone = None

    def header(self, name):
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"))

    def body(self, limit):
        """The raw body, at most `limit` bytes; never an unbounded read."""
        raw_length = self.environ.get("CONTENT_LENGTH") or ""
        if raw_length:
            if not raw_length.isdigit():
                raise BadRequest("Content-Length must be a number", code="invalid_request")
            length = int(raw_length)
            if length > limit:
                raise PayloadTooLarge(f"the body must be at most {limit} bytes")
            data = self.environ["wsgi.input"].read(length)
        else:
            # No length (e.g. chunked): read one byte past the limit to detect excess.
            data = self.environ["wsgi.input"].read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"the body must be at most {limit} bytes")
        return data

    def json(self, limit):
        """The decoded JSON body: 415 unless JSON, 413 past the limit, 400 if malformed."""
        ctype = self.environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise UnsupportedMediaType()
        return decode_json(self.body(limit))


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


def key_scope(api_key):
    """A stable, non-secret name for an API key: idempotency keys and rate limits hang on it."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def bearer_token(authorization):
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    scheme, _, presented = (authorization or "").partition(" ")
    return presented.strip() if scheme.lower() == "bearer" else None


def authenticate(authorization, config):
    """Return the caller's key scope from an Authorization header value; 401 unless a key
    matches, compared in constant time."""
    token = bearer_token(authorization)
    presented = (token or "").encode()
    matched = None
    for key in config.api_keys:
        # Compare against every key, so timing does not tell which one nearly matched.
        if hmac.compare_digest(presented, key.encode()):
            matched = key
    if matched is None or token is None:
        raise Unauthorized(headers=[("WWW-Authenticate", 'Bearer realm="mpesa-wsgi"')])
    return key_scope(matched)


def idempotency_for(key, scope, push):
    """The request's Idempotency-Key (None if absent), bound to its API key and content."""
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII"
                         " characters", code="invalid_idempotency_key")
    canonical = json.dumps([push.phone, push.amount, push.reference, push.description])
    return store.Idempotency(scope, key, hashlib.sha256(canonical.encode()).hexdigest())


def retry_after(seconds):
    return [("Retry-After", str(max(1, int(-(-seconds // 1)))))]


def callback_signature(secret, tx_id):
    """The path secret that proves a callback URL was made by this gateway."""
    digest = hmac.new(secret.encode(), tx_id.encode(), hashlib.sha256).hexdigest()
    return digest[:SIGNATURE_HEX_CHARS]


def transaction_resource(row):
    """The public view of a ledger row (SPEC §2): phone masked, internal states hidden."""
    status = store.PENDING if row["status"] == store.SUBMITTING else row["status"]
    return {
        "id": row["id"],
        "checkout_request_id": row["checkout_request_id"],
        "merchant_request_id": row["merchant_request_id"],
        "status": status,
        "reason": row["reason"],
        "phone": validation.mask_phone(row["phone"]),
        "amount": row["amount"],
        "reference": row["reference"],
        "description": row["description"],
        "result_code": row["result_code"],
        "result_desc": row["result_desc"],
        "receipt": row["receipt"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


# --- flows: plain values in, (status, body[, headers]) out, errors raised. Every web layer
#     (this module's handlers, and the framework versions in bench/) calls these, so only
#     routing, parsing and rendering differ between them. `note` is where a flow leaves
#     what the access log should say (tx_id, phone). ----------------------------------------


def health_status(app):
    checks = app.health_checks()
    ok = checks["ledger_writable"]
    return (200 if ok else 503), {"status": "ok" if ok else "degraded",
                                  "timestamp": store.iso_utc(time.time()),
                                  "version": settings.VERSION, "checks": checks}


def metrics_text(app, authorization):
    token = app.config.metrics_token
    if token is not None:
        presented = bearer_token(authorization)
        if presented is None or not hmac.compare_digest(presented.encode(), token.encode()):
            raise Unauthorized("GET /metrics needs 'Authorization: Bearer <GATEWAY_METRICS_TOKEN>'",
                               headers=[("WWW-Authenticate", 'Bearer realm="metrics"')])
    return 200, app.metrics.render().encode(), [("Content-Type", metrics.CONTENT_TYPE)]


def transactions_page(app, authorization, query_string):
    authenticate(authorization, app.config)
    try:
        query = validation.parse_list_query(query_string)
    except validation.ValidationError as exc:
        raise BadRequest(exc.message, code=exc.code, field=exc.field) from None
    rows, more = app.ledger.list_page(status=query.status, since=query.since,
                                      after=query.after, limit=query.limit)
    cursor = validation.encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
    return 200, {"data": [transaction_resource(r) for r in rows], "next_cursor": cursor}


def start_payment(app, note, authorization, load_body, idempotency_key):
    """POST /stkpush: `load_body()` returns the decoded JSON body (or raises 413/415/400)."""
    scope = authenticate(authorization, app.config)
    wait = app.limiter.acquire(scope)  # before idempotency, as Stripe does
    if wait:
        raise TooManyRequests(f"at most {app.config.rate:g} payments per second per API key",
                              headers=retry_after(wait))
    cfg = app.config
    try:
        push = validation.validate_push(load_body(), cfg.max_amount,
                                        cfg.default_reference, cfg.default_description)
    except validation.ValidationError as exc:
        raise BadRequest(exc.message, code=exc.code, field=exc.field) from None
    note.phone = push.phone
    idem = idempotency_for(idempotency_key, scope, push)  # validation failures never reach it
    try:
        # Committed before Daraja is called: a crash from here on leaves a trace.
        begun = app.ledger.begin_push(
            phone=push.phone, amount=push.amount, reference=push.reference,
            description=push.description, idempotency=idem, phone_lock_s=cfg.phone_lock_s)
    except sqlite3.Error:
        log.exception("ledger write failed before push")
        raise ServiceUnavailable("the ledger cannot be written; nothing was sent",
                                 code="ledger_unavailable",
                                 headers=retry_after(RETRY_AFTER_UNAVAILABLE_S)) from None
    if begun.kind != "new":
        return answer_without_push(note, begun)
    row = begun.row
    note.tx_id = row["id"]
    try:
        accepted = app.daraja.stk_push(
            phone=push.phone, amount=push.amount, reference=push.reference,
            description=push.description, callback_url=app.callback_url(row["id"]))
    except daraja.DarajaError as exc:
        return push_not_accepted(app, row, exc, idem)
    try:
        row = app.ledger.mark_accepted(row["id"], accepted.checkout_request_id,
                                       accepted.merchant_request_id)
    except sqlite3.Error:
        # The prompt is out; the row stays `submitting`, so a restart makes it `unknown`
        # and its signed callback URL still finds it. Tell the merchant what we know.
        log.exception("ledger write failed after push tx=%s", row["id"])
        row = dict(row, checkout_request_id=accepted.checkout_request_id,
                   merchant_request_id=accepted.merchant_request_id)
    return pinned(app, idem, 202, transaction_resource(row))


def pinned(app, idem, status, body):
    """Store the answer against the idempotency key (a prompt may have been sent)."""
    if idem is not None:
        app.ledger.store_response(idem, status, dumps(body))
    return status, body


REPLAYED = [("Idempotent-Replayed", "true")]


def answer_without_push(note, begun):
    """The ledger decided no new push is needed: replay, conflict, or phone lock."""
    if begun.kind == "reused":
        raise Unprocessable("this Idempotency-Key was used with a different request",
                            code="idempotency_key_reused")
    if begun.kind == "phone_busy":
        raise Conflict(f"transaction {begun.row['id']} for this phone is still pending;"
                       " wait for its result", code="payment_in_progress")
    note.tx_id = begun.row["id"]
    if begun.kind == "replay":
        return begun.status_code, json.loads(begun.body), REPLAYED
    if begun.row["status"] == store.SUBMITTING:  # in flight: the first request is still at Daraja
        raise Conflict("a request with this Idempotency-Key is still in progress; retry shortly",
                       code="idempotency_key_in_use", headers=retry_after(1))
    # In flight on paper, but its row moved on (its process died after the push): say so.
    return 202, transaction_resource(begun.row), REPLAYED


def push_not_accepted(app, row, exc, idem):
    """Record a push Daraja did not accept, then answer per SPEC §2 outcomes."""
    if exc.outcome == daraja.UNKNOWN:
        # It may have reached the customer: never resend; the callback or a query settles it.
        row = app.ledger.mark_not_accepted(row["id"], store.UNKNOWN, exc.reason)
        return pinned(app, idem, 202, transaction_resource(row))
    # Nothing reached the customer: the idempotency key is released with the row's update,
    # so the merchant may retry with the same key.
    if exc.outcome == daraja.REJECTED and exc.subscriber_locked:
        app.ledger.mark_not_accepted(row["id"], store.REJECTED, "subscriber_busy",
                                     exc.error_code, exc.error_message, release=idem)
        raise Conflict(f"the customer has another M-Pesa prompt open; transaction {row['id']}"
                       " was not sent", code="subscriber_busy",
                       headers=retry_after(RETRY_AFTER_BUSY_S))
    if exc.outcome == daraja.REJECTED:
        app.ledger.mark_not_accepted(row["id"], store.REJECTED, "daraja_rejected",
                                     exc.error_code, exc.error_message, release=idem)
        raise UpstreamRejected(f"Daraja refused the request ({exc.error_code}); transaction"
                               f" {row['id']} is rejected")
    app.ledger.mark_not_accepted(row["id"], store.REJECTED, "upstream_unavailable",
                                 exc.error_code, exc.error_message, release=idem)
    raise ServiceUnavailable(f"Daraja is unavailable ({exc.reason}); transaction {row['id']}"
                             " was not sent", headers=retry_after(RETRY_AFTER_UNAVAILABLE_S))


def read_transaction(app, note, authorization, ref):
    authenticate(authorization, app.config)
    row = app.ledger.get(ref) if 0 < len(ref) <= MAX_ID_LENGTH else None
    if row is None:
        raise NotFound("no transaction with that id or CheckoutRequestID")
    note.tx_id, note.phone = row["id"], row["phone"]
    return 200, transaction_resource(row)


def receive_callback(app, note, tx_id, sig, environ, load_raw):
    """Safaricom's STK result: stored and applied in one commit, then acknowledged.
    `load_raw()` returns the raw body, bounded (or raises 413)."""
    source = sources.client_address(environ, app.config.trusted_proxies)
    policy = app.config.callback_ip_policy
    if policy != "off" and not sources.within(source, app.config.callback_ips):
        log.warning("callback source_not_allowed ip=%s policy=%s", source, policy)
        if policy == "enforce":
            raise Forbidden("callbacks are accepted from Safaricom's addresses only",
                            code="forbidden_source")
    if not app.signature_ok(tx_id, sig):
        raise NotFound()  # same answer as any unknown path: reveals nothing
    note.tx_id = tx_id
    raw = load_raw()
    try:
        result = validation.parse_stk_callback(decode_json(raw))
    except (BadRequest, validation.ValidationError):
        result = None
    settlement = None
    if result is not None:
        status, reason = daraja.result_status(result.result_code)
        settlement = store.Settlement(
            status=status, reason=reason, result_code=result.result_code,
            result_desc=result.result_desc, checkout_request_id=result.checkout_request_id,
            merchant_request_id=result.merchant_request_id, receipt=result.receipt,
            amount=result.amount)
    try:
        outcome, row = app.ledger.record_callback(tx_id, raw, source, settlement)
    except sqlite3.Error:
        # Not stored, so not acknowledged; the reconciler's query settles it if it never returns.
        log.exception("ledger write failed for callback tx=%s", tx_id)
        raise ServiceUnavailable("the callback could not be stored", code="ledger_unavailable",
                                 headers=retry_after(RETRY_AFTER_UNAVAILABLE_S)) from None
    if row is not None:
        note.phone = row["phone"]
    app.metrics.callbacks.inc(outcome)
    log.info("callback tx=%s outcome=%s result_code=%s", tx_id, outcome,
             result.result_code if result else None)
    if result is None:
        raise BadRequest("the callback is not a valid STK result (it was stored)",
                         code="invalid_callback")
    return 200, CALLBACK_ACK


# --- handlers: (req, app, *path params) -> (status, body[, headers]); errors are raised ---


def health(req, app):
    return health_status(app)


def metrics_page(req, app):
    return metrics_text(app, req.header("Authorization"))


def openapi(req, app):
    return 200, app.openapi, [("Content-Type", "application/json")]


def list_transactions(req, app):
    return transactions_page(app, req.header("Authorization"),
                             req.environ.get("QUERY_STRING", ""))


def stk_push(req, app):
    return start_payment(app, req, req.header("Authorization"),
                         lambda: req.json(app.config.max_body), req.header("Idempotency-Key"))


def get_transaction(req, app, ref):
    return read_transaction(app, req, req.header("Authorization"), ref)


def callback(req, app, tx_id, sig):
    return receive_callback(app, req, tx_id, sig, req.environ,
                            lambda: req.body(app.config.max_body))


# Literal paths: auditable at a glance. Value: {method: handler}.
ROUTES = {
    "/health": {"GET": health},
    "/stkpush": {"POST": stk_push},
    "/transactions": {"GET": list_transactions},
    "/metrics": {"GET": metrics_page},
    "/openapi.json": {"GET": openapi},
}
# (prefix, route template for logs, number of path segments after it, {method: handler})
PREFIX_ROUTES = (
    ("/transactions/", "/transactions/{id}", 1, {"GET": get_transaction}),
    ("/callback/", "/callback/{tx_id}/{sig}", 2, {"POST": callback}),
)


def match(method, path):
    """(handler, route template, params) or raise 404/405."""
    methods, template, params = ROUTES.get(path), path, ()
    if methods is None:
        for prefix, prefix_template, count, candidate in PREFIX_ROUTES:
            if path.startswith(prefix):
                parts = tuple(path[len(prefix):].split("/"))
                if len(parts) == count and all(parts):
                    methods, template, params = candidate, prefix_template, parts
                break
    if methods is None:
        raise NotFound()
    if method not in methods:
        raise MethodNotAllowed(headers=[("Allow", ", ".join(sorted(methods)))])
    return methods[method], template, params


# --- the app ----------------------------------------------------------------------------


class Gateway:
    """The WSGI application: holds the dependencies, routes, renders. Nothing else."""

    def __init__(self, config, ledger, client, metrics_registry, reconcile=None):
        self.config = config
        self.ledger = ledger
        self.daraja = client
        self.metrics = metrics_registry
        self.limiter = ratelimit.RateLimiter(config.rate, config.burst)
        self.reconciler = reconcile
        with open(OPENAPI_PATH, "rb") as f:
            self.openapi = f.read()
        self._secret = config.secret
        self._health = (float("-inf"), None)  # (checked at, checks): shared, replaced whole

    def __call__(self, environ, start_response):
        request_id = logs.request_id_from(environ.get("HTTP_X_REQUEST_ID"))
        token = logs.REQUEST_ID.set(request_id)  # every line of this request carries it
        try:
            return self.wsgi_app(environ, start_response, request_id)
        finally:
            logs.REQUEST_ID.reset(token)

    def wsgi_app(self, environ, start_response, request_id):
        """Route, call, render, account. Nothing else lives here."""
        started = time.monotonic()
        req = Request(environ)
        try:
            handler, req.route, params = match(environ["REQUEST_METHOD"],
                                               environ.get("PATH_INFO", ""))
            status, body, *extra = handler(req, self, *params)
            headers = list(extra[0]) if extra else []
        except ApiError as exc:
            status, body, headers = exc.status, exc.body(), list(exc.headers)
        except Exception:
            log.exception("unhandled error route=%s", req.route)
            status, body, headers = 500, ApiError().body(), []
        payload = body if isinstance(body, bytes) else dumps(body)
        if not any(name == "Content-Type" for name, _ in headers):
            headers.append(("Content-Type", "application/json"))
        headers += [("Content-Length", str(len(payload))), ("X-Request-Id", request_id)]
        start_response(STATUS_LINES[status], headers)
        self.account(environ["REQUEST_METHOD"], req.route or "unmatched", status,
                     time.monotonic() - started, req.tx_id, req.phone)
        return [payload]

    def account(self, method, route, status, elapsed, tx_id=None, phone=None):
        """Metrics and the one access line: route template, never the raw callback path."""
        self.metrics.requests.inc(route, method, str(status))
        self.metrics.request_seconds.observe(elapsed, route)
        masked = validation.mask_phone(phone) if phone else "-"
        access_log.info(
            "request method=%s route=%s status=%d ms=%.1f tx=%s phone=%s",
            method, route, status, elapsed * 1000, tx_id or "-", masked,
            extra={"sanitized": True, "fields": {
                "method": method, "route": route, "status": status,
                "ms": round(elapsed * 1000, 1), "tx": tx_id, "phone": masked}})

    def health_checks(self):
        """Ledger writable, token age, pending/unknown counts; refreshed at most once a second."""
        checked_at, checks = self._health
        now = time.monotonic()
        if checks is None or now - checked_at >= HEALTH_CHECK_EVERY_S:
            counts = self.ledger.count_by_status()
            age = self.daraja.tokens.age()
            checks = {
                "ledger_writable": self.ledger.writable(),
                "token_age_s": None if age is None else round(age, 1),
                "pending": counts.get(store.PENDING, 0),
                "unknown": counts.get(store.UNKNOWN, 0),
            }
            self._health = (now, checks)
        return checks

    def callback_url(self, tx_id):
        return (f"{self.config.callback_base_url}/callback/{tx_id}/"
                f"{callback_signature(self._secret, tx_id)}")

    def signature_ok(self, tx_id, sig):
        expected = callback_signature(self._secret, tx_id)
        return hmac.compare_digest(sig.encode(), expected.encode())

    def close_background(self):
        if self.reconciler is not None:
            self.reconciler.stop()

    def close(self):
        self.close_background()
        self.ledger.close()
        self.daraja.close()


def create_app(config=None):
    """Build the app once: config (from the environment unless given), ledger, Daraja client."""
    if config is None:
        config = settings.load_config(os.environ)
    ledger = store.Ledger(config.db_path)

    def by_status():
        counts = ledger.count_by_status()
        counts.setdefault(store.PENDING, 0)  # the series a dashboard watches, even at 0
        return {(status,): n for status, n in counts.items()}

    registry = metrics.GatewayMetrics(settings.VERSION, by_status)
    client = daraja.DarajaClient(config, daraja.build_pool(config), observer=registry.daraja_call)
    # A row still `submitting` after the longest a push can take was cut off mid-push.
    ledger.recover_interrupted(client.longest_call_s)
    background = None
    if config.reconcile:
        background = reconciler.Reconciler(ledger, client, config, observer=registry.reconcile.inc)
        background.start()
    return Gateway(config, ledger, client, registry, background)


# --- command line ---------------------------------------------------------------------


def configure_logging(config):
    logs.configure(config.log_level, config.log_format, config.secret_values())


def pin_cpu(setting):
    """GATEWAY_CPU_AFFINITY: on a multi-core host an unpinned waitress loses 3-4x to GIL
    hand-offs between cores (SPEC §3). Linux only; a no-op where the OS lacks it."""
    if setting is None or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[os.getpid() % len(cpus)] if setting == "auto" else setting
    os.sched_setaffinity(0, {cpu})
    return cpu


def serve(app, host, port, threads, banner=None):
    """Serve with waitress until SIGTERM or Ctrl-C, then shut down gracefully: stop
    accepting, let in-flight requests finish and their answers flush (up to the longest a
    push can take), stop the reconciler. The caller closes the app (ledger, pool)."""
    import waitress  # serving only: importing the app needs no server

    # The app alone decides which X-Forwarded-For hop to believe (GATEWAY_TRUSTED_PROXY);
    # waitress's default would strip the header before the callback policy could see it.
    server = waitress.create_server(app, host=host, port=port, threads=threads,
                                    clear_untrusted_proxy_headers=False)
    cpu = pin_cpu(app.config.cpu_affinity)
    if cpu is not None:
        log.info("pinned to cpu=%d", cpu)
    stopping = threading.Event()

    def on_sigterm(*_):
        # Only flags: a handler runs between select() retries, so it must not close sockets.
        server.accepting = False
        stopping.set()

    if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # guarded: not on every OS
    print(banner or f"mpesa-wsgi {settings.VERSION} serving on http://{host}:{port}", flush=True)
    try:
        while not stopping.is_set():  # waitress's own run(), one short poll at a time
            server.asyncore.loop(timeout=SHUTDOWN_POLL_S, map=server._map,
                                 use_poll=server.adj.asyncore_use_poll, count=1)
    except KeyboardInterrupt:
        pass
    server.accepting = False
    server.del_channel()  # stop listening: new connections are refused from here on
    server.socket.close()
    log.info("shutdown started: no new connections; finishing in-flight requests")
    app.close_background()
    deadline = time.monotonic() + app.daraja.longest_call_s
    dispatcher = server.task_dispatcher
    while time.monotonic() < deadline and (
            dispatcher.active_count or dispatcher.queue
            or any(ch.total_outbufs_len for ch in list(server.active_channels.values()))):
        server.asyncore.loop(timeout=0.05, map=server._map, count=1)
    dispatcher.shutdown(timeout=1)
    server.close()
    log.info("shutdown complete")


def demo_environment(environ, port, sim_port, api_key, secret):
    """The demo's settings: sandbox-like values, the simulator as Daraja, loopback only."""
    import simulator

    env = {
        "MPESA_CONSUMER_KEY": simulator.DEMO_CONSUMER_KEY,
        "MPESA_CONSUMER_SECRET": simulator.DEMO_CONSUMER_SECRET,
        "MPESA_SHORTCODE": simulator.SANDBOX_SHORTCODE,
        "MPESA_PASSKEY": simulator.SANDBOX_PASSKEY,
        "GATEWAY_DB": "mpesa_demo.db",
        "GATEWAY_API_KEYS": api_key,
        "GATEWAY_SECRET": secret,
    }
    env.update({k: v for k, v in environ.items() if v})
    # The demo never talks to Safaricom and never listens beyond loopback.
    env.update({
        "MPESA_ENVIRONMENT": "sandbox",
        "MPESA_BASE_URL": f"http://127.0.0.1:{sim_port}",
        "MPESA_CALLBACK_BASE_URL": f"http://127.0.0.1:{port}",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
    })
    return env


def run_demo(environ):
    import waitress
    import simulator

    port = settings.port(environ.get("GATEWAY_PORT") or "8000")
    sim_port = port + 1
    api_key = environ.get("GATEWAY_API_KEYS") or "demo_" + secrets.token_urlsafe(18)
    env = demo_environment(environ, port, sim_port, api_key, secrets.token_urlsafe(24))
    config = settings.load_config(env)
    configure_logging(config)
    sim = simulator.Simulator(simulator.SimSettings.from_env(env))
    sim_server = waitress.create_server(sim, host="127.0.0.1", port=sim_port, threads=4)
    threading.Thread(target=sim_server.run, name="simulator", daemon=True).start()
    app = create_app(config)
    shown_key = api_key if "GATEWAY_API_KEYS" not in environ else "<a key from GATEWAY_API_KEYS>"
    base = f"http://127.0.0.1:{port}"
    banner = "\n".join([
        f"mpesa-wsgi {settings.VERSION} demo: gateway {base}, Daraja simulator"
        f" http://127.0.0.1:{sim_port}, ledger {config.db_path}",
        f"API key: {shown_key}",
        "",
        "Start a payment (any Safaricom-style number succeeds; see README for scenario phones):",
        f"  curl -s -X POST {base}/stkpush -H 'Authorization: Bearer {shown_key}'"
        " -H 'Content-Type: application/json'"
        " -d '{\"phone\":\"0712345678\",\"amount\":10,\"reference\":\"INV001\"}'",
        "Then, with the id it returns (pending, then succeeded after the callback):",
        f"  curl -s {base}/transactions/<id> -H 'Authorization: Bearer {shown_key}'",
        f"  curl -s {base}/health",
        "Ctrl-C stops the demo.",
    ])
    try:
        serve(app, "127.0.0.1", port, config.threads, banner)
    finally:
        sim.stop()
        app.close()


def check_config(environ):
    try:
        config = settings.load_config(environ)
    except settings.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for name, value in config.masked().items():
        print(f"{name} = {value}")
    return 0


def reconcile_once(config):
    """One reconciliation pass for cron / Task Scheduler; the same work the thread does."""
    app = create_app(dataclasses.replace(config, reconcile=False))
    try:
        results = reconciler.Reconciler(app.ledger, app.daraja, config).run_once()
        app.ledger.prune_idempotency()
    finally:
        app.close()
    summary = " ".join(f"{k}={v}" for k, v in sorted(results.items())) or "nothing due"
    print(f"reconcile {summary}", flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mpesa_wsgi.py", description="M-Pesa STK Push gateway")
    parser.add_argument("command", nargs="?", choices=("serve", "reconcile"), default="serve",
                        help="serve (default) or run one reconciliation pass and exit")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check-config", action="store_true",
                      help="print the resolved settings (secrets masked) and exit")
    mode.add_argument("--demo", action="store_true",
                      help="run the gateway against the built-in Daraja simulator on loopback")
    args = parser.parse_args(argv)
    if args.check_config:
        return check_config(os.environ)
    try:
        if args.demo:
            run_demo(os.environ)
            return 0
        config = settings.load_config(os.environ)
    except settings.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(config)
    if args.command == "reconcile":
        return reconcile_once(config)
    app = create_app(config)
    try:
        serve(app, config.host, config.port, config.threads)
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
