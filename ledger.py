"""The payment ledger: SQLite, the only module that touches the database.

Owns the schema, the connections (one per thread; WAL, synchronous=FULL, a busy
timeout, `BEGIN IMMEDIATE` for every write), the life of a transaction row and
the append-only callback log.  The rules that keep money safe live here:

- a row is committed in state `submitting` *before* Daraja is called;
- a callback's raw body is stored and applied in one committed transaction;
- one settle step applies an STK result, whoever brings it, idempotently: a
  final state never changes, except that a success with a receipt overrides an
  earlier failure (flagged as an anomaly);
- on startup, rows left in `submitting` become `unknown`, never re-sent;
- an idempotency key is claimed, the per-phone lock checked and the row written
  in one `BEGIN IMMEDIATE` transaction, so the guarantees hold across threads
  and across processes sharing the file;
- reconciliation claims rows with a lease, so two processes never query the
  same row at once.
"""

import calendar
import logging
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

SUBMITTING = "submitting"  # written, Daraja not answered yet (shown to merchants as pending)
PENDING, SUCCEEDED, FAILED, REJECTED, UNKNOWN = (
    "pending", "succeeded", "failed", "rejected", "unknown")
FINAL = frozenset({SUCCEEDED, FAILED, REJECTED})  # unknown is not final: a result may still come
BUSY_TIMEOUT_S = 5.0
IDEMPOTENCY_TTL_S = 24 * 3600  # keys are kept at least this long (Stripe's window)

SCHEMA = """
CREATE TABLE IF NOT EXISTS transactions (
    id                  TEXT PRIMARY KEY,
    checkout_request_id TEXT UNIQUE,
    merchant_request_id TEXT,
    status              TEXT NOT NULL,
    reason              TEXT,
    phone               TEXT NOT NULL,
    amount              INTEGER NOT NULL,
    reference           TEXT NOT NULL,
    description         TEXT NOT NULL,
    result_code         TEXT,
    result_desc         TEXT,
    receipt             TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    -- reconciliation: when to query next, how often we did, who holds the row until when
    next_check_at       REAL NOT NULL DEFAULT 0,
    check_attempts      INTEGER NOT NULL DEFAULT 0,
    claimed_until       REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS transactions_status ON transactions (status, next_check_at);
CREATE INDEX IF NOT EXISTS transactions_phone ON transactions (phone, created_at);
CREATE INDEX IF NOT EXISTS transactions_created ON transactions (created_at, id);
CREATE TABLE IF NOT EXISTS heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope        TEXT NOT NULL,  -- fingerprint of the API key: keys are per merchant
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    tx_id        TEXT NOT NULL,
    status_code  INTEGER,        -- NULL while the first request is in flight
    body         BLOB,
    created_at   REAL NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency_keys (created_at);
CREATE TABLE IF NOT EXISTS callbacks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    tx_id       TEXT NOT NULL,
    received_at TEXT NOT NULL,
    remote_addr TEXT,
    outcome     TEXT NOT NULL,
    body        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS callbacks_tx ON callbacks (tx_id);
"""


def iso_utc(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def epoch(iso):
    return calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))


def new_tx_id(epoch_s):
    """tx_ + 12 hex digits of creation milliseconds + 12 random: ids sort by creation."""
    return f"tx_{int(epoch_s * 1000):012x}{secrets.token_hex(6)}"


@dataclass(frozen=True)
class Settlement:
    """An STK result to apply: from a callback (`receipt`, `amount` known) or a query."""

    status: str  # succeeded | failed
    reason: str | None
    result_code: str
    result_desc: str | None
    checkout_request_id: str
    merchant_request_id: str | None = None
    receipt: str | None = None
    amount: int | None = None
    source: str = "callback"


@dataclass(frozen=True)
class Idempotency:
    scope: str
    key: str
    request_hash: str


@dataclass(frozen=True)
class Begun:
    """What begin_push decided: `kind` is new, replay, in_flight, reused or phone_busy."""

    kind: str
    row: dict | None = None
    status_code: int | None = None
    body: bytes | None = None


