"""The payment flows: what each API call does, over the services it is given.

Owns the flows every web layer calls: start a payment, read one, list them, the
webhook events an owner reads and redelivers, receive a callback, receive a Paybill/Till
confirmation and answer its validation, and /metrics.
Flows take plain values and return a `wire.Reply` (status, body, headers and what the
access line should name); anything else is raised as a `wire.ApiError`. The raw WSGI
app and the Flask and Falcon versions in bench/ call the same flows over the same
`Services`, so only routing, parsing and rendering differ between them.

The order of a payment is the promise: the row is committed before Daraja is
called, and once a prompt may have been sent no path answers 500: the merchant
gets `202` with the transaction id and the status as far as it is known.
"""

import functools
import hashlib
import json
import logging
import time

import config as settings
import mpesa_ledger as store
import validation
from mpesa_gateway import (
    c2b,
    daraja,
    exports,
    metrics,
    recording,
    resources,
    settlement,
    sources,
)
from mpesa_gateway.auth import Caller, authenticate, idempotency_for, token_matches
from mpesa_gateway.resources import receipt_resource, transaction_resource
from mpesa_gateway.wire import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    Reply,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
    UpstreamRejected,
    dumps,
    retry_after,
)

log = logging.getLogger(__name__)

CALLBACK_ACK = {"ResultCode": 0, "ResultDesc": "Accepted"}
RETRY_AFTER_BUSY_S = 60  # Daraja: wait at least a minute after "unable to lock subscriber"
RETRY_AFTER_UNAVAILABLE_S = 30
RETRY_AFTER_GATEWAY_BUSY_S = 1
MAX_ID_LENGTH = 64
REPLAYED = (("Idempotent-Replayed", "true"),)
LEDGER_RETRIES_S = (0.05, 0.25)  # a lock that outlasted the busy timeout rarely lasts longer


def _failed(services, where, exc):
    """A ledger call failed: an outage is told once (LedgerWatch); anything else is a bug,
    logged with its traceback."""
    if isinstance(exc, services.ledger.Error):
        services.ledger_watch.failed(where, exc)
    else:
        log.error("ledger write failed where=%s", where, exc_info=exc)


def metrics_text(services, authorization):
    """GET /metrics: open, or behind GATEWAY_METRICS_TOKEN."""
    token = services.config.metrics_token
    if token is not None and not token_matches(authorization, token):
        raise Unauthorized("GET /metrics needs 'Authorization: Bearer <GATEWAY_METRICS_TOKEN>'",
                           headers=[("WWW-Authenticate", 'Bearer realm="metrics"')])
    return Reply(200, services.metrics.render().encode(),
                 (("Content-Type", metrics.CONTENT_TYPE),))


def ledger_unavailable(message):
    """The 503 for a ledger that cannot be read or written, with Retry-After."""
    return ServiceUnavailable(message, code="ledger_unavailable",
                              headers=retry_after(RETRY_AFTER_UNAVAILABLE_S))


def ledger_read(flow):
    """A flow that reads the ledger: a ledger that cannot be reached (a PostgreSQL server
    that is down) is 503 ledger_unavailable with Retry-After, never a 500."""
    @functools.wraps(flow)
    def guarded(services, *args):
        try:
            return flow(services, *args)
        except services.ledger.Error as exc:
            # (A read that works says nothing of writes: SQLite reads on while a lock holds
            # every writer. The watch hears "back" from a write or the health check.)
            services.ledger_watch.failed(flow.__name__, exc)
            raise ledger_unavailable("the ledger cannot be reached; retry shortly") from None
    return guarded


def checked(rule, *args):
    """`rule(*args)` from the validation module, its ValidationError as a 400."""
    try:
        return rule(*args)
    except validation.ValidationError as exc:
        raise BadRequest(exc.message, code=exc.code, field=exc.field) from None


