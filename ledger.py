"""The payment ledger: its contract in SQL both engines run, and the SQLite engine.

Owns the schema, the SQLite connections (a reading one per thread; one writing
connection whose transactions group_commit shares among concurrent writes; WAL,
synchronous=FULL, a busy timeout, `BEGIN IMMEDIATE`), the life of a transaction
row, the append-only callback log and the webhook outbox (ledger_postgres supplies
the PostgreSQL engine). The rules that keep money safe live here:

- a row is committed in state `submitting` *before* Daraja is called;
- a callback's raw body is stored and applied in one committed transaction;
- `settle()` runs settlement's rules on a row inside the write transaction
  that reads it (and, for a callback, stores its raw body), so a result is
  applied once whoever brings it;
- on startup, rows left in `submitting` become `unknown`, never re-sent;
- an idempotency key is claimed, the per-phone lock checked and the row written
  in one write transaction, so the guarantees hold across threads and across
  processes sharing the file;
- a push's outcome and its idempotent answer are one commit;
- reconciliation claims one row at a time with a lease, so two processes never
  query the same row at once;
- a write returns only once its COMMIT is durable; a failed COMMIT is rolled
  back; a connection that cannot be rolled back is discarded.
"""
import calendar
import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass

import group_commit

log = logging.getLogger(__name__)

SUBMITTING = "submitting"  # written, Daraja not answered yet (shown to merchants as pending)
PENDING, SUCCEEDED, FAILED, REJECTED, UNKNOWN = (
    "pending", "succeeded", "failed", "rejected", "unknown")
