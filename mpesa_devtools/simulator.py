"""A Daraja double: OAuth, STK push, STK query and callbacks, on loopback.

Owns everything a test, the demo or a benchmark needs from "Safaricom": the
OAuth endpoint (Basic auth and grant_type checked, `expires_in` as a string),
STK push with Daraja's field validation and error envelope, STK query (string
`ResultCode`), and callbacks POSTed by background threads after a configurable
delay in Daraja's real shapes (items by name, `Balance` without a value, EAT
`TransactionDate`).  Outcomes are chosen by the phone number (SCENARIOS),
including alphanumeric codes (`SFC_IC0003`, a string even in the callback) and
successes whose `PhoneNumber` item is masked or missing.

While a prompt is open the query answers as Daraja does in the wild, chosen by
`query_pending`: `4999` (HTTP 200, the default), or HTTP 500 `500.001.1001`
with "The transaction is being processed" or an empty message.  With
`query_not_found_s`, a push that young is unknown to the query ("The
transaction does not Exist"), as observed for the first ~30 s.

Control endpoints, for tests and for a person with curl (each has a Python
twin on Simulator):
  GET  /_sim/stats                            counters (`stats()`)
  GET  /_sim/timings, DELETE /_sim/timings    callback answer times since the last
                                              reset (`timings()`), for benchmarks
  GET  /_sim/weather, POST /_sim/weather      per-API weather (`weather()`,
                                              `set_weather(...)`), see WEATHERS
  POST /_sim/callbacks/<CheckoutRequestID>/resend
                                              send a push's callback again
                                              (`resend_callback(id)`)
Weather is what the API gateway in front of M-Pesa does on a bad day:
maintenance, spike arrest, quota, a 500 after the push was processed
(`internal`), Apigee's HTML page, a slow answer, a 503 with Retry-After.

Simulator policy, not Daraja's: AccountReference > 12 and TransactionDesc > 13
characters are refused at submit time (`strict_lengths`, on by default).  Real
Daraja is not known to do this; SDKs enforce the limits client-side.

It imports nothing from the gateway: it is Safaricom's side of the wire.
Run alone: `python -m mpesa_devtools.simulator --port 8001`.
"""

import argparse
import base64
import collections
import heapq
import itertools
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field, make_dataclass, replace
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("simulator")

EAT = timezone(timedelta(hours=3), "EAT")
SANDBOX_SHORTCODE = "174379"
SANDBOX_PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
DEMO_CONSUMER_KEY = "demo-consumer-key"  # the real sandbox's keys are per app, never public
DEMO_CONSUMER_SECRET = "demo-consumer-secret"
MAX_BODY = 64 * 1024

# phone → (what happens, ResultCode). Any other valid number: success.
SCENARIOS = {
    "254708374149": ("result", 1037),  # the sandbox test MSISDN never answers
    "254711000001": ("result", 1),
    "254711001032": ("result", 1032),
    "254711002001": ("result", 2001),
    "254711001019": ("result", 1019),
    "254711001025": ("result", 1025),
    "254711019999": ("result", 9999),
    "254711000017": ("result", 17),
    "254711000026": ("result", 26),
    "254711001031": ("result", 1031),
    "254711002028": ("result", 2028),
    "254711000003": ("result", "SFC_IC0003"),  # alphanumeric: a JSON string even in the callback
    "254711009999": ("no_callback", 0),  # paid, but only a query finds out
    "254711000002": ("callback_twice", 0),
    "254711000111": ("masked_phone", 0),  # PhoneNumber item "2547******111" (masking is unknown)
    "254711000112": ("no_phone", 0),  # no PhoneNumber item at all: items are not a contract
    "254711005001": ("refuse_lock", None),
    "254711005002": ("refuse_spike", None),
    "254711000408": ("slow_answer", 0),  # answered after the client gave up; still paid
}
# Daraja's prose (daraja_api.md §4.1, first variant); clients must map on the code, never this.
RESULT_DESCS = {
    0: "The service request is processed successfully.",
    1: "The balance is insufficient for the transaction.",
    17: "Rule limited.",
    26: "System busy.",
    1019: "Transaction has expired.",
    1025: "An error occurred while sending a push request.",
    # 1031 is not in daraja_api.md §4.1: this prose is the simulator's own, not Daraja's.
    1031: "The request could not be processed.",
    1032: "Request cancelled by user.",
    1037: "DS timeout user cannot be reached.",
    2001: "The initiator information is invalid.",
    2028: "The request is not permitted according to product assignment.",
    9999: "Error while sending push.",
    "SFC_IC0003": "The operator does not exist.",
}
LOCK_MESSAGE = ("Unable to lock subscriber, a transaction is already in process for the"
                " current subscriber")

