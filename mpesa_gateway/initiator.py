"""Daraja's initiator APIs, in the gateway's words: the credential and what results mean.

Owns the initiator's `SecurityCredential` (as the portal made it, or made at start-up from
the password and Safaricom's certificate: RSA PKCS#1 v1.5 by the optional `cryptography`
package, never by hand), the fingerprint that says whether the configuration changed,
reading a Result or QueueTimeOut body tolerantly into a `Result` (`ResultParameter` as
one object or a list, codes as numbers or strings, the placeholder `TransactionID` of a
failure), the reason each result code gives a person, the Account Balance packed string,
and the body as it may be kept (`kept_body`: no phone number in clear). Daraja's shapes
are in daraja_api.md §7; the flows that use them are in `refunds`.
"""

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import config as settings
import validation

EAT = timezone(timedelta(hours=3))
# Results that mean the initiator itself is refused: every call stops until the
# configuration changes, since more failures lock the business's API operator.
STOP_CODES = frozenset({"2001", "8006", "18", "20"})
PLACEHOLDER_IDS = frozenset({"", "XXXXXXXXXX", "0"})
# A request Daraja acknowledged whose result has not come in this long is `unknown`
# (no_result): results come in seconds; Daraja never resends one.
RESULT_WAIT_S = 3600
_RECEIPT = re.compile(r"[A-Z0-9]{6,20}")
# A Kenyan phone number in clear anywhere in a result body (DebitPartyName: "2547… - NAME").
_PHONE_TEXT = validation.PHONE_IN_TEXT
_PHONE = re.compile(_PHONE_TEXT.pattern.encode())

# What a result code tells a person (daraja_api.md §7.7): (reason slug, plain words).
REASONS = {
    "1": ("insufficient_balance", "the shortcode's account does not hold enough money"),
    "11": ("shortcode_inactive", "the shortcode is not active"),
    "17": ("daraja_internal_failure", "Daraja failed internally; try again later"),
    "18": ("wrong_credential", "Daraja refused the initiator's credential"),
    "20": ("unknown_initiator", "Daraja does not know MPESA_INITIATOR_NAME"),
    "21": ("initiator_not_allowed", "the API operator lacks the role for this request (ask"
           " Safaricom to grant it, e.g. 'Org Reversals Initiator')"),
    "26": ("daraja_busy", "Daraja is too busy; try again later"),
    "2001": ("wrong_credential", "the initiator name or credential is wrong (check"
             " MPESA_INITIATOR_NAME and the credential, and the certificate's environment)"),
    "2028": ("not_permitted", "the shortcode is not permitted to do this"),
    "2032": ("not_found", "no such M-Pesa receipt for this shortcode"),
    "8006": ("initiator_locked", "the API operator is locked after failed credentials;"
             " unlock it on the Daraja portal, then change the configuration"),
    "R000001": ("already_reversed", "the payment was already reversed"),
    "R000002": ("invalid_receipt", "Daraja does not know that receipt for this shortcode,"
                " or it cannot be reversed"),
    "timeout": ("queue_timeout", "Daraja's queue timed out: whether it happened is not"
                " known"),
}


def reason_for(code):
    """(reason slug, plain words) of a result code; unknown codes say so."""
    return REASONS.get(code, ("daraja_refused", f"Daraja refused it (result code {code})"))


@dataclass(frozen=True)
class Initiator:
    """The initiator the gateway calls Daraja as: its name, its credential, and the
    fingerprint of the configuration that made them (a stop lasts until it changes)."""

    name: str
    credential: str = field(repr=False)
    fingerprint: str


def from_config(config):
    """The Initiator the settings describe, or None when they name none. Raises
    config.ConfigError (one message) when the credential cannot be made."""
    if not config.initiator_name:
        return None
    if config.security_credential:
        credential = config.security_credential.strip()
        source = credential.encode()
    else:
        try:
            with open(config.cert_file, "rb") as f:
                certificate = f.read()
        except OSError as exc:
            raise settings.ConfigError([f"MPESA_CERT_FILE cannot be read ({exc.strerror})"]) \
                from None
        credential = encrypt_password(config.initiator_password, certificate)
        source = config.initiator_password.encode() + b"\0" + certificate
    digest = hashlib.sha256(config.initiator_name.encode() + b"\0" + source).hexdigest()
    return Initiator(config.initiator_name, credential, digest[:16])


