"""Paybill and Till payments (C2B): what Safaricom's confirmation says, read strictly.

Owns reading a confirmation body into a `Confirmation`: the receipt number, the amount
in whole shillings, the account number, Paybill or Till, the time Safaricom gives turned
from EAT into UTC, the payer's name as given, and the MSISDN as given when hashed or
masked (masked here when it arrives in clear); the anomalies that keep one from being
money; the body as it may be kept (`kept_body`: no MSISDN in clear, whatever its shape);
and the validation refusals. Daraja sends every field as a string (daraja_api.md §6.2).
The flows that store and answer them are in `payments`.
"""

import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

EAT = timezone(timedelta(hours=3))  # TransTime is Nairobi time, no zone given
_AMOUNT = re.compile(r"[0-9]{1,9}(?:\.0{1,2})?")  # whole shillings, as Daraja writes them
_RECEIPT = re.compile(r"[A-Z0-9]{6,20}")
_TIME = re.compile(r"[0-9]{14}")
_CLEAR_MSISDN = re.compile(r"(?:254|0)?([17][0-9]{5})([0-9]{3})")
# In a body that is not a JSON object: a run of 9 or more digits, maybe spaced, maybe a phone.
_PHONE_RUN = re.compile(rb"\+?[0-9](?:[ -]?[0-9]){8,}")
MASKED_UNREADABLE = "unreadable"  # a few digits and no mask: neither a number nor a mask
_HASHED_MSISDN = re.compile(r"[0-9a-f]{64}")
CHANNELS = {"pay bill": "paybill", "paybill": "paybill", "customerpaybillonline": "paybill",
            "buy goods": "till", "buygoods": "till", "customerbuygoodsonline": "till"}
MAX_TEXT = 100  # names and account numbers kept, at most (Daraja: BillRefNumber ≤ 20)


@dataclass(frozen=True)
class Confirmation:
    """One confirmation as the ledger keeps it; `anomalies` name what is not as Daraja
    documents it (an amount that is not whole shillings is no money: `amount` is None)."""

    receipt: str
    amount: int | None
    account: str
    shortcode: str
    channel: str | None  # paybill | till
    paid_at: str | None  # ISO-8601 UTC
    payer_name: str
    msisdn: str
    anomalies: tuple = ()


def _text(body, name, numbers=False):
    """A field as text: trimmed, at most MAX_TEXT, with what no ledger column takes (a NUL,
    a lone surrogate) replaced. `numbers`: a JSON number is read as its digits too (Daraja's
    own examples send some fields so)."""
    value = body.get(name)
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return ""
    value = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return value.strip()[:MAX_TEXT]


def masked_msisdn(value):
    """The MSISDN as it may be kept: a SHA-256 hash as given; a form Safaricom masked (a
    `*` and at most 8 digits) as given; anything holding more digits masked like every
    phone in the logs (2547******678); digits are read in any script (NFKC)."""
    value = unicodedata.normalize("NFKC", value).strip()
    if _HASHED_MSISDN.fullmatch(value.lower()):
        return value.lower()
    digits = "".join(str(unicodedata.decimal(c)) for c in value  # any script's digits
                     if unicodedata.decimal(c, None) is not None)
    if len(digits) <= 8:
        return value[:32] if "*" in value or not digits else MASKED_UNREADABLE
    clear = _CLEAR_MSISDN.fullmatch(digits)
    if clear:
        return f"254{clear[1][0]}{'*' * 6}{clear[2]}"
    return f"{'*' * 6}{digits[-3:]}"


def paid_at(trans_time):
    """TransTime (YYYYMMDDHHmmss, Nairobi time) as ISO-8601 UTC, or None."""
    if not _TIME.fullmatch(trans_time):
        return None
    try:
        moment = datetime.strptime(trans_time, "%Y%m%d%H%M%S").replace(tzinfo=EAT)
    except ValueError:
        return None
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_raw(raw, shortcodes):
    """The Confirmation a raw body holds, or None when it names no receipt (malformed:
    stored as it came, never money). `shortcodes`: this gateway's own (a confirmation for
    another is kept and flagged `other_shortcode`)."""
    try:
        body = json.loads(raw.decode("utf-8"))  # UTF-8 only, as Daraja sends
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    receipt = _text(body, "TransID")
    if not _RECEIPT.fullmatch(receipt):
        return None
    anomalies = []
    amount_text = body.get("TransAmount")
    amount = None
    if isinstance(amount_text, str) and _AMOUNT.fullmatch(amount_text):
        amount = int(amount_text.split(".", 1)[0])
    if amount is None or amount <= 0:
        amount = None
        anomalies.append("amount")
    channel = CHANNELS.get(_text(body, "TransactionType").lower())
    if channel is None:
        anomalies.append("transaction_type")
    when = paid_at(_text(body, "TransTime"))
    if when is None:
        anomalies.append("trans_time")
    shortcode = _text(body, "BusinessShortCode", numbers=True)
    if shortcode not in shortcodes:
        anomalies.append("other_shortcode")
    name = " ".join(n for n in (_text(body, k) for k in ("FirstName", "MiddleName",
                                                          "LastName")) if n)
    return Confirmation(receipt=receipt, amount=amount,
                        account=_text(body, "BillRefNumber"), shortcode=shortcode,
                        channel=channel, paid_at=when, payer_name=name[:MAX_TEXT],
                        msisdn=masked_msisdn(_text(body, "MSISDN", numbers=True)),
                        anomalies=tuple(anomalies))


def kept_body(raw):
    """The body as the ledger and the spool keep it: as it came, except that an MSISDN in
    clear is masked (never stored in clear), under any spelling of the key, at any depth,
    and in a body that repeats the key; an MSISDN that is not text or a number is emptied;
    a body that is not a JSON object has every phone-like run of digits masked. Never
    raises: the body is kept whatever it holds."""
    repeated = []

    def keep_repeats(pairs):
        keys = [k.casefold() for k, _ in pairs]
        repeated.extend(k for k in keys if k == "msisdn" and keys.count(k) > 1)
        return dict(pairs)

    try:
        body = json.loads(raw.decode("utf-8"), object_pairs_hook=keep_repeats)
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return _PHONE_RUN.sub(_mask_run, raw)
    masked, changed = _masked_tree(body)
    if not (changed or repeated):
        return raw
    return json.dumps(masked, separators=(",", ":")).encode()  # ASCII: any surrogate


def _mask_run(match):
    digits = re.sub(rb"[^0-9]", b"", match[0])
    return digits[:4] + b"*" * (len(digits) - 7) + digits[-3:]


def _masked_tree(value):
    """(value with every MSISDN masked, whether anything changed), at any depth."""
    if isinstance(value, list):
        items = [_masked_tree(v) for v in value]
        return [v for v, _ in items], any(c for _, c in items)
    if not isinstance(value, dict):
        return value, False
    out, changed = {}, False
    for key, item in value.items():
        if key.casefold() == "msisdn":
            text = _text({key: item}, key, numbers=True) if isinstance(item, (str, int)) \
                else ""
            new = masked_msisdn(text)
            changed = changed or new != item
            out[key] = new
        else:
            out[key], inner = _masked_tree(item)
            changed = changed or inner
    return out, changed


# A validation refused (daraja_api.md §6.2): the code decides the customer's SMS.
REFUSALS = {"C2B00012": "Invalid Account Number", "C2B00013": "Invalid Amount",
            "C2B00016": "Other Error"}


def refusal(code):
    """The validation answer refusing a payment with `code`."""
    return {"ResultCode": code, "ResultDesc": REFUSALS[code]}