@ledger_read
def transactions_page(services, authorization, query_string):
    caller = authenticate(authorization, services.config)
    query = checked(validation.parse_list_query, query_string)
    owner = None if caller.admin else caller.owner
    rows, more = services.ledger.list_page(
        statuses=query.statuses, since=query.since, until=query.until,
        reference=query.reference, receipt=query.receipt, phone=query.phone,
        after=query.after, limit=query.limit, owner=owner,
        with_unowned=owner == settings.DEFAULT_OWNER)
    cursor = validation.encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
    return Reply(200, {"data": [transaction_resource(r) for r in rows], "next_cursor": cursor})


@ledger_read
def transactions_csv(services, authorization, query_string):
    """GET /transactions.csv: every payment the listing's filters select, as CSV."""
    caller = authenticate(authorization, services.config)
    query = checked(validation.parse_list_query, query_string, validation.EXPORT_PARAMS)
    owner = None if caller.admin else caller.owner
    return exports.attachment("payments.csv", lambda: exports.payments_csv(
        services.ledger, query, owner), services.exports, owner)


@ledger_read
def receipts_csv(services, authorization, query_string):
    """GET /receipts.csv: every receipt the listing's filters select, as CSV."""
    caller = authenticate(authorization, services.config)
    query = checked(validation.parse_receipts_query, query_string,
                    validation.RECEIPT_EXPORT_PARAMS)
    owner = None if caller.admin else caller.owner
    return exports.attachment("receipts.csv", lambda: exports.receipts_csv(
        services.ledger, query, owner), services.exports, owner)


@ledger_read
def receipts_page(services, authorization, query_string):
    """GET /receipts: every receipt the caller owns (admins: all), Paybill/Till and STK."""
    caller = authenticate(authorization, services.config)
    query = checked(validation.parse_receipts_query, query_string)
    rows, more = services.ledger.receipts_page(
        owner=None if caller.admin else caller.owner, reference=query.reference,
        since=query.since, until=query.until, channel=query.channel, after=query.after,
        limit=query.limit)
    cursor = validation.encode_cursor(rows[-1]["at"], rows[-1]["receipt"]) if more else None
    return Reply(200, {"data": [receipt_resource(r) for r in rows], "next_cursor": cursor})


@ledger_read
def read_receipt(services, authorization, number):
    """GET /receipts/<number>: one receipt, if the caller owns it, with its refund, the
    caller's last check of it and who claimed it; or, for a code the ledger does not hold,
    what the caller's check of it said."""
    caller = authenticate(authorization, services.config)
    ledger = services.ledger
    if validation.MPESA_CODE.fullmatch(number.upper()) and number.isascii():
        number = number.upper()  # as a person types it: receipts are upper case
    rows = (ledger.receipts_page(receipt=number, limit=1)[0]
            if validation.RECEIPT_NUMBER.fullmatch(number) else [])
    own = bool(rows) and caller.sees(rows[0])
    check = (ledger.latest_request("verify", receipt=number, owner=caller.owner)
             if validation.RECEIPT_NUMBER.fullmatch(number) and not caller.admin else None)
    if not own and check is None:  # another owner's receipt does not exist here
        raise NotFound("no receipt with that number")
    if own:
        body = receipt_resource(rows[0])
        body["refund"] = resources.refund_resource(ledger.refund_of(number))
    else:  # known only by the caller's check: nothing of another owner's is shown
        body = {"receipt": number, "channel": None}
    # (The payer, masked, only on the caller's own receipt: a check says it of anyone's.)
    body["verified"] = resources.verified_resource(check, with_payer=own)
    body["claimed_by"] = resources.claim_resource(ledger.receipt_claim(number), caller)
    return Reply(200, body, tx_id=rows[0]["tx_id"] if own else None)