def encrypt_password(password, certificate):
    """base64(RSA PKCS#1 v1.5 encryption of the password with the certificate's public
    key), as Safaricom documents it; the certificate in PEM or DER."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError:
        raise settings.ConfigError([
            "MPESA_INITIATOR_PASSWORD needs the optional 'cryptography' package: pip install"
            " 'mpesa-wsgi[initiator]' (or -r requirements-initiator.txt), or set"
            " MPESA_SECURITY_CREDENTIAL as the Daraja portal generates it"]) from None
    try:
        cert = (x509.load_pem_x509_certificate(certificate) if b"-----BEGIN" in certificate
                else x509.load_der_x509_certificate(certificate))
    except ValueError:
        raise settings.ConfigError(["MPESA_CERT_FILE is not an X.509 certificate (PEM or"
                                    " DER)"]) from None
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise settings.ConfigError(["MPESA_CERT_FILE's key is not RSA: is it Safaricom's API"
                                    " certificate?"])
    encrypted = key.encrypt(password.encode(), padding.PKCS1v15())
    return base64.b64encode(encrypted).decode("ascii")


@dataclass(frozen=True)
class Result:
    """One Result (or QueueTimeOut) body, read tolerantly: codes as text, the receipt
    Daraja gives (None for the placeholder of a failure), the parameters by key."""

    code: str
    description: str
    transaction_id: str | None
    originator_conversation_id: str | None
    conversation_id: str | None
    parameters: dict
    interim: bool = False  # ResultType 1: "waiting for further messages", not the end

    @property
    def ok(self):
        return self.code == "0"


# A QueueTimeOut body that is not a Result envelope (its shape is undocumented): still a
# timeout.
UNREADABLE_TIMEOUT = Result(code="", description="", transaction_id=None,
                            originator_conversation_id=None, conversation_id=None,
                            parameters={})


def _text(value, limit=200):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ""
    return str(value).replace("\x00", "").encode("utf-8", "replace").decode()[:limit].strip()


def _items(value):
    """`ResultParameter` / `ReferenceItem`: one object or a list of them."""
    if isinstance(value, dict):
        return [value]
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def from_raw(raw):
    """The Result a raw body holds, or None (not JSON, no Result, no ResultCode)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    result = body.get("Result") if isinstance(body, dict) else None
    if not isinstance(result, dict):
        return None
    code = _text(result.get("ResultCode"), 32)
    if not code:
        return None
    container = result.get("ResultParameters")
    params = {}
    for item in _items(container.get("ResultParameter") if isinstance(container, dict)
                       else None):
        key = _text(item.get("Key"), 64)
        if key and key not in params:
            params[key] = item.get("Value")
    receipt = _text(result.get("TransactionID"), 32)
    return Result(code=code, interim=_text(result.get("ResultType"), 8) == "1",
                  description=_text(result.get("ResultDesc")),
                  transaction_id=None if receipt.upper() in PLACEHOLDER_IDS
                  or not _RECEIPT.fullmatch(receipt) else receipt,
                  originator_conversation_id=_text(result.get("OriginatorConversationID"), 64)
                  or None,
                  conversation_id=_text(result.get("ConversationID"), 64) or None,
                  parameters=params)


def _masked(match):
    return validation.mask_phones_in(match[0]) if isinstance(match[0], str) else \
        f"254{match[1]}******{re.sub(r'[^0-9]', '', match[3])}"


