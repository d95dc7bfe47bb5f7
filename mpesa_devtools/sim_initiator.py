"""The simulator's initiator APIs: Reversal, Transaction Status and Account Balance.

Owns what daraja_api.md §7 says of these three for the simulator:
  - the endpoints: their token check (Reversal refuses as STK does, HTTP 404
    `404.001.03`; the two queries HTTP 401 `401.002.01` with the token echoed), the field
    checks (`400.002.02 Bad Request - Invalid <Field>`) and the acknowledgement;
  - the initiator: an RSA key pair and a self-signed certificate of its own (made when
    first needed, with `cryptography`, imported only then), the SecurityCredential
    decrypted (PKCS#1 v1.5) and checked against the initiator's name and password:
    `2001` when wrong, and after LOCK_AFTER in a row the lock, `8006`, until unlocked;
  - the transactions the simulator knows: the receipts of the STK and C2B payments it
    completed (handed in with `paid`), the reversals it made, and the money each
    shortcode received, which Reversal, Transaction Status and Account Balance read;
  - the Result envelope (§7.6), POSTed to the ResultURL `result_delay_s` after the
    acknowledgement through the simulator's callback sender, never resent; or, in
    `timeout` mode, the simulator's QueueTimeOut body to the QueueTimeOutURL;
  - its control: mode (`normal`, `timeout`, `silent`), the result delay, a single-object
    `ResultParameter`, unlock (`/_sim/initiator`), and the certificate as PEM
    (`/_sim/initiator/certificate`, and the MPESA_SIM_CERT_FILE file).

It imports nothing from simulator.py (the two would import each other): the Simulator
lends it what they share (lock, counters, sender, token check, error answers, receipt
numbers) through `Parts`.
"""

import base64
import binascii
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

log = logging.getLogger("simulator.initiator")

EAT = timezone(timedelta(hours=3), "EAT")
LOCK_AFTER = 5  # refused credentials in a row that lock the initiator (an SDK's note: ~5)
MODES = ("normal", "timeout", "silent")
MAX_RESULT_DELAY_S = 600.0  # a result that late is a typo
CERT_COMMON_NAME = "apicrypt.safaricom.co.ke-simulator"
CERT_DAYS = 3650
KEY_BITS = 2048
ORG_NAME = "Simulator Merchant"  # the organisation's public name after its shortcode
COUNTERS = ("reversals", "transaction_status", "account_balance", "initiator_results_sent",
            "initiator_results_failed", "initiator_timeouts_sent",
            "initiator_credential_failures")

# api → (path, CommandID, counter)
APIS = {
    "reversal": ("/mpesa/reversal/v1/request", "TransactionReversal", "reversals"),
    "status": ("/mpesa/transactionstatus/v1/query", "TransactionStatusQuery",
               "transaction_status"),
    "balance": ("/mpesa/accountbalance/v1/query", "AccountBalance", "account_balance"),
}
IDENTIFIER_TYPES = ("1", "2", "4")  # MSISDN, Till, Organisation shortcode
RECEIVER_IDENTIFIER_TYPE = "11"  # Reversal's `RecieverIdentifierType` (sic): always 11

# Results: (ResultCode, ResultDesc). Numbers stay numbers; the R codes are strings.
SUCCESS = (0, "The service request is processed successfully.")
BAD_INITIATOR = (2001, "The initiator information is invalid.")
LOCKED = (8006, "The security credential is locked.")
NO_RECEIPT = (2032, "The transaction receipt number does not exist.")
ALREADY_REVERSED = ("R000001", "The transaction has already been reversed.")
INVALID_ORIGINAL = ("R000002", "The OriginalTransactionID is invalid.")
# The simulator's choices, not Daraja's (what Daraja answers is not recorded): an Amount
# that is not the original's is Daraja's documented InvalidRequestParameters code; the
# QueueTimeOut body's code is a string no Daraja table holds, so that no client maps it
# onto a real outcome (a queue timeout is not a failure: ask Transaction Status).
WRONG_AMOUNT = (25, "Invalid request parameters: the Amount is not the original"
                    " transaction's amount.")
QUEUE_TIMEOUT = ("SIM_QUEUE_TIMEOUT", "The request timed out in the queue.")
LOCKED_TRANSACTION_ID = "XXXXXXXXXX"  # as observed in the locked initiator's results

