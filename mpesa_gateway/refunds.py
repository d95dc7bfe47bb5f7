"""Money back and codes checked: the flows of Daraja's initiator APIs.

Owns what these calls do over the services they are given: refund a payment or a
Paybill/Till receipt by Reversal (POST /transactions/<id>/refund, POST /receipts/<receipt>/
refund), check a code a customer quotes by Transaction Status (POST /receipts/<receipt>/
verify), attach a code to one order (POST /receipts/<receipt>/claim), the balance by
Account Balance (GET /balance), and Daraja's results and queue timeouts
(/results/<kind>/<request>/<sig>). Like a payment, a request is committed before Daraja
is called, answered by what is known once it may have been sent, and never re-sent by
itself; a result is stored (in the ledger, or the spool while it is away) before it is
acknowledged. What a result means is `initiator.decide`'s.
"""

import hashlib
import json
import logging

import mpesa_ledger as store
import validation
from mpesa_gateway import daraja, initiator, recording
from mpesa_gateway.auth import authenticate
from mpesa_gateway.payments import (
    CALLBACK_ACK,
    REPLAYED,
    checked,
    ledger_read,
    ledger_unavailable,
    safaricom_source,
    with_retries,
    within_rate,
)
from mpesa_gateway.resources import claim_resource, refund_resource, verified_resource
from mpesa_gateway.wire import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotConfigured,
    NotFound,
    Reply,
    ServiceUnavailable,
    Unprocessable,
    UpstreamRejected,
    dumps,
    retry_after,
)

log = logging.getLogger(__name__)

BALANCE_EVERY_S = 600  # Account Balance is asked at most this often
RESULT_KINDS = ("result", "timeout")
REFUND_REMARKS = "Refund"
RETRY_AFTER_UNAVAILABLE_S = 30


# --- shared steps -----------------------------------------------------------------------


def _owner(services, authorization, what):
    """The caller, who must hold an owner's key: admin keys read and change nothing."""
    caller = authenticate(authorization, services.config)
    if caller.admin:
        raise Forbidden(f"admin keys are read-only; {what} with the owner's API key",
                        code="admin_key")
    return caller


def _initiator(services):
    """The initiator, or 501 naming the settings that make one."""
    if services.initiator is None:
        raise NotConfigured(
            "refunds, code checks and the balance use Daraja's initiator APIs: set"
            " MPESA_INITIATOR_NAME and MPESA_SECURITY_CREDENTIAL (or MPESA_INITIATOR_PASSWORD"
            " and MPESA_CERT_FILE)", code="initiator_not_configured")
    return services.initiator


def _stopped(stop):
    """The 503 of a stopped initiator: more failures would lock the business's operator."""
    slug, _ = initiator.reason_for(stop["result_code"])
    return ServiceUnavailable(
        f"Daraja refused the initiator (result code {stop['result_code']}: {slug}); every"
        " initiator call is stopped until MPESA_INITIATOR_NAME or its credential changes"
        " (repeated failures lock the API operator): fix them and restart",
        code="initiator_stopped")


def _begin(services, new):
    try:
        begun = services.ledger.begin_request(new)
    except services.ledger.Error as exc:
        services.ledger_watch.failed("initiator_request", exc)
        raise ledger_unavailable("the ledger cannot be written; nothing was sent") from None
    services.ledger_watch.answered()
    if begun.kind == store.Start.STOPPED:
        raise _stopped(begun.row)
    if begun.kind == store.Start.PROVING:
        raise ServiceUnavailable(
            "the initiator's first request is at Daraja and no result has yet said its"
            " credential works: one request at a time until one does (a wrong credential"
            " sent many times locks the API operator); nothing was sent",
            code="initiator_unproven", headers=retry_after(5))
    return begun


def _send(services, row, call, answer):
    """Call Daraja for a `submitting` request and record what it answered, with the
    answer the caller gets (`answer(row)`: (status, body) of the row as recorded).
    Returns that answer; a refusal (nothing was done) is raised after it is recorded."""
    signer = services.signer
    urls = dict(result_url=signer.result_url("result", row["id"]),
                timeout_url=signer.result_url("timeout", row["id"]))
    try:
        ack = call(**urls)
    except daraja.DarajaError as exc:
        return _not_acknowledged(services, row, exc, answer)
    except Exception:  # noqa: BLE001 - a bug after the row: the request may have gone out
        log.exception("initiator request failed unexpectedly request=%s", row["id"])
        return _not_acknowledged(services, row, daraja.DarajaError(
            "initiator", daraja.UNKNOWN, "internal_error"), answer)
    expected = dict(row, status=store.PENDING, conversation_id=ack.conversation_id,
                    originator_conversation_id=ack.originator_conversation_id)
    status, body = answer(expected)
    _record(services, row, lambda: services.ledger.mark_request(
        row["id"], store.PENDING, conversation_id=ack.conversation_id,
        originator_conversation_id=ack.originator_conversation_id,
        answer=(status, dumps(body))))
    return status, body


