"""The SQLite engine of the ledger: one file on local disk, for one host.

Owns the SQLite schema (its version in PRAGMA user_version), the connections (a reading
one per thread; one writing connection whose transactions group commit shares among
concurrent writes; WAL, synchronous=FULL, a busy timeout, `BEGIN IMMEDIATE`) and the
hooks of the contract: a write is one savepoint of a shared transaction and returns
only once its COMMIT is durable; a failed COMMIT is rolled back; a connection that
cannot be rolled back is discarded. The file's write lock serialises every writer, so
no other lock is needed.
"""

import logging
import sqlite3
import threading
import time
from contextlib import contextmanager

from mpesa_ledger import group_commit
from mpesa_ledger.contract import Dialect, Ledger

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 5.0
# 1: the first tables; 2: transactions.owner (added by _migrate); 3: receipts and
# applied_entries (a receipt pays once; a spooled entry is applied once); 4: Paybill/Till
# confirmations (c2b_receipts, c2b_bodies); 5: initiator requests, their results and stops,
# receipt claims; 6: console sessions; 7: console actions; 8: payment links; 9: a
# payment's link (transactions.link_id, added by _migrate)
SCHEMA_VERSION = 9

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
    owner               TEXT, -- the API key name that made it; NULL on rows from before owners
    link_id             TEXT  -- the payment link it was made through, if any
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
-- every M-Pesa receipt the ledger has accepted, once: one namespace for all its kinds
CREATE TABLE IF NOT EXISTS receipts (
    receipt    TEXT PRIMARY KEY,
    tx_id      TEXT NOT NULL,
    kind       TEXT NOT NULL,  -- stk (tx_id: the payment) | c2b (tx_id: empty)
    created_at REAL NOT NULL
);
-- Paybill/Till confirmations: each receipt once (its number also in receipts, kind c2b),
-- and every body as it came
CREATE TABLE IF NOT EXISTS c2b_receipts (
    receipt     TEXT PRIMARY KEY,
    amount      INTEGER,            -- whole shillings; NULL: not money (see anomalies)
    account     TEXT NOT NULL,      -- BillRefNumber; empty for a till
    shortcode   TEXT NOT NULL,
    channel     TEXT,               -- paybill | till
    paid_at     TEXT,               -- TransTime, in UTC
    payer_name  TEXT NOT NULL,
    msisdn      TEXT NOT NULL,      -- hashed or masked, never in clear
    anomalies   TEXT NOT NULL,      -- comma-separated; empty when none
    owner       TEXT NOT NULL,      -- the matched payment's, else by account prefix, else default
    matched_tx_id TEXT,             -- the one recent payment whose reference is the account
    received_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS c2b_receipts_owner ON c2b_receipts (owner, received_at);
-- a Paybill account number finds the payment it pays: its reference, any case
CREATE INDEX IF NOT EXISTS transactions_reference ON transactions (lower(trim(reference)), created_at);
CREATE TABLE IF NOT EXISTS c2b_bodies (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    receipt     TEXT,
    received_at TEXT NOT NULL,
    remote_addr TEXT,
    outcome     TEXT NOT NULL,
    body        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS c2b_bodies_receipt ON c2b_bodies (receipt);
-- Daraja's initiator requests (refunds by Reversal, code checks by Transaction Status,
-- Account Balance): each row before Daraja is called; its result URL names it
CREATE TABLE IF NOT EXISTS initiator_requests (
    id            TEXT PRIMARY KEY,   -- rq_…
    kind          TEXT NOT NULL,      -- refund | verify | balance
    owner         TEXT NOT NULL,
    receipt       TEXT,               -- refund: the receipt reversed; verify: the code checked
    tx_id         TEXT,               -- a refund of an STK payment: the payment
    amount        INTEGER,            -- a refund: the whole amount reversed
    status        TEXT NOT NULL,      -- submitting | pending | unknown | succeeded | failed
    reason        TEXT,
    result_code   TEXT,
    result_desc   TEXT,
    result_receipt TEXT,              -- a refund: the reversal's own M-Pesa receipt
    details       TEXT,               -- JSON: what the result said (a check, a balance)
    conversation_id TEXT,
    originator_conversation_id TEXT,
    idem_key      TEXT,               -- the caller's Idempotency-Key (NULL once freed)
    request_hash  TEXT,
    answer_status INTEGER,            -- the first answer, replayed for that key
    answer_body   BLOB,
    fingerprint   TEXT NOT NULL,      -- the initiator configuration that sent it
    attempts      INTEGER NOT NULL DEFAULT 1,
    requested_at  TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    completed_at  TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS initiator_requests_key ON initiator_requests (owner, idem_key)
    WHERE idem_key IS NOT NULL;
-- at most one refund of a receipt that is not a definite failure
CREATE UNIQUE INDEX IF NOT EXISTS initiator_one_refund ON initiator_requests (receipt)
    WHERE kind = 'refund' AND status <> 'failed';
CREATE INDEX IF NOT EXISTS initiator_requests_receipt
    ON initiator_requests (receipt, kind, requested_at);
CREATE INDEX IF NOT EXISTS initiator_requests_status ON initiator_requests (status, requested_at);
CREATE INDEX IF NOT EXISTS initiator_requests_kind ON initiator_requests (kind, requested_at);
-- every result and queue timeout Daraja POSTed, as it came (phone numbers masked)
CREATE TABLE IF NOT EXISTS initiator_results (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,        -- result | timeout
    received_at TEXT NOT NULL,
    remote_addr TEXT,
    outcome     TEXT NOT NULL,
    body        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS initiator_results_request ON initiator_results (request_id);
-- an initiator refused (wrong credential, locked): no call until its configuration changes
CREATE TABLE IF NOT EXISTS initiator_stops (
    fingerprint TEXT PRIMARY KEY,
    result_code TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    at          REAL NOT NULL
);
-- a receipt attached to one merchant reference, once: one code pays for one order
CREATE TABLE IF NOT EXISTS receipt_claims (
    receipt    TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    reference  TEXT NOT NULL,
    claimed_at TEXT NOT NULL
);
-- a person's console sign-in: the cookie names it; sign-out ends it for every host
CREATE TABLE IF NOT EXISTS console_sessions (
    id          TEXT PRIMARY KEY,
    person      TEXT NOT NULL,        -- person@owner, as GATEWAY_CONSOLE_KEYS names them
    key_hash    TEXT NOT NULL,        -- which key signed in: a removed key ends its sessions
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    ended_at    REAL
);
CREATE INDEX IF NOT EXISTS console_sessions_expires ON console_sessions (expires_at);
-- what a person did from the console (a refund, a query, a redelivery, a code check)
CREATE TABLE IF NOT EXISTS console_actions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    person      TEXT NOT NULL,        -- person@owner
    tx_id       TEXT,                 -- the payment (or receipt, or event) it concerns
    action      TEXT NOT NULL,        -- requery | refund | redeliver | verify
    outcome     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS console_actions_tx ON console_actions (tx_id);
-- payment links a merchant sends a customer (/pay/<id>): each a fixed amount, until it
-- expires, is revoked or is used up
CREATE TABLE IF NOT EXISTS payment_links (
    id          TEXT PRIMARY KEY,     -- pl_ + 22 random characters: the URL is its only key
    owner       TEXT NOT NULL,
    amount      INTEGER NOT NULL,
    reference   TEXT NOT NULL,
    description TEXT NOT NULL,
    max_uses    INTEGER NOT NULL,
    uses        INTEGER NOT NULL DEFAULT 0,
    expires_at  REAL NOT NULL,
    revoked_at  REAL,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS payment_links_owner ON payment_links (owner, created_at);
-- the spool entries already applied: a replay cut short by a crash never applies one twice
CREATE TABLE IF NOT EXISTS applied_entries (
    id         TEXT PRIMARY KEY,
    applied_at REAL NOT NULL
);
"""


class _Rows:
    """A statement's rows, read at once (so a write's results can be read after it ends,
    as the contract does for PostgreSQL's pipelined writes)."""

    __slots__ = ("_rows", "_next", "rowcount")

    def __init__(self, cur):
        self._rows = cur.fetchall() if cur.description is not None else []
        self._next = 0
        self.rowcount = cur.rowcount

    def fetchone(self):
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self):
        rows, self._next = self._rows[self._next:], len(self._rows)
        return rows

    def __iter__(self):
        return iter(self.fetchall())


class _Eager:
    """The write's connection, each statement's rows read as it runs."""

    __slots__ = ("_conn",)

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql, args=()):
        return _Rows(self._conn.execute(sql, args))


class SqliteLedger(Ledger):
    Error = sqlite3.Error
    Permanent = (sqlite3.IntegrityError, sqlite3.DataError)
    dialect = Dialect(seq="rowid", for_update="", skip_locked="")

    def __init__(self, path, *, clock=time.time, events=None, receipt_rules=None,
                 request_events=None, busy_timeout_s=BUSY_TIMEOUT_S, on_connect=None):
        """`busy_timeout_s`: how long a write waits for another process's lock on the file
        before it fails (GATEWAY_DB_WAIT_S)."""
        super().__init__(clock=clock, events=events, receipt_rules=receipt_rules,
                         request_events=request_events)
        self.path = path
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
            # 9: the payment link a payment was made through
            if "link_id" not in columns:
                conn.execute("ALTER TABLE transactions ADD COLUMN link_id TEXT")
            conn.execute("CREATE INDEX IF NOT EXISTS transactions_link"
                         " ON transactions (link_id, phone)")
            # 3: receipts already in the ledger are taken (the oldest payment keeps each)
            if conn.execute("PRAGMA user_version").fetchone()[0] < 3:
                conn.execute("INSERT OR IGNORE INTO receipts (receipt, tx_id, kind, created_at)"
                             " SELECT receipt, id, 'stk', 0 FROM transactions"
                             " WHERE receipt IS NOT NULL ORDER BY created_at, id")
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

    @contextmanager
    def _write(self, step=None, prelude=None):
        """One write, in the group commit's current transaction (taken with BEGIN
        IMMEDIATE: no mid-way SQLITE_BUSY); returns once it is durable. (`step` names it
        for engines that count round trips; there are none to count here.)"""
        if prelude is not None:
            raise NotImplementedError("the SQLite ledger keeps no shared rate buckets")
        with self._group.write() as conn:
            yield _Eager(conn)

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
        return [dict(r) for r in self._conn().execute(sql, args)]

    def _serialize(self, conn, names):
        """The file's write lock, taken by BEGIN IMMEDIATE, already serialises every writer."""

    def close(self):
        self._group.close()
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()


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
