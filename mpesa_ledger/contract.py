"""The ledger contract: every call a ledger answers, its SQL written once for both engines.

Owns the life of a payment row, the append-only callback log, idempotency keys and the
webhook outbox, as SQL that SQLite and PostgreSQL both run. An engine (`sqlite`,
`postgres`) supplies only what is declared below as a hook: connections and
transactions, how names are serialised, its `Dialect`, and what its failures raise.
The rules that keep money safe live here:

- a row is committed in state `submitting` *before* Daraja is called;
- a callback's raw body is stored and applied in one committed transaction;
- `settle()` runs settlement's rules on a row inside the write transaction
  that reads it (and, for a callback, stores its raw body), so a result is
  applied once whoever brings it;
- on startup, rows left in `submitting` become `unknown`, never re-sent;
- an idempotency key is claimed, the per-phone lock checked and the row written
  in one write transaction, so the guarantees hold across threads, processes and
  hosts;
- a push's outcome and its idempotent answer are one commit;
- a status change and its webhook event (the `events` hook given when the ledger is
  built) are one commit;
- an initiator request (a refund, a code check, a balance) is committed `submitting`
  before Daraja is called, at most one refund of a receipt is under way or done, a
  result is stored and applied in one commit, and an initiator refused by a result
  stays stopped (under its configuration's fingerprint) in that commit;
- reconciliation claims one row at a time with a lease, so two claimers never
  query the same row at once;
- a write returns only once its COMMIT is durable.
"""

import logging
import time
from dataclasses import dataclass

from mpesa_ledger.states import (
    IDEMPOTENCY_TTL_S,
    PENDING,
    REQUEST_ACTIVE,
    SUBMITTING,
    UNKNOWN,
    Begun,
    ReceiptRules,
    Start,
    iso_utc,
    new_tx_id,
)

log = logging.getLogger(__name__)

APPLIED_KEEP_S = 30 * 24 * 3600  # a spool entry's mark outlives any replay of it
# Every receipt in one view: Paybill/Till confirmations, and succeeded STK payments'.
RECEIPTS_VIEW = (
    "SELECT receipt, 'c2b' AS channel, amount, account AS reference, paid_at,"
    " received_at AS at, owner, matched_tx_id AS tx_id, payer_name, msisdn, anomalies"
    " FROM c2b_receipts UNION ALL"
    " SELECT receipt, 'stk' AS channel, amount, reference, updated_at AS paid_at,"
    " updated_at AS at, COALESCE(owner, 'default') AS owner, id AS tx_id, '' AS payer_name,"
    " phone AS msisdn, '' AS anomalies FROM transactions"
    " WHERE status = 'succeeded' AND receipt IS NOT NULL")


class LedgerOpenError(Exception):
    """The ledger cannot be opened (or its driver is missing): one message for startup."""


@dataclass(frozen=True)
class Dialect:
    """Where the engines' SQL differs, as text the contract's statements splice in."""

    seq: str  # the outbox's written order
    for_update: str  # lock a row read to be changed (SQLite: BEGIN IMMEDIATE locks all)
    skip_locked: str  # a claim passes over rows another claimer is locking