# While the prompt is open the query answers one of these ways (daraja_api.md §5).
QUERY_PENDING_MODES = ("4999", "processing", "empty")

# Weather: how the API gateway in front of M-Pesa answers one API today.
WEATHER_APIS = ("push", "query", "oauth")
WEATHERS = ("ok", "maintenance", "spike", "quota", "internal", "html", "slow", "retry_after")
DEFAULT_SLOW_S = 5.0
MAX_SLOW_S = 600.0  # a request thread is held that long; more is a typo
RETRY_AFTER_S = 3600
_WEATHER_ERRORS = {  # weather → Daraja's envelope (daraja_api.md §3, synchronous errors)
    "maintenance": ("500.002.1001",
                    "Service is currently under maintenance. Please try again later"),
    "spike": ("500.003.02", "Error Occurred: Spike Arrest Violation"),
    "quota": ("500.003.03", "Quota Violation"),
    "internal": ("500.003.1001", "Internal Server Error"),
}
# What Apigee answers for a wrong host or path: a 200 that is not JSON (daraja_api.md §1).
# The real page's text is not recorded; what matters is the status and the Content-Type.
SPA_PROXY_PAGE = (b"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>SPA Proxy</title>"
                  b"</head>\n<body><h1>SPA Proxy</h1><p>Apigee API proxy.</p></body></html>\n")

_MSISDN = re.compile(r"254[17][0-9]{8}")
_SHORTCODE = re.compile(r"[0-9]{5,7}")
_TIMESTAMP = re.compile(r"[0-9]{14}")
_DIGITS = re.compile(r"[0-9]{1,9}")
_RESEND_PATH = re.compile(r"/_sim/callbacks/([^/]{1,64})/resend")
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_DAY_CHARS = "123456789ABCDEFGHIJKLMNOPQRSTUV"


# --- settings -----------------------------------------------------------------

def _non_negative(raw):
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number, 0 or more")
    return value


def _count(raw):
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ValueError("must be a whole number, 1 or more")
    return value


def _on_off(raw):
    value = raw.lower()
    if value not in ("on", "off"):
        raise ValueError("must be on or off")
    return value == "on"


def _query_pending(raw):
    if raw not in QUERY_PENDING_MODES:
        raise ValueError("must be " + ", ".join(QUERY_PENDING_MODES[:-1])
                         + " or " + QUERY_PENDING_MODES[-1])
    return raw


