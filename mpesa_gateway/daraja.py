"""The Daraja client: the only module that talks to Safaricom.

Owns the one `urllib3.PoolManager` of the app, the OAuth fetch behind the
token cache, the STK push and STK query calls, C2B registration and QR codes, the
initiator APIs (Reversal, Transaction Status, Account Balance: acknowledged now, their
results POSTed later), and the classification of every
answer into an explicit outcome:

- accepted     Daraja took the request (a push: the prompt is queued).
- rejected     Daraja definitely refused it; nothing happened.
- unavailable  nothing was processed (connect failure, OAuth down, spike arrest,
               quota, maintenance: refused by Daraja's API gateway before the STK service).
- unknown      the request may have been processed (read timeout, dropped
               connection, 500.003.1001 or another 5xx, an unparsable answer).

Each API (OAuth, push, query) has one immutable `CallPolicy`: connect and read
timeouts, attempts, and the one deadline they imply.  The longest push, the
longest query, how long a token waiter waits, the ledger's recovery cutoff, the
reconciler's lease and the shutdown drain are all derived from these policies.
The retry rules follow from the outcomes: connect errors may be retried, an
STK push that may have been sent is never retried, a push refused with
"Invalid Access Token" (refused at Daraja's API gateway, before processing) is
resent once with a fresh token, and an upstream's Retry-After is never slept
on (a worker must not park for an hour).
"""

import base64
import functools
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    EmptyPoolError,
    HTTPError,
    MaxRetryError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import Retry, Timeout

from token_cache import TokenCache, TokenError, TokenWaitTimeout, expires_in_seconds

log = logging.getLogger(__name__)

EAT = timezone(timedelta(hours=3), "EAT")  # every Daraja timestamp; no DST
OAUTH_PATH = "/oauth/v1/generate?grant_type=client_credentials"
PUSH_PATH = "/mpesa/stkpush/v1/processrequest"
QUERY_PATH = "/mpesa/stkpushquery/v1/query"
C2B_REGISTER_PATHS = {"v1": "/mpesa/c2b/v1/registerurl", "v2": "/mpesa/c2b/v2/registerurl"}
QR_PATH = "/mpesa/qrcode/v1/generate"
REVERSAL_PATH = "/mpesa/reversal/v1/request"
STATUS_PATH = "/mpesa/transactionstatus/v1/query"
BALANCE_PATH = "/mpesa/accountbalance/v1/query"
ORGANISATION = "4"  # IdentifierType of a shortcode (1 MSISDN, 2 till)
REVERSAL_RECEIVER = "11"  # RecieverIdentifierType (sic) a reversal must carry
MAX_RESPONSE_BYTES = 64 * 1024  # Daraja answers are < 1 KiB; anything larger is not Daraja

ACCEPTED, REJECTED, UNAVAILABLE, UNKNOWN = "accepted", "rejected", "unavailable", "unknown"
INITIATOR_APIS = ("reversal", "transaction_status", "account_balance")

# "Invalid Access Token": STK's codes, and C2B's (daraja_api.md §6.1).
INVALID_TOKEN_CODES = frozenset({"404.001.03", "401.002.01", "400.003.01"})
THROTTLE_CODES = frozenset({"500.003.02", "500.003.03"})  # spike arrest, quota: nothing processed
REFUSED_CODE = "500.001.1001"  # merchant, credentials, subscriber lock; on a query: "not yet"
PENDING_RESULT_CODE = "4999"  # query only: the prompt is still open

MAINTENANCE_CODE = "500.002.1001"  # "Service is currently under maintenance"
# A query's 500.001.1001 with one of these texts (or none) means "no answer yet".
_NOT_YET_TEXTS = ("being processed", "transaction does not exist", "under processing")


