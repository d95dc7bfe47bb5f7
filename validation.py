"""Input rules for merchant requests and Safaricom callbacks: pure functions, no I/O.

Owns the phone, amount and text rules of SPEC §2 (patterns compiled once), the
check of a whole `POST /stkpush` body, the parser of Daraja's STK callback
(items read by name), and phone masking for logs and responses.  Every failure
is a `ValidationError` carrying a machine code and the field at fault; the web
layer turns it into a 400.
"""

import base64
import binascii
import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

PHONE_FORMS = "07XXXXXXXX, 01XXXXXXXX, 7XXXXXXXX, 1XXXXXXXX, 2547XXXXXXXX, 2541XXXXXXXX or +254XXXXXXXXX"
# After dropping spaces and dashes: optional 0 / 254 / +254, then 7 or 1 and 8 digits.
_PHONE = re.compile(r"(?:\+254|254|0)?([17][0-9]{8})")
_PHONE_SEPARATORS = re.compile(r"[ \-]+")
_DIGITS = re.compile(r"[0-9]{1,9}")
_TEXT = re.compile(r"[A-Za-z0-9 _-]+")
_MSISDN = re.compile(r"254[17][0-9]{8}")
_DECIMAL = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,4})?")  # "10", "10.00"; never "1e1"

REFERENCE_MAX = 12  # AccountReference: shown to the customer in the prompt and SMS
DESCRIPTION_MAX = 13  # TransactionDesc
PUSH_FIELDS = ("phone", "amount", "reference", "description")


class ValidationError(ValueError):
    """Input broke a rule: `code` is the machine code, `field` the culprit or None."""

    def __init__(self, code, message, field=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def normalize_phone(value):
    """Return a Kenyan mobile number as 254XXXXXXXXX, or raise invalid_phone."""
    if isinstance(value, str) and len(value) <= 32:
        match = _PHONE.fullmatch(_PHONE_SEPARATORS.sub("", value.strip()))
        if match:
            return "254" + match.group(1)
    raise ValidationError(
        "invalid_phone", f"phone must be a Safaricom number: {PHONE_FORMS}", "phone"
    )


def parse_amount(value, max_amount):
    """Return whole shillings 1..max_amount from a JSON integer or digit string."""
    # bool is an int subclass: `true` must not pay 1 shilling.
    if isinstance(value, int) and not isinstance(value, bool):
        amount = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        amount = int(value)
    else:
        amount = None
    if amount is None or not 1 <= amount <= max_amount:
        raise ValidationError(
            "invalid_amount",
            f"amount must be whole shillings from 1 to {max_amount}, as an integer or digit string",
            "amount",
        )
    return amount


def check_text(value, field, limit):
    """Return `value` if it is 1..limit characters of [A-Za-z0-9 _-]; never truncate."""
    if isinstance(value, str) and len(value) <= limit and _TEXT.fullmatch(value):
        return value
    raise ValidationError(
        f"invalid_{field}",
        f"{field} must be 1 to {limit} characters of letters, digits, space, _ or -",
        field,
    )


@dataclass(frozen=True)
class PushRequest:
    phone: str
    amount: int
    reference: str
    description: str


def validate_push(body, max_amount, default_reference, default_description):
    """Check a decoded POST /stkpush body and return a PushRequest."""
    if not isinstance(body, dict):
        raise ValidationError("invalid_body", "the body must be a JSON object")
    for name in body:
        if name not in PUSH_FIELDS:
            raise ValidationError(
                "unknown_field", f"unknown field; accepted: {', '.join(PUSH_FIELDS)}", name
            )
    for name in ("phone", "amount"):
        if name not in body:
            raise ValidationError("missing_field", f"{name} is required", name)
    reference = body.get("reference", default_reference)
    description = body.get("description", default_description)
    return PushRequest(
        phone=normalize_phone(body["phone"]),
        amount=parse_amount(body["amount"], max_amount),
        reference=check_text(reference, "reference", REFERENCE_MAX),
        description=check_text(description, "description", DESCRIPTION_MAX),
    )


# A Kenyan mobile number in clear inside any text (a name, an account number someone typed,
# a party name), written plainly or with spaces or dashes between its digits.
PHONE_IN_TEXT = re.compile(r"(?<![0-9])(?:\+?254|0)[ -]?([17])((?:[ -]?[0-9]){5})"
                           r"((?:[ -]?[0-9]){3})(?![0-9])")


def _masked_match(match):
    return f"254{match[1]}******{re.sub(r'[^0-9]', '', match[3])}"


def mask_phones_in(text):
    """`text` with every phone number in it masked like one (2547******678)."""
    return PHONE_IN_TEXT.sub(_masked_match, text) if isinstance(text, str) else text


def mask_phone(phone):
    """2547******678: enough to tell numbers apart in a log, not enough to call one."""
    if isinstance(phone, str) and _MSISDN.fullmatch(phone):
        return phone[:4] + "******" + phone[-3:]
    return "***"


# --- STK callback ------------------------------------------------------------


@dataclass(frozen=True)
class StkResult:
    """One STK outcome, from a callback or a query: what settles a transaction."""

    checkout_request_id: str
    merchant_request_id: str | None
    result_code: str  # Daraja sends a number (callback) or string (query): kept as text
    result_desc: str | None
    amount: int | None = None  # None unless the callback carried it
    receipt: str | None = None


def _callback_error(message):
    return ValidationError("invalid_callback", message)


def _result_code(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and 0 < len(value) <= 32 and value.strip() == value:
        return value
    raise _callback_error("ResultCode must be a number or a string")


def _optional_text(value, limit=256):
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)[:limit]
    return None


def _items_by_name(metadata):
    """CallbackMetadata.Item as {Name: Value}; order and count are not a contract."""
    if metadata is None or metadata == {}:  # failure callbacks carry none, or an empty one
        return {}
    items = metadata.get("Item") if isinstance(metadata, dict) else None
    if isinstance(items, dict):  # a single item sent as an object
        items = [items]
    if not isinstance(items, list):
        raise _callback_error("CallbackMetadata.Item must be a list")
    values = {}
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("Name"), str):
            values[item["Name"]] = item.get("Value")  # Balance often has no Value
    return values