def within_rate(services, caller, what, unavailable):
    """Take one from the caller's token bucket, or raise 429 with Retry-After (503 with
    `unavailable` when the fleet's buckets, kept in the ledger, cannot be reached)."""
    try:
        wait = services.limiter.acquire(caller.owner)
    except services.ledger.Error as exc:
        services.ledger_watch.failed("rate_limit", exc)
        raise ledger_unavailable(unavailable) from None
    if wait:
        raise TooManyRequests(
            f"at most {services.config.rate:g} {what} per second per API key name",
            headers=retry_after(wait))


def payment_qr(services, authorization, load_body):
    """POST /qr: a Dynamic QR code the customer scans to pay the Paybill (account: the
    reference) or the Till; the payment comes back as a receipt matched by its reference.
    Rate-limited like pushes; no money moves, so Daraja's answer is only relayed."""
    cfg = services.config
    caller = authenticate(authorization, cfg)
    if caller.admin:
        raise Forbidden("admin keys read; a QR code is made with a merchant's key",
                        code="admin_key")
    within_rate(services, caller, "requests", "the ledger cannot be reached; try again")
    asked = checked(validation.validate_qr, load_body(), cfg.max_amount)
    till = cfg.transaction_type == settings.TILL
    trx_code, cpi = ("BG", cfg.party_b) if till else ("PB", cfg.c2b_shortcode)
    try:
        image = services.daraja.generate_qr(
            merchant_name=cfg.qr_merchant_name, reference=asked.reference,
            amount=asked.amount, trx_code=trx_code, cpi=cpi, size=asked.size)
    except daraja.DarajaError as exc:
        if exc.outcome == daraja.REJECTED:
            raise UpstreamRejected(f"Daraja refused the QR code ({exc.error_code})") from None
        raise ServiceUnavailable("Daraja cannot draw the QR code now; try again",
                                 headers=retry_after(RETRY_AFTER_UNAVAILABLE_S)) from None
    text = (f"Till {cpi}, KES {asked.amount}" if till else
            f"Paybill {cpi}, account {asked.reference}, KES {asked.amount}")
    return Reply(200, {"image_png_base64": image, "text": text, "trx_code": trx_code,
                       "cpi": cpi, "reference": asked.reference, "amount": asked.amount})


def start_payment(services, authorization, load_body, idempotency_key):
    """POST /stkpush: `load_body()` returns the decoded JSON body (or raises 413/415/400)."""
    cfg = services.config
    caller = authenticate(authorization, cfg)
    if caller.admin:
        raise Forbidden("admin keys read payments; start one with a merchant key",
                        code="admin_key")
    _take_slot(services)
    try:
        return _start_payment(services, caller, load_body, idempotency_key)
    finally:
        services.slots.release()


def _take_slot(services):
    """A push slot, or 503 gateway_busy at once, like 429: nothing sent, no row, no key.
    The reserve threads stay free for callbacks, reads and health."""
    if not services.slots.try_acquire():
        services.metrics.busy.inc()
        raise ServiceUnavailable("every push slot is taken; retry in a second; nothing was"
                                 " sent", code="gateway_busy",
                                 headers=retry_after(RETRY_AFTER_GATEWAY_BUSY_S))


def _start_payment(services, caller, load_body, idempotency_key):
    cfg = services.config
    push = checked(validation.validate_push, load_body(), cfg.max_amount,
                   cfg.default_reference, cfg.default_description)
    # A valid push takes a token before its key is looked at, as Stripe does. The fleet's
    # bucket (in the PostgreSQL ledger) is taken by begin_push, in its round trip.
    in_ledger = getattr(services.limiter, "in_ledger", False)
    if not in_ledger:
        within_rate(services, caller, "payments",
                    "the ledger cannot be reached; nothing was sent")
    try:
        return _push(services, caller, push, idempotency_key,
                     rate=services.limiter.bucket(caller.owner) if in_ledger else None)
    except ApiError as exc:
        raise exc.about(phone=push.phone)