@dataclass(frozen=True)
class CallPolicy:
    """How one Daraja API is called, and the longest that can take.

    `attempts` counts the first try. A connection that was never made may be retried
    (nothing was sent); a read error only where `retry_read` (the call has no side
    effect); listed statuses only for idempotent calls. Backoff between attempts is
    urllib3's, capped at `backoff_max_s`; an upstream Retry-After is never honoured.
    """

    api: str
    method: str
    connect_s: float
    read_s: float
    attempts: int
    retry_read: bool = False
    retry_statuses: tuple = ()
    backoff_s: float = 0.2
    backoff_max_s: float = 1.0

    @property
    def longest_s(self):
        """Every attempt's connect and first-byte wait, the backoff between attempts,
        and one read timeout more for the body of the answer that came."""
        return (self.attempts * (self.connect_s + self.read_s)
                + (self.attempts - 1) * self.backoff_max_s + self.read_s)

    def retry(self):
        retries = self.attempts - 1
        # urllib3 reads an empty collection as "every method": name one that is never used.
        retryable = {self.method} if (self.retry_read or self.retry_statuses) else {"NONE"}
        return Retry(
            total=retries, connect=retries, read=retries if self.retry_read else 0,
            status=retries if self.retry_statuses else 0, other=0,
            status_forcelist=self.retry_statuses, allowed_methods=frozenset(retryable),
            backoff_factor=self.backoff_s, backoff_max=self.backoff_max_s,
            respect_retry_after_header=False,  # never park a worker on Daraja's say-so
            redirect=False, raise_on_status=False,
        )

    def timeout(self):
        return Timeout(connect=self.connect_s, read=self.read_s)


def call_policies(config):
    """The three policies, from MPESA_CONNECT_TIMEOUT and MPESA_READ_TIMEOUT."""
    connect, read = config.connect_timeout, config.read_timeout
    return {
        # A GET for a token is idempotent: retry connect, read and 5xx.
        "oauth": CallPolicy("oauth", "GET", connect, read, attempts=3, retry_read=True,
                            retry_statuses=(500, 502, 503, 504)),
        # A push is retried only when the connection was never made: a POST that may
        # have been sent is never resent (a second prompt could charge twice).
        "stk_push": CallPolicy("stk_push", "POST", connect, read, attempts=2),
        # A query has no side effect: a connect or read error may be retried once.
        "stk_query": CallPolicy("stk_query", "POST", connect, read, attempts=2,
                                retry_read=True),
        # Registering C2B URLs: an operator's command, retried only where nothing was sent
        # (in production a second registration is refused as "already registered").
        "c2b_register": CallPolicy("c2b_register", "POST", connect, read, attempts=2),
        # A QR code is only drawn: no money moves, so a read error may be retried once.
        "qr": CallPolicy("qr", "POST", connect, read, attempts=2, retry_read=True),
        # A reversal moves money back: like a push, resent only when nothing was sent.
        "reversal": CallPolicy("reversal", "POST", connect, read, attempts=2),
        # A status or balance query moves nothing; a second result of one is only a
        # duplicate the ledger ignores, so a read error may be retried once.
        "transaction_status": CallPolicy("transaction_status", "POST", connect, read,
                                         attempts=2, retry_read=True),
        "account_balance": CallPolicy("account_balance", "POST", connect, read, attempts=2,
                                      retry_read=True),
    }


class DarajaError(Exception):
    """A Daraja call that did not succeed; `outcome` says what the caller may assume."""

    def __init__(self, api, outcome, reason, *, http_status=None, error_code=None,
                 error_message=None, request_id=None):
        self.api = api
        self.outcome = outcome
        self.reason = reason  # slug: connect_failed, read_timeout, daraja_rejected, ...
        self.http_status = http_status
        self.error_code = error_code
        self.error_message = error_message
        self.request_id = request_id
        super().__init__(
            f"{api} {outcome} reason={reason} http_status={http_status} error_code={error_code}"
        )

    @property
    def subscriber_locked(self):
        # Shares 500.001.1001 with "Merchant does not exist"; only the text differs.
        return (self.error_code == REFUSED_CODE
                and "lock subscriber" in (self.error_message or "").lower())


@dataclass(frozen=True)
class PushAccepted:
    merchant_request_id: str | None
    checkout_request_id: str
    customer_message: str | None