def _record(services, row, write):
    """Record Daraja's answer; never raises: it may have acted, so the caller is told what
    is known. A row left `submitting` becomes `unknown` (interrupted) and its result,
    when it comes, still finds it."""
    try:
        with_retries(services.ledger, write)
    except Exception as exc:  # noqa: BLE001 - the request may be out: never a 500 from here
        if isinstance(exc, services.ledger.Error):
            services.ledger_watch.failed("initiator_request", exc)
        log.error("initiator request outcome not recorded request=%s: it will show as"
                  " unknown until its result comes", row["id"], exc_info=exc)


def _not_acknowledged(services, row, exc, answer):
    if exc.outcome == daraja.UNKNOWN:
        # It may have reached Daraja: never resent; its result (or an operator) settles it.
        expected = dict(row, status=store.UNKNOWN, reason="upstream_unknown")
        status, body = answer(expected)
        _record(services, row, lambda: services.ledger.mark_request(
            row["id"], store.UNKNOWN, reason="upstream_unknown", answer=(status, dumps(body))))
        return status, body
    # Nothing was done: the key is freed, so the caller may try again with it. A retry of
    # a request whose fate was unknown stays unknown: the first attempt may have been done.
    retried = row["attempts"] > 1
    reason = "daraja_rejected" if exc.outcome == daraja.REJECTED else "upstream_unavailable"
    _record(services, row, lambda: services.ledger.mark_request(
        row["id"], store.UNKNOWN if retried else store.FAILED,
        reason="retry_not_sent" if retried else reason, result_code=exc.error_code,
        result_desc=exc.error_message, release_key=True))
    what = ("the retry was not sent; whether the first attempt was done is still not known"
            if retried else "nothing was done")
    if exc.outcome == daraja.REJECTED:
        raise UpstreamRejected(f"Daraja refused the request ({exc.error_code}); {what}")
    raise ServiceUnavailable(f"Daraja is unavailable ({exc.reason}); {what}",
                             headers=retry_after(RETRY_AFTER_UNAVAILABLE_S))


# --- refunds ----------------------------------------------------------------------------


def refund_payment(services, authorization, ref, load_body, idempotency_key):
    """POST /transactions/<id>/refund: the whole amount of a succeeded STK payment, back to
    its payer, by Reversal."""
    caller = _owner(services, authorization, "refund a payment")
    _initiator(services)
    retry = checked(validation.validate_refund, load_body())
    return refund_for(services, caller, ref, retry, idempotency_key)


def refund_for(services, caller, ref, retry, idempotency_key):
    """Refund payment `ref` for `caller` (an owner's Caller: the API's, or a console
    person's acting for their owner)."""
    init = _initiator(services)
    row = _read(services, lambda: services.ledger.get(ref)
                if 0 < len(ref) <= 64 and ref.isprintable() else None)
    if row is None or not caller.sees(row):
        raise NotFound("no transaction with that id or CheckoutRequestID")
    if row["status"] != store.SUCCEEDED or not row["receipt"]:
        status = store.PENDING if row["status"] == store.SUBMITTING else row["status"]
        raise Conflict(f"transaction {row['id']} is {status}: only a succeeded payment, with"
                       " its M-Pesa receipt, can be refunded", code="not_refundable")
    cfg = services.config
    receiver = cfg.party_b if cfg.transaction_type == "CustomerBuyGoodsOnline" else cfg.shortcode
    try:
        return _refund(services, caller, init, idempotency_key, retry, receipt=row["receipt"],
                       tx_id=row["id"], amount=row["amount"], receiver=receiver)
    except ApiError as exc:
        raise exc.about(tx_id=row["id"])


