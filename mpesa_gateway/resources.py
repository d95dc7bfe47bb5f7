"""The public view of a payment: what merchants see, by HTTP and in webhook events.

Owns the transaction resource of SPEC §2 (phone masked, the internal `submitting`
state shown as `pending`) and the body of a webhook event built around it, so the
API and the events can never disagree about what a payment looks like.
"""

import mpesa_ledger as store
import validation


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