# What Daraja puts in ReferenceData: its own internal URL (never the caller's), or for
# Transaction Status an `Occasion` item without a Value.
_INTERNAL = "https://internalsandbox.safaricom.co.ke/mpesa"
REFERENCE_ITEMS = {
    "reversal": {"Key": "QueueTimeoutURL", "Value": _INTERNAL + "/reversalresults/v1/submit"},
    "status": {"Key": "Occasion"},
    "balance": {"Key": "QueueTimeoutURL", "Value": _INTERNAL + "/abresults/v1/submit"},
}
# The payment's ReasonType in a Transaction Status result (the simulator's wording).
REASON_TYPES = {"stk": "Lipa Na M-Pesa Online", "CustomerPayBillOnline": "Pay Bill Online",
                "CustomerBuyGoodsOnline": "Buy Goods Online", "reversal": "Reversal"}
CRYPTOGRAPHY_MISSING = ("The simulator needs cryptography for the initiator APIs and their"
                        " certificate: pip install cryptography")

_SHORTCODE = re.compile(r"[0-9]{5,7}")
_PARTY = re.compile(r"[0-9]{5,12}")  # a shortcode, a till or an MSISDN
_TRANSACTION_ID = re.compile(r"[A-Za-z0-9]{1,20}")
_WHOLE = re.compile(r"[0-9]{1,9}")


# --- errors -------------------------------------------------------------------

class CryptographyMissing(RuntimeError):
    """The `cryptography` package is not installed: no key, no certificate, no decryption."""

    def __init__(self):
        super().__init__(CRYPTOGRAPHY_MISSING)


class _Invalid(Exception):
    """A field refused: `400.002.02 Bad Request - Invalid <field>`."""

    def __init__(self, field_name):
        super().__init__(field_name)
        self.field = field_name


# --- pure helpers ---------------------------------------------------------------

@dataclass(frozen=True)
class _Request:
    """One checked initiator request."""

    api: str
    initiator: str
    credential: str
    result_url: str
    timeout_url: str
    transaction_id: str = ""  # Reversal, Transaction Status
    original_conversation_id: str = ""  # Transaction Status
    amount: int = 0  # Reversal
    party: str = ""  # ReceiverParty (Reversal) or PartyA


def _as_text(value):
    """A string, or a whole number as its digits; None for anything else (types are loose)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def _matching(body, name, pattern):
    text = _as_text(body.get(name))
    if text is None or not pattern.fullmatch(text):
        raise _Invalid(name)
    return text


def _checked(api, body, valid_url):
    """The request's fields, each checked in Daraja's order of the table; _Invalid if not."""
    texts = {}
    for name in ("Initiator", "SecurityCredential"):
        value = body.get(name)
        if not isinstance(value, str) or not value.strip():
            raise _Invalid(name)
        texts[name] = value
    if body.get("CommandID") != APIS[api][1]:
        raise _Invalid("CommandID")
    found = {}
    if api == "reversal":
        found["transaction_id"] = _matching(body, "TransactionID", _TRANSACTION_ID)
        amount = _as_text(body.get("Amount"))
        if amount is None or not _WHOLE.fullmatch(amount) or int(amount) < 1:
            raise _Invalid("Amount")
        found["amount"] = int(amount)
        found["party"] = _matching(body, "ReceiverParty", _SHORTCODE)
        if _as_text(body.get("RecieverIdentifierType")) != RECEIVER_IDENTIFIER_TYPE:
            raise _Invalid("RecieverIdentifierType")
    else:
        if api == "status":
            # TransactionID or OriginalConversationID or both (each is acknowledged).
            transaction_id = body.get("TransactionID")
            original = body.get("OriginalConversationID")
            if transaction_id not in (None, ""):
                found["transaction_id"] = _matching(body, "TransactionID", _TRANSACTION_ID)
            if original not in (None, ""):
                if not isinstance(original, str) or len(original) > 100:
                    raise _Invalid("OriginalConversationID")
                found["original_conversation_id"] = original
            if not found:
                raise _Invalid("TransactionID")
        found["party"] = _matching(body, "PartyA", _PARTY)
        if _as_text(body.get("IdentifierType")) not in IDENTIFIER_TYPES:
            raise _Invalid("IdentifierType")
    urls = {}
    for name in ("ResultURL", "QueueTimeOutURL"):
        url = body.get(name)
        if not isinstance(url, str) or not valid_url(url):
            raise _Invalid(name)
        urls[name] = url
    remarks = body.get("Remarks")
    if api == "reversal" or remarks is not None:  # required for a reversal only
        if not isinstance(remarks, str) or not 2 <= len(remarks) <= 100:
            raise _Invalid("Remarks")
    occasion = body.get("Occasion")
    if api == "status" and occasion is not None and (
            not isinstance(occasion, str) or len(occasion) > 100):
        raise _Invalid("Occasion")
    return _Request(api, texts["Initiator"], texts["SecurityCredential"], urls["ResultURL"],
                    urls["QueueTimeOutURL"], **found)


def _control_changes(changes):
    """Check a partial control update; ValueError says what is wrong."""
    checked = {}
    for name, value in changes.items():
        if name == "mode":
            if not isinstance(value, str) or value not in MODES:
                raise ValueError(f"unknown mode {str(value)[:40]!r}; expected one of"
                                 f" {', '.join(MODES)}")
        elif name == "result_delay_s":
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0 <= value <= MAX_RESULT_DELAY_S):  # NaN fails this too
                raise ValueError("result_delay_s must be a number of seconds from 0 to"
                                 f" {MAX_RESULT_DELAY_S:g}")
            value = float(value)
        elif name in ("single_parameter", "unlock"):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
        else:
            raise ValueError(f"unknown setting {str(name)[:40]!r}; expected mode,"
                             " result_delay_s, single_parameter or unlock")
        checked[name] = value
    return checked


def _conversation_id(wall):
    """AG_ + YYYYMMDD + _ + 20 hex, as Daraja's ConversationID."""
    return f"AG_{wall:%Y%m%d}_{secrets.token_hex(10)}"