@dataclass(frozen=True)
class Acknowledged:
    """Daraja took an initiator request; its result comes later to the ResultURL."""

    conversation_id: str | None
    originator_conversation_id: str | None


@dataclass(frozen=True)
class QueryAnswer:
    """An STK query's answer: `pending`, or a terminal `result_code`."""

    checkout_request_id: str
    pending: bool
    result_code: str | None = None
    result_desc: str | None = None
    merchant_request_id: str | None = None


def observed(api):
    """Time one Daraja call, log its outcome and report it to the client's observer."""

    def decorate(method):
        @functools.wraps(method)
        def timed(self, *args, **kwargs):
            started, outcome = time.monotonic(), ACCEPTED
            try:
                return method(self, *args, **kwargs)
            except DarajaError as exc:
                outcome = exc.outcome
                raise
            finally:
                elapsed = time.monotonic() - started
                log.info("daraja api=%s outcome=%s ms=%.1f", api, outcome, elapsed * 1000)
                self.observer(api, outcome, elapsed)

        return timed

    return decorate


def build_pool(config):
    """The app's one PoolManager: TLS verified, `threads` connections, blocking when full."""
    return urllib3.PoolManager(
        num_pools=4,
        maxsize=config.threads,
        block=True,
        timeout=Timeout(connect=config.connect_timeout, read=config.read_timeout),
        retries=False,
        cert_reqs="CERT_REQUIRED",
    )


def _text(value, limit=256):
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)[:limit]
    return None