FINAL = frozenset({SUCCEEDED, FAILED, REJECTED})  # unknown is not final: a result may still come
BUSY_TIMEOUT_S = 5.0
IDEMPOTENCY_TTL_S = 24 * 3600  # keys are kept at least this long (Stripe's window)
SCHEMA_VERSION = 2  # 1: the tables below; 2: transactions.owner (added by _migrate)

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
    claimed_until       REAL NOT NULL DEFAULT 0,
    owner               TEXT  -- the API key name that made it; NULL on rows from before owners
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
-- the webhook outbox: written in the commit that changes a payment's status
CREATE TABLE IF NOT EXISTS events (
    id              TEXT PRIMARY KEY,  -- the webhook-id; pages sort by it (creation time)
    tx_id           TEXT NOT NULL,
    owner           TEXT NOT NULL,
    type            TEXT NOT NULL,
    body            BLOB NOT NULL,     -- the JSON sent, fixed when the event is made
    status          TEXT NOT NULL,     -- pending | delivered | dead
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    claimed_until   REAL NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    delivered_at    REAL
);
CREATE INDEX IF NOT EXISTS events_due ON events (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS events_tx ON events (tx_id);
CREATE INDEX IF NOT EXISTS events_owner ON events (owner, id);
-- a claim looks for an earlier pending event of the same payment: one probe, not a scan
CREATE INDEX IF NOT EXISTS events_pending_tx ON events (tx_id) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS event_attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL,
    at          REAL NOT NULL,
    status_code INTEGER,
    duration_ms REAL NOT NULL,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS event_attempts_event ON event_attempts (event_id);
"""


def iso_utc(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def epoch(iso):
    return calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))


def new_tx_id(epoch_s, prefix="tx_"):
    """tx_ + 12 hex digits of creation milliseconds + 12 random: ids sort by creation."""
    return f"{prefix}{int(epoch_s * 1000):012x}{secrets.token_hex(6)}"


class LedgerOpenError(Exception):
    """The ledger cannot be opened (or its driver is missing): one message for startup."""


def is_postgres(target):
    return target.startswith(("postgresql://", "postgres://"))


def open_ledger(target, *, clock=time.time, pool_size=8, migrate=True, wait_s=5.0):
    """The ledger GATEWAY_DB names: a postgresql:// URL (ledger_postgres, pooled to
    `pool_size` connections, a caller waiting at most `wait_s` for one), or a SQLite
    file path. Raises LedgerOpenError."""
    if is_postgres(target):
        import ledger_postgres  # only here: SQLite users never import the driver

        return ledger_postgres.PostgresLedger(target, clock=clock, pool_size=pool_size,
                                              migrate=migrate, wait_s=wait_s)
    try:
        return Ledger(target, clock=clock)
    except sqlite3.Error as exc:
        raise LedgerOpenError(f"GATEWAY_DB cannot be opened as a SQLite ledger ({target}):"
                              f" {exc}") from None


@dataclass(frozen=True)
class NewEvent:
    """A webhook event to write in the same commit as the status change it reports."""

    tx_id: str
    owner: str
    type: str
    body: bytes


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
    """The SQLite ledger, and the contract every ledger keeps: its methods are written once,
    in SQL both engines run; a backend (ledger_postgres) changes only what is marked
    "backend" below: connections and transactions, row locks and the outbox's sequence."""

    Error = sqlite3.Error  # backend: what a failed ledger call raises
    SEQ = "rowid"  # backend: the outbox's written order
    FOR_UPDATE = ""  # backend: lock a row read to be changed (BEGIN IMMEDIATE locks all)
    SKIP_LOCKED = ""  # backend: a claim passes over rows another claimer is locking
    FLEET = False  # backend: keeps the fleet's token and rate buckets (ledger_postgres)

    def __init__(self, path, *, clock=time.time, busy_timeout_s=BUSY_TIMEOUT_S, on_connect=None):
        self.path = path
        self._clock = clock
        self._on_connect = on_connect  # test shim: sees each new connection (e.g. an authorizer)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all = []  # every connection opened, so close() can reach them
        self._all_lock = threading.Lock()
        self._group = group_commit.GroupCommit(self._writer_conn, self._rollback, sqlite3.Error)
        self.migrate()

    def migrate(self):
        """Create the schema or bring a ledger made by an older version up to it; returns
        the schema version (PRAGMA user_version). Each step is idempotent, since ledgers
        from before versioning say 0 whatever they hold."""
        conn = self._conn()
        self._when_unlocked(lambda: conn.executescript(SCHEMA))
        return self._when_unlocked(lambda: self._migrate(conn))

    @staticmethod
    def _migrate(conn):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # 2: the owner of each row (API key names)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(transactions)")}
            if "owner" not in columns:
                conn.execute("ALTER TABLE transactions ADD COLUMN owner TEXT")
            conn.execute("CREATE INDEX IF NOT EXISTS transactions_owner"
                         " ON transactions (owner, created_at, id)")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return SCHEMA_VERSION

    # --- connections --------------------------------------------------------

    def _conn(self):
        """This thread's reading connection (and the schema's)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open()
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _open(self):
        # check_same_thread=False: the writer is used by one thread at a time (group
        # commit), and close() ends every connection.
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        # WAL is a property of the file: switch only if needed, since switching takes an
        # exclusive lock that another process opening a new ledger may hold right now.
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._when_unlocked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
        conn.execute("PRAGMA synchronous=FULL")  # a commit we acknowledged survives power loss
        if self._on_connect is not None:
            self._on_connect(conn)
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

    def _write(self):
        """One write, in the group commit's current transaction (taken with BEGIN
        IMMEDIATE: no mid-way SQLITE_BUSY); returns once it is durable."""
        return self._group.write()

    def _writer_conn(self):
        """The one connection the group commit writes with."""
        conn = self._open()
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _rollback(self, conn):
        """End a failed transaction (a failed COMMIT leaves it open); a connection that
        cannot be rolled back is discarded (False), so the next write starts clean."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return True
        except sqlite3.Error:
            log.error("ledger rollback_failed action=discard_connection")
            with self._all_lock:
                if conn in self._all:
                    self._all.remove(conn)
            try:
                conn.close()
            except sqlite3.Error:
                pass
            return False

    @property
    def commit_counts(self):
        """(writes made durable, COMMITs that did it): batching, for /metrics."""
        return self._group.commits, self._group.batches

    def _read(self, sql, args=()):
        """backend: rows of one query, as dicts."""
        return [dict(r) for r in self._conn().execute(sql, args)]

    def _read_one(self, sql, args=()):
        rows = self._read(sql, args)
        return rows[0] if rows else None

    def _serialize(self, conn, names):
        """backend: hold these names' locks until the transaction ends (here the file's
        write lock, taken by BEGIN IMMEDIATE, already serialises every writer)."""

    def close(self):
        self._group.close()
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
                   phone_lock_s=0.0, owner=None):
        """In one write transaction: honour the idempotency key, check the phone lock,
        and commit a new `submitting` row. Returns a Begun."""
        now = self._clock()
        with self._write() as conn:
            # Serialised per key, then per phone (SQLite: BEGIN IMMEDIATE already is).
            self._serialize(conn, ([f"key:{idempotency.scope}:{idempotency.key}"]
                                   if idempotency is not None else []) + [f"phone:{phone}"])
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
                # A prompt may be open: pending, or unknown without a CheckoutRequestID (its
                # push was cut off or timed out after it may have been sent).
                busy = conn.execute(
                    "SELECT * FROM transactions WHERE phone = ? AND created_at >= ?"
                    " AND (status IN (?, ?) OR (status = ? AND checkout_request_id IS NULL))"
                    " ORDER BY created_at DESC LIMIT 1",
                    (phone, iso_utc(now - phone_lock_s), SUBMITTING, PENDING,
                     UNKNOWN)).fetchone()
                if busy is not None:
                    return Begun("phone_busy", dict(busy))
            stamp = iso_utc(now)
            row = dict(id=new_tx_id(now), status=SUBMITTING, phone=phone, amount=amount,
                       reference=reference, description=description, created_at=stamp,
                       updated_at=stamp, owner=owner)
            row = dict(conn.execute(
                "INSERT INTO transactions (id, status, phone, amount, reference, description,"
                " created_at, updated_at, owner) VALUES (:id, :status, :phone, :amount,"
                " :reference, :description, :created_at, :updated_at, :owner) RETURNING *",
                row).fetchone())
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
        """Forget keys older than the retention window; the payments themselves stay."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?",
                               (self._clock() - IDEMPOTENCY_TTL_S,))
        return cur.rowcount

    def mark_accepted(self, tx_id, checkout_request_id, merchant_request_id, pin=None):
        """Daraja queued the prompt. A result that already arrived is kept. `pin`: an
        (Idempotency, answer(row) → (status, body)) whose answer is stored in the same
        commit, so a keyed payment costs no extra commit."""
        with self._write() as conn:
            row = conn.execute(
                "UPDATE transactions SET status = CASE status WHEN ? THEN ? ELSE status END,"
                " checkout_request_id = COALESCE(checkout_request_id, ?),"
                " merchant_request_id = COALESCE(merchant_request_id, ?), updated_at = ?"
                " WHERE id = ? RETURNING *",
                (SUBMITTING, PENDING, checkout_request_id, merchant_request_id, self._now(),
                 tx_id)).fetchone()
            if row is not None and pin is not None:
                self._pin(conn, pin, dict(row))
        return dict(row) if row is not None else None

    @staticmethod
    def _pin(conn, pin, row):
        idempotency, answer = pin
        status_code, body = answer(row)
        conn.execute(
            "UPDATE idempotency_keys SET status_code = ?, body = ? WHERE scope = ? AND key = ?",
            (status_code, body, idempotency.scope, idempotency.key))

    def mark_not_accepted(self, tx_id, status, reason, result_code=None, result_desc=None,
                          release=None, event=None, pin=None):
        """The push was refused (`rejected`) or its fate is unknown (`unknown`).

        `release`: an Idempotency whose key is freed in the same commit, because
        nothing reached the customer and the merchant may retry with that key.
        `event(before, after, "not_accepted")`: the webhook event written in the same commit;
        `pin`: the idempotent answer too (as for mark_accepted).
        """
        with self._write() as conn:
            row = conn.execute(
                "UPDATE transactions SET status = ?, reason = ?, result_code = ?, result_desc = ?,"
                " updated_at = ? WHERE id = ? AND status = ? RETURNING *",
                (status, reason, result_code, result_desc, self._now(), tx_id,
                 SUBMITTING)).fetchone()
            if row is not None and event is not None:
                self._add_event(conn, event(dict(row, status=SUBMITTING), dict(row),
                                            "not_accepted"))
            if row is None:  # a result beat the push's answer: the row as it is now
                row = conn.execute("SELECT * FROM transactions WHERE id = ?",
                                   (tx_id,)).fetchone()
            if row is not None and pin is not None:
                self._pin(conn, pin, dict(row))  # the answer the caller gets: this row
            if release is not None:
                conn.execute("DELETE FROM idempotency_keys WHERE scope = ? AND key = ?",
                             (release.scope, release.key))
        return dict(row) if row is not None else None

    def get(self, ref):
        """The row by gateway id or CheckoutRequestID, as a dict, or None."""
        return self._read_one(
            "SELECT * FROM transactions WHERE id = ? UNION ALL"
            " SELECT * FROM transactions WHERE checkout_request_id = ? LIMIT 1", (ref, ref))

    def recover_interrupted(self, older_than_s, event=None):
        """Rows stuck in `submitting` (the process died mid-push) become `unknown`, each
        with its webhook event `event(before, after, "interrupted")` in the same commit."""
        cutoff = iso_utc(self._clock() - older_than_s)
        with self._write() as conn:
            rows = conn.execute(
                "UPDATE transactions SET status = ?, reason = 'interrupted', updated_at = ?"
                " WHERE status = ? AND created_at <= ? RETURNING *",
                (UNKNOWN, self._now(), SUBMITTING, cutoff)).fetchall()
            for row in sorted(rows, key=lambda r: r["id"]) if event is not None else ():
                self._add_event(conn, event(dict(row, status=SUBMITTING), dict(row),
                                            "interrupted"))
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
        with self._write() as conn:
            row = conn.execute(
                "SELECT id FROM transactions WHERE checkout_request_id IS NOT NULL"
                " AND next_check_at <= ? AND claimed_until <= ?"
                " AND ((status = ? AND created_at <= ?) OR (status = ? AND created_at >= ?))"
                f" ORDER BY next_check_at, created_at LIMIT 1{self.SKIP_LOCKED}",
                (due_by, now, PENDING, iso_utc(now - older_than_s), UNKNOWN,
                 iso_utc(now - unknown_window_s))).fetchone()
            if row is not None:
                row = conn.execute("UPDATE transactions SET claimed_until = ? WHERE id = ?"
                                   " RETURNING *", (now + lease_s, row["id"])).fetchone()
        return dict(row) if row is not None else None

    def claim(self, tx_id, lease_s):
        """Lease one row now, whatever its schedule; None if another claimer holds it (or it
        does not exist). The row's `claimed_until` is the lease: pass it back to release."""
        now = self._clock()
        with self._write() as conn:
            row = conn.execute("UPDATE transactions SET claimed_until = ? WHERE id = ?"
                               " AND claimed_until <= ? RETURNING *",
                               (now + lease_s, tx_id, now)).fetchone()
        return dict(row) if row is not None else None

    def reschedule(self, tx_id, next_check_at, lease):
        """Not settled yet: query again at `next_check_at`; the lease ends. Only while the
        lease is still this claimer's: if it lapsed and another took the row, it decides."""
        with self._write() as conn:
            conn.execute(
                "UPDATE transactions SET next_check_at = ?, check_attempts = check_attempts + 1,"
                " claimed_until = 0 WHERE id = ? AND claimed_until = ?",
                (next_check_at, tx_id, lease))

    def give_up(self, tx_id, next_check_at, lease, event=None):
        """No final result before the deadline: `unknown`, reason no_final_result; still
        queried now and then (from `next_check_at`) in case the result turns up. The
        webhook event `event(before, after, "gave_up")` is written in the same commit."""
        with self._write() as conn:
            before = conn.execute(f"SELECT * FROM transactions WHERE id = ?{self.FOR_UPDATE}",
                                  (tx_id,)).fetchone()
            row = conn.execute(
                "UPDATE transactions SET status = ?, reason = 'no_final_result', claimed_until = 0,"
                " next_check_at = ?, check_attempts = check_attempts + 1, updated_at = ?"
                " WHERE id = ? AND status = ? AND claimed_until = ? RETURNING *",
                (UNKNOWN, next_check_at, self._now(), tx_id, PENDING, lease)).fetchone()
            if row is not None and event is not None:
                self._add_event(conn, event(dict(before), dict(row), "gave_up"))
        return row is not None

    def list_page(self, *, status=None, since=None, after=None, limit=50, owner=None,
                  with_unowned=False):
        """Newest first; `after` = (created_at, id) of the previous page's last row;
        `owner`: only that owner's rows (and, `with_unowned`, rows from before owners).

        Returns (rows, more): the page and whether another page follows.
        """
        where, args = [], []
        if owner is not None:
            where.append("(owner = ? OR owner IS NULL)" if with_unowned else "owner = ?")
            args.append(owner)
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
        rows = self._read(sql, (*args, limit + 1))
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
        rows = self._read("SELECT status, COUNT(*) AS n FROM transactions GROUP BY status")
        counts = {r["status"]: r["n"] for r in rows}
        if SUBMITTING in counts:
            counts[PENDING] = counts.get(PENDING, 0) + counts.pop(SUBMITTING)
        return counts

    # --- settling: callbacks and query answers ----------------------------

    SETTLE_COLUMNS = ("status", "reason", "result_code", "result_desc", "receipt",
                      "checkout_request_id", "merchant_request_id")

    def settle(self, tx_id, rules, *, callback=None, release_claim=None, event=None):
        """In one write transaction: read the row, let `rules(row)` decide (a Decision
        from settlement; None: the callback is malformed), apply its changes, store the
        raw `callback` (a settlement.CallbackRecord) if given, end the lease
        `release_claim` if the row is still held under it, and write the webhook event
        `event(before, after, outcome)` returns (a NewEvent or None), all in one commit.

        Returns (outcome, row after): outcome is the decision's, or malformed or
        unknown_transaction; row is None for an unknown transaction.
        """
        with self._write() as conn:
            row = conn.execute(f"SELECT * FROM transactions WHERE id = ?{self.FOR_UPDATE}",
                               (tx_id,)).fetchone()
            if row is None:
                outcome = "unknown_transaction"
            elif rules is None:
                outcome = "malformed"
            else:
                row = before = dict(row)
                decision = rules(row)
                outcome = decision.outcome
                if decision.changes:
                    row = dict(self._update(conn, tx_id, decision.changes))
                    if event is not None and row["status"] != before["status"]:
                        self._add_event(conn, event(before, row, outcome))
            if callback is not None:
                conn.execute(
                    "INSERT INTO callbacks (tx_id, received_at, remote_addr, outcome, body)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (tx_id, self._now(), callback.remote_addr, outcome, callback.body))
            if release_claim is not None and row is not None:
                conn.execute("UPDATE transactions SET claimed_until = 0 WHERE id = ?"
                             " AND claimed_until = ?", (tx_id, release_claim))
        return outcome, (dict(row) if row is not None else None)

    def _update(self, conn, tx_id, changes):
        sets, args = [], {"id": tx_id, "updated_at": self._now()}
        for column, value in changes.items():
            if column not in self.SETTLE_COLUMNS:
                raise ValueError(f"settle cannot change {column}")
            args[column] = value
            if column == "receipt":
                sets.append("receipt = COALESCE(:receipt, receipt)")
            elif column == "checkout_request_id":
                # Learn it only if unset and no other row holds it (it is UNIQUE).
                sets.append("checkout_request_id = COALESCE(checkout_request_id, (SELECT"
                            " :checkout_request_id WHERE NOT EXISTS (SELECT 1 FROM transactions"
                            " WHERE checkout_request_id = :checkout_request_id)))")
            elif column == "merchant_request_id":
                sets.append("merchant_request_id = COALESCE(merchant_request_id,"
                            " :merchant_request_id)")
            else:
                sets.append(f"{column} = :{column}")
        sets.append("updated_at = :updated_at")
        return conn.execute(f"UPDATE transactions SET {', '.join(sets)} WHERE id = :id"
                            " RETURNING *", args).fetchone()

    def _add_event(self, conn, new):
        if new is None:
            return
        now = self._clock()
        conn.execute(
            "INSERT INTO events (id, tx_id, owner, type, body, status, next_attempt_at,"
            " created_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
            (new_tx_id(now, "msg_"), new.tx_id, new.owner, new.type, new.body, now, now))

    # --- the webhook outbox ---------------------------------------------------

    def claim_event(self, lease_s, skip_owners=()):
        """Lease the event most due for delivery (not of `skip_owners`), or None. An event
        waits while one written before it for the same transaction is still pending, so a
        merchant sees them in order: written order is the rowid, whatever the clocks of
        the processes that wrote them said."""
        now = self._clock()
        skip = (f" AND owner NOT IN ({','.join('?' * len(skip_owners))})" if skip_owners
                else "")
        seq = self.SEQ
        with self._write() as conn:
            row = conn.execute(
                "SELECT id FROM events e WHERE status = 'pending' AND next_attempt_at <= ?"
                f" AND claimed_until <= ?{skip} AND NOT EXISTS (SELECT 1 FROM events o"
                f" WHERE o.tx_id = e.tx_id AND o.status = 'pending' AND o.{seq} < e.{seq})"
                f" ORDER BY next_attempt_at, {seq} LIMIT 1{self.SKIP_LOCKED}",
                (now, now, *skip_owners)).fetchone()
            if row is not None:
                row = conn.execute("UPDATE events SET claimed_until = ? WHERE id = ?"
                                   " RETURNING *", (now + lease_s, row["id"])).fetchone()
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

    def events(self, tx_id=None):
        """Events (of one transaction), oldest first, each with its attempts."""
        rows = self._read("SELECT * FROM events" + (" WHERE tx_id = ?" if tx_id else "")
                          + f" ORDER BY {self.SEQ}", (tx_id,) if tx_id else ())
        for row in rows:
            row["attempts_log"] = self._read(
                "SELECT * FROM event_attempts WHERE event_id = ? ORDER BY id", (row["id"],))
        return rows

    def callbacks(self, tx_id):
        """The stored callbacks of one transaction, oldest first."""
        return self._read("SELECT * FROM callbacks WHERE tx_id = ? ORDER BY id", (tx_id,))