def _from_env(environ, name, convert, default):
    """One MPESA_SIM_* value: unset or blank → default; bad → ValueError naming the variable."""
    raw = (environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        return convert(raw)
    except ValueError as exc:
        raise ValueError(f"{name} {exc} (got {raw[:40]!r})") from None


# The simulator's settings, each named once: (field, environment variable or None,
# converter, default, what it does). MPESA_* credentials default to the public sandbox's.
SETTINGS = (
    ("consumer_key", "MPESA_CONSUMER_KEY", str, DEMO_CONSUMER_KEY, "OAuth Basic user"),
    ("consumer_secret", "MPESA_CONSUMER_SECRET", str, DEMO_CONSUMER_SECRET,
     "OAuth Basic password"),
    ("shortcode", "MPESA_SHORTCODE", str, SANDBOX_SHORTCODE, "the merchant's shortcode"),
    ("passkey", "MPESA_PASSKEY", str, SANDBOX_PASSKEY, "the Lipa na M-Pesa passkey"),
    ("callback_delay_s", "MPESA_SIM_CALLBACK_DELAY_S", _non_negative, 2.0,
     "push accepted → result decided and callback sent"),
    ("latency_ms", "MPESA_SIM_LATENCY_MS", _non_negative, 0.0,
     "added to every Daraja answer (real Daraja: ~1000)"),
    ("token_ttl_s", "MPESA_SIM_TOKEN_TTL_S", _count, 3599, "a token's life"),
    ("slow_answer_s", "MPESA_SIM_SLOW_ANSWER_S", _non_negative, 20.0,
     "the 254711000408 push answers this late (> read timeout)"),
    ("query_pending", "MPESA_SIM_QUERY_PENDING", _query_pending, "4999",
     'prompt open: "4999" (HTTP 200), or HTTP 500 "processing"/"empty"'),
    ("query_not_found_s", "MPESA_SIM_QUERY_NOT_FOUND_S", _non_negative, 0.0,
     "a push this young is unknown to the query (~30 s observed)"),
    ("strict_lengths", "MPESA_SIM_STRICT_LENGTHS", _on_off, True,
     "simulator policy: AccountReference ≤ 12, TransactionDesc ≤ 13"),
    ("max_amount", None, _count, 250_000, "largest amount a push may ask for"),
    ("lock_subscriber", None, _on_off, True,
     "a second push to a phone with an open prompt is refused"),
    ("callback_workers", None, _count, 4, "threads that send callbacks"),
    ("record_deliveries", None, _on_off, False,
     "keep (url, body) of each callback answered 2xx (tests)"),
)
SIM_ENV = tuple(env for _, env, *_ in SETTINGS if env and env.startswith("MPESA_SIM_"))


class _SimSettingsChecks:
    """What every SimSettings checks and how it is read from the environment."""

    def __post_init__(self):
        # Checked here too, so a typo fails when the simulator is built, not at the first query.
        checks = (("query_pending", _query_pending), ("query_not_found_s", _non_negative))
        for name, check in checks:
            try:
                check(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name} {exc}") from None

    @classmethod
    def from_env(cls, environ):
        """Settings from MPESA_SIM_* and the gateway's own MPESA_* credentials. An unknown
        MPESA_SIM_* name is a typo (MPESA_SIM_LATENCY=1000 silently ignored misleads)."""
        unknown = sorted(n for n in environ if n.startswith("MPESA_SIM_") and n not in SIM_ENV)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a simulator setting; known:"
                             f" {', '.join(SIM_ENV)}")
        return cls(**{name: _from_env(environ, env, convert, default)
                      for name, env, convert, default, _ in SETTINGS if env})


SimSettings = make_dataclass(
    "SimSettings", [(name, type(default), field(default=default))
                    for name, _, _, default, _ in SETTINGS], bases=(_SimSettingsChecks,))
SimSettings.__module__ = __name__
SimSettings.__doc__ = "The simulator's settings: one field per row of SETTINGS."


@dataclass(frozen=True)
class Weather:
    """Per-API behaviour of the gateway in front of M-Pesa; replaced whole, never mutated."""

    push: str = "ok"
    query: str = "ok"
    oauth: str = "ok"
    slow_s: float = DEFAULT_SLOW_S  # how long `slow` holds an answer


def _weather_changes(changes):
    """Check a partial weather update (api → value, slow_s); ValueError says what is wrong."""
    checked = {}
    for name, value in changes.items():
        if name == "slow_s":
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0 <= value <= MAX_SLOW_S):  # NaN fails this too
                raise ValueError(f"slow_s must be a number of seconds from 0 to {MAX_SLOW_S:g}")
            checked[name] = float(value)
        elif name in WEATHER_APIS:
            if not isinstance(value, str) or value not in WEATHERS:
                raise ValueError(f"unknown weather {str(value)[:40]!r} for {name}; expected one"
                                 f" of {', '.join(WEATHERS)}")
            checked[name] = value
        else:
            raise ValueError(f"unknown api {str(name)[:40]!r}; expected"
                             f" {', '.join(WEATHER_APIS)} or slow_s")
    return checked


# --- errors -------------------------------------------------------------------

class _Reject(Exception):
    """An answer in Daraja's error envelope."""

    def __init__(self, http_status, error_code, message):
        self.http_status, self.error_code, self.message = http_status, error_code, message


class _Raw(Exception):
    """An answer that is not Daraja's JSON: Apigee's HTML page, a bare 503."""

    def __init__(self, http_status, content_type, data=b"", headers=()):
        self.http_status, self.content_type = http_status, content_type
        self.data, self.headers = data, list(headers)


class _ControlError(Exception):
    """A /_sim/ control endpoint refusing a request: {"error": {"code", "message"}}."""

    def __init__(self, http_status, code, message):
        self.http_status, self.code, self.message = http_status, code, message


def _invalid(name):
    return _Reject(400, "400.002.02", f"Bad Request - Invalid {name}")


