"""A Daraja double: OAuth, STK push, STK query and callbacks, C2B and Dynamic QR, on loopback.

Owns everything a test, the demo or a benchmark needs from "Safaricom": the
OAuth endpoint (Basic auth and grant_type checked, `expires_in` as a string),
STK push with Daraja's field validation and error envelope, STK query (string
`ResultCode`), and callbacks POSTed by background threads after a configurable
delay in Daraja's real shapes (items by name, `Balance` without a value, EAT
`TransactionDate`).  Outcomes are chosen by the phone number (SCENARIOS),
including alphanumeric codes (`SFC_IC0003`, a string even in the callback) and
successes whose `PhoneNumber` item is masked or missing.

Paybill and Till (C2B, daraja_api.md §6): URLs registered per shortcode (v1 or v2; the
STK-only 174379 refused with the URL-vault fault, Daraja's forbidden words refused), and
a simulated payment that, after the callback delay, POSTs the validation request (when
`c2b_validation` is on; no answer in time: the registered ResponseType decides) and the
confirmation, every field a string, the MSISDN hashed (v1) or masked (v2).  Never resent;
nothing is sent for a shortcode without URLs.  The account number `C2BTWICE` sends the
confirmation twice.  Dynamic QR answers a real PNG (needs segno, imported only there).

The initiator APIs (Reversal, Transaction Status, Account Balance, daraja_api.md §7) live
in sim_initiator.py, which the Simulator composes: it lends them its lock, counters,
callback sender and token check, and tells them each receipt it issues.

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
  GET  /_sim/initiator, POST /_sim/initiator  the initiator APIs' mode, result delay,
                                              single ResultParameter, unlock
                                              (`initiator()`, `set_initiator(...)`,
                                              `unlock_initiator()`)
  GET  /_sim/initiator/certificate            the initiator's certificate, PEM
                                              (`initiator_certificate_pem()`)
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
import hashlib
import heapq
import io
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

from mpesa_devtools import sim_initiator

log = logging.getLogger("simulator")

EAT = timezone(timedelta(hours=3), "EAT")
SANDBOX_SHORTCODE = "174379"
SANDBOX_PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
DEMO_CONSUMER_KEY = "demo-consumer-key"  # the real sandbox's keys are per app, never public
DEMO_CONSUMER_SECRET = "demo-consumer-secret"
SANDBOX_INITIATOR_NAME = "testapi"  # the sandbox's public initiator (daraja_api.md §7.1)
SANDBOX_INITIATOR_PASSWORD = "Safaricom123!!"
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

# C2B (daraja_api.md §6). 174379 is Lipa-Na-M-Pesa-Online only: registering its URLs fails
# in the URL vault (Apigee's wording for a ServiceCallout answered 409).
URL_VAULT_FAULT = ("Execution of ServiceCallout SCO-AddURLVault failed. Reason: ResponseCode 409"
                   " is treated as error")
C2B_RESPONSE_TYPES = ("Completed", "Cancelled")  # what happens when validation goes unanswered
C2B_BANNED_WORDS = ("m-pesa", "mpesa", "safaricom", "exe", "exec", "cmd", "sql", "query")
C2B_COMMANDS = {"CustomerPayBillOnline": "Pay Bill", "CustomerBuyGoodsOnline": "Buy Goods"}
C2B_TWICE = "C2BTWICE"  # this account number: the confirmation is sent twice, same TransID
C2B_FIRST_NAME = "JOHN"
# Register URL's answer per version: (ResponseCode, ResponseDescription).
_C2B_REGISTERED = {"v1": ("0", "success"), "v2": ("00000000", "Success")}
# Dynamic QR (§6.4): the content of a real M-Pesa QR is not public; the simulator's is JSON.
QR_TRX_CODES = ("BG", "PB", "WA", "SM", "SB")
QR_DEFAULT_SIZE = 300
QR_MAX_SIZE = 2000  # pixels a side
QR_MAX_TEXT = 100  # MerchantName and RefNo, at most (simulator policy: the code stays small)
_CPI = re.compile(r"[0-9]{5,12}")  # a till, a paybill or a phone


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


def _positive(raw):
    value = _non_negative(raw)
    if value == 0:
        raise ValueError("must be a number more than 0")
    return value


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
    ("c2b_validation", "MPESA_SIM_C2B_VALIDATION", _on_off, False,
     "C2B: POST the validation request before the confirmation (External Validation)"),
    ("c2b_validation_timeout_s", "MPESA_SIM_C2B_VALIDATION_TIMEOUT_S", _positive, 8.0,
     "C2B: how long a validation answer is awaited; then ResponseType decides"),
    ("initiator_name", "MPESA_SIM_INITIATOR_NAME", str, SANDBOX_INITIATOR_NAME,
     "initiator APIs: the InitiatorName"),
    ("initiator_password", "MPESA_SIM_INITIATOR_PASSWORD", str, SANDBOX_INITIATOR_PASSWORD,
     "initiator APIs: the password a SecurityCredential must hold"),
    ("result_delay_s", "MPESA_SIM_RESULT_DELAY_S", _non_negative, 1.0,
     "initiator APIs: request acknowledged → Result POSTed"),
    ("cert_file", "MPESA_SIM_CERT_FILE", str, "",
     "initiator APIs: write the certificate (PEM) here at start"),
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
        checks = (("query_pending", _query_pending), ("query_not_found_s", _non_negative),
                  ("c2b_validation_timeout_s", _positive), ("result_delay_s", _non_negative))
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


def _c2b_shortcode(body):
    """A C2B body's ShortCode, 5 to 7 digits (a string or a number), or the refusal."""
    shortcode = _numeric(_c2b_required(body, "ShortCode"), _SHORTCODE)
    if shortcode is None:
        raise _invalid("ShortCode")
    return shortcode


