"""Paybill and Till payments (C2B): what Safaricom's confirmation says, read strictly.

Owns reading a confirmation body into a `Confirmation`: the receipt number, the amount
in whole shillings, the account number, Paybill or Till, the time Safaricom gives turned
from EAT into UTC, the payer's name as given, and the MSISDN as given when hashed or
masked (masked here when it arrives in clear); and the anomalies that keep one from
being money. Daraja sends every field as a string (daraja_api.md §6.2). The flows that
store and answer them are in `payments`.
"""

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

EAT = timezone(timedelta(hours=3))  # TransTime is Nairobi time, no zone given
_AMOUNT = re.compile(r"[0-9]{1,9}(?:\.0{1,2})?")  # whole shillings, as Daraja writes them
_RECEIPT = re.compile(r"[A-Z0-9]{6,20}")
_TIME = re.compile(r"[0-9]{14}")
_CLEAR_MSISDN = re.compile(r"(?:254|0)([17][0-9]{5})([0-9]{3})")
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


def _text(body, name):
    value = body.get(name)
    return value.strip()[:MAX_TEXT] if isinstance(value, str) else ""


def masked_msisdn(value):
    """The MSISDN as it may be kept: a hash or a masked form as given; a clear number
    masked like every phone in the logs (2547******678)."""
    value = value.strip()
    clear = _CLEAR_MSISDN.fullmatch(value.replace(" ", "").lstrip("+"))
    if clear:
        return f"2547{'*' * 6}{clear[2]}" if clear[1].startswith("7") else \
            f"2541{'*' * 6}{clear[2]}"
    if _HASHED_MSISDN.fullmatch(value.lower()):
        return value.lower()
    # A masked form ("2547 ***** 126", "25470****149"): at most its outer digits survive.
    return re.sub(r"(?<=[0-9]{4})[0-9](?=[0-9 *]*[0-9]{3}$)", "*", value)[:32]


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
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    receipt = body.get("TransID")
    if not isinstance(receipt, str) or not _RECEIPT.fullmatch(receipt.strip()):
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
    shortcode = _text(body, "BusinessShortCode")
    if shortcode not in shortcodes:
        anomalies.append("other_shortcode")
    name = " ".join(n for n in (_text(body, k) for k in ("FirstName", "MiddleName",
                                                          "LastName")) if n)
    return Confirmation(receipt=receipt.strip(), amount=amount,
                        account=_text(body, "BillRefNumber"), shortcode=shortcode,
                        channel=channel, paid_at=when, payer_name=name[:MAX_TEXT],
                        msisdn=masked_msisdn(_text(body, "MSISDN")),
                        anomalies=tuple(anomalies))
