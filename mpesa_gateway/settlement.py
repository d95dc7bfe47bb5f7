"""Settlement: what an STK result means, and the one place it is applied to a payment.

Owns the outcome type that callbacks and STK query answers share (`Outcome`),
Daraja's ResultCode table (code → status and reason, SPEC §2; map on the code,
never on ResultDesc), the rules that decide what one outcome does to one
transaction row, and `apply()`, which the callback path and the reconciler
both call.  The rules are a pure function of (row, outcome); the ledger runs
them inside the write transaction that reads the row and, for a callback,
stores its raw body, so a result is applied exactly once whoever brings it.

The rules, in order:
- a CheckoutRequestID other than the stored one is an anomaly (never applied);
- a `rejected` row was never sent: any result for it is an anomaly;
- a receipt another payment already holds is an anomaly, never money (a receipt pays
  once; the ledger keeps receipts unique);
- a success from a callback must carry a receipt and the stored amount, else it
  is an anomaly and the reconciler's query decides;
- a final state never changes, except that a success with a receipt overrides
  an earlier failure (money moved; flagged as an anomaly in the log);
- `submitting`, `pending` and `unknown` rows take the result; an `unknown` row
  without a CheckoutRequestID learns it from its signed callback.
"""

import logging
from dataclasses import dataclass

import mpesa_ledger as store
import validation
from mpesa_gateway.wire import BadRequest, decode_json

log = logging.getLogger(__name__)

SUCCESS_CODE = "0"
# ResultCode → failure reason. Anything not listed is `other`.
FAILURE_REASONS = {
    "1": "insufficient_funds",
    "2": "limit_exceeded",
    "3": "limit_exceeded",
    "4": "limit_exceeded",
    "8": "limit_exceeded",
    "17": "duplicate_request",  # same amount, same customer within 2 minutes
    "26": "system_busy",
    "1001": "subscriber_busy",
    "1019": "expired",
    "1025": "push_failed",
    "1031": "cancelled",
    "1032": "cancelled",
    "1037": "unreachable",
    "2001": "wrong_pin",
    "2028": "misconfigured",  # TransactionType / PartyB do not match the shortcode
    "SFC_IC0003": "misconfigured",
    "9999": "push_failed",
}


@dataclass(frozen=True)
class Outcome:
    """One STK result to apply: from a callback (`receipt`, `amount` known) or a query."""

    status: str  # succeeded | failed
    reason: str | None
    result_code: str
    result_desc: str | None
    checkout_request_id: str
    merchant_request_id: str | None = None
    receipt: str | None = None
    amount: int | None = None
    source: str = "callback"  # callback | query


@dataclass(frozen=True)
class Decision:
    """What one outcome does to one row: an outcome name, the columns to change (or
    None), and why it is an anomaly (None when it is not)."""

    outcome: str  # applied | override | duplicate | ignored | anomaly
    changes: dict | None = None
    anomaly: str | None = None


def result_status(result_code):
    """Map a terminal ResultCode (number or string) to (status, reason)."""
    code = str(result_code).strip()
    if code == SUCCESS_CODE:
        return store.SUCCEEDED, None
    return store.FAILED, FAILURE_REASONS.get(code, "other")


def from_callback(result):
    """The Outcome of a parsed callback (validation.StkResult)."""
    status, reason = result_status(result.result_code)
    return Outcome(status=status, reason=reason, result_code=result.result_code,
                   result_desc=result.result_desc, checkout_request_id=result.checkout_request_id,
                   merchant_request_id=result.merchant_request_id, receipt=result.receipt,
                   amount=result.amount, source="callback")


def from_raw_callback(raw):
    """The Outcome of a callback's raw body, or None when it is not a valid STK result
    (a malformed callback is stored, never applied)."""
    try:
        return from_callback(validation.parse_stk_callback(decode_json(raw)))
    except (BadRequest, validation.ValidationError):
        return None