def _stamp(wall):
    """YYYYMMDDHHmmss (EAT) as a number, as Daraja sends these times in results."""
    return int(f"{wall:%Y%m%d%H%M%S}")


def _no_money_id(receipt):
    """The TransactionID of a result that moved no money: a receipt's date letters and
    zeros (Daraja's NLJ0000000)."""
    return receipt[:3] + "0000000"


def _packed(account, amount):
    """One account of Daraja's packed balance: Name|Currency|Available|Uncleared|Reserved|
    Unreserved (the simulator's money is all available)."""
    return f"{account}|KES|{amount:.2f}|{amount:.2f}|0.00|0.00"


def _envelope(api, outcome, ids, transaction_id, params=None, single=False):
    """The Result body (§7.6); `params` [(Key, Value or None: a Key without a Value)]."""
    code, description = outcome
    result = {"ResultType": 0, "ResultCode": code, "ResultDesc": description,
              "OriginatorConversationID": ids[0], "ConversationID": ids[1],
              "TransactionID": transaction_id}
    if params:
        items = [{"Key": k} if v is None else {"Key": k, "Value": v} for k, v in params]
        result["ResultParameters"] = {"ResultParameter": items[0] if single else items}
    result["ReferenceData"] = {"ReferenceItem": dict(REFERENCE_ITEMS[api])}
    return {"Result": result}


# --- the initiator's key and certificate -------------------------------------------