@dataclass
class _Push:
    checkout_id: str
    merchant_id: str
    phone: str
    amount: int
    callback_url: str
    result_code: int | str  # a number, or an alphanumeric code such as "SFC_IC0003"
    decided_at: float  # monotonic: before it, queries answer "pending"
    kind: str = "result"  # its SCENARIOS kind
    accepted_at: float = 0.0  # monotonic
    receipt: str | None = None
    callback_body: bytes = b""  # built once, so a resend is the same bytes


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    url: str = field(compare=False)
    body: bytes = field(compare=False)


class _CallbackSender:
    """Delivers callbacks when due, from a few worker threads; never retries (as Daraja)."""

    def __init__(self, workers, shortcode, count, delivered=None):
        self._heap = []
        self._delivered = delivered
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._stopped = False
        self._shortcode = shortcode
        self._count = count
        self._timings_lock = threading.Lock()
        self._timings = collections.deque(maxlen=200_000)
        # Loopback targets only: never route callbacks through an environment proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._threads = [threading.Thread(target=self._run, name=f"sim-callback-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def schedule(self, due, url, body):
        with self._cv:
            heapq.heappush(self._heap, _Delivery(due, next(self._seq), url, body))
            self._cv.notify()

    def stop(self):
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    def _next(self):
        with self._cv:
            while not self._stopped:
                now = time.monotonic()
                if self._heap and self._heap[0].due <= now:
                    return heapq.heappop(self._heap)
                self._cv.wait(timeout=(self._heap[0].due - now) if self._heap else None)
            return None

    def timings(self):
        with self._timings_lock:
            rows = list(self._timings)
        answer = sorted(t for t, _ in rows)

        def pct(p):
            return round(answer[min(len(answer) - 1, int(p * len(answer)))] * 1000, 1)

        return {"count": len(rows), "p50_ms": pct(0.5) if rows else None,
                "p99_ms": pct(0.99) if rows else None,
                "max_ms": round(answer[-1] * 1000, 1) if rows else None,
                "late_1s": sum(1 for _, late in rows if late > 1.0)}

    def reset_timings(self):
        with self._timings_lock:
            self._timings.clear()
        return {"count": 0}

    def _run(self):
        while (delivery := self._next()) is not None:
            request = urllib.request.Request(delivery.url, data=delivery.body, method="POST", headers={
                "Content-Type": "application/json;charset=UTF-8",
                "BusinessShortCode": self._shortcode,
            })
            started = time.monotonic()
            try:
                with self._opener.open(request, timeout=10) as resp:
                    resp.read()
                answered = time.monotonic()
                with self._timings_lock:
                    # (how long the receiver took to answer, how late after it was due)
                    self._timings.append((answered - started, answered - delivery.due))
                self._count("callbacks_sent")
                if self._delivered is not None:
                    self._delivered.append((delivery.url, delivery.body))
            except Exception as exc:  # noqa: BLE001 - a lost callback is part of the model
                self._count("callbacks_failed")
                log.info("callback delivery failed: %s", type(exc).__name__)