class Ledger:
    def __init__(self, path, *, clock=time.time, busy_timeout_s=BUSY_TIMEOUT_S):
        self.path = path
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all = []  # every connection opened, so close() can reach them
        self._all_lock = threading.Lock()
        conn = self._conn()
        self._when_unlocked(lambda: conn.executescript(SCHEMA))

    # --- connections --------------------------------------------------------

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # One connection per thread; check_same_thread=False only so close() can end it.
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            # WAL is a property of the file: switch only if needed, since switching takes an
            # exclusive lock that another process opening a new ledger may hold right now.
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._when_unlocked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=FULL")  # a commit we acknowledged survives power loss
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _when_unlocked(self, action):
        """Run a schema-level statement, waiting out another process's lock.

        SQLite answers "locked" at once, without its busy handler, when two connections
        would deadlock (both opening a brand-new file); so wait here instead.
        """
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @contextmanager
    def _write(self):
        """One write transaction, taking the write lock up front (no mid-way SQLITE_BUSY)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self):
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def _now(self):
        return iso_utc(self._clock())

    # --- transactions -------------------------------------------------------

    def create(self, *, phone, amount, reference, description):
        """Commit a new row in `submitting`; return it. Call before Daraja."""
        return self.begin_push(phone=phone, amount=amount, reference=reference,
                               description=description).row

    def begin_push(self, *, phone, amount, reference, description, idempotency=None,
                   phone_lock_s=0.0):
        """In one write transaction: honour the idempotency key, check the phone lock,
        and commit a new `submitting` row. Returns a Begun."""
        now = self._clock()
        with self._write() as conn:
            if idempotency is not None:
                found = conn.execute(
                    "SELECT * FROM idempotency_keys WHERE scope = ? AND key = ?",
                    (idempotency.scope, idempotency.key)).fetchone()
                if found is not None and found["created_at"] > now - IDEMPOTENCY_TTL_S:
                    return self._existing_key(conn, found, idempotency)
                if found is not None:  # expired: the key may start a new payment
                    conn.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ?",
                                 (idempotency.scope, idempotency.key))
            if phone_lock_s > 0:
                busy = conn.execute(
                    "SELECT * FROM transactions WHERE phone = ? AND status IN (?, ?)"
                    " AND created_at >= ? ORDER BY created_at DESC LIMIT 1",
                    (phone, SUBMITTING, PENDING, iso_utc(now - phone_lock_s))).fetchone()
                if busy is not None:
                    return Begun("phone_busy", dict(busy))
            stamp = iso_utc(now)
            row = dict(id=new_tx_id(now), status=SUBMITTING, phone=phone, amount=amount,
                       reference=reference, description=description, created_at=stamp,
                       updated_at=stamp)
            row = dict(conn.execute(
                "INSERT INTO transactions (id, status, phone, amount, reference, description,"
                " created_at, updated_at) VALUES (:id, :status, :phone, :amount, :reference,"
                " :description, :created_at, :updated_at) RETURNING *", row).fetchone())
            if idempotency is not None:
                conn.execute(
                    "INSERT INTO idempotency_keys (scope, key, request_hash, tx_id, created_at)"
                    " VALUES (?, ?, ?, ?, ?)", (idempotency.scope, idempotency.key,
                                                idempotency.request_hash, row["id"], now))
        return Begun("new", row)

    @staticmethod
    def _existing_key(conn, found, idempotency):
        if found["request_hash"] != idempotency.request_hash:
            return Begun("reused")
        row = conn.execute("SELECT * FROM transactions WHERE id = ?",
                           (found["tx_id"],)).fetchone()
        if found["status_code"] is not None:
            return Begun("replay", dict(row), found["status_code"], found["body"])
        return Begun("in_flight", dict(row))

    def store_response(self, idempotency, status_code, body):
        """Pin the key to the answer the first request got."""
        with self._write() as conn:
            conn.execute(
                "UPDATE idempotency_keys SET status_code = ?, body = ? WHERE scope = ? AND key = ?",
                (status_code, body, idempotency.scope, idempotency.key))

    def prune_idempotency(self):
        """Forget keys older than the retention window; the payments themselves stay."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?",
                               (self._clock() - IDEMPOTENCY_TTL_S,))
        return cur.rowcount

    def mark_accepted(self, tx_id, checkout_request_id, merchant_request_id):
        """Daraja queued the prompt. A result that already arrived is kept."""
        with self._write() as conn:
            row = conn.execute(
                "UPDATE transactions SET status = CASE status WHEN ? THEN ? ELSE status END,"
                " checkout_request_id = COALESCE(checkout_request_id, ?),"
                " merchant_request_id = COALESCE(merchant_request_id, ?), updated_at = ?"
                " WHERE id = ? RETURNING *",
                (SUBMITTING, PENDING, checkout_request_id, merchant_request_id, self._now(),
                 tx_id)).fetchone()
        return dict(row) if row is not None else None

    def mark_not_accepted(self, tx_id, status, reason, result_code=None, result_desc=None,
                          release=None):
        """The push was refused (`rejected`) or its fate is unknown (`unknown`).

        `release`: an Idempotency whose key is freed in the same commit, because
        nothing reached the customer and the merchant may retry with that key.
        """
        with self._write() as conn:
            conn.execute(
                "UPDATE transactions SET status = ?, reason = ?, result_code = ?, result_desc = ?,"
                " updated_at = ? WHERE id = ? AND status = ?",
                (status, reason, result_code, result_desc, self._now(), tx_id, SUBMITTING))
            if release is not None:
                conn.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ?",
                             (release.scope, release.key))
        return self.get(tx_id)

    def get(self, ref):
        """The row by gateway id or CheckoutRequestID, as a dict, or None."""
        cur = self._conn().execute(
            "SELECT * FROM transactions WHERE id = ? UNION ALL"
            " SELECT * FROM transactions WHERE checkout_request_id = ? LIMIT 1", (ref, ref))
        row = cur.fetchone()
        return dict(row) if row is not None else None

    def recover_interrupted(self, older_than_s):
        """Rows stuck in `submitting` (the process died mid-push) become `unknown`."""
        cutoff = iso_utc(self._clock() - older_than_s)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE transactions SET status = ?, reason = 'interrupted', updated_at = ?"
                " WHERE status = ? AND created_at <= ?",
                (UNKNOWN, self._now(), SUBMITTING, cutoff))
        if cur.rowcount:
            log.warning("ledger recovered_interrupted=%d status=unknown", cur.rowcount)
        return cur.rowcount

    # --- reconciliation ---------------------------------------------------

    def claim_due(self, *, older_than_s, lease_s, limit=50):
        """Lease `pending` rows that are due for an STK query to this caller.

        A leased row is invisible to other claimers until the lease ends, so two
        processes never query the same row at once; a crashed claimer's lease lapses.
        """
        now = self._clock()
        with self._write() as conn:
            rows = [dict(r) for r in conn.execute(
                "SELECT * FROM transactions WHERE status = ? AND checkout_request_id IS NOT NULL"
                " AND next_check_at <= ? AND claimed_until <= ? AND created_at <= ?"
                " ORDER BY next_check_at, created_at LIMIT ?",
                (PENDING, now, now, iso_utc(now - older_than_s), limit))]
            conn.executemany("UPDATE transactions SET claimed_until = ? WHERE id = ?",
                             [(now + lease_s, r["id"]) for r in rows])
        return rows

    def reschedule(self, tx_id, next_check_at):
        """Not settled yet: query again at `next_check_at`; the lease ends."""
        with self._write() as conn:
            conn.execute(
                "UPDATE transactions SET next_check_at = ?, check_attempts = check_attempts + 1,"
                " claimed_until = 0 WHERE id = ?", (next_check_at, tx_id))

    def give_up(self, tx_id):
        """No final result before the deadline: `unknown`, reason no_final_result."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE transactions SET status = ?, reason = 'no_final_result', claimed_until = 0,"
                " updated_at = ? WHERE id = ? AND status = ?",
                (UNKNOWN, self._now(), tx_id, PENDING))
        return cur.rowcount == 1

    def apply_result(self, tx_id, settlement):
        """Settle from an STK query: the same step a callback uses. Returns the outcome."""
        with self._write() as conn:
            row = conn.execute("SELECT * FROM transactions WHERE id = ?", (tx_id,)).fetchone()
            outcome = self._settle(conn, dict(row), settlement) if row else "unknown_transaction"
            conn.execute("UPDATE transactions SET claimed_until = 0 WHERE id = ?", (tx_id,))
        return outcome

    def list_page(self, *, status=None, since=None, after=None, limit=50):
        """Newest first; `after` = (created_at, id) of the previous page's last row.

        Returns (rows, more): the page and whether another page follows.
        """
        where, args = [], []
        if status is not None:
            statuses = (PENDING, SUBMITTING) if status == PENDING else (status,)
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        if after is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args.extend([after[0], after[0], after[1]])
        sql = "SELECT * FROM transactions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        rows = [dict(r) for r in self._conn().execute(sql, (*args, limit + 1))]
        return rows[:limit], len(rows) > limit

    def writable(self):
        """Can a new connection commit a write right now? (A fresh one: an open connection
        keeps working on a file whose permissions changed under it.)"""
        try:
            conn = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT OR REPLACE INTO heartbeat (id, at) VALUES (1, ?)",
                             (self._clock(),))
                conn.execute("COMMIT")
            finally:
                conn.close()
        except sqlite3.Error:
            return False
        return True

    def count_by_status(self):
        """Counts by public status: `submitting` is shown as `pending`, as in the API."""
        rows = self._conn().execute("SELECT status, COUNT(*) FROM transactions GROUP BY status")
        counts = {status: n for status, n in rows}
        if SUBMITTING in counts:
            counts[PENDING] = counts.get(PENDING, 0) + counts.pop(SUBMITTING)
        return counts

    # --- callbacks ----------------------------------------------------------

    def record_callback(self, tx_id, body, remote_addr, settlement):
        """Store the raw callback and apply `settlement` (None: unparsable) atomically.

        Returns (outcome, row): outcome is applied, duplicate, ignored, anomaly,
        override, malformed or unknown_transaction; row is the transaction after.
        """
        with self._write() as conn:
            row = conn.execute("SELECT * FROM transactions WHERE id = ?", (tx_id,)).fetchone()
            row = dict(row) if row is not None else None
            if row is None:
                outcome = "unknown_transaction"
            elif settlement is None:
                outcome = "malformed"
            else:
                outcome = self._settle(conn, row, settlement)
            conn.execute(
                "INSERT INTO callbacks (tx_id, received_at, remote_addr, outcome, body)"
                " VALUES (?, ?, ?, ?, ?)", (tx_id, self._now(), remote_addr, outcome, body))
        return outcome, (self.get(tx_id) if row is not None else None)

    def callbacks(self, tx_id):
        """The stored callbacks of one transaction, oldest first."""
        rows = self._conn().execute(
            "SELECT * FROM callbacks WHERE tx_id = ? ORDER BY id", (tx_id,)).fetchall()
        return [dict(r) for r in rows]

    def _settle(self, conn, row, s):
        """Apply one STK result to `row` inside the caller's write transaction."""
        stored_id = row["checkout_request_id"]
        if stored_id is not None and stored_id != s.checkout_request_id:
            log.error("anomaly tx=%s reason=checkout_request_id_mismatch", row["id"])
            return "anomaly"
        if s.status == SUCCEEDED and s.source == "callback":
            if s.receipt is None or s.amount != row["amount"]:
                # Not proof of payment: keep the row as it is; a query decides.
                log.error("anomaly tx=%s reason=%s", row["id"],
                          "no_receipt" if s.receipt is None else "amount_mismatch")
                return "anomaly"
        current = row["status"]
        if current == SUCCEEDED:
            if s.status == SUCCEEDED and row["receipt"] is None and s.receipt is not None:
                # Settled by a query (which carries no receipt); the callback completes it.
                conn.execute("UPDATE transactions SET receipt = ?, updated_at = ? WHERE id = ?",
                             (s.receipt, self._now(), row["id"]))
                return "duplicate"
            same = s.status == SUCCEEDED and s.receipt in (None, row["receipt"])
            if not same:
                log.error("anomaly tx=%s reason=result_after_success result_code=%s",
                          row["id"], s.result_code)
            return "duplicate" if same else "ignored"
        if current in FINAL:
            if s.status != SUCCEEDED or s.receipt is None:
                return "duplicate" if s.result_code == row["result_code"] else "ignored"
            # Paid after all: money moved, so the success wins over the earlier failure.
            log.error("anomaly tx=%s reason=success_after_%s", row["id"], current)
            outcome = "override"
        else:
            outcome = "applied"
        conn.execute(
            "UPDATE transactions SET status = ?, reason = ?, result_code = ?, result_desc = ?,"
            " receipt = COALESCE(?, receipt), checkout_request_id = COALESCE(checkout_request_id,"
            " (SELECT ? WHERE NOT EXISTS (SELECT 1 FROM transactions WHERE checkout_request_id = ?))),"
            " merchant_request_id = COALESCE(merchant_request_id, ?), updated_at = ? WHERE id = ?",
            (s.status, s.reason, s.result_code, s.result_desc, s.receipt, s.checkout_request_id,
             s.checkout_request_id, s.merchant_request_id, self._now(), row["id"]))
        return outcome