def kept_body(raw):
    """A result body as the ledger and the spool keep it: every phone number in clear
    masked (2547******678), the rest as it came. A JSON body is masked value by value (a
    number too) and written again only when something was masked, so it stays JSON; any
    other body has its phone-shaped runs masked as bytes."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _PHONE.sub(lambda m: _masked((None, *(g.decode() for g in m.groups())))
                          .encode(), raw)
    masked, changed = _masked_tree(body)
    return json.dumps(masked, separators=(",", ":")).encode() if changed else raw


def _masked_tree(value):
    """(value with every phone number masked, whether anything changed), at any depth."""
    if isinstance(value, list):
        items = [_masked_tree(v) for v in value]
        return [v for v, _ in items], any(c for _, c in items)
    if isinstance(value, dict):
        items = {k: _masked_tree(v) for k, v in value.items()}
        return {k: v for k, (v, _) in items.items()}, any(c for _, c in items.values())
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
        return (masked_text(text), True) if _PHONE_TEXT.fullmatch(text) else (value, False)
    if isinstance(value, str):
        new = _PHONE_TEXT.sub(_masked, value)
        return new, new != value
    return value, False


def masked_text(value):
    """A party name as it may be shown ("2547******678 - JOHN DOE")."""
    return _PHONE_TEXT.sub(_masked, _text(value))


def amount_of(value):
    """A whole-shilling amount from a result parameter (10, "10", "10.00"), or None."""
    text = _text(value, 32)
    if re.fullmatch(r"[0-9]{1,12}(?:\.0{1,2})?", text):
        return int(text.split(".", 1)[0])
    return None


def eat_time(value):
    """A Daraja time (YYYYMMDDHHmmss or DD.MM.YYYY HH:mm:ss, Nairobi time) as ISO-8601
    UTC, or None."""
    text = _text(value, 32)
    for pattern in ("%Y%m%d%H%M%S", "%d.%m.%Y %H:%M:%S"):
        try:
            moment = datetime.strptime(text, pattern).replace(tzinfo=EAT)
        except ValueError:
            continue
        return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return None


def balances(packed):
    """The accounts of Account Balance's packed string ("Working Account|KES|700000.00|
    700000.00|0.00|0.00&Utility Account|…"): [{name, currency, available, uncleared,
    reserved, unreserved}], amounts as numbers; unreadable parts are skipped."""
    accounts = []
    for part in _text(packed, 2000).split("&"):
        fields_ = [f.strip() for f in part.split("|")]
        if len(fields_) < 3 or not fields_[0]:
            continue
        numbers = []
        for f in fields_[2:6]:
            try:
                numbers.append(float(f))
            except ValueError:
                numbers.append(None)
        numbers += [None] * (4 - len(numbers))
        accounts.append({"name": fields_[0][:64], "currency": fields_[1][:8],
                         "available": numbers[0], "uncleared": numbers[1],
                         "reserved": numbers[2], "unreserved": numbers[3]})
    return accounts

PLAIN = {  # reasons that are not a result code's
    "interrupted": "the gateway stopped before Daraja answered: whether it was sent is not"
                   " known",
    "no_result": "Daraja acknowledged it but no result came: whether it happened is not"
                 " known",
    "upstream_unavailable": "Daraja could not be reached; nothing was sent",
    "daraja_rejected": "Daraja refused the request; nothing was done",
    "upstream_unknown": "Daraja's answer was lost: whether it was taken is not known",
    "retry_not_sent": "the retry did not reach Daraja (or Daraja refused it): whether the"
                      " first attempt was done is still not known",
}

WORDS = {**{slug: words for slug, words in REASONS.values()}, **PLAIN}


def words(reason, result_desc=None):
    """What a reason slug tells a person (Daraja's own words for a code we do not know)."""
    if reason is None:
        return None
    return WORDS.get(reason) or result_desc or reason


def decide(row, kind, result):
    """What a Result (`kind` result) or QueueTimeOut (`kind` timeout) body makes of an open
    request (a row): the ledger's settle_request applies it. A refund is done on 0, and on
    R000001 (already reversed: an operator's retry of one whose fate was unknown); a check
    answered 2032 is done too (not found for this shortcode); a refused initiator stops."""
    if kind == "timeout":
        return {"outcome": "timed_out", "status": "unknown", "reason": "queue_timeout",
                "result_code": result.code or None, "result_desc": result.description or None}
    if result.interim:  # more is to come: kept, nothing decided
        return {"outcome": "interim"}
    changes = {"result_code": result.code, "result_desc": result.description}
    p = result.parameters
    other_attempt = (result.conversation_id and row["conversation_id"]
                     and result.conversation_id != row["conversation_id"])
    if other_attempt and not (result.ok or result.code == "R000001"):
        # An earlier attempt's failure (a retry is out): it says nothing of this one.
        return {"outcome": "earlier_attempt"}
    if result.code in STOP_CODES:
        return dict(changes, outcome="initiator_refused", status="failed",
                    reason=reason_for(result.code)[0], stop=True)
    if row["kind"] == "refund" and (result.ok or result.code == "R000001"):
        return dict(changes, outcome="refunded", status="succeeded",
                    reason=None if result.ok else "already_reversed",
                    result_receipt=result.transaction_id if result.ok else None,
                    details=json.dumps({"charge": _text(p.get("Charge"), 32) or None}))
    if row["kind"] == "verify" and (result.ok or result.code == "2032"):
        found = result.ok
        return dict(changes, outcome="verified" if found else "not_found",
                    status="succeeded", reason=None if found else "not_found",
                    details=json.dumps({
                        "found": found, "amount": amount_of(p.get("Amount")),
                        "completed_at": eat_time(p.get("FinalisedTime")),
                        "transaction_status": _text(p.get("TransactionStatus"), 32) or None,
                        "debit_party": masked_text(p.get("DebitPartyName")) or None,
                        "credit_party": masked_text(p.get("CreditPartyName")) or None,
                        "receipt_no": _text(p.get("ReceiptNo"), 32) or None}))
    if row["kind"] == "balance" and result.ok:
        return dict(changes, outcome="balance", status="succeeded", reason=None,
                    details=json.dumps({"accounts": balances(p.get("AccountBalance")),
                                        "as_of": eat_time(p.get("BOCompletedTime"))}))
    return dict(changes, outcome="failed", status="failed", reason=reason_for(result.code)[0])