class DarajaClient:
    def __init__(self, config, http, *, clock=time.monotonic, now=None, observer=None,
                 shared_tokens=None):
        self._cfg = config
        self.observer = observer or (lambda api, outcome, seconds: None)
        self._http = http
        self._base = config.base_url
        self._now = now or (lambda: datetime.now(EAT))  # wall clock for Timestamp
        self._pool_timeout = config.connect_timeout
        self.policies = call_policies(config)
        # fleet.SharedTokens (PostgreSQL ledger): the token every process shares, got within
        # one fetch's bound (its own fetch, or a wait for another process's).
        self._shared = shared_tokens
        oauth_s = self.policies["oauth"].longest_s
        # A push: a token fetch and the push, then, after "Invalid Access Token", a second
        # fetch and the one resend. A row `submitting` for longer was abandoned mid-push.
        self.longest_push_s = 2 * (oauth_s + self.policies["stk_push"].longest_s)
        self.longest_query_s = 2 * (oauth_s + self.policies["stk_query"].longest_s)
        # An initiator request, likewise: a row `submitting` longer was cut off.
        self.longest_initiator_s = 2 * (oauth_s + max(
            self.policies[api].longest_s for api in INITIATOR_APIS))
        # Token waiters wait for the one fetch in flight, never longer than it can take.
        fetch = (self.fetch_token if shared_tokens is None
                 else lambda: shared_tokens.get(self.fetch_token))
        self.tokens = TokenCache(fetch, config.token_margin_s, clock=clock, wait_s=oauth_s)

    def close(self):
        self._http.clear()

    # --- credentials -----------------------------------------------------------

    def timestamp(self):
        """YYYYMMDDHHmmss in EAT, the value both `Timestamp` and `Password` use."""
        return self._now().astimezone(EAT).strftime("%Y%m%d%H%M%S")

    def password(self, timestamp):
        raw = self._cfg.shortcode + self._cfg.passkey + timestamp
        return base64.b64encode(raw.encode()).decode("ascii")

    @observed("oauth")
    def fetch_token(self):
        """GET a new OAuth token; return (access_token, expires_in). Used by the cache."""
        headers = {"Authorization": self._cfg.oauth_header}
        try:
            status, data, _ = self._send(self.policies["oauth"], OAUTH_PATH, None, headers)
        except DarajaError as exc:
            # No push has been sent yet, whatever happened to the token request.
            raise DarajaError("oauth", UNAVAILABLE, exc.reason, http_status=exc.http_status) from None
        if status == 200 and isinstance(data, dict) and data.get("access_token"):
            try:
                return data["access_token"], expires_in_seconds(data.get("expires_in"))
            except TokenError:
                raise DarajaError("oauth", UNAVAILABLE, "oauth_unparsable",
                                  http_status=status) from None
        error_code, message, request_id = _envelope(data)
        if status in (400, 401, 403):  # wrong credentials or grant: a definite refusal
            raise DarajaError("oauth", REJECTED, "oauth_refused", http_status=status,
                              error_code=error_code or f"HTTP {status}", error_message=message,
                              request_id=request_id)
        raise DarajaError("oauth", UNAVAILABLE, "oauth_failed", http_status=status,
                          error_code=error_code, error_message=message, request_id=request_id)

    def _token(self):
        try:
            return self.tokens.get()
        except TokenWaitTimeout:
            raise DarajaError("oauth", UNAVAILABLE, "oauth_wait_timeout") from None
        except TokenError:
            raise DarajaError("oauth", UNAVAILABLE, "oauth_unparsable") from None
        except DarajaError:
            raise
        except Exception:  # noqa: BLE001 - the fleet's token store (the ledger) failed
            log.exception("daraja api=oauth the shared token could not be read or stored")
            raise DarajaError("oauth", UNAVAILABLE, "token_store_unavailable") from None

    # --- the two STK calls -------------------------------------------------------

    @observed("stk_push")
    def stk_push(self, *, phone, amount, reference, description, callback_url):
        """Send one STK push. Return PushAccepted or raise DarajaError with its outcome."""
        timestamp = self.timestamp()
        payload = {
            "BusinessShortCode": int(self._cfg.shortcode),
            "Password": self.password(timestamp),
            "Timestamp": timestamp,
            "TransactionType": self._cfg.transaction_type,
            "Amount": amount,
            "PartyA": phone,
            "PartyB": self._cfg.party_b,
            "PhoneNumber": phone,
            "CallBackURL": callback_url,
            "AccountReference": reference,
            "TransactionDesc": description,
        }
        status, data, html = self._authorized_post("stk_push", PUSH_PATH, payload)
        if status == 200 and html:
            raise _wrong_base_url("stk_push", status)
        if status == 200 and isinstance(data, dict) and "errorCode" not in data:
            checkout = data.get("CheckoutRequestID")
            if str(data.get("ResponseCode")) == "0" and isinstance(checkout, str) and checkout:
                return PushAccepted(_text(data.get("MerchantRequestID"), 64), checkout[:64],
                                    _text(data.get("CustomerMessage")))
            if data.get("ResponseCode") not in (None, "", "0", 0):
                raise DarajaError("stk_push", REJECTED, "daraja_rejected", http_status=status,
                                  error_code=_text(data.get("ResponseCode"), 32),
                                  error_message=_text(data.get("ResponseDescription")))
        raise self._classify("stk_push", status, data)

    @observed("stk_query")
    def stk_query(self, checkout_request_id):
        """Ask for a push's result. Return QueryAnswer (pending or terminal) or raise."""
        timestamp = self.timestamp()
        payload = {
            "BusinessShortCode": int(self._cfg.shortcode),
            "Password": self.password(timestamp),
            "Timestamp": timestamp,
            "CheckoutRequestID": checkout_request_id,
        }
        status, data, html = self._authorized_post("stk_query", QUERY_PATH, payload)
        if status == 200 and html:
            raise _wrong_base_url("stk_query", status)
        error_code, message, _ = _envelope(data)
        if error_code == REFUSED_CODE and _not_yet(message):
            # "being processed" / "does not Exist" / empty: not yet, never a failure.
            return QueryAnswer(checkout_request_id, pending=True)
        if status == 200 and isinstance(data, dict) and _text(data.get("ResultCode"), 32):
            code = _text(data["ResultCode"], 32).strip()
            if code == PENDING_RESULT_CODE:
                return QueryAnswer(checkout_request_id, pending=True)
            return QueryAnswer(checkout_request_id, pending=False, result_code=code,
                               result_desc=_text(data.get("ResultDesc")),
                               merchant_request_id=_text(data.get("MerchantRequestID"), 64))
        raise self._classify("stk_query", status, data)

    # --- C2B -------------------------------------------------------------------------

    @observed("c2b_register")
    def register_c2b(self, *, shortcode, response_type, confirmation_url, validation_url,
                     version="v2"):
        """Register a shortcode's confirmation and validation URLs. Return Daraja's
        description of success (any all-zero ResponseCode) or raise DarajaError."""
        payload = {"ShortCode": shortcode, "ResponseType": response_type,
                   "ConfirmationURL": confirmation_url, "ValidationURL": validation_url}
        status, data, html = self._authorized_post(
            "c2b_register", C2B_REGISTER_PATHS[version], payload)
        if status == 200 and html:
            raise _wrong_base_url("c2b_register", status)
        code = _text(data.get("ResponseCode"), 32) if isinstance(data, dict) else None
        described = _text(data.get("ResponseDescription")) if isinstance(data, dict) else None
        if status == 200 and "errorCode" not in (data or {}) and (
                set(code.strip() or "x") == {"0"} if code  # all zeros
                else (described or "").lower().startswith("success")):  # no code: its word
            return described or "success"
        if status == 200 and code:
            raise DarajaError("c2b_register", REJECTED, "daraja_rejected", http_status=status,
                              error_code=code, error_message=described)
        raise self._classify("c2b_register", status, data)

    @observed("qr")
    def generate_qr(self, *, merchant_name, reference, amount, trx_code, cpi, size):
        """A Dynamic QR code: the base64 PNG Daraja draws, or DarajaError."""
        payload = {"MerchantName": merchant_name, "RefNo": reference, "Amount": amount,
                   "TrxCode": trx_code, "CPI": cpi, "Size": str(size)}
        status, data, html = self._authorized_post("qr", QR_PATH, payload)
        if status == 200 and html:
            raise _wrong_base_url("qr", status)
        image = data.get("QRCode") if isinstance(data, dict) else None
        code = _text(data.get("ResponseCode"), 32) if isinstance(data, dict) else None
        if status == 200 and isinstance(image, str) and image and "errorCode" not in data:
            return image  # Safaricom's own sample answers "AG_2019…" as its ResponseCode
        if status == 200 and code:
            raise DarajaError("qr", REJECTED, "daraja_rejected", http_status=status,
                              error_code=code, error_message=_text(data.get("ResponseDescription")))
        raise self._classify("qr", status, data)

    # --- the initiator APIs: acknowledged now, the result POSTed later ---------------

    @observed("reversal")
    def reversal(self, *, initiator, receipt, amount, receiver_party, result_url, timeout_url,
                 remarks):
        """Ask Daraja to reverse a payment (money back to the payer)."""
        return self._initiator_call("reversal", REVERSAL_PATH, {
            "Initiator": initiator.name, "SecurityCredential": initiator.credential,
            "CommandID": "TransactionReversal", "TransactionID": receipt,
            "Amount": str(amount), "ReceiverParty": receiver_party,
            "RecieverIdentifierType": REVERSAL_RECEIVER, "ResultURL": result_url,
            "QueueTimeOutURL": timeout_url, "Remarks": remarks})

    @observed("transaction_status")
    def transaction_status(self, *, initiator, receipt, party_a, result_url, timeout_url):
        """Ask Daraja what it knows of a receipt at this shortcode."""
        return self._initiator_call("transaction_status", STATUS_PATH, {
            "Initiator": initiator.name, "SecurityCredential": initiator.credential,
            "CommandID": "TransactionStatusQuery", "TransactionID": receipt,
            "PartyA": party_a, "IdentifierType": ORGANISATION, "ResultURL": result_url,
            "QueueTimeOutURL": timeout_url, "Remarks": "Code check", "Occasion": ""})

    @observed("account_balance")
    def account_balance(self, *, initiator, party_a, result_url, timeout_url):
        """Ask Daraja for the shortcode's account balances."""
        return self._initiator_call("account_balance", BALANCE_PATH, {
            "Initiator": initiator.name, "SecurityCredential": initiator.credential,
            "CommandID": "AccountBalance", "PartyA": party_a, "IdentifierType": ORGANISATION,
            "Remarks": "Balance", "QueueTimeOutURL": timeout_url, "ResultURL": result_url})

    def _initiator_call(self, api, path, payload):
        """Acknowledged, or DarajaError with what the caller may assume."""
        status, data, html = self._authorized_post(api, path, payload)
        if status == 200 and html:
            raise _wrong_base_url(api, status)
        if status == 200 and isinstance(data, dict) and "errorCode" not in data:
            code = _text(data.get("ResponseCode"), 32)
            if code is not None and code.strip() == "0":
                return Acknowledged(_text(data.get("ConversationID"), 64),
                                    _text(data.get("OriginatorConversationID"), 64))
            if code:
                raise DarajaError(api, REJECTED, "daraja_rejected", http_status=status,
                                  error_code=code,
                                  error_message=_text(data.get("ResponseDescription")))
        error = self._classify(api, status, data)
        if api == "reversal" and error.error_code == REFUSED_CODE:
            # On Reversal it may say "The transaction is being processed": maybe taken.
            error.outcome, error.reason = UNKNOWN, "upstream_error"
        raise error

    # --- transport -----------------------------------------------------------------

    def _authorized_post(self, api, path, payload):
        body = json.dumps(payload, separators=(",", ":")).encode()
        policy = self.policies[api]
        for attempt in (1, 2):
            token = self._token()
            headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
            status, data, html = self._send(policy, path, body, headers)
            if attempt == 1 and _envelope(data)[0] in INVALID_TOKEN_CODES:
                # Refused by Daraja's API gateway before processing: safe to resend once.
                self.tokens.invalidate(token)
                if self._shared is not None:
                    try:
                        self._shared.drop(token)
                    except Exception:  # noqa: BLE001 - the resend fetches a new one anyway
                        log.warning("daraja the shared token could not be dropped")
                log.warning("daraja api=%s invalid_access_token action=refresh_and_resend", api)
                continue
            return status, data, html
        return status, data, html

    def _send(self, policy, path, body, headers):
        """One exchange under `policy`, its retries included; return (status, decoded JSON
        or None, whether the answer is an HTML page) or raise DarajaError."""
        started = time.monotonic()
        status, result = None, "answered"
        try:
            resp = self._http.request(
                policy.method, self._base + path, body=body, headers=headers,
                retries=policy.retry(), timeout=policy.timeout(), redirect=False,
                preload_content=False, pool_timeout=self._pool_timeout,
            )
            status = resp.status
            html_type = "html" in (resp.headers.get("Content-Type") or "").lower()
            try:
                # The policy's deadline, from the start: retries and a slow drip included.
                # One read may block a read timeout past the check, so check that much
                # earlier: the whole exchange stays within the policy's longest_s.
                raw = _read_bounded(resp, started + policy.longest_s - policy.read_s)
            finally:
                resp.release_conn()
            data = _json_or_none(raw)
            # An HTML page is an answer that did not parse: a Daraja JSON body wins, whatever
            # its Content-Type says.
            html = data is None and (html_type or (raw or b"").lstrip()[:1] == b"<")
            return status, data, html
        except (MaxRetryError, EmptyPoolError, ConnectTimeoutError, SSLError,
                ReadTimeoutError, ProtocolError, HTTPError) as exc:
            error = _transport_error(policy.api, exc, status)
            result = error.reason
            raise error from None
        finally:
            log.debug("daraja http api=%s result=%s http_status=%s ms=%.1f",
                      policy.api, result, status, (time.monotonic() - started) * 1000)

    @staticmethod
    def _classify(api, status, data):
        """The DarajaError for an answer that is not a success."""
        error_code, message, request_id = _envelope(data)
        kwargs = dict(http_status=status, error_code=error_code, error_message=message,
                      request_id=request_id)
        if error_code in THROTTLE_CODES or status == 429:
            return DarajaError(api, UNAVAILABLE, "throttled", **kwargs)
        if error_code == MAINTENANCE_CODE:
            return DarajaError(api, UNAVAILABLE, "maintenance", **kwargs)
        if status is not None and 400 <= status < 500:
            kwargs["error_code"] = error_code or f"HTTP {status}"
            return DarajaError(api, REJECTED, "daraja_rejected", **kwargs)
        if error_code == REFUSED_CODE:
            return DarajaError(api, REJECTED, "daraja_rejected", **kwargs)
        if status is not None and 300 <= status < 400:
            return DarajaError(api, UNKNOWN, "redirect", **kwargs)  # never followed
        if status is not None and status >= 500:
            return DarajaError(api, UNKNOWN, "upstream_error", **kwargs)
        return DarajaError(api, UNKNOWN, "unparsable_response", **kwargs)