class InitiatorKeys:
    """The initiator's RSA key pair and self-signed certificate, made once, when first
    needed (a key costs tens of milliseconds, and most simulators never use one)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._made = None  # (private key, certificate PEM, PKCS1v15 padding class)

    def _get(self):
        with self._lock:
            if self._made is None:
                self._made = _make_keys()
            return self._made

    def certificate_pem(self):
        return self._get()[1]

    def decrypt(self, credential):
        """The password a SecurityCredential holds, or None when it holds none."""
        key, _, pkcs1v15 = self._get()
        try:
            data = base64.b64decode(credential, validate=True)
            return key.decrypt(data, pkcs1v15())
        except (binascii.Error, ValueError):  # not base64, wrong length, bad padding
            return None


def _make_keys():
    try:  # here only: the simulator runs without cryptography until an initiator API is used
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise CryptographyMissing() from None
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CERT_COMMON_NAME),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Daraja simulator")])
    now = datetime.now(timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(days=1))
                   .not_valid_after(now + timedelta(days=CERT_DAYS))
                   .sign(key, hashes.SHA256()))
    return key, certificate.public_bytes(serialization.Encoding.PEM), padding.PKCS1v15


# --- the stateful part ---------------------------------------------------------

@dataclass(frozen=True)
class Parts:
    """What the Simulator lends its initiator APIs."""

    settings: Any  # SimSettings: initiator_name, initiator_password, result_delay_s, cert_file
    lock: Any  # the simulator's lock: it guards the state below too
    count: Callable  # count(name): one more on a /_sim/stats counter (takes the lock)
    sender: Any  # the callback sender: schedule_job(due, job), post(url, body, timeout)
    check_bearer: Callable  # check_bearer(environ, status, code, message with {token})
    read_body: Callable  # read_body(environ): the body as JSON, bounded
    reject: type  # reject(status, errorCode, errorMessage): Daraja's error envelope
    control_error: type  # control_error(status, code, message): a /_sim/ refusal
    raw: type  # raw(status, content_type, data): an answer that is not JSON
    receipt: Callable  # receipt(wall): a new receipt number
    request_id: Callable  # request_id(): an id in Daraja's newer form
    valid_url: Callable  # valid_url(url): an absolute http(s) URL without spaces


@dataclass
class _Transaction:
    """A transaction the simulator completed: a payment it received, or a reversal."""

    receipt: str
    amount: int
    shortcode: str  # the organisation's side
    debit_party: str  # "2547******678 - JOHN" for a payment; the organisation for a reversal
    credit_party: str
    reason: str  # ReasonType
    account_type: str  # DebitAccountType
    initiated: datetime  # EAT
    completed: datetime  # EAT
    visible_at: float  # monotonic: before it the payment is not done (a prompt still open)
    conversation_id: str
    reversible: bool
    status: str = "Completed"  # or "Reversed"


class InitiatorApis:
    """The three initiator APIs and their control; the Simulator routes to `routes()`."""

    def __init__(self, parts):
        self._p = parts
        self._keys = InitiatorKeys()
        self._transactions = {}  # receipt → _Transaction
        self._by_originator = {}  # a reversal's OriginatorConversationID → its receipt
        self._mode, self._single = "normal", False
        self._delay = float(parts.settings.result_delay_s)
        self._failures = 0  # credentials refused in a row; LOCK_AFTER locks
        self.results = []  # (url, body bytes) of each Result or QueueTimeOut answered 2xx
        self.received = []  # (api, TransactionID) of each request acknowledged
        if parts.settings.cert_file:
            self._write_certificate(parts.settings.cert_file)

    def routes(self):
        """path → {method: handler}, for the Simulator's route table."""
        return {
            **{path: {"POST": lambda environ, api=api: self._handle(api, environ)}
               for api, (path, _, _) in APIS.items()},
            "/_sim/initiator": {"GET": lambda environ: (200, self.state()),
                                "POST": self._post_control},
            "/_sim/initiator/certificate": {"GET": self._get_certificate},
        }

    def _write_certificate(self, path):
        try:
            pem = self._keys.certificate_pem()
        except CryptographyMissing as exc:
            # The rest of the simulator works without cryptography: it starts all the same.
            log.warning("MPESA_SIM_CERT_FILE not written: %s", exc)
            return
        try:
            with open(path, "wb") as f:
                f.write(pem)
        except OSError as exc:
            raise ValueError(f"MPESA_SIM_CERT_FILE cannot be written ({exc.strerror}):"
                             f" {path}") from None

    # --- what the Simulator tells it, and its Python control ------------------------

    def paid(self, receipt, amount, customer, shortcode, channel, initiated, completed,
             visible_at=0.0):
        """A payment the simulator completed: receipt, whole shillings, the customer's
        public name, the shortcode paid, "stk" or the C2B CommandID, EAT times; before
        `visible_at` (monotonic) it is not done yet."""
        tx = _Transaction(receipt, amount, shortcode, customer, f"{shortcode} - {ORG_NAME}",
                          REASON_TYPES[channel], "MMF Account For Customer", initiated,
                          completed, visible_at, _conversation_id(completed), True)
        with self._p.lock:
            self._transactions[receipt] = tx

    def certificate_pem(self):
        """The initiator's certificate, PEM bytes (CryptographyMissing without cryptography)."""
        return self._keys.certificate_pem()

    def state(self):
        with self._p.lock:
            return {"mode": self._mode, "result_delay_s": self._delay,
                    "single_parameter": self._single, "locked": self._failures >= LOCK_AFTER,
                    "failures": self._failures}

    def change(self, changes):
        """Apply a partial update (mode, result_delay_s, single_parameter, unlock); all
        checked before any applies. ValueError for a bad one."""
        checked = _control_changes(changes)
        with self._p.lock:
            self._mode = checked.get("mode", self._mode)
            self._delay = checked.get("result_delay_s", self._delay)
            self._single = checked.get("single_parameter", self._single)
            if checked.get("unlock"):
                self._failures = 0
        now = self.state()
        log.info("initiator mode=%s result_delay_s=%g single_parameter=%s locked=%s",
                 now["mode"], now["result_delay_s"], now["single_parameter"], now["locked"])
        return now

    # --- control endpoints ---------------------------------------------------------

    def _post_control(self, environ):
        try:
            body = self._p.read_body(environ)
        except self._p.reject:
            body = None
        if not isinstance(body, dict):
            raise self._p.control_error(400, "invalid_json", "the body must be a JSON object")
        try:
            return 200, self.change(body)
        except ValueError as exc:
            raise self._p.control_error(400, "invalid_initiator", str(exc)) from None

    def _get_certificate(self, environ):
        try:
            pem = self._keys.certificate_pem()
        except CryptographyMissing as exc:
            raise self._p.control_error(500, "cryptography_missing", str(exc)) from None
        return 200, self._p.raw(200, "application/x-pem-file", pem)

    # --- the APIs --------------------------------------------------------------------

    def _handle(self, api, environ):
        """Check, acknowledge, and schedule what is POSTed later."""
        p = self._p
        p.count(APIS[api][2])
        if api == "reversal":
            p.check_bearer(environ)  # as STK: HTTP 404 404.001.03
        else:
            p.check_bearer(environ, 401, "401.002.01",
                           "Error Occurred - Invalid Access Token - {token}")
        request = self._read(api, environ)
        with p.lock:
            self.received.append((api, request.transaction_id))
        wall = datetime.now(EAT)
        ids = (p.request_id(), _conversation_id(wall))
        with p.lock:
            mode, delay, single = self._mode, self._delay, self._single
        if mode == "timeout":  # never processed: it timed out in the queue
            body = _envelope(api, QUEUE_TIMEOUT, ids, _no_money_id(p.receipt(wall)))
            self._post_later(delay, request.timeout_url, body, "initiator_timeouts_sent")
        else:
            body = self._process(request, ids, wall, single)
            if mode == "normal":  # silent: processed, the result never sent
                self._post_later(delay, request.result_url, body, "initiator_results_sent")
        return 200, {"OriginatorConversationID": ids[0], "ConversationID": ids[1],
                     "ResponseCode": "0",
                     "ResponseDescription": "Accept the service request successfully."}

    def _read(self, api, environ):
        p = self._p
        if not environ.get("CONTENT_TYPE", "").lower().startswith("application/json"):
            # Daraja's quirk for a wrong Content-Type, on the first field it reads.
            raise p.reject(400, "400.002.02", "Bad Request - Invalid Initiator")
        body = p.read_body(environ)
        if not isinstance(body, dict):
            raise p.reject(400, "400.002.05", "Invalid Request Payload")
        try:
            return _checked(api, body, p.valid_url)
        except _Invalid as exc:
            raise p.reject(400, "400.002.02", f"Bad Request - Invalid {exc.field}") from None

    def _process(self, request, ids, wall, single):
        """Check the credential, then do the request; the Result body to POST."""
        try:
            good = self._credential_ok(request)
        except CryptographyMissing as exc:
            raise self._p.reject(500, "500.003.1001", str(exc)) from None
        no_money = _no_money_id(self._p.receipt(wall))
        refused = False
        with self._p.lock:
            if self._failures >= LOCK_AFTER:  # a good credential too, until unlocked
                return _envelope(request.api, LOCKED, ids, LOCKED_TRANSACTION_ID)
            if not good:
                self._failures += 1
                refused = True
            else:
                self._failures = 0
                do = {"reversal": self._reversal, "status": self._status,
                      "balance": self._balance}[request.api]
                outcome, transaction_id, params = do(request, ids, wall)
        if refused:
            self._p.count("initiator_credential_failures")
            return _envelope(request.api, BAD_INITIATOR, ids, no_money)
        return _envelope(request.api, outcome, ids, transaction_id or no_money, params, single)

    def _credential_ok(self, request):
        s = self._p.settings
        password = self._keys.decrypt(request.credential)  # always: the same work either way
        return (password is not None
                and secrets.compare_digest(request.initiator.encode(), s.initiator_name.encode())
                and secrets.compare_digest(password, s.initiator_password.encode()))

    # Each of these runs under the lock: (outcome, TransactionID or None, parameters).

    def _reversal(self, request, ids, wall):
        tx = self._known(request.transaction_id)
        if tx is None or not tx.reversible:
            return INVALID_ORIGINAL, None, None
        if tx.status == "Reversed":
            return ALREADY_REVERSED, None, None
        if request.amount != tx.amount:
            return WRONG_AMOUNT, None, None
        tx.status = "Reversed"
        receipt = self._p.receipt(wall)
        while receipt in self._transactions:
            receipt = self._p.receipt(wall)
        self._transactions[receipt] = _Transaction(
            receipt, tx.amount, tx.shortcode, tx.credit_party, tx.debit_party,
            REASON_TYPES["reversal"], "Utility Account", wall, wall, 0.0, ids[1], False)
        self._by_originator[ids[0]] = receipt
        return SUCCESS, receipt, [
            ("DebitAccountBalance", _packed("Utility Account", self._received(tx.shortcode))),
            ("Amount", tx.amount),
            ("TransCompletedTime", _stamp(wall)),
            ("OriginalTransactionID", tx.receipt),
            ("Charge", 0),
            ("CreditPartyPublicName", tx.debit_party),
            ("DebitPartyPublicName", tx.credit_party),
        ]

    def _status(self, request, ids, wall):
        receipt = request.transaction_id or self._by_originator.get(
            request.original_conversation_id, "")
        tx = self._known(receipt)
        if tx is None:
            return NO_RECEIPT, None, None
        return SUCCESS, None, [
            ("DebitPartyName", tx.debit_party),
            ("CreditPartyName", tx.credit_party),
            ("OriginatorConversationID", None),  # a Key without a Value, as Daraja sends it
            ("InitiatedTime", _stamp(tx.initiated)),
            ("DebitAccountType", tx.account_type),
            ("DebitPartyCharges", None),
            ("TransactionReason", None),
            ("ReasonType", tx.reason),
            ("TransactionStatus", tx.status),
            ("FinalisedTime", _stamp(tx.completed)),
            ("Amount", tx.amount),
            ("ConversationID", tx.conversation_id),
            ("ReceiptNo", tx.receipt),
        ]

    def _balance(self, request, ids, wall):
        accounts = (("Working Account", 0), ("Utility Account", self._received(request.party)),
                    ("Charges Paid Account", 0))
        return SUCCESS, None, [
            ("AccountBalance", "&".join(_packed(name, amount) for name, amount in accounts)),
            ("BOCompletedTime", _stamp(wall)),
        ]

    def _known(self, receipt):
        tx = self._transactions.get(receipt)
        return tx if tx is not None and tx.visible_at <= time.monotonic() else None

    def _received(self, shortcode):
        """Whole shillings paid to `shortcode` in this run, less what was reversed."""
        now = time.monotonic()
        return sum(tx.amount if tx.reversible else -tx.amount
                   for tx in self._transactions.values()
                   if tx.shortcode == shortcode and tx.visible_at <= now)

    def _post_later(self, delay, url, body, counter):
        data = json.dumps(body).encode()

        def deliver():
            try:
                self._p.sender.post(url, data, timeout=10)
            except Exception as exc:  # noqa: BLE001 - a lost result is part of the model
                self._p.count("initiator_results_failed")
                log.info("initiator result delivery failed: %s", type(exc).__name__)
                return
            with self._p.lock:
                self.results.append((url, data))
            self._p.count(counter)

        self._p.sender.schedule_job(time.monotonic() + delay, deliver)
