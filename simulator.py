"""A Daraja double: OAuth, STK push, STK query and callbacks, on loopback.

Owns everything a test, the demo or a benchmark needs from "Safaricom": the
OAuth endpoint (Basic auth and grant_type checked, `expires_in` as a string),
STK push with Daraja's field validation and error envelope, STK query (`4999`
while the prompt is open, string `ResultCode`), and callbacks POSTed by
background threads after a configurable delay in Daraja's real shapes (items by
name, `Balance` without a value, EAT `TransactionDate`).  Outcomes are chosen
by the phone number (SCENARIOS).  Counters are served at `GET /_sim/stats`.

It imports nothing from the gateway: it is Safaricom's side of the wire.
Run alone: `python simulator.py --port 8001`.
"""

import argparse
import base64
import heapq
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
import urllib.request
from dataclasses import dataclass, field
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
    "254711009999": ("no_callback", 0),  # paid, but only a query finds out
    "254711000002": ("callback_twice", 0),
    "254711005001": ("refuse_lock", None),
    "254711005002": ("refuse_spike", None),
    "254711000408": ("slow_answer", 0),  # answered after the client gave up; still paid
}
RESULT_DESCS = {
    0: "The service request is processed successfully.",
    1: "The balance is insufficient for the transaction.",
    1019: "Transaction has expired.",
    1032: "Request cancelled by user.",
    1037: "DS timeout user cannot be reached.",
    2001: "The initiator information is invalid.",
}
LOCK_MESSAGE = ("Unable to lock subscriber, a transaction is already in process for the"
                " current subscriber")

_MSISDN = re.compile(r"254[17][0-9]{8}")
_SHORTCODE = re.compile(r"[0-9]{5,7}")
_TIMESTAMP = re.compile(r"[0-9]{14}")
_DIGITS = re.compile(r"[0-9]{1,9}")
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_DAY_CHARS = "123456789ABCDEFGHIJKLMNOPQRSTUV"


@dataclass
class SimSettings:
    consumer_key: str = DEMO_CONSUMER_KEY
    consumer_secret: str = DEMO_CONSUMER_SECRET
    shortcode: str = SANDBOX_SHORTCODE
    passkey: str = SANDBOX_PASSKEY
    callback_delay_s: float = 2.0  # push accepted → result decided and callback sent
    latency_ms: float = 0.0  # added to every Daraja answer (real Daraja: ~1000)
    token_ttl_s: int = 3599
    slow_answer_s: float = 20.0  # the 254711000408 push answers this late (> read timeout)
    max_amount: int = 250_000
    lock_subscriber: bool = True  # a second push to a phone with an open prompt is refused
    callback_workers: int = 4
    record_deliveries: bool = False  # keep (url, body) of each callback answered 2xx (tests)

    @classmethod
    def from_env(cls, environ):
        """Settings from MPESA_SIM_* and the gateway's own MPESA_* credentials."""
        get = environ.get
        return cls(
            consumer_key=get("MPESA_CONSUMER_KEY") or DEMO_CONSUMER_KEY,
            consumer_secret=get("MPESA_CONSUMER_SECRET") or DEMO_CONSUMER_SECRET,
            shortcode=get("MPESA_SHORTCODE") or SANDBOX_SHORTCODE,
            passkey=get("MPESA_PASSKEY") or SANDBOX_PASSKEY,
            callback_delay_s=float(get("MPESA_SIM_CALLBACK_DELAY_S") or 2.0),
            latency_ms=float(get("MPESA_SIM_LATENCY_MS") or 0.0),
            token_ttl_s=int(get("MPESA_SIM_TOKEN_TTL_S") or 3599),
            slow_answer_s=float(get("MPESA_SIM_SLOW_ANSWER_S") or 20.0),
        )


class _Reject(Exception):
    """An answer in Daraja's error envelope."""

    def __init__(self, http_status, error_code, message):
        self.http_status, self.error_code, self.message = http_status, error_code, message


def _invalid(name):
    return _Reject(400, "400.002.02", f"Bad Request - Invalid {name}")