def refund_receipt(services, authorization, number, load_body, idempotency_key):
    """POST /receipts/<receipt>/refund: a Paybill/Till payment back to its payer (an STK
    payment's receipt refunds that payment)."""
    caller = _owner(services, authorization, "refund a payment")
    init = _initiator(services)
    retry = checked(validation.validate_refund, load_body())
    number = checked(validation.mpesa_code, number)
    held = _read(services, lambda: services.ledger.receipts_page(receipt=number, limit=1)[0])
    if not held or not caller.sees(held[0]):
        raise NotFound("no receipt with that number")
    receipt = held[0]
    if receipt["channel"] == "stk":
        return refund_payment(services, authorization, receipt["tx_id"], lambda: {"retry": retry},
                              idempotency_key)
    if receipt["amount"] is None:
        raise Conflict(f"receipt {number} carries no amount in whole shillings (anomalies:"
                       f" {receipt['anomalies']}): refund it from the M-Pesa portal",
                       code="not_refundable")
    shortcode = _read(services, lambda: services.ledger.c2b_receipt(number))["shortcode"]
    return _refund(services, caller, init, idempotency_key, retry, receipt=number, tx_id=None,
                   amount=receipt["amount"], receiver=shortcode)


def _read(services, read):
    try:
        return read()
    except services.ledger.Error as exc:
        services.ledger_watch.failed("initiator_read", exc)
        raise ledger_unavailable("the ledger cannot be reached; retry shortly") from None


def _refund(services, caller, init, key, retry, *, receipt, tx_id, amount, receiver):
    if key is None:
        raise BadRequest("a refund needs an Idempotency-Key header: a retry with it never"
                         " refunds twice", code="idempotency_key_required")
    idem = refund_key(key, caller.owner, receipt, retry)
    begun = _begin(services, store.NewRequest(
        kind="refund", owner=caller.owner, fingerprint=init.fingerprint, receipt=receipt,
        tx_id=tx_id, amount=amount, idempotency=idem, retry=retry))
    if begun.kind == store.Start.REUSED:
        raise Unprocessable("this Idempotency-Key was used with a different request",
                            code="idempotency_key_reused")
    if begun.kind == store.Start.IN_FLIGHT and begun.row["status"] != store.SUBMITTING:
        # Its first answer was never stored (the process died, the ledger was away): the
        # request is past sending, so its state now is the answer.
        return Reply(202, refund_answer(begun.row), REPLAYED, tx_id)
    if begun.kind == store.Start.IN_FLIGHT:
        raise Conflict("a request with this Idempotency-Key is still in progress; retry"
                       " shortly", code="idempotency_key_in_use", headers=retry_after(1))
    if begun.kind == store.Start.REPLAY:
        return Reply(begun.status_code, json.loads(begun.body), REPLAYED, tx_id)
    if begun.kind == store.Start.EXISTS:
        refund = refund_resource(begun.row)
        hint = (" (POST it with {\"retry\": true} to send it again)"
                if refund["status"] == "unknown" else "")
        raise Conflict(f"receipt {receipt} already has a refund that is {refund['status']}"
                       f"{hint}", code="refund_exists")
    row = begun.row
    status, body = _send(services, row, lambda **urls: services.daraja.reversal(
        initiator=init, receipt=receipt, amount=amount, receiver_party=receiver,
        remarks=REFUND_REMARKS, **urls), lambda r: (202, refund_answer(r)))
    log.info("refund request=%s receipt=%s attempt=%d answered=%d", row["id"], receipt,
             row["attempts"], status)
    return Reply(status, body, tx_id=tx_id)


def refund_key(key, owner, receipt, retry):
    """The refund's Idempotency-Key, bound to its owner and what it asks."""
    if not 0 < len(key) <= 255 or not key.isascii() or not key.isprintable():
        raise BadRequest("Idempotency-Key must be 1 to 255 printable ASCII characters",
                         code="invalid_idempotency_key")
    canonical = json.dumps(["refund", receipt, retry]).encode()
    return store.Idempotency(owner, key, hashlib.sha256(canonical).hexdigest())


def refund_answer(row):
    return {"receipt": row["receipt"], "transaction_id": row["tx_id"],
            "refund": refund_resource(row)}


# --- code checks and claims ------------------------------------------------------------


def verify_receipt(services, authorization, number):
    """POST /receipts/<receipt>/verify: is this M-Pesa code real? The ledger answers at once
    for a receipt it holds; otherwise Transaction Status is asked and its answer comes as
    GET /receipts/<receipt>'s `verified` (and a receipt.verified event)."""
    return verify_for(services, _owner(services, authorization, "check a code"), number)