def push_through_link(services, owner, push, link):
    """A payment link's push (the pay page's): as a merchant's, for the link's owner, with
    the link's limits (a LinkLimits) checked in the row's commit; a push slot like any."""
    _take_slot(services)
    try:
        return _push(services, Caller(owner), push, None, link)
    except ApiError as exc:
        raise exc.about(phone=push.phone)
    finally:
        services.slots.release()


def _push(services, caller, push, idempotency_key, link=None, rate=None):
    cfg = services.config
    idem = idempotency_for(idempotency_key, caller.owner, push)  # never for a 400
    try:
        # Committed before Daraja is called: a crash from here on leaves a trace.
        begun = services.ledger.begin_push(
            phone=push.phone, amount=push.amount, reference=push.reference,
            description=push.description, idempotency=idem, phone_lock_s=cfg.phone_lock_s,
            owner=caller.owner, link=link, rate=rate)
    except services.ledger.Error as exc:
        services.ledger_watch.failed("start_payment", exc)
        raise ledger_unavailable("the ledger cannot be written; nothing was sent") from None
    services.ledger_watch.answered()
    if begun.kind == store.Start.RATE_LIMITED:
        raise TooManyRequests(
            f"at most {cfg.rate:g} payments per second per API key name",
            headers=retry_after(begun.wait_s))
    if begun.kind != store.Start.NEW:
        return answer_without_push(begun, caller, push.phone)
    row = begun.row
    try:
        return _after_row(services, row, push, idem)
    except ApiError as exc:
        raise exc.about(tx_id=row["id"])


def _after_row(services, row, push, idem):
    try:
        accepted = services.daraja.stk_push(
            phone=push.phone, amount=push.amount, reference=push.reference,
            description=push.description, callback_url=services.signer.url(row["id"]))
    except daraja.DarajaError as exc:
        return push_not_accepted(services, row, exc, idem)
    except Exception:  # noqa: BLE001 - a bug after the row: the push may have gone out
        log.exception("push failed unexpectedly tx=%s", row["id"])
        return push_not_accepted(
            services, row, daraja.DarajaError("stk_push", daraja.UNKNOWN, "internal_error"), idem)
    tx_id, cid, mid = row["id"], accepted.checkout_request_id, accepted.merchant_request_id
    at = services.clock.wall()
    expected = dict(row, status=store.PENDING, checkout_request_id=cid,
                    merchant_request_id=mid, updated_at=store.iso_utc(at))
    body = record_outcome(
        services, idem, expected,
        lambda pin: services.ledger.mark_accepted(tx_id, cid, mid, at=at, pin=pin),
        lambda pin: recording.accepted(tx_id, cid, mid, at, pin))
    return Reply(202, body, tx_id=tx_id, phone=push.phone)


def with_retries(ledger, write):
    """Run a ledger write that must not be lost (a push has been answered), retrying a
    failure twice; the last failure is raised."""
    for pause in LEDGER_RETRIES_S:
        try:
            return write()
        except ledger.Error:
            log.debug("ledger write failed; retrying in %.2f s", pause)
            time.sleep(pause)
    return write()