class Ledger:
    """The contract. Engines subclass it, set up their own state, call `__init__` for the
    contract's, and implement every hook (each raises NotImplementedError here)."""

    Error = None  # hook: the engine's failure type (a failed call raises it)
    # hook: the failures a retry cannot mend (a constraint the data breaks), a subset of Error
    Permanent = None
    dialect = None  # hook: the engine's Dialect
    # Capability: the engine keeps state every process on every host shares (the fleet's
    # OAuth token and rate buckets); the gateway then keeps them there, not in memory.
    shared_by_hosts = False

    def __init__(self, *, clock=time.time, events=None, receipt_rules=None,
                 request_events=None):
        if None in (self.Error, self.Permanent, self.dialect):
            raise NotImplementedError(f"{type(self).__name__} must set Error, Permanent and"
                                      " dialect")
        self._clock = clock
        # events(before, after, outcome) → a NewEvent or None: the webhook event a status
        # change produces, written in the commit that makes the change. None: no events.
        self._events = events
        # How a Paybill/Till receipt finds its payment, its owner and its event.
        self._receipt_rules = receipt_rules or ReceiptRules()
        # request_events(before, after) → a NewEvent or None: an initiator request's event
        # (a refund's, a code check's), written in the commit that changes it.
        self._request_events = request_events

    # --- hooks: each engine implements these -------------------------------------

    def _write(self, step=None, prelude=None):
        """hook: a context manager giving a connection inside one write transaction; the
        transaction is durable when the block ends (or raises the failure). Each
        statement's result can be read inside the block or after it: a step that reads
        only after the block costs one network round trip on an engine that pipelines
        (PostgreSQL). `step` names the write for the engine's round-trip counts;
        `prelude(conn)`, if given, runs first in the same round trip (`_rate_step`)."""
        raise NotImplementedError

    def _read(self, sql, args=()):
        """hook: the rows of one query, as dicts."""
        raise NotImplementedError

    def _serialize(self, conn, names):
        """hook: hold these names' locks until the write transaction ends."""
        raise NotImplementedError

    def migrate(self):
        """hook: create or upgrade the schema; returns its version."""
        raise NotImplementedError

    def writable(self):
        """hook: can a write be committed right now?"""
        raise NotImplementedError

    @property
    def commit_counts(self):
        """hook: (writes made durable, COMMITs that did it), for /metrics."""
        raise NotImplementedError

    @property
    def round_trips(self):
        """{step: (statements, network round trips, calls)} an engine with a server counts,
        for /metrics and the bench; {} for one without (SQLite)."""
        return {}

    def close(self):
        """hook: end every connection."""
        raise NotImplementedError

    # --- the fleet's shared state: only engines that are `shared_by_hosts` ---------------

    def fleet_token(self, margin_s):
        """(token, seconds left) of the fleet's OAuth token, if it has more than `margin_s`."""
        raise NotImplementedError

    def take_token_lease(self, lease_s, margin_s):
        """Become the fleet's one token fetcher for `lease_s`; True if this caller did."""
        raise NotImplementedError

    def put_token(self, token, expires_in):
        """The lease holder's new token, for every process; the lease ends."""
        raise NotImplementedError

    def release_token_lease(self):
        raise NotImplementedError

    def drop_token(self, token):
        """Daraja called `token` invalid: nobody uses it again (unless already replaced)."""
        raise NotImplementedError

    def take_rate_token(self, key, rate, burst):
        """Take one token of `key`'s bucket: 0.0 if allowed, else seconds until one is."""
        raise NotImplementedError

    def _rate_step(self, key, rate, burst):
        """A push's token taken within begin_push's write: (prelude for `_write`, SQL the
        new row's INSERT must also satisfy, wait(): read after the write, 0.0 if allowed
        or seconds until a token is free)."""
        raise NotImplementedError

    # --- shared helpers ------------------------------------------------------------

    def _read_one(self, sql, args=()):
        rows = self._read(sql, args)
        return rows[0] if rows else None

    def _now(self):
        return iso_utc(self._clock())

    # --- transactions -------------------------------------------------------

    # A prompt may be open on the phone: pending, or unknown without a CheckoutRequestID
    # (its push was cut off or timed out after it may have been sent). Arguments: phone,
    # since, then the three states.
    PHONE_BUSY = ("SELECT * FROM transactions WHERE phone = ? AND created_at >= ?"
                  " AND (status IN (?, ?) OR (status = ? AND checkout_request_id IS NULL))")
    NEW_ROW = ("id", "status", "phone", "amount", "reference", "description", "created_at",
               "updated_at", "owner", "link_id")

    @staticmethod
    def _busy_args(phone, now, phone_lock_s):
        """PHONE_BUSY's arguments: a prompt on `phone` within `phone_lock_s` of `now`."""
        return phone, iso_utc(now - phone_lock_s), SUBMITTING, PENDING, UNKNOWN

    def _insert_row(self, conn, tx_id, now, push, link_id=None, where="", args=()):
        """INSERT a new `submitting` row `tx_id` (`push`: its phone, amount, reference,
        description and owner) if `where` (SQL with `args`) holds; its result, RETURNING
        the row."""
        stamp = iso_utc(now)
        row = dict(push, id=tx_id, status=SUBMITTING, created_at=stamp, updated_at=stamp,
                   link_id=link_id)
        return conn.execute(
            f"INSERT INTO transactions ({', '.join(self.NEW_ROW)}) SELECT"
            f" {', '.join('?' * len(self.NEW_ROW))}{' WHERE ' + where if where else ''}"
            " RETURNING *", (*(row[c] for c in self.NEW_ROW), *args))

    def begin_push(self, *, phone, amount, reference, description, idempotency=None,
                   phone_lock_s=0.0, owner=None, link=None, rate=None):
        """In one write transaction: honour the idempotency key, check the phone lock
        (and, for a payment link's push, its limits: `link` a LinkLimits), and commit a new
        `submitting` row. `rate`: (key, rate, burst) of the fleet's token bucket
        (engines `shared_by_hosts`), taken in the same round trip. Returns a Begun.

        One round trip on PostgreSQL: every statement goes out at once and nothing is read
        until the write ends, so the new row's INSERT carries the conditions (no fresh key,
        no busy phone, a token) and the reads after it say why, when it inserted nothing.
        Serialised per key, then per phone (SQLite: BEGIN IMMEDIATE already is); in its
        transaction the INSERT and the reads see the same key and phone."""
        if link is not None:
            return self._begin_link_push(phone=phone, amount=amount, reference=reference,
                                         description=description, phone_lock_s=phone_lock_s,
                                         owner=owner, link=link)
        now = self._clock()
        prelude, gate, wait = self._rate_step(*rate) if rate is not None else (None, None, None)
        tx_id = new_tx_id(now)
        push = dict(phone=phone, amount=amount, reference=reference, description=description,
                    owner=owner)
        busy_args = self._busy_args(phone, now, phone_lock_s)
        conditions, args = [], []
        if idempotency is not None:
            conditions.append("NOT EXISTS (SELECT 1 FROM idempotency_keys WHERE scope = ?"
                              " AND key = ?)")
            args += [idempotency.scope, idempotency.key]
        if phone_lock_s > 0:
            conditions.append(f"NOT EXISTS ({self.PHONE_BUSY})")
            args += busy_args
        found = busy = None
        for _ in range(3):  # again only if what blocked the INSERT was gone when read
            where = " AND ".join(conditions + ([gate] if gate is not None else []))
            with self._write(step="begin_push", prelude=prelude) as conn:
                self._serialize(conn, ([f"key:{idempotency.scope}:{idempotency.key}"]
                                       if idempotency is not None else []) + [f"phone:{phone}"])
                if idempotency is not None:  # an expired key may start a new payment
                    conn.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ?"
                                 " AND created_at <= ?", (idempotency.scope, idempotency.key,
                                                          now - IDEMPOTENCY_TTL_S))
                inserted = self._insert_row(conn, tx_id, now, push, where=where, args=args)
                if idempotency is not None:
                    conn.execute(
                        "INSERT INTO idempotency_keys (scope, key, request_hash, tx_id,"
                        " created_at) SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM"
                        " transactions WHERE id = ?)",
                        (idempotency.scope, idempotency.key, idempotency.request_hash,
                         tx_id, now, tx_id))
                    found = conn.execute(
                        "SELECT k.request_hash AS key_request_hash, k.status_code AS"
                        " key_status_code, k.body AS key_body, t.* FROM idempotency_keys k"
                        " JOIN transactions t ON t.id = k.tx_id WHERE k.scope = ? AND k.key = ?"
                        " AND k.tx_id <> ?", (idempotency.scope, idempotency.key, tx_id))
                if phone_lock_s > 0:
                    busy = conn.execute(f"{self.PHONE_BUSY} AND id <> ? ORDER BY created_at"
                                        " DESC LIMIT 1", (*busy_args, tx_id))
            new = inserted.fetchone()
            if wait is not None:
                waited = wait()
                if waited:
                    return Begun(Start.RATE_LIMITED, wait_s=waited)
                # The token is this push's: a second pass neither takes nor asks for one.
                prelude = gate = wait = None
            if new is not None:
                return Begun(Start.NEW, dict(new))
            key = found.fetchone() if found is not None else None
            if key is not None:
                return self._existing_key(dict(key), idempotency)
            blocker = busy.fetchone() if busy is not None else None
            if blocker is not None:
                return Begun(Start.PHONE_BUSY, dict(blocker))
        raise self.Error("begin_push found its way blocked three times by rows that were"
                         " gone when read")

    def _begin_link_push(self, *, phone, amount, reference, description, phone_lock_s, owner,
                         link):
        """begin_push for a payment link's push (the pay page's): its limits are counted
        from rows read in the transaction, so this step reads as it goes (a round trip
        each) and is serialised per link too."""
        now = self._clock()
        with self._write(step="begin_link_push") as conn:
            self._serialize(conn, [f"phone:{phone}", f"link:{link.link_id}"])
            if phone_lock_s > 0:
                busy = conn.execute(f"{self.PHONE_BUSY} ORDER BY created_at DESC LIMIT 1",
                                    self._busy_args(phone, now, phone_lock_s)).fetchone()
                if busy is not None:
                    return Begun(Start.PHONE_BUSY, dict(busy))
            refused = self._link_refuses(conn, link, phone)
            if refused is not None:
                return Begun(refused)
            row = dict(self._insert_row(conn, new_tx_id(now), now, dict(
                phone=phone, amount=amount, reference=reference, description=description,
                owner=owner), link_id=link.link_id).fetchone())
        return Begun(Start.NEW, row)

    def _link_refuses(self, conn, link, phone):
        """Why a payment link takes no more prompts (a Start), or None, read in the push's
        commit: it was revoked or expired meanwhile; its payments that may take money (under
        way, unknown or succeeded, and Paybill payments matched to one of its payments)
        reach its uses; this phone had its prompts (ones Daraja refused do not count)."""
        open_ = conn.execute("SELECT 1 FROM payment_links WHERE id = ? AND revoked_at IS NULL"
                             " AND expires_at > ?", (link.link_id, self._clock())).fetchone()
        if open_ is None:
            return Start.LINK_USED_UP
        taken = conn.execute(
            "SELECT COUNT(*) AS n FROM transactions WHERE link_id = ? AND status IN"
            " (?, ?, ?, 'succeeded')", (link.link_id, SUBMITTING, PENDING, UNKNOWN)).fetchone()
        by_menu = conn.execute(
            "SELECT COUNT(*) AS n FROM c2b_receipts r JOIN transactions t ON t.id ="
            " r.matched_tx_id WHERE t.link_id = ? AND t.status <> 'succeeded'",
            (link.link_id,)).fetchone()
        if taken["n"] + by_menu["n"] >= link.max_uses:
            return Start.LINK_USED_UP
        prompts = conn.execute("SELECT COUNT(*) AS n FROM transactions WHERE link_id = ?"
                               " AND phone = ? AND status <> 'rejected'",
                               (link.link_id, phone)).fetchone()
        return Start.LINK_PHONE_DONE if prompts["n"] >= link.prompts_per_phone else None

    @staticmethod
    def _existing_key(found, idempotency):
        """What a fresh key says about a retry: `found` its payment's row with the key's
        request hash and stored answer (key_… columns)."""
        key = {name: found.pop(f"key_{name}") for name in ("request_hash", "status_code", "body")}
        if key["request_hash"] != idempotency.request_hash:
            return Begun(Start.REUSED)
        if key["status_code"] is not None:
            return Begun(Start.REPLAY, found, key["status_code"], key["body"])
        return Begun(Start.IN_FLIGHT, found)

    def rename_scope(self, old, new):
        """Move idempotency keys stored under `old` (an API key's hash, before owner names)
        to the owner name `new`, so a retry across an upgrade still finds its key."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE idempotency_keys SET scope = ? WHERE scope = ? AND NOT EXISTS (SELECT 1"
                " FROM idempotency_keys k WHERE k.scope = ? AND k.key = idempotency_keys.key)",
                (new, old, new))
        return cur.rowcount

    def prune_idempotency(self):
        """Forget keys older than the retention window, and the marks of spool entries
        applied more than APPLIED_KEEP_S ago (their spools were emptied long since); the
        payments themselves stay."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?",
                               (self._clock() - IDEMPOTENCY_TTL_S,))
            conn.execute("DELETE FROM applied_entries WHERE applied_at < ?",
                         (self._clock() - APPLIED_KEEP_S,))
        return cur.rowcount

    def mark_accepted(self, tx_id, checkout_request_id, merchant_request_id, *, at=None,
                      pin=None, once=None):
        """Daraja queued the prompt: `submitting` becomes `pending` with Daraja's ids, dated
        `at` (epoch; default now). A result that already arrived is kept (its ids are
        learnt if unset). `pin`: a PinnedAnswer stored in the same commit when the row
        went from `submitting` to `pending` here, the row its bytes were made from; when a
        result came first, nothing is pinned and a retry is answered from the row.

        Recorded late (from the spool, `once` its entry's id) on a row that recovery has
        meanwhile called `unknown`/`interrupted`: the row learns its ids and is named for
        what happened (`ledger_unavailable`), so the reconciler can query it."""
        stamp = iso_utc(self._clock() if at is None else at)
        with self._write(step="mark_accepted") as conn:
            if not self._first_time(conn, once):  # (a spooled answer's: read as it goes)
                return self._row(conn, tx_id)
            # From submitting, the row becomes pending; a result that beat the push's
            # answer is kept, and the row learns the ids. (SET reads the row as it was.)
            accepted = conn.execute(
                "UPDATE transactions SET status = CASE WHEN status = ? THEN ? ELSE status END,"
                " checkout_request_id = COALESCE(checkout_request_id, ?),"
                " merchant_request_id = COALESCE(merchant_request_id, ?),"
                " reason = CASE WHEN status = ? AND reason = 'interrupted'"
                " AND checkout_request_id IS NULL THEN 'ledger_unavailable' ELSE reason END,"
                " updated_at = CASE WHEN status = ? THEN ? ELSE ? END WHERE id = ? RETURNING *",
                (SUBMITTING, PENDING, checkout_request_id, merchant_request_id, UNKNOWN,
                 SUBMITTING, stamp, self._now(), tx_id))
            # Pinned only if the row went from submitting to pending just now: it is
            # pending with these ids (nothing else makes a row pending).
            self._pin(conn, pin, only_if="status_code IS NULL AND EXISTS (SELECT 1 FROM"
                      " transactions WHERE id = ? AND status = ? AND checkout_request_id = ?)",
                      only_if_args=(tx_id, PENDING, checkout_request_id))
        row = accepted.fetchone()
        return dict(row) if row is not None else None

    @staticmethod
    def _row(conn, tx_id):
        row = conn.execute("SELECT * FROM transactions WHERE id = ?", (tx_id,)).fetchone()
        return dict(row) if row is not None else None

    def pin_answer(self, pin):
        """Store a keyed request's answer (a PinnedAnswer) unless its key has one already:
        for a push whose row a result reached before Daraja's answer was recorded."""
        with self._write() as conn:
            conn.execute(
                "UPDATE idempotency_keys SET status_code = ?, body = ? WHERE scope = ? AND"
                " key = ? AND tx_id = ? AND status_code IS NULL",
                (pin.status_code, pin.body, pin.idempotency.scope, pin.idempotency.key,
                 pin.tx_id))

    @staticmethod
    def _pin(conn, pin, only_if=None, only_if_args=()):
        """Store a PinnedAnswer (if any) for its key, in this commit; `only_if`: SQL that
        must hold too (with its arguments)."""
        if pin is not None:
            conn.execute(
                "UPDATE idempotency_keys SET status_code = ?, body = ? WHERE scope = ? AND"
                " key = ? AND tx_id = ?" + (f" AND {only_if}" if only_if else ""),
                (pin.status_code, pin.body, pin.idempotency.scope, pin.idempotency.key,
                 pin.tx_id, *only_if_args))

    def mark_not_accepted(self, tx_id, status, reason, result_code=None, result_desc=None, *,
                          at=None, release=None, pin=None, once=None):
        """The push was refused (`rejected`) or its fate is unknown (`unknown`), dated `at`
        (epoch; default now), with its webhook event, in one commit.

        `release`: an Idempotency whose key is freed in the same commit, because
        nothing reached the customer and the merchant may retry with that key.
        `pin`: the idempotent answer, stored when the row was still `submitting` (as for
        mark_accepted). Recorded late (from the spool, `once` its entry's id) on a row that
        recovery called `unknown`/`interrupted` meanwhile: the row takes what happened.
        """
        stamp = iso_utc(self._clock() if at is None else at)
        with self._write() as conn:
            if not self._first_time(conn, once):
                return self._row(conn, tx_id)
            row = conn.execute(
                "UPDATE transactions SET status = ?, reason = ?, result_code = ?, result_desc = ?,"
                " updated_at = ? WHERE id = ? AND status = ? RETURNING *",
                (status, reason, result_code, result_desc, stamp, tx_id,
                 SUBMITTING)).fetchone()
            if row is not None:
                self._add_event(conn, dict(row, status=SUBMITTING), dict(row), "not_accepted")
                self._pin(conn, pin)
            else:  # a result (or recovery) beat the push's answer
                row = self._row(conn, tx_id)
                if row is not None and (row["status"], row["reason"]) == (UNKNOWN, "interrupted"):
                    # Recovery guessed; this is what happened.
                    before, row = row, dict(conn.execute(
                        "UPDATE transactions SET status = ?, reason = ?, result_code = ?,"
                        " result_desc = ?, updated_at = ? WHERE id = ? RETURNING *",
                        (status, reason, result_code, result_desc, self._now(),
                         tx_id)).fetchone())
                    if row["status"] != before["status"]:
                        self._add_event(conn, before, row, "not_accepted")
            if release is not None:
                # Only while the key names this payment: a late replay must not free a
                # key a newer request took after the first was released.
                conn.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ?"
                             " AND tx_id = ?", (release.scope, release.key, tx_id))
        return dict(row) if row is not None else None

    def learn_checkout_request_id(self, tx_id, checkout_request_id):
        """An operator's fix for a row whose push Daraja accepted but whose CheckoutRequestID
        the ledger never learnt (the merchant's 202 carried it): learn it, if the row is
        `unknown` (a push in flight is never taught: its own answer or callback will tell),
        has none, and no other row holds it; `interrupted` becomes `ledger_unavailable`.
        The row after, or None."""
        with self._write() as conn:
            row = conn.execute(
                "UPDATE transactions SET checkout_request_id = ?, updated_at = ?,"
                " reason = CASE reason WHEN 'interrupted' THEN 'ledger_unavailable'"
                " ELSE reason END WHERE id = ? AND checkout_request_id IS NULL AND status = ?"
                " AND NOT EXISTS (SELECT 1 FROM transactions o WHERE o.checkout_request_id = ?)"
                " RETURNING *",
                (checkout_request_id, self._now(), tx_id, UNKNOWN,
                 checkout_request_id)).fetchone()
        return dict(row) if row is not None else None

    def get(self, ref):
        """The row by gateway id or CheckoutRequestID, as a dict, or None."""
        return self._read_one(
            "SELECT * FROM transactions WHERE id = ? UNION ALL"
            " SELECT * FROM transactions WHERE checkout_request_id = ? LIMIT 1", (ref, ref))

    def recover_interrupted(self, older_than_s):
        """Rows stuck in `submitting` (the process died mid-push) become `unknown`, each
        with its webhook event in the same commit."""
        cutoff = iso_utc(self._clock() - older_than_s)
        with self._write() as conn:
            rows = conn.execute(
                "UPDATE transactions SET status = ?, reason = 'interrupted', updated_at = ?"
                " WHERE status = ? AND created_at <= ? RETURNING *",
                (UNKNOWN, self._now(), SUBMITTING, cutoff)).fetchall()
            for row in sorted(rows, key=lambda r: r["id"]):
                self._add_event(conn, dict(row, status=SUBMITTING), dict(row), "interrupted")
        if rows:
            log.warning("ledger recovered_interrupted=%d status=unknown", len(rows))
        return len(rows)

    # --- reconciliation ---------------------------------------------------

    def claim_next(self, *, older_than_s, lease_s, unknown_window_s, due_by=None):
        """Lease the one row most due for an STK query to this caller, or return None.

        Due: `pending` rows older than `older_than_s`, and `unknown` rows with a
        CheckoutRequestID younger than `unknown_window_s` (a lost callback may still be
        found). A leased row is invisible to other claimers until the lease ends, so two
        processes never query the same row at once; a crashed claimer's lease lapses.
        `due_by`: only rows due by then (a pass gives its start, so a row it rescheduled
        waits for the next pass).
        """
        now = self._clock()
        due_by = now if due_by is None else min(due_by, now)
        with self._write(step="claim_next") as conn:
            claimed = conn.execute(
                "UPDATE transactions SET claimed_until = ? WHERE id = (SELECT id FROM"
                " transactions WHERE checkout_request_id IS NOT NULL"
                " AND next_check_at <= ? AND claimed_until <= ?"
                " AND ((status = ? AND created_at <= ?) OR (status = ? AND created_at >= ?))"
                f" ORDER BY next_check_at, created_at LIMIT 1{self.dialect.skip_locked})"
                " RETURNING *",
                (now + lease_s, due_by, now, PENDING, iso_utc(now - older_than_s), UNKNOWN,
                 iso_utc(now - unknown_window_s)))
        row = claimed.fetchone()
        return dict(row) if row is not None else None

    def claim(self, tx_id, lease_s):
        """Lease one row now, whatever its schedule; None if another claimer holds it (or it
        does not exist). The row's `claimed_until` is the lease: pass it back to release."""
        now = self._clock()
        with self._write(step="claim") as conn:
            claimed = conn.execute("UPDATE transactions SET claimed_until = ? WHERE id = ?"
                                   " AND claimed_until <= ? RETURNING *",
                                   (now + lease_s, tx_id, now))
        row = claimed.fetchone()
        return dict(row) if row is not None else None

    def reschedule(self, tx_id, next_check_at, lease):
        """Not settled yet: query again at `next_check_at`; the lease ends. Only while the
        lease is still this claimer's: if it lapsed and another took the row, it decides."""
        with self._write() as conn:
            conn.execute(
                "UPDATE transactions SET next_check_at = ?, check_attempts = check_attempts + 1,"
                " claimed_until = 0 WHERE id = ? AND claimed_until = ?",
                (next_check_at, tx_id, lease))

    def give_up(self, tx_id, next_check_at, lease):
        """No final result before the deadline: `unknown`, reason no_final_result; still
        queried now and then (from `next_check_at`) in case the result turns up. Its
        webhook event is written in the same commit."""
        with self._write() as conn:
            before = conn.execute(
                f"SELECT * FROM transactions WHERE id = ?{self.dialect.for_update}",
                (tx_id,)).fetchone()
            row = conn.execute(
                "UPDATE transactions SET status = ?, reason = 'no_final_result', claimed_until = 0,"
                " next_check_at = ?, check_attempts = check_attempts + 1, updated_at = ?"
                " WHERE id = ? AND status = ? AND claimed_until = ? RETURNING *",
                (UNKNOWN, next_check_at, self._now(), tx_id, PENDING, lease)).fetchone()
            if row is not None:
                self._add_event(conn, dict(before), dict(row), "gave_up")
        return row is not None

    def list_page(self, *, status=None, since=None, after=None, limit=50, owner=None,
                  with_unowned=False, statuses=None, until=None, reference=None,
                  receipt=None, phone=None):
        """Newest first; `after` = (created_at, id) of the previous page's last row;
        `owner`: only that owner's rows (and, `with_unowned`, rows from before owners).
        Filters: `status` or `statuses` (public names: pending includes `submitting`),
        `since`/`until` (ISO-8601 UTC bounds on creation, until excluded), `reference`
        (any case), `receipt`, `phone` (its last 1 to 3 digits, or the whole 254… number).

        Returns (rows, more): the page and whether another page follows.
        """
        where, args = [], []
        if owner is not None:
            where.append("(owner = ? OR owner IS NULL)" if with_unowned else "owner = ?")
            args.append(owner)
        wanted = set(statuses or ()) | ({status} if status is not None else set())
        if wanted:
            if PENDING in wanted:
                wanted.add(SUBMITTING)
            where.append(f"status IN ({','.join('?' * len(wanted))})")
            args.extend(sorted(wanted))
        for test, value in (("created_at >= ?", since), ("created_at < ?", until),
                            ("lower(trim(reference)) = ?",
                             reference.strip().lower() if reference else None),
                            ("receipt = ?", receipt),
                            ("phone = ?" if phone and len(phone) == 12 else "phone LIKE ?",
                             phone if phone and len(phone) == 12
                             else f"%{phone}" if phone else None)):
            if value is not None:
                where.append(test)
                args.append(value)
        if after is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args.extend([after[0], after[0], after[1]])
        sql = "SELECT * FROM transactions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        rows = self._read(sql, (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    def daily_totals(self, since, *, owner=None):
        """Payments made since `since` (ISO-8601 UTC) by day (UTC) and public status:
        [{day, status, n, amount}]."""
        scope = self._owner_scope(owner)
        rows = self._read(
            "SELECT substr(created_at, 1, 10) AS day, status, COUNT(*) AS n,"
            f" COALESCE(SUM(amount), 0) AS amount FROM transactions WHERE created_at >= ?{scope}"
            " GROUP BY substr(created_at, 1, 10), status ORDER BY day",
            (since, *([owner] if owner else [])))
        merged = {}
        for r in rows:  # `submitting` is shown as pending, as in the API
            key = (r["day"], PENDING if r["status"] == SUBMITTING else r["status"])
            n, amount = merged.get(key, (0, 0))
            merged[key] = (n + int(r["n"]), amount + int(r["amount"]))
        return [{"day": d, "status": st, "n": n, "amount": a}
                for (d, st), (n, a) in sorted(merged.items())]

    @staticmethod
    def _owner_scope(owner):
        """The SQL that keeps a payments query to `owner`'s rows (the default owner's
        include rows from before owners)."""
        if owner is None:
            return ""
        return " AND (owner = ? OR owner IS NULL)" if owner == "default" else " AND owner = ?"

    def timeline_of(self, tx_id):
        """What the ledger holds about one payment besides its row: its callbacks (bodies
        as stored), its webhook events with their attempts, its refund requests, and the
        results of those, each list oldest first."""
        events = self._read("SELECT * FROM events WHERE tx_id = ? ORDER BY created_at, id",
                            (tx_id,))
        for event in events:
            event["attempts_log"] = self._read(
                "SELECT * FROM event_attempts WHERE event_id = ? ORDER BY id", (event["id"],))
        requests = self._read("SELECT * FROM initiator_requests WHERE tx_id = ?"
                              " ORDER BY requested_at, id", (tx_id,))
        results = self._read(
            "SELECT r.* FROM initiator_results r JOIN initiator_requests q ON q.id ="
            " r.request_id WHERE q.tx_id = ? ORDER BY r.id", (tx_id,)) if requests else []
        return {"callbacks": self._read("SELECT * FROM callbacks WHERE tx_id = ? ORDER BY id",
                                        (tx_id,)),
                "events": events, "requests": requests, "results": results}

    def attention(self, *, owner=None, pending_before=None, limit=20):
        """What needs a person: `unknown` payments and payments still pending that were
        made before `pending_before` (ISO-8601 UTC), newest first (at most `limit` each,
        with their counts); webhook events that could not be delivered (dead, or pending
        after a failed attempt) by owner; and the receipts to look at, with their count."""
        scope, owner_args = (self._owner_scope(owner), [owner] if owner is not None else [])
        found = {}
        for name, test, args in (
                ("unknown", "status = ?", [UNKNOWN]),
                ("late", "status IN (?, ?) AND created_at < ?",
                 [PENDING, SUBMITTING, pending_before or ""])):
            found[name] = self._read(f"SELECT * FROM transactions WHERE {test}{scope}"
                                     " ORDER BY created_at DESC LIMIT ?",
                                     (*args, *owner_args, limit))
            found[name + "_count"] = self._read_one(
                f"SELECT COUNT(*) AS n FROM transactions WHERE {test}{scope}",
                (*args, *owner_args))["n"]
        plain = " AND owner = ?" if owner is not None else ""  # (these rows always have one)
        found["webhooks"] = self._read(
            "SELECT owner, SUM(CASE WHEN status = 'dead' THEN 1 ELSE 0 END) AS dead,"
            " SUM(CASE WHEN status = 'pending' AND attempts > 0 THEN 1 ELSE 0 END)"
            f" AS failing FROM events WHERE (status = 'dead' OR (status = 'pending' AND"
            f" attempts > 0)){plain} GROUP BY owner ORDER BY owner", tuple(owner_args))
        found["receipts"], found["receipts_count"] = self.receipts_to_look_at(
            owner=owner, limit=limit)
        return found

    def receipts_to_look_at(self, *, owner=None, limit=20):
        """Paybill receipts no payment claims, and any with anomalies (a Till payment names
        no payment: not one of them), newest first: (at most `limit` rows, their count)."""
        plain, args = (" AND owner = ?", [owner]) if owner is not None else ("", [])
        look = "((matched_tx_id IS NULL AND channel = 'paybill') OR anomalies <> '')" + plain
        rows = self._read(f"SELECT * FROM c2b_receipts WHERE {look}"
                          " ORDER BY received_at DESC LIMIT ?", (*args, limit))
        count = self._read_one(f"SELECT COUNT(*) AS n FROM c2b_receipts WHERE {look}",
                               tuple(args))["n"]
        return rows, int(count)

    def count_by_status(self):
        """Counts by public status: `submitting` is shown as `pending`, as in the API."""
        rows = self._read("SELECT status, COUNT(*) AS n FROM transactions GROUP BY status")
        counts = {r["status"]: r["n"] for r in rows}
        if SUBMITTING in counts:
            counts[PENDING] = counts.get(PENDING, 0) + counts.pop(SUBMITTING)
        return counts

    # --- settling: callbacks and query answers ----------------------------

    SETTLE_COLUMNS = ("status", "reason", "result_code", "result_desc", "receipt",
                      "checkout_request_id", "merchant_request_id")

    def settle(self, tx_id, rules, *, receipt=None, checkout_request_id=None, callback=None,
               release_claim=None, once=None):
        """In one write transaction: read the row and which payment already holds `receipt`
        (the outcome's M-Pesa receipt, if any), let `rules(row, holder)` decide (a Decision
        from settlement; None: the callback is malformed), apply its changes (a receipt it
        sets is taken for this payment: a receipt pays once), store the raw `callback` (its
        body, remote_addr and received_at) if given, end the lease `release_claim` if the
        row is still held under it, and write the webhook event of a status change, all in one
        commit. `once`: a spool entry's id; if it was applied already, nothing is done.
        `checkout_request_id`: the outcome's, so the row after can be known before it is
        written (another row holding it means the row does not learn it).

        Two round trips on PostgreSQL: the reads (the row locked FOR UPDATE), then every
        write with COMMIT. The event is made from the row as the changes will leave it,
        which the lock makes certain; the changes and the event are written only while
        the receipt is this payment's, so a receipt another host took meanwhile leaves
        the row alone and stores the callback as an anomaly.

        Returns (outcome, row after): outcome is the decision's, or malformed,
        unknown_transaction or already_applied; row is None for an unknown transaction.
        """
        with self._write(step="settle_callback" if callback is not None else "settle") as conn:
            if not self._first_time(conn, once):  # (a spooled callback's: read as it goes)
                row = self._row(conn, tx_id)
                return "already_applied", row
            # One statement reads all it needs: the row (locked), which payment holds the
            # receipt (only a Paybill confirmation of it: nobody, as its result takes it
            # over), and whether another row holds the CheckoutRequestID.
            found = conn.execute(
                "SELECT t.*, (SELECT r.tx_id FROM receipts r WHERE r.receipt = ? AND"
                " r.kind = 'stk') AS settle_holder, EXISTS (SELECT 1 FROM transactions o"
                " WHERE o.checkout_request_id = ? AND o.id <> t.id) AS settle_cid_taken"
                f" FROM transactions t WHERE t.id = ?{self.dialect.for_update}",
                (receipt, checkout_request_id, tx_id)).fetchone()  # one round trip
            row = holder = cid_taken = None
            if found is not None:
                row = dict(found)
                holder, cid_taken = row.pop("settle_holder"), bool(row.pop("settle_cid_taken"))
            decision = changed = held = None
            if row is None:
                outcome = "unknown_transaction"
            elif rules is None:
                outcome = "malformed"
            else:
                before = row
                decision = rules(row, holder)
                outcome = decision.outcome
                if decision.changes:
                    taking = decision.changes.get("receipt")
                    if taking is not None:
                        held = self._take_receipt(conn, taking, tx_id)
                    row = self._predicted(before, decision.changes, self._now(), cid_taken)
                    changed = self._update(conn, tx_id, before, row, held)
                    if row["status"] != before["status"]:
                        self._add_event(conn, before, row, outcome, only_if=held)
            if callback is not None:
                # Stored with the decision's outcome, or `anomaly` if the receipt turned out
                # to be another payment's.
                received = getattr(callback, "received_at", None)
                conn.execute(
                    "INSERT INTO callbacks (tx_id, received_at, remote_addr, outcome, body)"
                    " VALUES (?, ?, ?, "
                    + (f"CASE WHEN {self.HELD} THEN ? ELSE 'anomaly' END" if held else "?")
                    + ", ?)",
                    (tx_id, self._now() if received is None else iso_utc(received),
                     callback.remote_addr, *(held or ()), outcome, callback.body))
            if release_claim is not None and row is not None:
                conn.execute("UPDATE transactions SET claimed_until = 0 WHERE id = ?"
                             " AND claimed_until = ?", (tx_id, release_claim))
        if changed is not None:
            after = changed.fetchone()
            if after is None:
                # Another payment took the receipt between the two trips (the callback is
                # stored as an anomaly): decided again as what it is, receipt_reused.
                return rules(before, self.ANOTHER_PAYMENT).outcome, before
            if dict(after) != row:
                log.error("ledger settle tx=%s: the row written differs from the one its"
                          " event was made from", tx_id)
            row = dict(after)
        return outcome, (dict(row) if row is not None else None)

    def _predicted(self, before, changes, stamp, cid_taken):
        """The row settle's `changes` leave, dated `stamp`, known before it is written (the
        row is locked): a receipt, a MerchantRequestID or a CheckoutRequestID is kept once
        set, the last learnt only if no other row holds it (`cid_taken`)."""
        after = dict(before)
        for column, value in changes.items():
            if column not in self.SETTLE_COLUMNS:
                raise ValueError(f"settle cannot change {column}")
            if column == "receipt":
                after[column] = value if value is not None else before[column]
            elif column == "checkout_request_id":
                after[column] = before[column] if before[column] is not None else (
                    None if cid_taken else value)
            elif column == "merchant_request_id":
                after[column] = before[column] if before[column] is not None else value
            else:
                after[column] = value
        after["updated_at"] = stamp
        return after

    ANOTHER_PAYMENT = "another payment"  # a receipt's holder, when not this payment

    # The receipt is this payment's (after _take_receipt): arguments receipt, tx_id.
    HELD = "EXISTS (SELECT 1 FROM receipts WHERE receipt = ? AND tx_id = ? AND kind = 'stk')"

    def _take_receipt(self, conn, receipt, tx_id):
        """Take `receipt` for `tx_id` unless another payment holds it; a Paybill
        confirmation of this very payment that came first gives it up: the receipt is the
        payment's (stk), never a second one. Nothing is read: returns the arguments of
        HELD, the condition the writes that follow carry (another host may have taken the
        receipt since it was read)."""
        held = (receipt, tx_id)
        conn.execute("INSERT INTO receipts (receipt, tx_id, kind, created_at) VALUES"
                     " (?, ?, 'stk', ?) ON CONFLICT (receipt) DO UPDATE SET tx_id ="
                     " excluded.tx_id, kind = 'stk' WHERE receipts.kind = 'c2b'",
                     (receipt, tx_id, self._clock()))
        # A Paybill receipt exists only while its number is kind c2b: once taken over, its
        # row goes, and its receipt.received, if not sent yet, would announce this money twice.
        conn.execute(f"DELETE FROM c2b_receipts WHERE receipt = ? AND {self.HELD}",
                     (receipt, *held))
        conn.execute("DELETE FROM events WHERE tx_id = ? AND type = 'receipt.received'"
                     f" AND status = 'pending' AND attempts = 0 AND claimed_until <= ?"
                     f" AND {self.HELD}", (receipt, self._clock(), *held))
        return held

    # --- Paybill and Till confirmations (C2B) ---------------------------------

    C2B_COLUMNS = ("receipt", "amount", "account", "shortcode", "channel", "paid_at",
                   "payer_name", "msisdn", "anomalies", "owner", "matched_tx_id", "received_at")

    def record_confirmation(self, confirmation, *, raw, remote_addr, received_at=None,
                            once=None):
        """In one commit: the raw body (always: Daraja never resends), and, when it names a
        receipt nobody holds, that receipt as a Paybill/Till one, matched and owned by the
        ledger's ReceiptRules, with its event. Idempotent on the receipt number, which
        STK receipts share: an STK payment's own receipt stays its. `confirmation`: a
        c2b.Confirmation, or None for a body that names no receipt. `once`: a spool entry's
        id. Returns the outcome: received, duplicate (the receipt is already a
        confirmation's), stk_receipt (an STK payment's), malformed or already_applied (the
        spool entry was)."""
        received = self._now() if received_at is None else iso_utc(received_at)
        with self._write() as conn:
            if not self._first_time(conn, once):
                return "already_applied"
            outcome = "malformed" if confirmation is None else self._take_c2b_receipt(
                conn, confirmation, received, self._receipt_rules)
            conn.execute("INSERT INTO c2b_bodies (receipt, received_at, remote_addr, outcome,"
                         " body) VALUES (?, ?, ?, ?, ?)",
                         (confirmation.receipt if confirmation else None, received,
                          remote_addr, outcome, raw))
        return outcome

    def _take_c2b_receipt(self, conn, c, received, rules):
        taken = conn.execute("INSERT INTO receipts (receipt, tx_id, kind, created_at) VALUES"
                             " (?, '', 'c2b', ?) ON CONFLICT (receipt) DO NOTHING"
                             " RETURNING receipt", (c.receipt, self._clock())).fetchone()
        if taken is None:
            holder = conn.execute("SELECT kind FROM receipts WHERE receipt = ?",
                                  (c.receipt,)).fetchone()
            return "stk_receipt" if holder["kind"] == "stk" else "duplicate"
        anomalies, candidates = list(c.anomalies), []
        if c.channel == "paybill" and "other_shortcode" not in anomalies:
            candidates = self._payments_referenced(
                lambda sql, args: conn.execute(sql, args).fetchall(), c.account, rules)
            if len(candidates) > 1:
                anomalies.append("ambiguous_reference")
        if len(candidates) == 1:  # that payment's, and its owner's
            owner, matched = candidates[0]["owner"] or "default", candidates[0]["id"]
            if c.amount is not None and c.amount != candidates[0]["amount"]:
                anomalies.append("amount_differs")
        else:
            owner, matched = (rules.owner_for or (lambda _: "default"))(c.account), None
        row = dict(zip(self.C2B_COLUMNS, (
            c.receipt, c.amount, c.account, c.shortcode, c.channel, c.paid_at, c.payer_name,
            c.msisdn, ",".join(anomalies), owner, matched, received)))
        conn.execute(f"INSERT INTO c2b_receipts ({', '.join(self.C2B_COLUMNS)})"
                     f" VALUES ({', '.join('?' * len(self.C2B_COLUMNS))})", tuple(row.values()))
        new = rules.event(row) if rules.event is not None else None
        if new is not None:
            self._write_event(conn, new)
        return "received"

    def _payments_referenced(self, query, account, rules):
        """The recent payments (two at most: one is a match, two are ambiguous) whose
        reference is `account`, any case; never by the default reference. `query(sql,
        args)`: the rows, inside a write or as a read."""
        account = account.strip()
        if not account or account.lower() == rules.default_reference.lower():
            return []
        # An account a prefix gives to an owner matches only that owner's payments.
        owner = (rules.owner_for or (lambda _: None))(account)
        scoped = " AND COALESCE(owner, 'default') = ?" if owner != "default" and owner else ""
        return query("SELECT id, owner, amount FROM transactions"
                     " WHERE lower(trim(reference)) = ? AND created_at >= ?"
                     f" AND status != 'rejected'{scoped} ORDER BY created_at LIMIT 2",
                     (account.lower(), iso_utc(self._clock() - rules.recent_s),
                      *([owner] if scoped else [])))

    def payments_referenced(self, account):
        """The recent payments, two at most, whose reference is `account` (a validation
        request asks before any money moves): read, no write."""
        return [dict(r) for r in self._payments_referenced(self._read, account,
                                                          self._receipt_rules)]

    def c2b_receipt(self, receipt):
        """A Paybill/Till receipt the ledger keeps, as a dict, or None."""
        rows = self._read("SELECT * FROM c2b_receipts WHERE receipt = ?", (receipt,))
        return dict(rows[0]) if rows else None

    def receipts_page(self, *, owner=None, reference=None, since=None, until=None,
                      channel=None, receipt=None, after=None, limit=50):
        """Every receipt, newest first: Paybill/Till ones and succeeded STK payments', in one
        view. `owner`: only that owner's; `reference`: the account number or the payment's
        reference, any case; `since`/`until`: ISO-8601 UTC bounds on when it was kept;
        `channel`: stk or c2b; `receipt`: that one; `after`: the (at, receipt) of the
        previous page's last.
        Returns (rows, more)."""
        where, args = [], []
        for column, value, test in (("owner", owner, "owner = ?"),
                                    ("reference", reference, "lower(reference) = ?"),
                                    ("since", since, "at >= ?"), ("until", until, "at < ?"),
                                    ("channel", channel, "channel = ?"),
                                    ("receipt", receipt, "receipt = ?")):
            if value is not None:
                where.append(test)
                args.append(value.lower() if column == "reference" else value)
        if after is not None:
            where.append("(at < ? OR (at = ? AND receipt < ?))")
            args.extend([after[0], after[0], after[1]])
        sql = (f"SELECT * FROM ({RECEIPTS_VIEW}) r" + (" WHERE " + " AND ".join(where)
                                                       if where else "")
               + " ORDER BY at DESC, receipt DESC LIMIT ?")
        rows = [dict(r) for r in self._read(sql, (*args, limit + 1))]
        return rows[:limit], len(rows) > limit

    def receipts_of(self, tx_id):
        """The Paybill/Till receipts matched to a payment, oldest first."""
        return [dict(r) for r in self._read(
            f"SELECT * FROM ({RECEIPTS_VIEW}) r WHERE channel = 'c2b' AND tx_id = ?"
            " ORDER BY at, receipt", (tx_id,))]

    def _first_time(self, conn, once):
        """Record spool entry `once` as applied in this commit; False if it already was."""
        if once is None:
            return True
        return conn.execute("INSERT INTO applied_entries (id, applied_at) VALUES (?, ?)"
                            " ON CONFLICT (id) DO NOTHING RETURNING id",
                            (once, self._clock())).fetchone() is not None

    def _update(self, conn, tx_id, before, after, held=None):
        """Write `after`, the row `_predicted` made (the lock makes it certain), over
        `before`: its changed columns and updated_at, RETURNING it for the caller to read.
        A CheckoutRequestID is learnt only while no other row holds it (it is UNIQUE);
        `held`: HELD's arguments (receipt, tx_id), which the change also needs."""
        sets, args = [], []
        for column in self.SETTLE_COLUMNS:
            if after[column] == before[column]:
                continue
            if column == "checkout_request_id":
                sets.append("checkout_request_id = (SELECT ? WHERE NOT EXISTS (SELECT 1 FROM"
                            " transactions WHERE checkout_request_id = ?))")
                args += [after[column]] * 2
            else:
                sets.append(f"{column} = ?")
                args.append(after[column])
        sets.append("updated_at = ?")
        return conn.execute(f"UPDATE transactions SET {', '.join(sets)} WHERE id = ?"
                            + (f" AND {self.HELD}" if held else "") + " RETURNING *",
                            (*args, after["updated_at"], tx_id, *(held or ())))

    def _add_event(self, conn, before, after, outcome, only_if=None):
        """The webhook event of a status change (the `events` hook's), in this commit;
        `only_if`: the HELD arguments it also needs."""
        new = self._events(before, after, outcome) if self._events is not None else None
        if new is not None:
            self._write_event(conn, new, only_if)

    def _write_event(self, conn, new, only_if=None):
        """A NewEvent into the outbox, in this commit (`only_if`: HELD's arguments)."""
        now = self._clock()
        conn.execute(
            "INSERT INTO events (id, tx_id, owner, type, body, status, next_attempt_at,"
            " created_at) SELECT ?, ?, ?, ?, ?, 'pending', ?, ?"
            + (f" WHERE {self.HELD}" if only_if else ""),
            (new_tx_id(now, "msg_"), new.tx_id, new.owner, new.type, new.body, now, now,
             *(only_if or ())))

    # --- initiator requests: refunds, code checks, the balance -------------------

    def begin_request(self, new):
        """In one write transaction, a NewRequest: honour its idempotency key, refuse it
        while its initiator is stopped, find the request that already answers it, or
        commit it `submitting`. Returns a Begun: NEW (the row: call Daraja), REPLAY (the
        key's first answer), IN_FLIGHT (the key's first request is not answered yet),
        REUSED (the key named another request), EXISTS (the row that answers it: the
        refund under way or done, the check under way, the recent balance query), STOPPED
        (the stop's row)."""
        now = self._clock()
        stamp, idem = iso_utc(now), new.idempotency
        with self._write() as conn:
            self._serialize(conn, ([f"key:{idem.scope}:{idem.key}"] if idem else [])
                            + [f"initiator:{new.kind}:{new.receipt or ''}"])
            if idem is not None:
                found = conn.execute("SELECT * FROM initiator_requests WHERE owner = ? AND"
                                     " idem_key = ?", (new.owner, idem.key)).fetchone()
                if found is not None:
                    found = dict(found)
                    if found["request_hash"] != idem.request_hash:
                        return Begun(Start.REUSED, found)
                    if found["answer_status"] is None:
                        return Begun(Start.IN_FLIGHT, found)
                    return Begun(Start.REPLAY, found, found["answer_status"],
                                 bytes(found["answer_body"]))
            stop = conn.execute("SELECT * FROM initiator_stops WHERE fingerprint = ?",
                                (new.fingerprint,)).fetchone()
            if stop is not None:
                return Begun(Start.STOPPED, dict(stop))
            existing = self._answering(conn, new, now)
            if existing is None:
                proving = self._proving(conn, new.fingerprint, now)
                if proving is not None:
                    return Begun(Start.PROVING, proving)
            if existing is not None and new.retry and existing["status"] == UNKNOWN:
                # An operator's explicit retry of a refund whose fate is unknown: the same
                # request is sent again (Daraja answers R000001 if it was done).
                return Begun(Start.NEW, dict(conn.execute(
                    "UPDATE initiator_requests SET status = ?, reason = NULL,"
                    " attempts = attempts + 1, idem_key = ?, request_hash = ?,"
                    " answer_status = NULL, answer_body = NULL, fingerprint = ?,"
                    " updated_at = ? WHERE id = ? RETURNING *",
                    (SUBMITTING, idem.key if idem else None, idem.request_hash if idem else None,
                     new.fingerprint, stamp, existing["id"])).fetchone()))
            if existing is not None:
                return Begun(Start.EXISTS, existing)
            row = dict(id=new_tx_id(now, "rq_"), kind=new.kind, owner=new.owner,
                       receipt=new.receipt, tx_id=new.tx_id, amount=new.amount,
                       status=SUBMITTING, idem_key=idem.key if idem else None,
                       request_hash=idem.request_hash if idem else None,
                       fingerprint=new.fingerprint, requested_at=stamp, updated_at=stamp)
            return Begun(Start.NEW, dict(conn.execute(
                f"INSERT INTO initiator_requests ({', '.join(row)}) VALUES"
                f" ({', '.join(':' + c for c in row)}) RETURNING *", row).fetchone()))

    def _proving(self, conn, fingerprint, now):
        """While no Daraja result has yet said that this initiator configuration's
        credential works, one request at a time (any kind, any host): a wrong credential
        then costs one refusal, not a burst that locks the operator. The request in flight
        (its row), or None."""
        self._serialize(conn, [f"initiator:{fingerprint}"])
        proven = conn.execute(
            "SELECT 1 FROM initiator_requests WHERE fingerprint = ? AND result_code IS NOT"
            f" NULL AND result_code NOT IN ({','.join('?' * len(self.STOP_CODES))})"
            " AND status IN ('succeeded', 'failed') LIMIT 1",
            (fingerprint, *self.STOP_CODES)).fetchone()
        if proven is not None:
            return None
        waiting = conn.execute(
            "SELECT * FROM initiator_requests WHERE fingerprint = ? AND status IN (?, ?)"
            " AND requested_at >= ? ORDER BY requested_at LIMIT 1",
            (fingerprint, SUBMITTING, PENDING, iso_utc(now - self.PROVING_WAIT_S))).fetchone()
        return dict(waiting) if waiting is not None else None

    # Result codes that refuse the initiator itself (initiator.STOP_CODES: the gateway's
    # word; the ledger only needs to know they prove nothing).
    STOP_CODES = ("2001", "8006", "18", "20")
    PROVING_WAIT_S = 120  # a first request whose result has not come by then no longer holds

    @staticmethod
    def _answering(conn, new, now):
        """The request that already answers `new`, or None: a refund of the receipt that is
        not a definite failure; a check of the code by the same owner still under way; a
        balance query made within `min_interval_s`."""
        if new.kind == "refund":
            sql, args = ("SELECT * FROM initiator_requests WHERE kind = 'refund' AND receipt = ?"
                         " AND status <> 'failed'", (new.receipt,))
        elif new.kind == "verify":
            sql, args = ("SELECT * FROM initiator_requests WHERE kind = 'verify' AND receipt = ?"
                         " AND owner = ? AND status IN (?, ?) ORDER BY requested_at DESC"
                         " LIMIT 1", (new.receipt, new.owner, SUBMITTING, PENDING))
        else:
            sql, args = ("SELECT * FROM initiator_requests WHERE kind = ? AND requested_at >= ?"
                         " ORDER BY requested_at DESC LIMIT 1",
                         (new.kind, iso_utc(now - new.min_interval_s)))
        row = conn.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def mark_request(self, request_id, status, *, reason=None, result_code=None,
                     result_desc=None, conversation_id=None, originator_conversation_id=None,
                     answer=None, release_key=False):
        """What Daraja answered a request, in one commit with its event: `pending` (it
        acknowledged it: its ids), `failed` (it refused it: nothing was done;
        `release_key` frees the caller's key, as after a refused push), or `unknown` (it
        may have been taken). `answer`: (status code, body bytes), the answer the caller got,
        replayed for their key. A row a result reached first keeps its status and learns
        the ids; one recovery called `unknown`/`interrupted` takes what happened. Returns
        the row after, or None."""
        stamp = self._now()
        with self._write() as conn:
            before = conn.execute(f"SELECT * FROM initiator_requests WHERE id = ?"
                                  f"{self.dialect.for_update}", (request_id,)).fetchone()
            if before is None:
                return None
            before = dict(before)
            takes = before["status"] == SUBMITTING or (
                before["status"], before["reason"]) == (UNKNOWN, "interrupted")
            changes = dict(conversation_id=before["conversation_id"] or conversation_id,
                           originator_conversation_id=before["originator_conversation_id"]
                           or originator_conversation_id, updated_at=stamp)
            if takes and conversation_id:  # this attempt's ids: its result names them
                changes.update(conversation_id=conversation_id,
                               originator_conversation_id=originator_conversation_id)
            if takes:
                changes.update(status=status, reason=reason, result_code=result_code,
                               result_desc=result_desc,
                               completed_at=stamp if status == "failed" else None)
            if release_key:
                changes.update(idem_key=None, request_hash=None)
            elif answer is not None:
                changes.update(answer_status=answer[0], answer_body=answer[1])
            row = self._update_request(conn, request_id, changes)
            self._add_request_event(conn, before, row)
        return row

    @staticmethod
    def _update_request(conn, request_id, changes):
        sets = ", ".join(f"{column} = :{column}" for column in changes)
        return dict(conn.execute(f"UPDATE initiator_requests SET {sets} WHERE id = :request_id"
                                 " RETURNING *", dict(changes, request_id=request_id)).fetchone())

    def _add_request_event(self, conn, before, after):
        if after["status"] != before["status"] and self._request_events is not None:
            new = self._request_events(before, after)
            if new is not None:
                self._write_event(conn, new)

    REQUEST_CHANGES = ("status", "reason", "result_code", "result_desc", "result_receipt",
                       "details", "completed_at")

    def settle_request(self, request_id, decide, *, kind, result, raw, remote_addr,
                       received_at=None, once=None):
        """In one commit: a Result or QueueTimeOut body as it came (always), and, for a
        request still open (submitting, pending or unknown), what `decide(row, kind,
        result)` makes of it: a dict with `outcome`, changes among REQUEST_CHANGES, and
        `stop` (the initiator was refused: stopped under the request's fingerprint), with
        the event of a change. `kind`: result | timeout; `result`: an initiator.Result, or
        None for a body that is not one. `once`: a spool entry's id.
        Returns (outcome, row after): the decision's outcome, or duplicate (already
        settled: nothing changes), malformed, unknown_request (stored as an anomaly, never
        money) or already_applied."""
        received = self._now() if received_at is None else iso_utc(received_at)
        with self._write() as conn:
            if not self._first_time(conn, once):
                return "already_applied", None
            row = conn.execute(f"SELECT * FROM initiator_requests WHERE id = ?"
                               f"{self.dialect.for_update}", (request_id,)).fetchone()
            row = dict(row) if row is not None else None
            if row is None:
                outcome = "unknown_request"
            elif result is None:
                outcome = "malformed"
            elif row["status"] not in REQUEST_ACTIVE:
                outcome = "duplicate"
            else:
                decision = dict(decide(row, kind, result))
                outcome, stop = decision.pop("outcome"), decision.pop("stop", False)
                changes = {c: decision[c] for c in self.REQUEST_CHANGES if c in decision}
                if changes.get("status") in ("succeeded", "failed"):
                    changes.setdefault("completed_at", received)
                before, row = row, self._update_request(
                    conn, request_id, dict(changes, updated_at=received))
                if stop:
                    conn.execute("INSERT INTO initiator_stops (fingerprint, result_code,"
                                 " request_id, at) VALUES (?, ?, ?, ?) ON CONFLICT"
                                 " (fingerprint) DO NOTHING",
                                 (row["fingerprint"], result.code, request_id, self._clock()))
                self._add_request_event(conn, before, row)
            conn.execute("INSERT INTO initiator_results (request_id, kind, received_at,"
                         " remote_addr, outcome, body) VALUES (?, ?, ?, ?, ?, ?)",
                         (request_id, kind, received, remote_addr, outcome, raw))
        return outcome, row

    def settle_stale_requests(self, *, interrupted_after_s, no_result_after_s):
        """Requests whose fate can no longer be learnt by waiting become `unknown` (never
        re-sent), each with its event: `submitting` past `interrupted_after_s` (cut off
        before Daraja answered: interrupted), `pending` past `no_result_after_s` (no result
        came: no_result). Returns how many."""
        now = self._clock()
        stale = ((SUBMITTING, "interrupted", interrupted_after_s),
                 (PENDING, "no_result", no_result_after_s))
        if not any(self._read("SELECT 1 FROM initiator_requests WHERE status = ? AND"
                              " updated_at <= ? LIMIT 1", (status, iso_utc(now - age)))
                   for status, _, age in stale):
            return 0  # the usual case: no write, so no commit each pass
        changed = 0
        with self._write() as conn:
            for status, reason, age in stale:
                rows = conn.execute(
                    f"SELECT * FROM initiator_requests WHERE status = ? AND updated_at <= ?"
                    f"{self.dialect.for_update}", (status, iso_utc(now - age))).fetchall()
                for before in sorted((dict(r) for r in rows), key=lambda r: r["id"]):
                    after = self._update_request(conn, before["id"], dict(
                        status=UNKNOWN, reason=reason, updated_at=iso_utc(now)))
                    self._add_request_event(conn, before, after)
                    changed += 1
        return changed

    def request(self, request_id):
        """One initiator request, as a dict, or None."""
        return self._read_one("SELECT * FROM initiator_requests WHERE id = ?", (request_id,))

    def refund_of(self, receipt):
        """The refund of a receipt that counts: the one under way or done, else the latest
        that failed, else None."""
        return self._read_one(
            "SELECT * FROM initiator_requests WHERE kind = 'refund' AND receipt = ?"
            " ORDER BY CASE WHEN status = 'failed' THEN 1 ELSE 0 END, requested_at DESC, id DESC"
            " LIMIT 1", (receipt,))

    def latest_request(self, kind, *, receipt=None, owner=None, status=None):
        """The newest request of `kind` (of that receipt, owner, status when given)."""
        where, args = ["kind = ?"], [kind]
        for column, value in (("receipt", receipt), ("owner", owner), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        return self._read_one(f"SELECT * FROM initiator_requests WHERE {' AND '.join(where)}"
                              " ORDER BY requested_at DESC, id DESC LIMIT 1", tuple(args))

    def reversal_of(self, receipt):
        """The refund whose reversal's own receipt is `receipt` (a dict), or None: a code
        that is money going back, not a payment."""
        return self._read_one("SELECT * FROM initiator_requests WHERE kind = 'refund' AND"
                              " result_receipt = ? LIMIT 1", (receipt,))

    def initiator_stop(self, fingerprint):
        """The stop of an initiator configuration (a dict), or None while it may call."""
        return self._read_one("SELECT * FROM initiator_stops WHERE fingerprint = ?",
                              (fingerprint,))

    def lift_initiator_stop(self, fingerprint):
        """An operator's word that the initiator may call again (it was unlocked on the
        portal): the stop removed, returned (or None if there was none)."""
        with self._write() as conn:
            row = conn.execute("DELETE FROM initiator_stops WHERE fingerprint = ? RETURNING *",
                               (fingerprint,)).fetchone()
        return dict(row) if row is not None else None

    # --- console sessions --------------------------------------------------------------

    def start_session(self, session_id, person, key_hash, lifetime_s):
        """A person signed in: their session, until `lifetime_s` from now."""
        now = self._clock()
        with self._write() as conn:
            conn.execute("DELETE FROM console_sessions WHERE expires_at < ?", (now - 86400,))
            conn.execute("INSERT INTO console_sessions (id, person, key_hash, created_at,"
                         " expires_at) VALUES (?, ?, ?, ?, ?)",
                         (session_id, person, key_hash, now, now + lifetime_s))

    def session(self, session_id):
        """A live session (not ended, not expired) as a dict, or None."""
        return self._read_one("SELECT * FROM console_sessions WHERE id = ? AND ended_at IS NULL"
                              " AND expires_at > ?", (session_id, self._clock()))

    def end_session(self, session_id):
        """Sign-out: the session ends, on every host."""
        with self._write() as conn:
            conn.execute("UPDATE console_sessions SET ended_at = ? WHERE id = ? AND ended_at"
                         " IS NULL", (self._clock(), session_id))

    def record_action(self, person, tx_id, action, outcome):
        """What a person did from the console, for the payment's timeline."""
        with self._write() as conn:
            conn.execute("INSERT INTO console_actions (at, person, tx_id, action, outcome)"
                         " VALUES (?, ?, ?, ?, ?)",
                         (self._clock(), person, tx_id, action, outcome))

    def actions_of(self, tx_id):
        """The console actions on a payment (or receipt), oldest first."""
        return self._read("SELECT * FROM console_actions WHERE tx_id = ? ORDER BY id",
                          (tx_id,))

    # --- payment links ------------------------------------------------------------------

    LINK_COLUMNS = ("id", "owner", "amount", "reference", "description", "max_uses",
                    "expires_at", "created_at")

    def create_link(self, link_id, *, owner, amount, reference, description, max_uses,
                    expires_at):
        """A new payment link (a dict as stored)."""
        row = dict(id=link_id, owner=owner, amount=amount, reference=reference,
                   description=description, max_uses=max_uses, expires_at=expires_at,
                   created_at=self._clock())
        with self._write() as conn:
            conn.execute(f"INSERT INTO payment_links ({', '.join(self.LINK_COLUMNS)}) VALUES"
                         f" ({', '.join(':' + c for c in self.LINK_COLUMNS)})", row)
        return dict(row, uses=0, revoked_at=None)

    # A link's uses are its succeeded payments (transactions.link_id).
    # (and the Paybill payments matched to one of its payments that did not succeed: the
    # pay page offers the menu after a failed prompt).
    LINK_SELECT = ("SELECT l.id, l.owner, l.amount, l.reference, l.description, l.max_uses,"
                   " l.expires_at, l.revoked_at, l.created_at, (SELECT COUNT(*) FROM"
                   " transactions t WHERE t.link_id = l.id AND t.status = 'succeeded')"
                   " + (SELECT COUNT(*) FROM c2b_receipts r JOIN transactions t ON t.id ="
                   " r.matched_tx_id WHERE t.link_id = l.id AND t.status <> 'succeeded') AS uses"
                   " FROM payment_links l")

    def link(self, link_id):
        """One payment link (a dict, `uses` counted), or None."""
        return self._read_one(f"{self.LINK_SELECT} WHERE l.id = ?", (link_id,))

    def links_page(self, *, owner=None, limit=50):
        """Payment links newest first (only `owner`'s when given)."""
        where, args = ("WHERE l.owner = ? ", [owner]) if owner is not None else ("", [])
        return self._read(f"{self.LINK_SELECT} {where}ORDER BY l.created_at DESC, l.id DESC"
                          " LIMIT ?", (*args, limit))

    def revoke_link(self, link_id, owner):
        """Revoke `owner`'s link (once; a revoked link stays revoked): the row after, or
        None when `owner` has no such link."""
        with self._write() as conn:
            row = conn.execute("UPDATE payment_links SET revoked_at = COALESCE(revoked_at, ?)"
                               " WHERE id = ? AND owner = ? RETURNING id",
                               (self._clock(), link_id, owner)).fetchone()
        return self.link(link_id) if row is not None else None

    def claim_receipt(self, receipt, owner, reference):
        """Attach `receipt` to `owner`'s `reference`, once. Returns (outcome, claim row):
        claimed, unchanged (this very claim was made before) or taken (another claim
        holds it)."""
        with self._write() as conn:
            row = conn.execute("INSERT INTO receipt_claims (receipt, owner, reference,"
                               " claimed_at) VALUES (?, ?, ?, ?) ON CONFLICT (receipt) DO"
                               " NOTHING RETURNING *",
                               (receipt, owner, reference, self._now())).fetchone()
            if row is not None:
                return "claimed", dict(row)
            row = dict(conn.execute("SELECT * FROM receipt_claims WHERE receipt = ?",
                                    (receipt,)).fetchone())
        same = (row["owner"], row["reference"]) == (owner, reference)
        return ("unchanged" if same else "taken"), row

    def receipt_claim(self, receipt):
        """The claim on a receipt (a dict), or None."""
        return self._read_one("SELECT * FROM receipt_claims WHERE receipt = ?", (receipt,))

    # --- the webhook outbox ---------------------------------------------------

    def claim_event(self, lease_s, skip_owners=()):
        """Lease the event most due for delivery (not of `skip_owners`), or None. An event
        waits while one written before it for the same transaction is still pending, so a
        merchant sees them in order: written order is the rowid, whatever the clocks of
        the processes that wrote them said."""
        now = self._clock()
        skip = (f" AND owner NOT IN ({','.join('?' * len(skip_owners))})" if skip_owners
                else "")
        seq = self.dialect.seq
        with self._write() as conn:  # one statement: one round trip on PostgreSQL
            claimed = conn.execute(
                "UPDATE events SET claimed_until = ? WHERE id = (SELECT id FROM events e"
                " WHERE status = 'pending' AND next_attempt_at <= ?"
                f" AND claimed_until <= ?{skip} AND NOT EXISTS (SELECT 1 FROM events o"
                f" WHERE o.tx_id = e.tx_id AND o.status = 'pending' AND o.{seq} < e.{seq})"
                f" ORDER BY next_attempt_at, {seq} LIMIT 1{self.dialect.skip_locked})"
                " RETURNING *", (now + lease_s, now, now, *skip_owners))
        row = claimed.fetchone()
        return dict(row) if row is not None else None

    def record_attempt(self, event_id, lease, *, due_at, status_code, duration_ms, error,
                       delivered, next_attempt_at=None):
        """One delivery attempt: its result, and the event's next state (delivered, pending
        again from `next_attempt_at`, or dead when that is None), if the lease is ours.
        `due_at`: the event's next_attempt_at when it was claimed; if it moved since, an
        operator asked for a redelivery during the attempt, and that request stands."""
        now = self._clock()
        state = "delivered" if delivered else ("pending" if next_attempt_at else "dead")
        with self._write() as conn:
            row = conn.execute(
                "UPDATE events SET attempts = attempts + 1, claimed_until = 0,"
                " status = CASE WHEN next_attempt_at = ? THEN ? ELSE 'pending' END,"
                " next_attempt_at = CASE WHEN next_attempt_at = ?"
                " THEN COALESCE(?, next_attempt_at) ELSE next_attempt_at END,"
                " delivered_at = COALESCE(?, delivered_at) WHERE id = ? AND claimed_until = ?"
                " RETURNING status",
                (due_at, state, due_at, next_attempt_at, now if delivered else None, event_id,
                 lease)).fetchone()
            if row is None:
                return "lost_lease"  # another sender holds it now: its result counts
            state = row["status"]
            conn.execute("INSERT INTO event_attempts (event_id, at, status_code, duration_ms,"
                         " error) VALUES (?, ?, ?, ?, ?)",
                         (event_id, now, status_code, duration_ms, error))
        return state

    def event_page(self, *, owner=None, status=None, after=None, limit=50):
        """Events newest first (only `owner`'s when given); `after`: the previous page's last
        id. Returns (rows, more)."""
        where, args = [], []
        for column, value in (("owner", owner), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if after is not None:
            where.append("id < ?")
            args.append(after)
        sql = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._read(sql + " ORDER BY id DESC LIMIT ?", (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    def outbox_backlog(self):
        """(events not yet delivered, creation time of the oldest of them or None)."""
        row = self._read_one("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM events"
                             " WHERE status = 'pending'")
        return row["n"], row["oldest"]

    def event(self, event_id):
        """One event with its attempts, or None."""
        row = self._read_one("SELECT * FROM events WHERE id = ?", (event_id,))
        if row is not None:
            row["attempts_log"] = self._read(
                "SELECT * FROM event_attempts WHERE event_id = ? ORDER BY id", (event_id,))
        return row

    def redeliver(self, event_id):
        """Send an event again (delivered or dead ones too) as soon as the sender runs; its
        backoff starts again from the first step (the attempts log keeps every try)."""
        with self._write() as conn:
            # The lease is left alone: an attempt in flight finishes under it first.
            row = conn.execute(
                "UPDATE events SET status = 'pending', next_attempt_at = ?, attempts = 0"
                " WHERE id = ? RETURNING *", (self._clock(), event_id)).fetchone()
        return dict(row) if row is not None else None

    def prune_events(self, older_than_s, limit=1000):
        """Forget delivered and dead events (and their attempts) made more than
        `older_than_s` ago, at most `limit` per call so the write lock is held briefly."""
        cutoff = self._clock() - older_than_s
        with self._write() as conn:
            ids = [r["id"] for r in conn.execute(
                "SELECT id FROM events WHERE status IN ('delivered', 'dead')"
                " AND created_at < ? LIMIT ?", (cutoff, limit))]
            if ids:
                marks = ",".join("?" * len(ids))
                conn.execute(f"DELETE FROM event_attempts WHERE event_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM events WHERE id IN ({marks})", ids)
        return len(ids)