def verify_for(services, caller, number):
    """Check code `number` for `caller` (an owner's Caller)."""
    number = checked(validation.mpesa_code, number)
    reversal = _read(services, lambda: services.ledger.reversal_of(number))
    if reversal is not None:  # the gateway's own refund: money back to a payer, not paid
        return Reply(200, {"receipt": number, "verified": {
            "status": "found", "source": "ledger", "amount": reversal["amount"],
            "completed_at": reversal["completed_at"], "transaction_status": None,
            "reversal_of": reversal["receipt"] if caller.sees(reversal) else None}})
    held = _read(services, lambda: services.ledger.receipts_page(receipt=number, limit=1)[0])
    if held:  # Safaricom told the gateway itself: real, at this shortcode
        receipt, own = held[0], caller.sees(held[0])
        found = {"status": "found", "source": "ledger", "amount": receipt["amount"],
                 "completed_at": receipt["paid_at"], "transaction_status": None}
        if own:
            found["payer"] = receipt["payer_name"] or None
        return Reply(200, {"receipt": number, "verified": found},
                     tx_id=receipt["tx_id"] if own else None)
    init = _initiator(services)
    within_rate(services, caller, "requests", "the ledger cannot be reached; nothing was sent")
    begun = _begin(services, store.NewRequest(kind="verify", owner=caller.owner,
                                              fingerprint=init.fingerprint, receipt=number))
    if begun.kind == store.Start.EXISTS:  # a check of it is under way: its answer is this one's
        return Reply(202, verify_answer(begun.row))
    party_a = services.config.shortcode
    status, body = _send(services, begun.row, lambda **urls: services.daraja.transaction_status(
        initiator=init, receipt=number, party_a=party_a, **urls),
        lambda r: (202, verify_answer(r)))
    return Reply(status, body)


def paid_here(services, said):
    """Did a check's answer name one of this gateway's shortcodes as the party paid (its
    CreditPartyName begins with the shortcode)? True when Daraja named no one."""
    credit = said.get("credit_party")
    if not credit:
        return True
    return credit.split(" ", 1)[0].strip() in services.c2b_shortcodes


def verify_answer(row):
    return {"receipt": row["receipt"], "verified": verified_resource(row, with_payer=False)}


def claim_receipt(services, authorization, number, load_body):
    """POST /receipts/<receipt>/claim: attach the code to one of the caller's orders, once,
    so one code cannot pay for two. Only a code known to be real: one the ledger holds for
    the caller, or one the caller's check found."""
    caller = _owner(services, authorization, "claim a code")
    reference = checked(validation.validate_claim, load_body())
    number = checked(validation.mpesa_code, number)
    ledger = services.ledger
    held = _read(services, lambda: ledger.receipts_page(receipt=number, limit=1)[0])
    if held and not caller.sees(held[0]):
        raise NotFound("no receipt with that number")
    if _read(services, lambda: ledger.reversal_of(number)) is not None:
        raise Conflict(f"receipt {number} is a refund's reversal: money back to a payer,"
                       " not a payment", code="receipt_not_a_payment")
    check = _read(services, lambda: ledger.latest_request(
        "verify", receipt=number, owner=caller.owner, status=store.SUCCEEDED))
    said = json.loads(check["details"] or "{}") if check else {}
    if not held and said.get("found") and not paid_here(services, said):
        raise Conflict(f"Safaricom says receipt {number} did not pay this shortcode: it"
                       " pays for no order here", code="receipt_not_a_payment")
    if not held and not said.get("found"):
        raise Conflict(f"receipt {number} is not known to be real: POST"
                       f" /receipts/{number}/verify first", code="receipt_not_verified")
    if not held and said.get("transaction_status") not in (None, "Completed"):
        raise Conflict(f"Safaricom says receipt {number} is {said['transaction_status']}, not"
                       " Completed: it pays for no order", code="receipt_not_verified")
    refund = _read(services, lambda: ledger.refund_of(number))
    if (refund is not None and refund["status"] != store.FAILED) or \
            said.get("transaction_status") == "Reversed":
        raise Conflict(f"receipt {number} is refunded or being refunded: it pays for no"
                       " order", code="receipt_refunded")
    try:
        outcome, claim = ledger.claim_receipt(number, caller.owner, reference)
    except ledger.Error as exc:
        services.ledger_watch.failed("claim", exc)
        raise ledger_unavailable("the ledger cannot be written; nothing was claimed") from None
    if outcome == "taken":
        mine = claim["owner"] == caller.owner
        raise Conflict(f"receipt {number} already pays for "
                       + (f"order {claim['reference']}" if mine else "another order"),
                       code="receipt_claimed")
    return Reply(201 if outcome == "claimed" else 200,
                 {"receipt": number, "claimed_by": claim_resource(claim, caller)})


# --- the balance --------------------------------------------------------------------