def record_outcome(services, idem, expected, write, entry):
    """Record what Daraja answered to a push, and return the 202's body. Never raises: the
    prompt may be out, so the merchant is told what is known.

    `write(pin)` records it; with a key, the answer, made here from `expected` (the row as
    that write leaves it when nothing came first), is stored in the same commit. When a
    result came first the write pins nothing, and the answer made from the row as it is
    is pinned instead (one more commit, in that race only), so a retry gets what the first
    request got. If the answer cannot be stored, the outcome alone is; if the ledger
    cannot take the outcome either, `entry(pin)` (a recording entry) goes to the spool,
    fsynced before the merchant is answered, and is applied when the ledger is back."""
    ledger, tx_id = services.ledger, expected["id"]
    view = transaction_resource(expected)
    pin = None if idem is None else store.PinnedAnswer(idem, tx_id, 202, dumps(view))
    try:
        try:
            row = with_retries(ledger, lambda: write(pin))
        except Exception as exc:  # noqa: BLE001 - the outcome still has to be recorded
            if pin is None:
                raise
            if isinstance(exc, ledger.Error):
                services.ledger_watch.failed("push_outcome", exc)
            else:
                log.error("storing the idempotent answer failed tx=%s: recording the outcome"
                          " alone", tx_id, exc_info=exc)
            row = write(None)  # once: the retries above already waited out a lock
    except Exception as exc:  # noqa: BLE001 - the prompt may be out: never a 500 from here on
        _failed(services, "push_outcome", exc)
        if services.record(entry(pin)):
            log.info("push outcome spooled tx=%s: the ledger takes it when it is back", tx_id)
        else:
            # Still `submitting` in the ledger, so recovery makes it `unknown`; its signed
            # callback URL still finds it.
            log.error("push outcome not recorded tx=%s: neither the ledger nor the spool"
                      " could take it", tx_id)
        return view
    answer = transaction_resource(row)
    if pin is not None and answer != view:  # a result came first: pin what is answered
        try:
            with_retries(ledger, lambda: ledger.pin_answer(
                store.PinnedAnswer(idem, tx_id, 202, dumps(answer))))
        except Exception as exc:  # noqa: BLE001 - a retry is then answered from the row
            _failed(services, "push_outcome", exc)
    return answer


def answer_without_push(begun, caller, phone):
    """The ledger decided no new push is needed: replay, conflict, or phone lock."""
    if begun.kind == store.Start.REUSED:
        raise Unprocessable("this Idempotency-Key was used with a different request",
                            code="idempotency_key_reused")
    if begun.kind == store.Start.LINK_USED_UP:
        raise Conflict("this payment link has been paid (or a payment through it is under"
                       " way)", code="link_used_up")
    if begun.kind == store.Start.LINK_PHONE_DONE:
        raise Conflict("this phone has had its prompts from this link", code="link_phone_done")
    if begun.kind == store.Start.PHONE_BUSY:
        # The lock spans every owner (it protects the customer); the id is named only to
        # the merchant who owns it.
        which = f"transaction {begun.row['id']}" if caller.sees(begun.row) else "a payment"
        raise Conflict(f"{which} for this phone may still have a prompt open; wait for its"
                       " result", code="payment_in_progress")
    tx_id = begun.row["id"]
    if begun.kind == store.Start.REPLAY:
        return Reply(begun.status_code, json.loads(begun.body), REPLAYED, tx_id, phone)
    if begun.row["status"] == store.SUBMITTING:  # in flight: the first request is still at Daraja
        raise Conflict("a request with this Idempotency-Key is still in progress; retry shortly",
                       code="idempotency_key_in_use", headers=retry_after(1)).about(tx_id)
    # In flight on paper, but its row moved on (its answer was not pinned): say so.
    return Reply(202, transaction_resource(begun.row), REPLAYED, tx_id, phone)