def _wrong_base_url(api, status):
    """A 200 HTML page is the API proxy's answer to a wrong host or path: the request never
    reached the STK service."""
    log.error("daraja api=%s html_answer: MPESA_BASE_URL looks wrong (an API proxy page)", api)
    return DarajaError(api, REJECTED, "wrong_base_url", http_status=status,
                       error_code="HTML page", error_message="the base URL looks wrong")


def _not_yet(message):
    text = (message or "").strip().lower()
    return not text or any(t in text for t in _NOT_YET_TEXTS)


def _transport_error(api, exc, status):
    """Classify a urllib3 failure by its cause: was anything sent?"""
    cause = exc.reason if isinstance(exc, MaxRetryError) else exc
    if isinstance(cause, (ConnectTimeoutError, EmptyPoolError)):
        # No connection was made, so the request never left.
        return DarajaError(api, UNAVAILABLE, "connect_failed")
    if isinstance(cause, SSLError) and "certificate verify failed" in str(cause).lower():
        # Verification happens in the handshake, before a byte of the request is sent.
        # Other TLS errors may strike mid-request and stay "unknown".
        log.error("daraja api=%s tls_verify_failed: wrong host, proxy or interception?", api)
        return DarajaError(api, UNAVAILABLE, "tls_verify_failed")
    if isinstance(cause, ReadTimeoutError):
        return DarajaError(api, UNKNOWN, "read_timeout", http_status=status)
    return DarajaError(api, UNKNOWN, "connection_dropped", http_status=status)


