"""Recording what Daraja already did: into the ledger, or the local spool while it is away.

Owns the entries the spool holds, what each one means to the ledger, and putting them
there:

- `accepted`: Daraja queued a push (its CheckoutRequestID), with the idempotent answer;
- `not_accepted`: Daraja did not take a push (refused: nothing reached the customer; or
  unknown: it may have), with the key to free or the answer to pin;
- `callback`: a signed STK callback, raw, with its source and the time it arrived;
- `c2b_confirmation`: a Paybill/Till confirmation, raw, likewise;
- `initiator_result`: a Result or QueueTimeOut of an initiator request, raw, likewise.

When the ledger cannot take one of these (a PostgreSQL server that is down, a SQLite file
another process holds locked past the wait), the flow appends it to the spool, which
makes it durable before the merchant or Safaricom is answered. `replay()` applies the
spool to the ledger in written order, each entry once (its id is recorded in the commit
that applies it), stopping at the first entry the ledger still cannot take;
`Replayer` runs it in a thread while entries wait, and build_services and every
reconcile pass run it first.
"""

import base64
import logging
import threading

import mpesa_ledger as store
from mpesa_gateway import c2b, initiator, settlement

log = logging.getLogger(__name__)

RETRY_S = 1.0  # while entries wait, how often the ledger is tried again


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _pin(pin):
    if pin is None:
        return None
    i = pin.idempotency
    return {"scope": i.scope, "key": i.key, "request_hash": i.request_hash,
            "status_code": pin.status_code, "body": _b64(pin.body)}


def _idempotency(data):
    return None if data is None else store.Idempotency(data["scope"], data["key"],
                                                       data["request_hash"])


def accepted(tx_id, checkout_request_id, merchant_request_id, at, pin):
    return {"kind": "accepted", "tx_id": tx_id, "checkout_request_id": checkout_request_id,
            "merchant_request_id": merchant_request_id, "at": at, "pin": _pin(pin)}


def not_accepted(tx_id, status, reason, at, *, result_code=None, result_desc=None,
                 release=None, pin=None):
    return {"kind": "not_accepted", "tx_id": tx_id, "status": status, "reason": reason,
            "at": at, "result_code": result_code, "result_desc": result_desc,
            "release": None if release is None else {
                "scope": release.scope, "key": release.key,
                "request_hash": release.request_hash},
            "pin": _pin(pin)}


def callback(tx_id, raw, remote_addr, at):
    return {"kind": "callback", "tx_id": tx_id, "body": _b64(raw), "remote_addr": remote_addr,
            "at": at}


def confirmation(raw, remote_addr, at, shortcodes):
    """A Paybill/Till confirmation, raw (it names no transaction of the gateway's), with
    the shortcodes that were the gateway's own when it came."""
    return {"kind": "c2b_confirmation", "tx_id": None, "body": _b64(raw),
            "remote_addr": remote_addr, "at": at, "shortcodes": sorted(shortcodes)}


def initiator_result(request_id, result_kind, raw, remote_addr, at):
    """A Result (`result_kind` result) or QueueTimeOut (timeout) of request `request_id`."""
    return {"kind": "initiator_result", "tx_id": request_id, "result_kind": result_kind,
            "body": _b64(raw), "remote_addr": remote_addr, "at": at}


def describe(entry):
    """One line about an entry, for an operator (the caller masks phones and ids)."""
    if not isinstance(entry, dict) or "kind" not in entry or "tx_id" not in entry:
        return f"not an entry: {str(entry)[:200]}"
    at = store.iso_utc(entry.get("spooled_at") or entry.get("at") or 0)
    head = f"{at} {entry['kind']} tx={entry['tx_id']}"
    if entry["kind"] == "accepted":
        return f"{head} checkout_request_id={entry['checkout_request_id']}"
    if entry["kind"] == "c2b_confirmation":
        return f"{head} from={entry['remote_addr']} bytes={len(base64.b64decode(entry['body']))}"
    if entry["kind"] == "not_accepted":
        return f"{head} status={entry['status']} reason={entry['reason']}"
    if entry["kind"] == "initiator_result":
        result = initiator.from_raw(base64.b64decode(entry["body"]))
        return (f"{head} {entry['result_kind']} result_code={result.code if result else None}"
                f" from={entry['remote_addr']}")
    if entry["kind"] != "callback":
        return f"{head} fields={','.join(sorted(entry))}"
    outcome = settlement.from_raw_callback(base64.b64decode(entry["body"]))
    if outcome is None:
        return f"{head} callback=malformed from={entry['remote_addr']}"
    return (f"{head} callback result_code={outcome.result_code} status={outcome.status}"
            f" amount={outcome.amount} receipt={outcome.receipt}"
            f" checkout_request_id={outcome.checkout_request_id}"
            f" from={entry['remote_addr']}")