def from_query(checkout_request_id, result_code, result_desc, merchant_request_id):
    """The Outcome of a terminal STK query answer (no receipt, no amount)."""
    status, reason = result_status(result_code)
    return Outcome(status=status, reason=reason, result_code=result_code,
                   result_desc=result_desc, checkout_request_id=checkout_request_id,
                   merchant_request_id=merchant_request_id, source="query")


def decide(row, o, receipt_holder=None):
    """The rules (module docstring): what outcome `o` does to `row`, when the payment
    `receipt_holder` (or nobody) already holds the outcome's receipt. Pure."""
    stored_id = row["checkout_request_id"]
    if stored_id is not None and stored_id != o.checkout_request_id:
        return Decision("anomaly", anomaly="checkout_request_id_mismatch")
    current = row["status"]
    if current == store.REJECTED:
        return Decision("anomaly", anomaly="result_for_rejected")  # nothing was ever sent
    if receipt_holder is not None and receipt_holder != row["id"]:
        return Decision("anomaly", anomaly="receipt_reused")
    if o.status == store.SUCCEEDED and o.source == "callback":
        if o.receipt is None or o.amount != row["amount"]:
            # Not proof of payment: keep the row as it is; a query decides.
            return Decision("anomaly", anomaly="no_receipt" if o.receipt is None
                            else "amount_mismatch")
    if current == store.SUCCEEDED:
        if o.status == store.SUCCEEDED and row["receipt"] is None and o.receipt is not None:
            # Settled by a query (which carries no receipt); the callback completes it.
            return Decision("duplicate", {"receipt": o.receipt})
        if o.status == store.SUCCEEDED and o.receipt in (None, row["receipt"]):
            return Decision("duplicate")
        return Decision("ignored", anomaly="result_after_success")
    if current in store.FINAL:
        if o.status != store.SUCCEEDED or o.receipt is None:
            return Decision("duplicate" if o.result_code == row["result_code"] else "ignored")
        # Paid after all: money moved, so the success wins over the earlier failure.
        return Decision("override", _changes(o), anomaly=f"success_after_{current}")
    return Decision("applied", _changes(o))


def _changes(o):
    return {"status": o.status, "reason": o.reason, "result_code": o.result_code,
            "result_desc": o.result_desc, "receipt": o.receipt,
            "checkout_request_id": o.checkout_request_id,
            "merchant_request_id": o.merchant_request_id}


@dataclass(frozen=True)
class CallbackRecord:
    """A callback's raw body and source, stored in the same commit as its outcome."""

    body: bytes
    remote_addr: str | None
    received_at: float | None = None  # epoch; None: now (a spooled callback keeps its own)


def apply(ledger, tx_id, outcome, *, callback=None, release_claim=None, once=None):
    """Apply `outcome` (None: an unparsable callback, stored but applied never) to `tx_id`
    in one ledger transaction, with the webhook event when the status changes; return
    (outcome name, row after or None). `once`: the id of the spool entry this replays."""
    decisions = []

    def rules(row, receipt_holder):
        decision = decide(row, outcome, receipt_holder)
        decisions.append(decision)
        return decision

    name, row = ledger.settle(tx_id, rules if outcome is not None else None,
                              receipt=outcome.receipt if outcome is not None else None,
                              checkout_request_id=(outcome.checkout_request_id
                                                   if outcome is not None else None),
                              callback=callback, release_claim=release_claim, once=once)
    if decisions and decisions[-1].anomaly is not None:
        log.error("anomaly tx=%s reason=%s result_code=%s source=%s", tx_id,
                  decisions[-1].anomaly, outcome.result_code, outcome.source)
    if name in ("applied", "override") and outcome.reason == "misconfigured":
        log.error("settle tx=%s reason=misconfigured result_code=%s: Daraja says the"
                  " TransactionType does not fit PartyB; check MPESA_TRANSACTION_TYPE"
                  " (paybill or till) and MPESA_PARTY_B", tx_id, outcome.result_code)
    return name, row