def push_not_accepted(services, row, exc, idem):
    """Record a push Daraja did not accept, then answer per SPEC §2 outcomes."""
    ledger = services.ledger
    if exc.outcome == daraja.UNKNOWN:
        # It may have reached the customer: never resend; the callback or a query settles it.
        tx_id, at = row["id"], services.clock.wall()
        expected = dict(row, status=store.UNKNOWN, reason=exc.reason, result_code=None,
                        result_desc=None, updated_at=store.iso_utc(at))
        body = record_outcome(
            services, idem, expected,
            lambda pin: ledger.mark_not_accepted(tx_id, store.UNKNOWN, exc.reason, at=at,
                                                 pin=pin),
            lambda pin: recording.not_accepted(tx_id, store.UNKNOWN, exc.reason, at, pin=pin))
        return Reply(202, body, tx_id=tx_id, phone=row["phone"])
    # Nothing reached the customer: the idempotency key is released with the row's update,
    # so the merchant may retry with the same key.
    if exc.outcome == daraja.REJECTED and exc.subscriber_locked:
        _refused(services, row, "subscriber_busy", exc, idem)
        raise Conflict(f"the customer has another M-Pesa prompt open; transaction {row['id']}"
                       " was not sent", code="subscriber_busy",
                       headers=retry_after(RETRY_AFTER_BUSY_S))
    if exc.outcome == daraja.REJECTED and exc.reason == "wrong_base_url":
        _refused(services, row, "daraja_rejected", exc, idem)
        raise UpstreamRejected("Daraja's address answered with an HTML page, not the STK"
                               " service: the base URL (MPESA_BASE_URL or MPESA_ENVIRONMENT)"
                               f" looks wrong; transaction {row['id']} is rejected")
    if exc.outcome == daraja.REJECTED:
        _refused(services, row, "daraja_rejected", exc, idem)
        raise UpstreamRejected(f"Daraja refused the request ({exc.error_code}); transaction"
                               f" {row['id']} is rejected")
    _refused(services, row, "upstream_unavailable", exc, idem)
    raise ServiceUnavailable(f"Daraja is unavailable ({exc.reason}); transaction {row['id']}"
                             " was not sent", headers=retry_after(RETRY_AFTER_UNAVAILABLE_S))


def _refused(services, row, reason, exc, idem):
    """Mark a push that reached no customer `rejected` and free its key, in one commit.

    If the ledger cannot record it even after retries, the refusal goes to the spool
    (applied, and the key freed, when the ledger is back). If the spool cannot take it
    either, the row stays `submitting` (so recovery will call it `unknown`) and the key
    stays taken: say exactly that, rather than promise a retry with the same key that
    would be refused."""
    ledger, tx_id = services.ledger, row["id"]
    try:
        with_retries(ledger, lambda: ledger.mark_not_accepted(
            tx_id, store.REJECTED, reason, exc.error_code, exc.error_message, release=idem))
        return
    except ledger.Error as error:  # (`exc` is Daraja's refusal, still needed below)
        services.ledger_watch.failed("push_outcome", error)
    if services.record(recording.not_accepted(
            tx_id, store.REJECTED, reason, services.clock.wall(), result_code=exc.error_code,
            result_desc=exc.error_message, release=idem)):
        log.info("push refusal spooled tx=%s: the ledger takes it when it is back", tx_id)
        return
    raise ledger_unavailable(
        "Daraja did not take the request, so nothing was sent, but the ledger could not"
        f" record it: transaction {tx_id} may show as unknown; do not retry with the same"
        " Idempotency-Key")


@ledger_read
def events_page(services, authorization, query_string):
    """GET /events: the caller's webhook events, newest first (admin keys: everyone's)."""
    caller = authenticate(authorization, services.config)
    status, limit, after = checked(validation.parse_events_query, query_string)
    rows, more = services.ledger.event_page(owner=None if caller.admin else caller.owner,
                                            status=status, after=after, limit=limit)
    return Reply(200, {"data": [resources.event_resource(r) for r in rows],
                       "next_cursor": rows[-1]["id"] if more else None})


def _own_event(services, caller, event_id):
    row = services.ledger.event(event_id) if validation.event_id_ok(event_id) else None
    if row is None or not (caller.admin or row["owner"] == caller.owner):
        raise NotFound("no such event")  # another owner's event does not exist here
    return row


@ledger_read
def read_event(services, authorization, event_id):
    """GET /events/<id>: one event with its delivery attempts."""
    caller = authenticate(authorization, services.config)
    return Reply(200, resources.event_resource(_own_event(services, caller, event_id), True))