def apply(ledger, entry):
    """Put one entry in the ledger (raises ledger.Error when it still cannot take it)."""
    kind, once = entry["kind"], entry["id"]
    if kind == "accepted":
        _with_pin(ledger, entry, lambda pin: ledger.mark_accepted(
            entry["tx_id"], entry["checkout_request_id"], entry["merchant_request_id"],
            at=entry["at"], pin=pin, once=once))
    elif kind == "not_accepted":
        _with_pin(ledger, entry, lambda pin: ledger.mark_not_accepted(
            entry["tx_id"], entry["status"], entry["reason"], entry["result_code"],
            entry["result_desc"], at=entry["at"], release=_idempotency(entry["release"]),
            pin=pin, once=once))
    elif kind == "callback":
        raw = base64.b64decode(entry["body"])
        name, _ = settlement.apply(
            ledger, entry["tx_id"], settlement.from_raw_callback(raw),
            callback=settlement.CallbackRecord(raw, entry["remote_addr"], entry["at"]),
            once=once)
        log.info("callback tx=%s outcome=%s (from the spool)", entry["tx_id"], name)
    elif kind == "c2b_confirmation":
        raw = base64.b64decode(entry["body"])
        outcome = ledger.record_confirmation(
            c2b.from_raw(raw, entry["shortcodes"]), raw=raw, remote_addr=entry["remote_addr"],
            received_at=entry["at"], once=once)
        log.info("c2b confirmation outcome=%s (from the spool)", outcome)
    elif kind == "initiator_result":
        raw = base64.b64decode(entry["body"])
        outcome, _ = ledger.settle_request(
            entry["tx_id"], initiator.decide, kind=entry["result_kind"],
            result=initiator.from_raw(raw), raw=raw, remote_addr=entry["remote_addr"],
            received_at=entry["at"], once=once)
        log.info("initiator %s request=%s outcome=%s (from the spool)", entry["result_kind"],
                 entry["tx_id"], outcome)
        if outcome == "initiator_refused":
            log.error("initiator refused (from the spool): every initiator call is stopped"
                      " until MPESA_INITIATOR_NAME or its credential changes")
    else:
        raise ValueError(f"an entry of an unknown kind ({kind!r}): from a newer version?")


def _with_pin(ledger, entry, write):
    """`write(pin)` with the entry's idempotent answer: the bytes the merchant was sent,
    pinned whatever the row became meanwhile (a result may have come first, the ledger
    may take the outcome only without the answer): a retry with the key gets them."""
    pin = entry.get("pin")
    if pin is None:
        return write(None)
    pinned = store.PinnedAnswer(_idempotency(pin), entry["tx_id"], pin["status_code"],
                                base64.b64decode(pin["body"]))
    try:
        row = write(pinned)
    except ledger.Error:
        row = write(None)  # still raises while the ledger cannot take it
    try:
        ledger.pin_answer(pinned)  # nothing, if the write pinned it
    except ledger.Error:
        log.exception("ledger write failed storing the idempotent answer tx=%s",
                      entry["tx_id"])
    return row


def replay(spool, ledger, watch=None):
    """Apply the spool's entries in order; stop at the first the ledger cannot take yet
    (told to `watch`, a monitoring.LedgerWatch). Returns how many were applied."""
    done = 0
    for entry in spool.pending():
        try:
            apply(ledger, entry)
        except ledger.Permanent as exc:  # it will never apply: the entries behind it go on
            spool.set_aside(entry, type(exc).__name__)
            continue
        except ledger.Error as exc:
            if watch is not None:
                watch.failed("spool", exc)
            log.debug("spool replay waiting: the ledger cannot take entries yet (left=%d)",
                      spool.depth())
            break
        except Exception as exc:  # noqa: BLE001 - a malformed entry, or a bug: set aside
            log.error("spool entry cannot be applied id=%s", entry.get("id"), exc_info=exc)
            spool.set_aside(entry, type(exc).__name__)
            continue
        spool.applied(entry)
        done += 1
        if watch is not None:
            watch.answered()
    if done:
        log.info("spool replayed=%d left=%d", done, spool.depth())
    return done


class Replayer:
    """Replays the spool in a thread while it holds entries; `wake()` after an append."""

    def __init__(self, spool, ledger, watch=None, *, retry_s=RETRY_S):
        self._spool, self._ledger, self._watch, self._retry_s = spool, ledger, watch, retry_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="spool-replayer", daemon=True)
        self._thread.start()

    def wake(self):
        self._wake.set()

    def _loop(self):
        while not self._stop.is_set():
            self._wake.wait(None if not self._spool.depth() else self._retry_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                replay(self._spool, self._ledger, self._watch)
            except Exception:  # noqa: BLE001 - a bug must not end the thread that saves money
                log.exception("spool replay failed")

    def stop(self):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