class Simulator:
    """The WSGI app. `on_push(payload)` is called for each push received (test shim)."""

    def __init__(self, settings=None, on_push=None):
        self.settings = settings or SimSettings()
        self.on_push = on_push
        self._lock = threading.Lock()
        self._stats = dict(token_requests=0, tokens_issued=0, pushes=0, pushes_accepted=0,
                           pushes_rejected=0, queries=0, callbacks_scheduled=0,
                           callbacks_sent=0, callbacks_failed=0, weather_answers=0)
        self._tokens = {}  # access_token → monotonic expiry
        self.issued_tokens = []
        self._pushes = {}  # CheckoutRequestID → _Push
        self._open_prompts = {}  # phone → monotonic time its prompt closes
        self._weather = Weather()  # replaced whole under _lock; request threads read a snapshot
        basic = f"{self.settings.consumer_key}:{self.settings.consumer_secret}"
        self._basic = "Basic " + base64.b64encode(basic.encode()).decode()
        self.delivered = [] if self.settings.record_deliveries else None
        self._sender = _CallbackSender(self.settings.callback_workers, self.settings.shortcode,
                                       self.count, self.delivered)
        # path → {method: handler}; plus the one prefix route, /_sim/callbacks/<id>/resend.
        self._routes = {
            "/oauth/v1/generate": {"GET": self._oauth},
            "/mpesa/stkpush/v1/processrequest": {"POST": self._push},
            "/mpesa/stkpushquery/v1/query": {"POST": self._query},
            "/_sim/stats": {"GET": lambda environ: (200, self.stats())},
            "/_sim/timings": {"GET": lambda environ: (200, self.timings()),
                              "DELETE": lambda environ: (200, self.reset_timings())},
            "/_sim/weather": {"GET": lambda environ: (200, self.weather()),
                              "POST": self._post_weather},
        }

    def stop(self):
        self._sender.stop()

    def revoke_tokens(self):
        """Forget every issued token, as Daraja does when another instance takes a new one."""
        with self._lock:
            self._tokens.clear()

    def count(self, name, n=1):
        with self._lock:
            self._stats[name] = self._stats.get(name, 0) + n

    def stats(self):
        with self._lock:
            return dict(self._stats)

    def timings(self):
        """Callback deliveries since the last reset: how fast the receiver answered
        (p50/p99/max ms) and how many were answered more than 1 s after they were due
        (Daraja does not retry a callback that times out). For the `rush` benchmark."""
        return self._sender.timings()

    def reset_timings(self):
        return self._sender.reset_timings()

    def weather(self):
        """The current weather: {"push", "query", "oauth": one of WEATHERS, "slow_s"}."""
        with self._lock:
            return asdict(self._weather)

    def set_weather(self, push=None, query=None, oauth=None, slow_s=None):
        """Change some APIs' weather (None: unchanged); ValueError for an unknown value."""
        given = dict(push=push, query=query, oauth=oauth, slow_s=slow_s)
        return self._change_weather({k: v for k, v in given.items() if v is not None})

    def _change_weather(self, changes):
        checked = _weather_changes(changes)  # all checked before any applies
        with self._lock:
            self._weather = replace(self._weather, **checked)
            now = asdict(self._weather)
        log.info("weather push=%s query=%s oauth=%s slow_s=%g",
                 now["push"], now["query"], now["oauth"], now["slow_s"])
        return now

    def resend_callback(self, checkout_id):
        """Send a push's callback again, same body: now, or when its result is decided.

        KeyError if no push has this CheckoutRequestID.  Works for every accepted push,
        including one answered 500 by `internal` weather and one whose callback is never sent.
        """
        with self._lock:
            push = self._pushes.get(checkout_id) if isinstance(checkout_id, str) else None
        if push is None:
            raise KeyError(checkout_id)
        self.count("callbacks_scheduled")
        self._sender.schedule(max(time.monotonic(), push.decided_at), push.callback_url,
                              push.callback_body)

    # --- WSGI -----------------------------------------------------------------

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        try:
            handlers = self._route(path)
            if handlers is None:
                raise _Reject(404, "404.001.01", "Resource not found")
            if method not in handlers:
                raise _Reject(405, "405.001", f"{method} Method Not Allowed")
            if not path.startswith("/_sim/") and self.settings.latency_ms:
                time.sleep(self.settings.latency_ms / 1000)
            status, body = handlers[method](environ)
        except _Reject as exc:
            status = exc.http_status
            body = {"requestId": _request_id(), "errorCode": exc.error_code,
                    "errorMessage": exc.message}
        except _ControlError as exc:
            status, body = exc.http_status, {"error": {"code": exc.code, "message": exc.message}}
        except _Raw as exc:  # sent as is: not every answer from "Daraja" is JSON
            status, body = exc.http_status, exc
        headers = []
        if isinstance(body, _Raw):
            data, ctype, headers = body.data, body.content_type, body.headers
        elif body is None:
            data, ctype = b"", "text/plain"
        else:
            data, ctype = json.dumps(body).encode(), "application/json;charset=UTF-8"
        start_response(f"{status} {_REASONS.get(status, 'Error')}",
                       [("Content-Type", ctype), ("Content-Length", str(len(data))), *headers])
        return [data]

    def _route(self, path):
        """{method: handler} for a path, or None."""
        if path in self._routes:
            return self._routes[path]
        match = _RESEND_PATH.fullmatch(path)
        if match:
            return {"POST": lambda environ: self._post_resend(match.group(1))}
        return None

    def _weather_gate(self, api):
        """Answer for `api`'s weather before anything is processed; return the weather.

        Runs before the token and body checks: the API gateway in front of M-Pesa answers
        maintenance, spike arrest and the rest without looking at the request.
        """
        with self._lock:
            weather = self._weather
        value = getattr(weather, api)
        if value == "ok" or (api == "push" and value == "internal"):
            return value  # a push under `internal` is processed first, then answered 500
        self.count("weather_answers")
        if value == "slow":
            time.sleep(weather.slow_s)
        elif value == "html":
            raise _Raw(200, "text/html; charset=utf-8", SPA_PROXY_PAGE)
        elif value == "retry_after":
            raise _Raw(503, "text/plain", b"", [("Retry-After", str(RETRY_AFTER_S))])
        else:
            raise _Reject(500, *_WEATHER_ERRORS[value])
        return value

    # --- control endpoints (/_sim/) ---------------------------------------------

    def _post_weather(self, environ):
        changes = _read_control_json(environ)
        try:
            return 200, self._change_weather(changes)
        except ValueError as exc:
            raise _ControlError(400, "invalid_weather", str(exc)) from None

    def _post_resend(self, checkout_id):
        try:
            self.resend_callback(checkout_id)
        except KeyError:
            raise _ControlError(404, "unknown_checkout_request_id",
                                "no push has this CheckoutRequestID") from None
        return 200, {"scheduled": True}

    # --- OAuth ------------------------------------------------------------------

    def _oauth(self, environ):
        self.count("token_requests")
        self._weather_gate("oauth")
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if not auth.startswith("Basic "):
            raise _Reject(400, "400.008.01", "Invalid Authentication passed")
        if parse_qs(environ.get("QUERY_STRING", "")).get("grant_type") != ["client_credentials"]:
            raise _Reject(400, "400.008.02", "Invalid grant type passed")
        if not secrets.compare_digest(auth, self._basic):
            return 400, None  # wrong key/secret: an empty 400, as reported
        token = "".join(secrets.choice(_ALNUM + "abcdefghijklmnopqrstuvwxyz") for _ in range(28))
        now = time.monotonic()
        with self._lock:
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + self.settings.token_ttl_s
            self._stats["tokens_issued"] += 1
            self.issued_tokens.append(token)  # so tests can prove none is ever logged
        return 200, {"access_token": token, "expires_in": str(self.settings.token_ttl_s)}

    def _check_bearer(self, environ):
        auth = environ.get("HTTP_AUTHORIZATION", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        with self._lock:
            expiry = self._tokens.get(token)
        if expiry is None or expiry <= time.monotonic():
            raise _Reject(404, "404.001.03", "Invalid Access Token")

    def _read_json(self, environ):
        if not environ.get("CONTENT_TYPE", "").lower().startswith("application/json"):
            # Daraja's documented quirk for a missing/wrong Content-Type.
            raise _invalid("BusinessShortCode")
        body = _read_body_json(environ)
        if not isinstance(body, dict):
            raise _Reject(400, "400.002.05", "Invalid Request Payload")
        return body

    def _check_credentials(self, body):
        """BusinessShortCode, Timestamp and the Password derived from both."""
        shortcode = _numeric(body.get("BusinessShortCode"), _SHORTCODE)
        if shortcode is None:
            raise _invalid("BusinessShortCode")
        password, timestamp = body.get("Password"), body.get("Timestamp")
        if not isinstance(password, str) or not password:
            raise _invalid("Password")
        if not isinstance(timestamp, str) or not _valid_timestamp(timestamp):
            raise _invalid("Timestamp")
        return shortcode, password, timestamp

    def _check_merchant(self, shortcode, password, timestamp):
        s = self.settings
        if shortcode != s.shortcode:
            raise _Reject(500, "500.001.1001", "Merchant does not exist")
        expected = base64.b64encode((s.shortcode + s.passkey + timestamp).encode()).decode()
        if not secrets.compare_digest(password.encode(), expected.encode()):
            raise _Reject(500, "500.001.1001", "Wrong credentials")

    # --- STK push ---------------------------------------------------------------

    def _push(self, environ):
        self.count("pushes")
        try:
            weather = self._weather_gate("push")
            self._check_bearer(environ)
            body = self._read_json(environ)
            shortcode, password, timestamp = self._check_credentials(body)
            push = self._validate_push(body)
            self._check_merchant(shortcode, password, timestamp)
            if self.on_push is not None:
                self.on_push(body)
            answer = self._accept(push)
        except (_Reject, _Raw):
            self.count("pushes_rejected")
            raise
        self.count("pushes_accepted")
        if push.kind == "slow_answer":
            time.sleep(self.settings.slow_answer_s)
        if weather == "internal":
            # The prompt is open and its callback scheduled; only the answer is lost.  A client
            # must treat this push as possibly sent, never as refused.
            self.count("weather_answers")
            raise _Reject(500, *_WEATHER_ERRORS["internal"])
        return 200, answer

    def _validate_push(self, body):
        s = self.settings
        if body.get("TransactionType") not in ("CustomerPayBillOnline", "CustomerBuyGoodsOnline"):
            raise _invalid("TransactionType")
        amount = body.get("Amount")
        amount = int(_numeric(amount, _DIGITS) or 0) if not isinstance(amount, float) else 0
        if not 1 <= amount <= s.max_amount:
            raise _invalid("Amount")
        party_a = _numeric(body.get("PartyA"), _MSISDN)
        if party_a is None:
            raise _invalid("PartyA")
        if _numeric(body.get("PartyB"), _SHORTCODE) is None:
            raise _invalid("PartyB")
        phone = _numeric(body.get("PhoneNumber"), _MSISDN)
        if phone is None:
            raise _invalid("PhoneNumber")
        url = body.get("CallBackURL")
        if not isinstance(url, str) or not _valid_callback_url(url):
            raise _invalid("CallBackURL")
        # The length limits are simulator policy (strict_lengths): SDKs enforce them, but no
        # captured Daraja traffic shows the gateway refusing longer values at submit time.
        reference = body.get("AccountReference")
        if not isinstance(reference, str) or not reference or (
                s.strict_lengths and len(reference) > 12):
            raise _invalid("AccountReference")
        desc = body.get("TransactionDesc", "")
        if not isinstance(desc, str) or (s.strict_lengths and len(desc) > 13):
            raise _invalid("TransactionDesc")
        return _Push(checkout_id="", merchant_id="", phone=phone, amount=amount,
                     callback_url=url, result_code=0, decided_at=0.0)

    def _accept(self, push):
        s = self.settings
        kind, code = SCENARIOS.get(push.phone, ("result", 0))
        if kind == "refuse_lock":
            raise _Reject(500, "500.001.1001", LOCK_MESSAGE)
        if kind == "refuse_spike":
            raise _Reject(500, "500.003.02", "Error Occurred: Spike Arrest Violation")
        now, wall = time.monotonic(), datetime.now(EAT)
        # A slow answer's customer decides after it: the client that gave up has answered
        # `unknown` before the callback settles the payment.
        delay = s.callback_delay_s + (s.slow_answer_s if kind == "slow_answer" else 0)
        decided = wall + timedelta(seconds=delay)
        with self._lock:
            if s.lock_subscriber and self._open_prompts.get(push.phone, 0) > now:
                raise _Reject(500, "500.001.1001", LOCK_MESSAGE)
            self._open_prompts[push.phone] = now + delay
            checkout_id = _checkout_id(wall, push.phone)
            while checkout_id in self._pushes:
                checkout_id = _checkout_id(wall, push.phone, bump=len(self._pushes))
            push.checkout_id, push.merchant_id, push.kind = checkout_id, _request_id(), kind
            push.result_code, push.accepted_at = code, now
            push.decided_at = now + delay
            push.receipt = _receipt(wall) if code == 0 else None
            # Built before the push is visible, so a resend can never see it half made.
            push.callback_body = json.dumps(_callback_body(push, decided)).encode()
            self._pushes[checkout_id] = push
        deliveries = {"no_callback": 0, "callback_twice": 2}.get(kind, 1)
        for i in range(deliveries):
            self.count("callbacks_scheduled")
            self._sender.schedule(push.decided_at + 0.1 * i, push.callback_url, push.callback_body)
        return {
            "MerchantRequestID": push.merchant_id,
            "CheckoutRequestID": checkout_id,
            "ResponseCode": "0",
            "ResponseDescription": "Success. Request accepted for processing",
            "CustomerMessage": "Success. Request accepted for processing",
        }

    # --- STK query --------------------------------------------------------------

    def _query(self, environ):
        s = self.settings
        self.count("queries")
        self._weather_gate("query")
        self._check_bearer(environ)
        body = self._read_json(environ)
        self._check_merchant(*self._check_credentials(body))
        checkout_id = body.get("CheckoutRequestID")
        with self._lock:
            push = self._pushes.get(checkout_id) if isinstance(checkout_id, str) else None
        now = time.monotonic()
        if push is None or now < push.accepted_at + s.query_not_found_s:
            # A push this young is as unknown as one never made (observed for ~30 s).
            raise _Reject(500, "500.001.1001", "The transaction does not Exist")
        if now < push.decided_at and s.query_pending == "processing":
            raise _Reject(500, "500.001.1001", "The transaction is being processed")
        if now < push.decided_at and s.query_pending == "empty":
            raise _Reject(500, "500.001.1001", "")
        answer = {
            "ResponseCode": "0",
            "ResponseDescription": "The service request has been accepted successfully",
            "MerchantRequestID": push.merchant_id,
            "CheckoutRequestID": push.checkout_id,
        }
        if now < push.decided_at:
            answer.update(ResultCode="4999", ResultDesc="The transaction is still under processing")
        else:
            answer.update(ResultCode=str(push.result_code),
                          ResultDesc=RESULT_DESCS.get(push.result_code, "Failed"))
        return 200, answer


# --- Daraja's formats ---------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


def _read_body_json(environ):
    """The request body parsed as JSON (at most MAX_BODY bytes); Daraja's 400 if it is not."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    raw = environ["wsgi.input"].read(min(max(length, 0), MAX_BODY))
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise _Reject(400, "400.002.05", "Invalid Request Payload") from None


def _read_control_json(environ):
    """A /_sim/ request's JSON object; any Content-Type, so a bare `curl -d` works."""
    try:
        body = _read_body_json(environ)
    except _Reject:
        body = None
    if not isinstance(body, dict):
        raise _ControlError(400, "invalid_json", "the body must be a JSON object")
    return body


def _numeric(value, pattern):
    """A number or numeric string matching `pattern`, as a string; else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and pattern.fullmatch(value) else None


def _valid_timestamp(value):
    if not _TIMESTAMP.fullmatch(value):
        return False
    try:
        datetime.strptime(value, "%Y%m%d%H%M%S")
    except ValueError:
        return False
    return True


def _valid_callback_url(url):
    if url != url.strip() or any(c.isspace() for c in url):
        return False
    parts = urlsplit(url)
    return (parts.scheme in ("http", "https") and bool(parts.hostname)
            and parts.netloc == parts.netloc.lower())


def _request_id():
    """The newer Daraja id form: 3 hex groups, then hex and digits."""
    h = secrets.token_hex(12)
    return f"{h[:4]}-{h[4:8]}-{h[8:12]}-{h[12:]}{secrets.randbelow(10**7):07d}"


def _checkout_id(wall, phone, bump=0):
    """ws_CO_ + DDMMYYYYHHmmss (EAT) + milliseconds + the last 9 digits of the MSISDN."""
    millis = (wall.microsecond // 1000 + bump) % 1000
    return f"ws_CO_{wall:%d%m%Y%H%M%S}{millis:03d}{phone[-9:]}"


def _receipt(wall):
    """10 upper-case characters: year, month and day letters, then 7 random ones."""
    year = chr(ord("L") + wall.year - 2017) if 2017 <= wall.year <= 2031 else "Z"
    prefix = year + "ABCDEFGHIJKL"[wall.month - 1] + _DAY_CHARS[wall.day - 1]
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(7))


def _masked(phone):
    """2547******111: whether Daraja now masks the callback's PhoneNumber is unknown (§4)."""
    return phone[:4] + "*" * 6 + phone[-3:]


def _callback_body(push, decided):
    stk = {
        "MerchantRequestID": push.merchant_id,
        "CheckoutRequestID": push.checkout_id,
        "ResultCode": push.result_code,
        "ResultDesc": RESULT_DESCS.get(push.result_code, "Failed"),
    }
    if push.result_code == 0:
        items = [
            {"Name": "Amount", "Value": float(push.amount)},
            {"Name": "MpesaReceiptNumber", "Value": push.receipt},
            {"Name": "Balance"},
            {"Name": "TransactionDate", "Value": int(f"{decided:%Y%m%d%H%M%S}")},
        ]
        if push.kind == "masked_phone":
            items.append({"Name": "PhoneNumber", "Value": _masked(push.phone)})
        elif push.kind != "no_phone":
            items.append({"Name": "PhoneNumber", "Value": int(push.phone)})
        stk["CallbackMetadata"] = {"Item": items}
    return {"Body": {"stkCallback": stk}}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mpesa_devtools.simulator",
                                     description="Daraja simulator (loopback only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import waitress  # only when serving: the class above needs no server

    sim = Simulator(SimSettings.from_env(os.environ))
    try:
        waitress.serve(sim, host=args.host, port=args.port, threads=args.threads)
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