@ledger_read
def redeliver_event(services, authorization, event_id):
    """POST /events/<id>/redeliver: send it again at the sender's next pass. Owners act on
    their own events, a few a second; admin keys read everything and change nothing."""
    caller = authenticate(authorization, services.config)
    if caller.admin:
        raise Forbidden("admin keys read events; the owner's key redelivers one",
                        code="admin_key")
    _own_event(services, caller, event_id)
    wait = services.redeliveries.acquire(caller.owner)
    if wait:
        raise TooManyRequests("too many redeliveries for this API key name; retry shortly",
                              headers=retry_after(wait))
    row = services.ledger.redeliver(event_id)
    return Reply(202, resources.event_resource(row))


@ledger_read
def read_transaction(services, authorization, ref):
    caller = authenticate(authorization, services.config)
    row = (services.ledger.get(ref) if 0 < len(ref) <= MAX_ID_LENGTH and ref.isprintable()
           else None)
    if row is None or not caller.sees(row):  # another owner's payment does not exist here
        raise NotFound("no transaction with that id or CheckoutRequestID")
    body = transaction_resource(row)
    # The Paybill/Till payments matched to it: another M-Pesa transaction each, beside it.
    body["receipts"] = [receipt_resource(r) for r in services.ledger.receipts_of(row["id"])]
    body["refund"] = resources.refund_resource(
        services.ledger.refund_of(row["receipt"]) if row["receipt"] else None)
    return Reply(200, body, tx_id=row["id"], phone=row["phone"])


def receive_callback(services, tx_id, sig, environ, load_raw):
    """Safaricom's STK result: stored and applied in one commit, then acknowledged.
    `load_raw()` returns the raw body, bounded (or raises 413)."""
    if not services.signer.verify(tx_id, sig):
        # First, before anything is logged: a scanner's request is just an unknown path.
        raise NotFound()
    source = safaricom_source(services, environ, f"callback tx={tx_id}")
    try:
        return _store_callback(services, tx_id, source, load_raw())
    except ApiError as exc:
        raise exc.about(tx_id)


def safaricom_source(services, environ, what):
    """The address a signed Safaricom request came from, checked against MPESA_CALLBACK_IPS
    as MPESA_CALLBACK_IP_POLICY says (log: a WARNING; enforce: 403 too)."""
    cfg = services.config
    source = sources.client_address(environ, cfg.trusted_proxies)
    policy = cfg.callback_ip_policy
    if policy != "off" and not sources.within(source, cfg.callback_ips):
        log.warning("%s source_not_allowed ip=%s policy=%s", what, source, policy)
        if policy == "enforce":
            raise Forbidden("callbacks are accepted from Safaricom's addresses only",
                            code="forbidden_source")
    return source


def _store_callback(services, tx_id, source, raw):
    outcome = settlement.from_raw_callback(raw)
    try:
        name, row = settlement.apply(services.ledger, tx_id, outcome,
                                     callback=settlement.CallbackRecord(raw, source))
        services.ledger_watch.answered()
    except services.ledger.Error as exc:
        services.ledger_watch.failed("callback", exc)
        if not services.record(recording.callback(tx_id, raw, source, services.clock.wall())):
            # Not stored, so not acknowledged.
            raise ledger_unavailable("the callback could not be stored") from None
        name, row = "spooled", None  # stored: applied when the ledger is back
    phone = row["phone"] if row is not None else None
    services.metrics.callbacks.inc(name)
    log.info("callback tx=%s outcome=%s result_code=%s", tx_id, name,
             outcome.result_code if outcome else None)
    if outcome is None:
        raise BadRequest("the callback is not a valid STK result (it was stored)",
                         code="invalid_callback").about(tx_id, phone)
    return Reply(200, CALLBACK_ACK, tx_id=tx_id, phone=phone)


# --- Paybill and Till payments (C2B): Safaricom's registered URLs -------------------

C2B_CONFIRMATION_ACK = {"ResultCode": 0, "ResultDesc": "Success"}
C2B_VALIDATION_ACCEPT = {"ResultCode": "0", "ResultDesc": "Accepted"}


