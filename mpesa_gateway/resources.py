"""The public view of a payment: what merchants see, by HTTP and in webhook events.

Owns the transaction resource of SPEC §2 (phone masked, the internal `submitting`
state shown as `pending`), the receipt resource, the views of a refund, a code check
and the balance, and the body of a webhook event built around them, so the API and the
events can never disagree about what a payment looks like.
"""

import json

import mpesa_ledger as store
import validation
from mpesa_gateway import initiator


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


def receipt_resource(row):
    """The public view of a receipt (a row of the ledger's receipts view): a Paybill/Till
    one (`c2b`) or a succeeded STK payment's (`stk`), the phone masked."""
    msisdn = row["msisdn"] or None
    return {
        "receipt": row["receipt"],
        "channel": row["channel"],
        "amount": row["amount"],
        "reference": row["reference"],
        "paid_at": row["paid_at"],
        "received_at": row.get("at", row.get("received_at")),
        "transaction_id": row["tx_id"],
        "payer_name": row["payer_name"] or None,
        "msisdn": validation.mask_phone(msisdn) if row["channel"] == "stk" else msisdn,
        "anomalies": [a for a in (row["anomalies"] or "").split(",") if a],
    }


def event_resource(row, with_attempts=False):
    """The operator's view of a webhook event: never the merchant's answer, only its status
    code, duration and the error, per attempt."""
    view = {
        "id": row["id"],
        "type": row["type"],
        "transaction_id": row["tx_id"],
        "status": row["status"],
        "attempts": row["attempts"],
        "next_attempt_at": (store.iso_utc(row["next_attempt_at"])
                            if row["status"] == "pending" else None),
        "created_at": store.iso_utc(row["created_at"]),
        "delivered_at": store.iso_utc(row["delivered_at"]) if row["delivered_at"] else None,
    }
    if with_attempts:
        view["attempts_log"] = [
            {"at": store.iso_utc(a["at"]), "status_code": a["status_code"],
             "duration_ms": a["duration_ms"], "error": a["error"]}
            for a in row.get("attempts_log", [])]
    return view


def event_body(event_type, row, timestamp, previous_status=None):
    """A Standard Webhooks payload: {"type","timestamp","data"}; `data` is the transaction,
    with `previous_status` when a late success overrides a failure."""
    data = transaction_resource(row)
    if previous_status is not None:
        data["previous_status"] = previous_status
    return {"type": event_type, "timestamp": timestamp, "data": data}


REFUND_STATUSES = {store.SUBMITTING: "pending", store.PENDING: "pending",
                   store.UNKNOWN: "unknown", store.SUCCEEDED: "refunded",
                   store.FAILED: "failed"}
UNKNOWN_REFUND_NEXT_STEP = (
    "Daraja has not said whether the reversal happened, and the gateway never sends it"
    " again by itself. Look for the reversal on the M-Pesa statement (or ask the customer"
    " for the reversal SMS); to send it again, POST the refund with {\"retry\": true} and a"
    " new Idempotency-Key: a reversal already done is answered 'already reversed' and"
    " recorded refunded.")


def _details(row):
    try:
        return json.loads(row["details"]) if row.get("details") else {}
    except ValueError:
        return {}


def _words(row):
    return initiator.words(row["reason"], row["result_desc"])


def refund_resource(row):
    """A refund as its payment (or receipt) shows it: pending, unknown (with what to do),
    refunded (with the reversal's receipt) or failed (with why)."""
    if row is None:
        return None
    status = REFUND_STATUSES[row["status"]]
    view = {"id": row["id"], "status": status, "reason": row["reason"],
            "message": _words(row), "amount": row["amount"], "receipt": row["result_receipt"],
            "requested_at": row["requested_at"], "completed_at": row["completed_at"],
            "attempts": row["attempts"]}
    if status == "unknown":
        view["next_step"] = UNKNOWN_REFUND_NEXT_STEP
    return view


def _paid_to(credit_party):
    """Who a checked code paid: a shortcode and its name as Daraja gives them; a person (a
    phone: a reversal, a payout) is not named."""
    if not credit_party:
        return None
    first = credit_party.split(" ", 1)[0]
    return credit_party if first.isdigit() and len(first) <= 7 else "a person (not a shortcode)"


def verified_resource(row, with_payer=True):
    """What Transaction Status said of a code: checking, found (amount, time, status at
    Safaricom; the payer's name only for the caller's own), not_found ("not found for this
    shortcode"), unknown (no answer) or failed (why)."""
    if row is None:
        return None
    details = _details(row)
    status = {store.SUBMITTING: "checking", store.PENDING: "checking",
              store.UNKNOWN: "unknown", store.FAILED: "failed"}.get(row["status"])
    if status is None:
        status = "found" if details.get("found") else "not_found"
    view = {"status": status, "reason": row["reason"], "message": _words(row),
            "amount": details.get("amount"), "completed_at": details.get("completed_at"),
            "transaction_status": details.get("transaction_status"),
            "paid_to": _paid_to(details.get("credit_party")), "checked_at": row["updated_at"]}
    if with_payer:
        view["payer"] = details.get("debit_party")
    return view


def claim_resource(claim, caller):
    """Who holds a code (a receipt_claims row): the order's reference only to its owner
    (and admin keys)."""
    if claim is None:
        return None
    yours = claim["owner"] == caller.owner
    return {"reference": claim["reference"] if yours or caller.admin else None,
            "claimed_at": claim["claimed_at"], "yours": yours}


def request_event_body(event_type, row, timestamp):
    """A refund's or a code check's webhook payload: the receipt it concerns, the payment
    (a refund of an STK payment), and the refund or the check."""
    data = {"receipt": row["receipt"], "transaction_id": row["tx_id"]}
    if row["kind"] == "refund":
        data["refund"] = refund_resource(row)
    else:  # (no payer: the code may be anyone's)
        data["verified"] = verified_resource(row, with_payer=False)
    return {"type": event_type, "timestamp": timestamp, "data": data}