@dataclass
class _Push:
    checkout_id: str
    merchant_id: str
    phone: str
    amount: int
    callback_url: str
    result_code: int
    decided_at: float  # monotonic: before it, queries answer 4999
    receipt: str | None = None


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

    def _run(self):
        while (delivery := self._next()) is not None:
            request = urllib.request.Request(delivery.url, data=delivery.body, method="POST", headers={
                "Content-Type": "application/json;charset=UTF-8",
                "BusinessShortCode": self._shortcode,
            })
            try:
                with self._opener.open(request, timeout=10) as resp:
                    resp.read()
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
                           callbacks_sent=0, callbacks_failed=0)
        self._tokens = {}  # access_token → monotonic expiry
        self.issued_tokens = []
        self._pushes = {}  # CheckoutRequestID → _Push
        self._open_prompts = {}  # phone → monotonic time its prompt closes
        basic = f"{self.settings.consumer_key}:{self.settings.consumer_secret}"
        self._basic = "Basic " + base64.b64encode(basic.encode()).decode()
        self.delivered = [] if self.settings.record_deliveries else None
        self._sender = _CallbackSender(self.settings.callback_workers, self.settings.shortcode,
                                       self.count, self.delivered)

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

    # --- WSGI -----------------------------------------------------------------

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        routes = {
            "/oauth/v1/generate": ("GET", self._oauth),
            "/mpesa/stkpush/v1/processrequest": ("POST", self._push),
            "/mpesa/stkpushquery/v1/query": ("POST", self._query),
            "/_sim/stats": ("GET", lambda env: (200, self.stats())),
        }
        try:
            if path not in routes:
                raise _Reject(404, "404.001.01", "Resource not found")
            allowed, handler = routes[path]
            if method != allowed:
                raise _Reject(405, "405.001", f"{method} Method Not Allowed")
            if path != "/_sim/stats" and self.settings.latency_ms:
                time.sleep(self.settings.latency_ms / 1000)
            status, body = handler(environ)
        except _Reject as exc:
            status = exc.http_status
            body = {"requestId": _request_id(), "errorCode": exc.error_code,
                    "errorMessage": exc.message}
        if body is None:
            data, ctype = b"", "text/plain"
        else:
            data, ctype = json.dumps(body).encode(), "application/json;charset=UTF-8"
        start_response(f"{status} {_REASONS.get(status, 'Error')}",
                       [("Content-Type", ctype), ("Content-Length", str(len(data)))])
        return [data]

    # --- OAuth ------------------------------------------------------------------

    def _oauth(self, environ):
        self.count("token_requests")
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
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        raw = environ["wsgi.input"].read(min(length, MAX_BODY))
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise _Reject(400, "400.002.05", "Invalid Request Payload") from None
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
            self._check_bearer(environ)
            body = self._read_json(environ)
            shortcode, password, timestamp = self._check_credentials(body)
            push = self._validate_push(body)
            self._check_merchant(shortcode, password, timestamp)
            if self.on_push is not None:
                self.on_push(body)
            answer = self._accept(push)
        except _Reject:
            self.count("pushes_rejected")
            raise
        self.count("pushes_accepted")
        if SCENARIOS.get(push.phone, ("",))[0] == "slow_answer":
            time.sleep(self.settings.slow_answer_s)
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
        reference = body.get("AccountReference")
        if not isinstance(reference, str) or not 0 < len(reference) <= 12:
            raise _invalid("AccountReference")  # simulator policy (SDKs enforce it)
        desc = body.get("TransactionDesc", "")
        if not isinstance(desc, str) or len(desc) > 13:
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
        with self._lock:
            if s.lock_subscriber and self._open_prompts.get(push.phone, 0) > now:
                raise _Reject(500, "500.001.1001", LOCK_MESSAGE)
            self._open_prompts[push.phone] = now + s.callback_delay_s
            checkout_id = _checkout_id(wall, push.phone)
            while checkout_id in self._pushes:
                checkout_id = _checkout_id(wall, push.phone, bump=len(self._pushes))
            push.checkout_id, push.merchant_id = checkout_id, _request_id()
            push.result_code, push.decided_at = code, now + s.callback_delay_s
            push.receipt = _receipt(wall) if code == 0 else None
            self._pushes[checkout_id] = push
        deliveries = {"no_callback": 0, "callback_twice": 2}.get(kind, 1)
        for i in range(deliveries):
            self.count("callbacks_scheduled")
            decided = wall + timedelta(seconds=s.callback_delay_s)
            self._sender.schedule(push.decided_at + 0.1 * i, push.callback_url,
                                  json.dumps(_callback_body(push, decided)).encode())
        return {
            "MerchantRequestID": push.merchant_id,
            "CheckoutRequestID": checkout_id,
            "ResponseCode": "0",
            "ResponseDescription": "Success. Request accepted for processing",
            "CustomerMessage": "Success. Request accepted for processing",
        }

    # --- STK query --------------------------------------------------------------

    def _query(self, environ):
        self.count("queries")
        self._check_bearer(environ)
        body = self._read_json(environ)
        self._check_merchant(*self._check_credentials(body))
        with self._lock:
            push = self._pushes.get(body.get("CheckoutRequestID"))
        if push is None:
            raise _Reject(500, "500.001.1001", "The transaction does not Exist")
        answer = {
            "ResponseCode": "0",
            "ResponseDescription": "The service request has been accepted successfully",
            "MerchantRequestID": push.merchant_id,
            "CheckoutRequestID": push.checkout_id,
        }
        if time.monotonic() < push.decided_at:
            answer.update(ResultCode="4999", ResultDesc="The transaction is still under processing")
        else:
            answer.update(ResultCode=str(push.result_code),
                          ResultDesc=RESULT_DESCS.get(push.result_code, "Failed"))
        return 200, answer


# --- Daraja's formats ---------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}


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


def _callback_body(push, decided):
    stk = {
        "MerchantRequestID": push.merchant_id,
        "CheckoutRequestID": push.checkout_id,
        "ResultCode": push.result_code,
        "ResultDesc": RESULT_DESCS.get(push.result_code, "Failed"),
    }
    if push.result_code == 0:
        stk["CallbackMetadata"] = {"Item": [
            {"Name": "Amount", "Value": float(push.amount)},
            {"Name": "MpesaReceiptNumber", "Value": push.receipt},
            {"Name": "Balance"},
            {"Name": "TransactionDate", "Value": int(f"{decided:%Y%m%d%H%M%S}")},
            {"Name": "PhoneNumber", "Value": int(push.phone)},
        ]}
    return {"Body": {"stkCallback": stk}}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Daraja simulator (loopback only)")
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