@ledger_read
def balance(services, authorization):
    """GET /balance (admin keys): the last Account Balance result and its age; a new query
    is sent when it is older than BALANCE_EVERY_S, never while the initiator is stopped."""
    caller = authenticate(authorization, services.config)
    if not caller.admin:
        raise Forbidden("GET /balance needs an admin key (GATEWAY_ADMIN_KEYS)",
                        code="admin_key_required")
    init = _initiator(services)
    ledger, now = services.ledger, services.clock.wall()
    known = ledger.latest_request("balance", status=store.SUCCEEDED)
    stop = ledger.initiator_stop(init.fingerprint)
    if stop is None and (known is None or now - store.epoch(known["updated_at"])
                         > BALANCE_EVERY_S):
        try:
            begun = ledger.begin_request(store.NewRequest(
                kind="balance", owner="admin", fingerprint=init.fingerprint,
                min_interval_s=BALANCE_EVERY_S))
        except ledger.Error as exc:
            services.ledger_watch.failed("initiator_request", exc)
            begun = None
        if begun is not None and begun.kind == store.Start.NEW:
            try:
                _send(services, begun.row, lambda **urls: services.daraja.account_balance(
                    initiator=init, party_a=services.config.shortcode, **urls),
                    lambda r: (200, {}))
            except ApiError as exc:  # the last known balance is still worth showing
                log.warning("balance query not sent: %s", exc.message)
    latest = ledger.latest_request("balance")
    return Reply(200, balance_view(known, latest, stop, now))


QUERY_STATUSES = {store.SUBMITTING: "pending", store.PENDING: "pending",
                  store.UNKNOWN: "unknown", store.SUCCEEDED: "answered", store.FAILED: "failed"}


def balance_view(known, latest, stop, now):
    details = json.loads(known["details"] or "{}") if known else {}
    return {
        "accounts": details.get("accounts"),
        "as_of": details.get("as_of") or (known["updated_at"] if known else None),
        "age_s": round(now - store.epoch(known["updated_at"])) if known else None,
        "refreshing": latest is not None and latest["status"] in (store.SUBMITTING,
                                                                  store.PENDING),
        "last_query": None if latest is None else {
            "status": QUERY_STATUSES[latest["status"]], "reason": latest["reason"],
            "message": initiator.words(latest["reason"], latest["result_desc"]),
            "requested_at": latest["requested_at"]},
        "stopped": None if stop is None else {
            "result_code": stop["result_code"], "at": store.iso_utc(stop["at"]),
            "message": initiator.words(initiator.reason_for(stop["result_code"])[0])},
    }


# --- results --------------------------------------------------------------------------


def receive_result(services, kind, request_id, sig, environ, load_raw):
    """A Result or QueueTimeOut POST: signature first (a scanner's request is just an
    unknown path: 404, nothing stored), then stored and applied in one commit (or spooled
    while the ledger is away), then acknowledged."""
    if kind not in RESULT_KINDS or not services.signer.verify_result(kind, request_id, sig):
        raise NotFound()
    source = safaricom_source(services, environ, f"result request={request_id}")
    raw = initiator.kept_body(load_raw())  # a payer's number is never kept in clear
    result = initiator.from_raw(raw)
    if result is None and kind == "timeout":  # its shape is undocumented: it is a timeout
        result = initiator.UNREADABLE_TIMEOUT
    try:
        outcome, _ = services.ledger.settle_request(
            request_id, initiator.decide, kind=kind, result=result, raw=raw, remote_addr=source)
        services.ledger_watch.answered()
    except Exception as exc:  # noqa: BLE001 - whatever failed, the body is kept before the 200
        if isinstance(exc, services.ledger.Error) and not isinstance(
                exc, services.ledger.Permanent):
            services.ledger_watch.failed("result", exc)
        else:
            log.error("initiator result could not be recorded; kept in the spool", exc_info=exc)
        if not services.record(recording.initiator_result(request_id, kind, raw, source,
                                                          services.clock.wall())):
            raise ledger_unavailable("the result could not be stored") from None
        outcome = "spooled"
    services.metrics.initiator_results.inc(kind, outcome)
    log.info("initiator %s request=%s outcome=%s result_code=%s", kind, request_id, outcome,
             result.code if result else None)
    if outcome == "initiator_refused":
        log.error("initiator refused result_code=%s: every initiator call is stopped until"
                  " MPESA_INITIATOR_NAME or its credential changes", result.code)
    if result is None:
        raise BadRequest("the body is not a Daraja result (it was stored)",
                         code="invalid_result")
    return Reply(200, CALLBACK_ACK)