def _read_bounded(resp, deadline):
    """Read at most MAX_RESPONSE_BYTES before `deadline`; bigger or slower is an error."""
    chunks, size = [], 0
    # read1 returns what has arrived, so the deadline is checked even while bytes drip in.
    while chunk := resp.read1(8192):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            resp.close()  # do not drain an unbounded answer; the pool reconnects
            return None
        if time.monotonic() > deadline:
            resp.close()
            raise ReadTimeoutError(None, None, "answer too slow")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_or_none(raw):
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # includes bad UTF-8
        return None


def _fault(data):
    """The faultstring of the API proxy's SOAP-style fault ({"fault": …} or {"Envelope":
    {"Body": {"Fault": …}}}, as C2B registration answers some errors), or None."""
    fault = data.get("fault")
    if not isinstance(fault, dict):
        body = data.get("Envelope", {}).get("Body", {}) if isinstance(
            data.get("Envelope"), dict) else {}
        fault = body.get("Fault") if isinstance(body, dict) else None
    return _text(fault.get("faultstring")) if isinstance(fault, dict) else None


def _envelope(data):
    """(errorCode, errorMessage, requestId) of Daraja's error envelope (or of a proxy's
    fault: its faultstring as the message), or Nones."""
    if not isinstance(data, dict):
        return None, None, None
    code, message = _text(data.get("errorCode"), 32), _text(data.get("errorMessage"))
    message = message or _fault(data)
    if code in INVALID_TOKEN_CODES and message:
        # "Error Occurred - Invalid Access Token - <the token>": never keep the token.
        message = "Invalid Access Token"
    return code, message, _text(data.get("requestId"), 64)