def _c2b_required(body, name):
    """A C2B field that must be there: absent, null or "" is Daraja's bare 400.003.02."""
    value = body.get(name)
    if value is None or value == "":
        raise _Reject(400, "400.003.02", "Bad Request")
    return value


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


@dataclass(frozen=True)
class _C2BUrls:
    """What one shortcode registered, and through which version (v1 hashes the MSISDN)."""

    response_type: str
    confirmation_url: str
    validation_url: str
    version: str


@dataclass(frozen=True)
class _C2BPayment:
    shortcode: str
    command: str
    amount: int
    msisdn: str
    bill_ref: str  # "" for a till
    urls: _C2BUrls


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    url: str = field(compare=False)
    body: bytes = field(compare=False)
    job: object = field(default=None, compare=False)  # run instead of a POST (a C2B payment)


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

    def schedule(self, due, url, body, job=None):
        with self._cv:
            heapq.heappush(self._heap, _Delivery(due, next(self._seq), url, body, job))
            self._cv.notify()

    def schedule_job(self, due, job):
        """Run job() on a sender thread when due (it makes its own POSTs with `post`)."""
        self.schedule(due, "", b"", job)

    def post(self, url, body, timeout):
        """POST JSON once and return the answer's body; raises on no answer or a non-2xx."""
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json;charset=UTF-8"})
        with self._opener.open(request, timeout=timeout) as resp:
            return resp.read(MAX_BODY)

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
            if delivery.job is not None:
                try:
                    delivery.job()
                except Exception:  # noqa: BLE001 - one broken job must not stop the sender
                    log.exception("simulator job failed")
                continue
            request = urllib.request.Request(
                delivery.url, data=delivery.body, method="POST",
                headers={"Content-Type": "application/json;charset=UTF-8",
                         "BusinessShortCode": self._shortcode})
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
                           callbacks_sent=0, callbacks_failed=0, weather_answers=0,
                           c2b_registrations=0, c2b_simulations=0, c2b_unregistered=0,
                           c2b_validations_sent=0, c2b_validations_rejected=0,
                           c2b_validations_unanswered=0, c2b_cancelled=0,
                           c2b_confirmations_sent=0, c2b_confirmations_failed=0, qr_codes=0,
                           **dict.fromkeys(sim_initiator.COUNTERS, 0))
        self._tokens = {}  # access_token → monotonic expiry
        self.issued_tokens = []
        self._pushes = {}  # CheckoutRequestID → _Push
        self._open_prompts = {}  # phone → monotonic time its prompt closes
        self._weather = Weather()  # replaced whole under _lock; request threads read a snapshot
        self._c2b_urls = {}  # shortcode → _C2BUrls
        self._c2b_balances = {}  # shortcode → whole shillings received (OrgAccountBalance)
        self.c2b_confirmations = []  # (url, body bytes) of each confirmation answered 2xx
        self.c2b_rejections = []  # (TransID, ResultCode) of each payment validation refused
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
            "/mpesa/c2b/v1/registerurl": {"POST": lambda environ: self._register(environ, "v1")},
            "/mpesa/c2b/v2/registerurl": {"POST": lambda environ: self._register(environ, "v2")},
            "/mpesa/c2b/v1/simulate": {"POST": self._c2b_simulate},
            "/mpesa/c2b/v2/simulate": {"POST": self._c2b_simulate},
            "/mpesa/qrcode/v1/generate": {"POST": self._qr_generate},
            "/_sim/stats": {"GET": lambda environ: (200, self.stats())},
            "/_sim/timings": {"GET": lambda environ: (200, self.timings()),
                              "DELETE": lambda environ: (200, self.reset_timings())},
            "/_sim/weather": {"GET": lambda environ: (200, self.weather()),
                              "POST": self._post_weather},
        }
        self._initiator = sim_initiator.InitiatorApis(sim_initiator.Parts(
            settings=self.settings, lock=self._lock, count=self.count, sender=self._sender,
            check_bearer=self._check_bearer, read_body=_read_body_json, reject=_Reject,
            control_error=_ControlError, raw=_Raw, receipt=_receipt, request_id=_request_id,
            valid_url=_valid_callback_url))
        self._routes.update(self._initiator.routes())
        self.initiator_results = self._initiator.results  # (url, body) of each answered 2xx
        self.initiator_requests = self._initiator.received  # (api, TransactionID) acknowledged

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

    def registered_urls(self, shortcode):
        """What `shortcode` registered: {"ResponseType", "ConfirmationURL", "ValidationURL",
        "version"}, or None."""
        with self._lock:
            urls = self._c2b_urls.get(str(shortcode))
        if urls is None:
            return None
        return {"ResponseType": urls.response_type, "ConfirmationURL": urls.confirmation_url,
                "ValidationURL": urls.validation_url, "version": urls.version}

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

    def initiator_certificate_pem(self):
        """The initiator's self-signed certificate, PEM bytes: what a SecurityCredential is
        encrypted with. sim_initiator.CryptographyMissing without `cryptography`."""
        return self._initiator.certificate_pem()

    def initiator(self):
        """The initiator APIs' state: {"mode", "result_delay_s", "single_parameter",
        "locked", "failures"}."""
        return self._initiator.state()

    def set_initiator(self, mode=None, result_delay_s=None, single_parameter=None):
        """Change the initiator APIs' mode ("normal", "timeout", "silent"), result delay or
        single-object ResultParameter (None: unchanged); ValueError for a bad value."""
        given = dict(mode=mode, result_delay_s=result_delay_s, single_parameter=single_parameter)
        return self._initiator.change({k: v for k, v in given.items() if v is not None})

    def unlock_initiator(self):
        """Unlock the initiator locked by refused credentials (8006 → normal again)."""
        return self._initiator.change({"unlock": True})

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

    def _check_bearer(self, environ, status=404, code="404.001.03",
                      message="Invalid Access Token"):
        """A live token, else "Invalid Access Token": 404.001.03 (STK), 400.003.01 (C2B);
        the initiator APIs' 401.002.01 message echoes the token sent (`{token}`)."""
        auth = environ.get("HTTP_AUTHORIZATION", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        with self._lock:
            expiry = self._tokens.get(token)
        if expiry is None or expiry <= time.monotonic():
            raise _Reject(status, code, message.format(token=token or ""))

    def _answer_lost(self, weather):
        """Under `internal` weather a request is processed, then answered 500: a client
        must treat it as possibly done, never as refused."""
        if weather == "internal":
            self.count("weather_answers")
            raise _Reject(500, *_WEATHER_ERRORS["internal"])

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
        self._answer_lost(weather)  # under `internal`: the prompt is open, its callback scheduled
        return 200, answer

    def _validate_push(self, body):
        s = self.settings
        if body.get("TransactionType") not in ("CustomerPayBillOnline", "CustomerBuyGoodsOnline"):
            raise _invalid("TransactionType")
        amount = _amount(body.get("Amount"))
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
        if push.receipt is not None:  # paid once decided: then Reversal and Status know it
            self._initiator.paid(push.receipt, push.amount, _customer(push.phone),
                                 s.shortcode, "stk", wall, decided, visible_at=push.decided_at)
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

    # --- C2B: register URL, simulate, and the payment's validation and confirmation ------
    # The C2B APIs and Dynamic QR answer to the `push` weather (the APIs that take payments).

    def _register(self, environ, version):
        weather = self._weather_gate("push")
        self._check_bearer(environ, 400, "400.003.01")
        body = self._read_json(environ)
        shortcode = _c2b_shortcode(body)
        response_type = _c2b_required(body, "ResponseType")
        if response_type not in C2B_RESPONSE_TYPES:
            raise _invalid("ResponseType")
        urls = [_c2b_required(body, name) for name in ("ConfirmationURL", "ValidationURL")]
        for name, url in zip(("ConfirmationURL", "ValidationURL"), urls):
            if not _valid_c2b_url(url):
                raise _invalid(name)
        if shortcode == SANDBOX_SHORTCODE:
            raise _Reject(500, "500.003.1001", URL_VAULT_FAULT)
        with self._lock:  # the sandbox lets a shortcode re-register freely: the last one wins
            self._c2b_urls[shortcode] = _C2BUrls(response_type, *urls, version)
            self._stats["c2b_registrations"] += 1
        self._answer_lost(weather)
        code, description = _C2B_REGISTERED[version]
        return 200, {"OriginatorCoversationID": _request_id(), "ResponseCode": code,
                     "ResponseDescription": description}

    def _c2b_simulate(self, environ):
        weather = self._weather_gate("push")
        self._check_bearer(environ, 400, "400.003.01")
        payment = self._c2b_payment(self._read_json(environ))
        self.count("c2b_simulations")
        if payment.urls is None:
            self.count("c2b_unregistered")  # completed silently: nobody is told
        else:
            self._sender.schedule_job(time.monotonic() + self.settings.callback_delay_s,
                                      lambda: self._c2b_pay(payment))
        self._answer_lost(weather)
        return 200, {"OriginatorCoversationID": _request_id(), "ResponseCode": "0",
                     "ResponseDescription": "Accept the service request successfully."}

    def _c2b_payment(self, body):
        shortcode = _c2b_shortcode(body)
        command = _c2b_required(body, "CommandID")
        if command not in C2B_COMMANDS:
            raise _invalid("CommandID")
        amount = _amount(_c2b_required(body, "Amount"))
        if not 1 <= amount <= self.settings.max_amount:
            raise _invalid("Amount")
        msisdn = _numeric(_c2b_required(body, "Msisdn"), _MSISDN)
        if msisdn is None:
            raise _invalid("Msisdn")
        bill_ref = ""  # a till has no account number: whatever was sent is ignored
        if command == "CustomerPayBillOnline":
            bill_ref = _c2b_required(body, "BillRefNumber")
            if isinstance(bill_ref, int) and not isinstance(bill_ref, bool):
                bill_ref = str(bill_ref)  # types are loose: an account number may be a number
            if not isinstance(bill_ref, str):
                raise _invalid("BillRefNumber")
        with self._lock:  # the URLs as registered when the customer pays
            urls = self._c2b_urls.get(shortcode)
        return _C2BPayment(shortcode, command, amount, msisdn, bill_ref, urls)

    def _c2b_pay(self, payment):
        """The payment, on a sender thread: validation (when on), then the confirmation."""
        wall = datetime.now(EAT)
        fields = _c2b_fields(payment, _receipt(wall), wall)
        if self.settings.c2b_validation:
            third_party_id = self._c2b_validate(payment.urls, fields)
            if third_party_id is None:
                return
            fields["ThirdPartyTransID"] = third_party_id
        with self._lock:
            balance = self._c2b_balances.get(payment.shortcode, 0) + payment.amount
            self._c2b_balances[payment.shortcode] = balance
        fields["OrgAccountBalance"] = f"{balance}.00"
        self._initiator.paid(fields["TransID"], payment.amount, _customer(payment.msisdn),
                             payment.shortcode, payment.command, wall, wall)
        body, url = json.dumps(fields).encode(), payment.urls.confirmation_url
        # Daraja never resends a confirmation that failed; C2BTWICE sends the same one twice.
        for _ in range(2 if payment.bill_ref == C2B_TWICE else 1):
            try:
                self._sender.post(url, body, timeout=10)
            except Exception as exc:  # noqa: BLE001 - a lost confirmation is part of the model
                self.count("c2b_confirmations_failed")
                log.info("C2B confirmation delivery failed: %s", type(exc).__name__)
                continue
            with self._lock:
                self._stats["c2b_confirmations_sent"] += 1
                self.c2b_confirmations.append((url, body))

    def _c2b_validate(self, urls, fields):
        """POST the validation request; the ThirdPartyTransID to confirm with, or None when
        the payment stops (refused, or unanswered under ResponseType Cancelled)."""
        body = json.dumps(fields).encode()  # OrgAccountBalance still blank, as Daraja sends it
        self.count("c2b_validations_sent")
        try:
            answer = json.loads(self._sender.post(urls.validation_url, body,
                                                  self.settings.c2b_validation_timeout_s))
            code = answer["ResultCode"]
        except Exception as exc:  # noqa: BLE001 - no usable answer in time: ResponseType decides
            self.count("c2b_validations_unanswered")
            log.info("C2B validation unanswered (%s): ResponseType %s",
                     type(exc).__name__, urls.response_type)
            if urls.response_type == "Cancelled":
                self.count("c2b_cancelled")
                return None
            return ""
        if code == "0" or (type(code) is int and code == 0):
            third_party_id = answer.get("ThirdPartyTransID")
            return third_party_id if isinstance(third_party_id, str) else ""
        with self._lock:
            self._stats["c2b_validations_rejected"] += 1
            self.c2b_rejections.append((fields["TransID"], code))
        return None

    # --- Dynamic QR ---------------------------------------------------------------

    def _qr_generate(self, environ):
        weather = self._weather_gate("push")
        self._check_bearer(environ)
        body = self._read_json(environ)
        png = _qr_png(_qr_text(body, self.settings.max_amount), _qr_size(body.get("Size")))
        self.count("qr_codes")
        self._answer_lost(weather)
        return 200, {"ResponseCode": "00", "RequestID": _request_id(),
                     "ResponseDescription": "QR Code Successfully Generated.",
                     "QRCode": base64.b64encode(png).decode()}


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


def _amount(value):
    """Whole shillings from a number or numeric string; 0 (invalid) for anything else."""
    return int(_numeric(value, _DIGITS) or 0) if not isinstance(value, float) else 0


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


def _valid_c2b_url(url):
    """A callback URL without any of the words Daraja forbids in C2B URLs, in any case."""
    return (isinstance(url, str) and _valid_callback_url(url)
            and not any(word in url.lower() for word in C2B_BANNED_WORDS))


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


def _customer(phone):
    """A customer's public name in initiator results: "2547******678 - JOHN"."""
    return f"{_masked(phone)} - {C2B_FIRST_NAME}"


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


def _c2b_msisdn(msisdn, version):
    """v1: the SHA-256 hex of the MSISDN; v2: masked, "2547 ***** 126"."""
    if version == "v1":
        return hashlib.sha256(msisdn.encode()).hexdigest()
    return f"{msisdn[:4]} {'*' * 5} {msisdn[-3:]}"


def _c2b_fields(payment, receipt, wall):
    """A validation or confirmation body, every value a string (daraja_api.md §6.2)."""
    return {
        "TransactionType": C2B_COMMANDS[payment.command],
        "TransID": receipt,
        "TransTime": f"{wall:%Y%m%d%H%M%S}",
        "TransAmount": f"{payment.amount}.00",
        "BusinessShortCode": payment.shortcode,
        "BillRefNumber": payment.bill_ref,
        "InvoiceNumber": "",
        "OrgAccountBalance": "",  # blank on validation; the new balance on confirmation
        "ThirdPartyTransID": "",
        "MSISDN": _c2b_msisdn(payment.msisdn, payment.urls.version),
        "FirstName": C2B_FIRST_NAME,
        "MiddleName": "",
        "LastName": "",
    }


def _qr_text(body, max_amount):
    """What the QR code says: compact JSON with the request's fields, in their order."""
    texts = {}
    for name in ("MerchantName", "RefNo"):
        value = body.get(name)
        if not isinstance(value, str) or not value.strip() or len(value) > QR_MAX_TEXT:
            raise _invalid(name)
        texts[name] = value
    amount = _amount(body.get("Amount"))
    if not 1 <= amount <= max_amount:
        raise _invalid("Amount")
    trx_code = body.get("TrxCode")
    if trx_code not in QR_TRX_CODES:
        raise _invalid("TrxCode")
    cpi = _numeric(body.get("CPI"), _CPI)
    if cpi is None:
        raise _invalid("CPI")
    return json.dumps({**texts, "Amount": amount, "TrxCode": trx_code, "CPI": cpi},
                      separators=(",", ":"))


def _qr_size(value):
    """Size: a string (or number) of pixels a side, QR_DEFAULT_SIZE when absent."""
    if value is None or value == "":
        return QR_DEFAULT_SIZE
    size = _amount(value)
    if not 1 <= size <= QR_MAX_SIZE:
        raise _invalid("Size")
    return size


def _qr_png(text, size):
    """The PNG of a QR code holding `text`, about `size` pixels a side."""
    try:
        import segno  # here only: the runtime package depends on waitress and urllib3 alone
    except ImportError:
        raise _Reject(500, "500.003.1001", "The simulator needs segno to draw QR codes:"
                      " pip install segno") from None
    qr = segno.make_qr(text, error="m")
    side = qr.symbol_size(border=4)[0]  # modules, the quiet zone included
    out = io.BytesIO()
    qr.save(out, kind="png", scale=max(1, round(size / side)), border=4)
    return out.getvalue()


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