def receive_confirmation(services, source, raw):
    """Store, then acknowledge: in the ledger, or the spool while the ledger is away (503
    only when neither can take it: Daraja does not resend, so nothing is acknowledged
    that is not kept)."""
    raw = c2b.kept_body(raw)  # an MSISDN in clear is never stored so
    confirmation = None
    try:
        confirmation = c2b.from_raw(raw, services.c2b_shortcodes)
        outcome = services.ledger.record_confirmation(
            confirmation, raw=raw, remote_addr=source)
        services.ledger_watch.answered()
    except Exception as exc:  # noqa: BLE001 - whatever failed, the body is kept before the 200
        if isinstance(exc, services.ledger.Error) and not isinstance(
                exc, services.ledger.Permanent):
            services.ledger_watch.failed("c2b", exc)
        else:  # a bug, or a value the ledger refuses: the spool keeps it (set aside, named,
            # if its replay fails the same way)
            log.error("c2b confirmation could not be recorded; kept in the spool", exc_info=exc)
        if not services.record(recording.confirmation(raw, source, services.clock.wall(),
                                                     services.c2b_shortcodes)):
            # Not stored, so not acknowledged.
            raise ledger_unavailable("the confirmation could not be stored") from None
        outcome = "spooled"
    services.metrics.c2b_confirmations.inc(outcome)
    log.info("c2b confirmation receipt=%s outcome=%s anomalies=%s body=%s",
             confirmation.receipt if confirmation else None, outcome,
             ",".join(confirmation.anomalies) if confirmation else "malformed",
             hashlib.sha256(raw).hexdigest()[:12])  # never the body: it names the payer
    return Reply(200, C2B_CONFIRMATION_ACK)


def answer_validation(services, source, raw):
    """GATEWAY_C2B_VALIDATION: off accepts every payment Safaricom asks about (the
    confirmation that follows is what is kept); reference accepts a Paybill payment only
    when its account number is exactly one recent payment's reference and it pays that
    payment's amount (else C2B00012 / C2B00013). Nothing calls Daraja: the answer is due
    within 8 s. When the ledger cannot say, MPESA_C2B_RESPONSE_TYPE decides, as it would
    for an answer that never came."""
    del source
    cfg = services.config
    asked = c2b.from_raw(raw, services.c2b_shortcodes)
    if cfg.c2b_validation == "off" or asked is None or asked.channel != "paybill":
        return Reply(200, C2B_VALIDATION_ACCEPT)
    try:
        candidates = services.ledger.payments_referenced(asked.account)
        services.ledger_watch.answered()
    except services.ledger.Error as exc:
        services.ledger_watch.failed("c2b", exc)
        accept = cfg.c2b_response_type == "Completed"
        log.warning("c2b validation undecided (the ledger cannot be read): %s as"
                    " MPESA_C2B_RESPONSE_TYPE=%s says", "accepted" if accept else "refused",
                    cfg.c2b_response_type)
        return Reply(200, C2B_VALIDATION_ACCEPT if accept else c2b.refusal("C2B00016"))
    if len(candidates) != 1:
        return Reply(200, c2b.refusal("C2B00012"))  # no such account, or not one payment
    if asked.amount != candidates[0]["amount"]:
        return Reply(200, c2b.refusal("C2B00013"))
    return Reply(200, C2B_VALIDATION_ACCEPT)


C2B_FLOWS = {"confirmation": receive_confirmation, "validation": answer_validation}


def receive_c2b(services, kind, sig, environ, load_raw):
    """A registered Paybill/Till URL: its signature checked first (a scanner's request is
    just an unknown path: 404, nothing stored, nothing logged), then its flow."""
    flow = C2B_FLOWS.get(kind)
    if flow is None or not services.signer.verify_c2b(kind, sig):
        raise NotFound()
    return flow(services, safaricom_source(services, environ, f"c2b {kind}"), load_raw())