def _callback_amount(value):
    """Whole shillings from a JSON number (1, 1.00) or a plain decimal string ("10",
    "10.00"); None when absent, not whole, or another spelling ("1e1"): not proof."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            return None
        value = float(value)
    if isinstance(value, (int, float)) and value == value and abs(value) < 1e12:
        return int(value) if float(value).is_integer() else None
    return None


def parse_stk_callback(body):
    """Parse a decoded STK callback (`{"Body":{"stkCallback":{...}}}`) into StkResult."""
    stk = body.get("Body") if isinstance(body, dict) else None
    stk = stk.get("stkCallback") if isinstance(stk, dict) else None
    if not isinstance(stk, dict):
        raise _callback_error("expected Body.stkCallback")
    checkout = stk.get("CheckoutRequestID")
    if not isinstance(checkout, str) or not checkout or len(checkout) > 64:
        raise _callback_error("CheckoutRequestID must be a string")
    if "ResultCode" not in stk:
        raise _callback_error("ResultCode is required")
    code = _result_code(stk["ResultCode"])
    items = _items_by_name(stk.get("CallbackMetadata"))
    receipt = items.get("MpesaReceiptNumber")
    return StkResult(
        checkout_request_id=checkout,
        merchant_request_id=_optional_text(stk.get("MerchantRequestID"), 64),
        result_code=code,
        result_desc=_optional_text(stk.get("ResultDesc")),
        amount=_callback_amount(items.get("Amount")),
        receipt=receipt if isinstance(receipt, str) and 0 < len(receipt) <= 32 else None,
    )


# --- GET /events (webhook events) ---------------------------------------------

EVENT_STATUSES = ("pending", "delivered", "dead")
EVENT_PARAMS = ("status", "limit", "cursor")
_EVENT_ID = re.compile(r"msg_[0-9a-f]{24}")


def tx_id_ok(value):
    """Is `value` a gateway payment id (tx_…)?"""
    return bool(_TX_ID.fullmatch(value))


def event_id_ok(value):
    return bool(_EVENT_ID.fullmatch(value))


def parse_events_query(query_string):
    """(status, limit, after) of GET /events; each parameter at most once."""
    one, status, limit = _page_params(query_string, EVENT_PARAMS, EVENT_STATUSES)
    after = one.get("cursor")
    if after is not None and not event_id_ok(after):
        raise _bad_param("cursor", "cursor must be a next_cursor value from a previous page")
    return status, limit, after


# --- GET /transactions (operator listing) -------------------------------------

STATUSES = ("pending", "succeeded", "failed", "rejected", "unknown")
LIST_PARAMS = ("status", "since", "until", "reference", "receipt", "phone", "limit",
               "cursor")
# The digits a masked phone shows (2547******678): a filter by more would tell the hidden
# ones, digit by digit.
_PHONE_DIGITS = re.compile(r"[0-9]{1,3}")
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 50, 200
_ISO_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TX_ID = re.compile(r"tx_[0-9a-f]{24}")  # ledger.new_tx_id


@dataclass(frozen=True)
class ListQuery:
    statuses: tuple  # none: every status
    since: str | None  # ISO-8601 UTC, seconds
    limit: int
    after: tuple | None  # (created_at, id) of the last row already seen
    until: str | None = None  # ISO-8601 UTC, excluded
    reference: str | None = None  # any case
    receipt: str | None = None
    phone: str | None = None  # the phone's last 1 to 3 digits, or the whole number (254…)


def _bad_param(name, message):
    return ValidationError("invalid_parameter", message, name)


def encode_cursor(created_at, tx_id):
    """An opaque, stable position: the (created_at, id) of the last row of a page."""
    return base64.urlsafe_b64encode(f"{created_at}|{tx_id}".encode()).decode().rstrip("=")


def _decode_cursor(value, key=_TX_ID):
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    created_at, _, last = raw.partition("|")
    if not (_ISO_TIME.fullmatch(created_at) and key.fullmatch(last)):
        raise _bad_param("cursor", "cursor must be a next_cursor value from a previous page")
    return created_at, last


def _since(value, name="since"):
    text = value + "T00:00:00Z" if _ISO_DATE.fullmatch(value) else value
    try:
        if not _ISO_TIME.fullmatch(text):
            raise ValueError
        time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise _bad_param(name, f"{name} must be YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)") \
            from None
    return text


def _page_params(query_string, accepted, statuses, repeatable=()):
    """The parameters every paged listing shares: only `accepted` names, each at most
    once (but `repeatable` ones); `status` one of `statuses`; `limit` 1..LIST_LIMIT_MAX.
    Returns (all: a repeatable one's values joined by commas, status, limit)."""
    params = parse_qs(query_string or "", keep_blank_values=True)
    for name, values in params.items():
        if name not in accepted:
            raise ValidationError("unknown_parameter",
                                  f"unknown parameter; accepted: {', '.join(accepted)}", name)
        if len(values) != 1 and name not in repeatable:
            raise _bad_param(name, f"{name} may be given once")
    one = {name: ",".join(values) for name, values in params.items()}
    if "status" in repeatable:
        return one, None, _limit(one)
    status = one.get("status")
    if status is not None and status not in statuses:
        raise _bad_param("status", f"status must be one of {', '.join(statuses)}")
    return one, status, _limit(one)


def _limit(one):
    if "limit" not in one:
        return LIST_LIMIT_DEFAULT
    if not _DIGITS.fullmatch(one["limit"]) or not 1 <= int(one["limit"]) <= LIST_LIMIT_MAX:
        raise _bad_param("limit", f"limit must be a whole number from 1 to {LIST_LIMIT_MAX}")
    return int(one["limit"])


EXPORT_PARAMS = tuple(p for p in LIST_PARAMS if p not in ("limit", "cursor"))


def parse_list_query(query_string, accepted=LIST_PARAMS):
    """Check the payments listing's query parameters: `status` may be repeated (or hold
    several, comma-separated); the others appear once. An export takes EXPORT_PARAMS:
    every row of the filter, no page."""
    one, _, limit = _page_params(query_string, accepted, STATUSES, repeatable=("status",))
    statuses = tuple(dict.fromkeys(v for v in one.get("status", "").split(",") if v))
    if "status" in one and (not statuses or not set(statuses) <= set(STATUSES)):
        raise _bad_param("status", f"status must be one or more of {', '.join(STATUSES)}")
    reference = one.get("reference")
    if reference is not None and not (0 < len(reference.strip()) <= 64
                                      and reference.isprintable()):
        raise _bad_param("reference", "reference must be 1 to 64 printable characters")
    receipt = one.get("receipt")
    if receipt is not None and not RECEIPT_NUMBER.fullmatch(receipt.strip().upper()):
        raise _bad_param("receipt", "receipt must be an M-Pesa receipt number")
    phone = one.get("phone")
    if phone is not None:
        phone = phone.strip()
        if not _PHONE_DIGITS.fullmatch(phone):
            try:  # the whole number, in any form a person writes it
                phone = normalize_phone(phone)
            except ValidationError:
                raise _bad_param("phone", "phone must be the last 1 to 3 digits (as the"
                                 " masked phone shows them) or the whole number") from None
    return ListQuery(
        statuses=statuses, since=_since(one["since"]) if "since" in one else None,
        limit=limit, after=_decode_cursor(one["cursor"]) if "cursor" in one else None,
        until=_since(one["until"], "until") if "until" in one else None,
        reference=reference.strip() if reference is not None else None,
        receipt=receipt.strip().upper() if receipt is not None else None,
        phone=phone)


# --- the receipts listing ---------------------------------------------------------------------

RECEIPT_PARAMS = ("reference", "since", "until", "channel", "limit", "cursor")
CHANNELS = ("stk", "c2b")
RECEIPT_NUMBER = re.compile(r"[^|/\s\x00-\x1f\x7f]{1,32}")  # as the ledger may hold it


@dataclass(frozen=True)
class ReceiptQuery:
    reference: str | None  # an account number or a payment's reference, any case
    since: str | None  # ISO-8601 UTC bounds on when the receipt was kept
    until: str | None
    channel: str | None  # stk | c2b
    limit: int
    after: tuple | None  # (at, receipt) of the last row already seen


RECEIPT_EXPORT_PARAMS = tuple(p for p in RECEIPT_PARAMS if p not in ("limit", "cursor"))


def parse_receipts_query(query_string, accepted=RECEIPT_PARAMS):
    """Check GET /receipts's query parameters; each may appear once."""
    one, _, limit = _page_params(query_string, accepted, ())
    reference = one.get("reference")
    if reference is not None and not (0 < len(reference.strip()) <= 64
                                      and reference.isprintable()):
        raise _bad_param("reference", "reference must be 1 to 64 printable characters")
    channel = one.get("channel")
    if channel is not None and channel not in CHANNELS:
        raise _bad_param("channel", f"channel must be one of {', '.join(CHANNELS)}")
    return ReceiptQuery(
        reference=reference.strip() if reference is not None else None,
        since=_since(one["since"]) if "since" in one else None,
        until=_since(one["until"], "until") if "until" in one else None,
        channel=channel, limit=limit,
        after=_decode_cursor(one["cursor"], RECEIPT_NUMBER) if "cursor" in one else None)


# --- a payment's Dynamic QR code -------------------------------------------------------------

QR_FIELDS = ("amount", "reference", "size")
QR_SIZE_DEFAULT, QR_SIZE_MIN, QR_SIZE_MAX = 300, 100, 1000


@dataclass(frozen=True)
class QrRequest:
    amount: int
    reference: str
    size: int


def validate_qr(body, max_amount):
    """Check a decoded POST /qr body: amount and reference required, size in pixels."""
    if not isinstance(body, dict):
        raise ValidationError("invalid_body", "the body must be a JSON object")
    for name in body:
        if name not in QR_FIELDS:
            raise ValidationError(
                "unknown_field", f"unknown field; accepted: {', '.join(QR_FIELDS)}", name)
    for name in ("amount", "reference"):
        if name not in body:
            raise ValidationError("missing_field", f"{name} is required", name)
    size = body.get("size", QR_SIZE_DEFAULT)
    if isinstance(size, bool) or not isinstance(size, int) \
            or not QR_SIZE_MIN <= size <= QR_SIZE_MAX:
        raise ValidationError("invalid_size", f"size must be a whole number of pixels from"
                              f" {QR_SIZE_MIN} to {QR_SIZE_MAX}", "size")
    return QrRequest(amount=parse_amount(body["amount"], max_amount),
                     reference=check_text(body["reference"], "reference", REFERENCE_MAX),
                     size=size)


# --- refunds, code checks and claims ---------------------------------------------------------

MPESA_CODE = re.compile(r"[A-Z0-9]{6,20}")  # an M-Pesa receipt as Daraja writes it
CLAIM_REFERENCE_MAX = 64


def mpesa_code(value):
    """A receipt a person typed or pasted ("qkx1a2b3c4 "): upper case, trimmed, or a 400."""
    code = value.strip().upper() if isinstance(value, str) and value.isascii() else ""
    if not MPESA_CODE.fullmatch(code):
        raise ValidationError("invalid_receipt", "an M-Pesa receipt is 6 to 20 letters and"
                              " digits, e.g. QKX1A2B3C4", "receipt")
    return code


def validate_refund(body):
    """A POST …/refund body: empty ({}), or {"retry": true|false}; returns `retry`."""
    if not isinstance(body, dict):
        raise ValidationError("invalid_body", "the body must be a JSON object")
    for name in body:
        if name != "retry":
            raise ValidationError("unknown_field", "unknown field; accepted: retry", name)
    retry = body.get("retry", False)
    if not isinstance(retry, bool):
        raise ValidationError("invalid_retry", "retry must be true or false", "retry")
    return retry


def validate_claim(body):
    """A POST /receipts/<receipt>/claim body: {"reference": the merchant's order}."""
    if not isinstance(body, dict):
        raise ValidationError("invalid_body", "the body must be a JSON object")
    for name in body:
        if name != "reference":
            raise ValidationError("unknown_field", "unknown field; accepted: reference", name)
    if "reference" not in body:
        raise ValidationError("missing_field", "reference is required", "reference")
    reference = body["reference"]
    if isinstance(reference, str) and reference.strip() != reference:
        reference = ""  # no leading or trailing spaces: one order, one way to write it
    return check_text(reference, "reference", CLAIM_REFERENCE_MAX)


# --- payment links -------------------------------------------------------------------------

LINK_FIELDS = ("amount", "reference", "description", "expires_in_s", "max_uses")
LINK_EXPIRY_DEFAULT_S, LINK_EXPIRY_MIN_S, LINK_EXPIRY_MAX_S = 86_400, 300, 30 * 86_400
LINK_MAX_USES = 1000


@dataclass(frozen=True)
class LinkRequest:
    amount: int
    reference: str
    description: str
    expires_in_s: int
    max_uses: int


def _whole(body, name, default, low, high, what):
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"invalid_{name}", f"{name} must be {what} from {low} to {high}",
                              name)
    return value


def validate_link(body, max_amount, default_reference, default_description):
    """A POST /payment_links body: the amount (required), the reference and description the
    prompt shows (as a push's), how long it lasts (24 h by default) and how many payments it
    takes (1: single-use)."""
    if not isinstance(body, dict):
        raise ValidationError("invalid_body", "the body must be a JSON object")
    for name in body:
        if name not in LINK_FIELDS:
            raise ValidationError(
                "unknown_field", f"unknown field; accepted: {', '.join(LINK_FIELDS)}", name)
    if "amount" not in body:
        raise ValidationError("missing_field", "amount is required", "amount")
    return LinkRequest(
        amount=parse_amount(body["amount"], max_amount),
        reference=check_text(body.get("reference", default_reference), "reference",
                             REFERENCE_MAX),
        description=check_text(body.get("description", default_description), "description",
                               DESCRIPTION_MAX),
        expires_in_s=_whole(body, "expires_in_s", LINK_EXPIRY_DEFAULT_S, LINK_EXPIRY_MIN_S,
                            LINK_EXPIRY_MAX_S, "whole seconds"),
        max_uses=_whole(body, "max_uses", 1, 1, LINK_MAX_USES, "a whole number"))
