"""The PostgreSQL engine of the ledger: the same contract as SQLite's, for several hosts.

Owns the PostgreSQL side of the ledger: the connection pool (psycopg 3 and
psycopg_pool, an optional install: requirements-postgres.txt), the schema and its
versioned migrations, the state the fleet shares (one OAuth token, the rate buckets),
and the engine's own means for the promises `contract.Ledger` states once in SQL:

- every write is one transaction on one pooled connection, committed before the
  call returns (the server's `synchronous_commit = on` makes that durable);
- an idempotency key and a phone are serialised with transaction-scoped advisory
  locks (two hosts cannot both claim one key or prompt one phone), not a table lock;
- a row read to be changed is locked `FOR UPDATE`; the reconciler's and the webhook
  sender's claims pass over locked rows (`FOR UPDATE SKIP LOCKED`) and take per-row
  leases;
- the outbox's written order is an identity column;
- every write is one pipeline (psycopg's pipeline mode): its statements, BEGIN and
  COMMIT go out together and the server answers them in one network round trip, unless
  the contract reads a result before the write ends (each such read is one more);
- a connection is checked (an empty query) only when it comes out of the pool after
  sitting idle for IDLE_CHECK_S or with something to read (the server's goodbye when it
  shut down: a zero-timeout poll of its socket), and every idle one once a check or a
  call fails on a broken connection: not at every checkout, which cost a round trip per
  ledger call, and the gateway still recovers by itself;
- the statements and round trips each ledger step costs are counted (`round_trips`,
  for /metrics and the bench).
"""

import logging
import re
import select
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from functools import lru_cache

import config
from mpesa_ledger.contract import Dialect, Ledger, LedgerOpenError

try:
    import psycopg
    from psycopg.rows import dict_row
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError:  # an optional install: only needed when GATEWAY_DB is a postgresql URL
    psycopg = None

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5
# A connection idle this long is checked when taken from the pool; a busier one is used as
# it is (a failure on it has every idle connection checked, see `_broken`).
IDLE_CHECK_S = 10.0
MIGRATE_LOCK = "mpesa-gateway:migrate"

# Each step runs once, in order, in one transaction; `schema_migrations` records it.
MIGRATIONS = (
    (1, """
CREATE TABLE transactions (
    id                  TEXT PRIMARY KEY,
    checkout_request_id TEXT UNIQUE,
    merchant_request_id TEXT,
    status              TEXT NOT NULL,
    reason              TEXT,
    phone               TEXT NOT NULL,
    amount              BIGINT NOT NULL,
    reference           TEXT NOT NULL,
    description         TEXT NOT NULL,
    result_code         TEXT,
    result_desc         TEXT,
    receipt             TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    next_check_at       DOUBLE PRECISION NOT NULL DEFAULT 0,
    check_attempts      INTEGER NOT NULL DEFAULT 0,
    claimed_until       DOUBLE PRECISION NOT NULL DEFAULT 0,
    owner               TEXT
);
CREATE INDEX transactions_status ON transactions (status, next_check_at);
CREATE INDEX transactions_phone ON transactions (phone, created_at);
CREATE INDEX transactions_created ON transactions (created_at, id);
CREATE INDEX transactions_owner ON transactions (owner, created_at, id);
CREATE TABLE heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at DOUBLE PRECISION NOT NULL
);
CREATE TABLE idempotency_keys (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    tx_id        TEXT NOT NULL,
    status_code  INTEGER,
    body         BYTEA,
    created_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_created ON idempotency_keys (created_at);
CREATE TABLE callbacks (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx_id       TEXT NOT NULL,
    received_at TEXT NOT NULL,
    remote_addr TEXT,
    outcome     TEXT NOT NULL,
    body        BYTEA NOT NULL
);
CREATE INDEX callbacks_tx ON callbacks (tx_id);
CREATE TABLE events (
    id              TEXT PRIMARY KEY,
    seq             BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    tx_id           TEXT NOT NULL,
    owner           TEXT NOT NULL,
    type            TEXT NOT NULL,
    body            BYTEA NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    claimed_until   DOUBLE PRECISION NOT NULL DEFAULT 0,
    created_at      DOUBLE PRECISION NOT NULL,
    delivered_at    DOUBLE PRECISION
);
CREATE INDEX events_due ON events (status, next_attempt_at);
CREATE INDEX events_tx ON events (tx_id, seq);
CREATE INDEX events_owner ON events (owner, id);
CREATE TABLE event_attempts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    TEXT NOT NULL,
    at          DOUBLE PRECISION NOT NULL,
    status_code INTEGER,
    duration_ms DOUBLE PRECISION NOT NULL,
    error       TEXT
);
CREATE INDEX event_attempts_event ON event_attempts (event_id);
"""),
    (2, """
CREATE TABLE fleet_token (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    token       TEXT,
    expires_at  DOUBLE PRECISION NOT NULL DEFAULT 0,
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0
);
INSERT INTO fleet_token (id) VALUES (1);
CREATE TABLE rate_buckets (
    key        TEXT PRIMARY KEY,
    tokens     DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    granted    BOOLEAN NOT NULL
);
"""),
    # A claim looks for an earlier pending event of the same payment: with a backlog of
    # thousands, a scan per candidate made each claim take seconds.
    (3, """
CREATE INDEX events_pending_tx ON events (tx_id, seq) WHERE status = 'pending';
"""),
    # A receipt pays once (receipts already in the ledger are taken, the oldest payment
    # keeping each); a spooled entry is applied once.
    (4, """
CREATE TABLE receipts (
    receipt    TEXT PRIMARY KEY,
    tx_id      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
INSERT INTO receipts (receipt, tx_id, kind, created_at)
    SELECT receipt, id, 'stk', 0 FROM transactions WHERE receipt IS NOT NULL
    ORDER BY created_at, id ON CONFLICT (receipt) DO NOTHING;
CREATE TABLE applied_entries (
    id         TEXT PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL
);
"""),
    # Paybill/Till confirmations: each receipt once (its number also in receipts, kind
    # c2b), and every body as it came.
    (5, """
CREATE TABLE c2b_receipts (
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
CREATE INDEX c2b_receipts_owner ON c2b_receipts (owner, received_at);
-- a Paybill account number finds the payment it pays: its reference, any case
CREATE INDEX transactions_reference ON transactions (lower(trim(reference)), created_at);
CREATE TABLE c2b_bodies (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    receipt     TEXT,
    received_at TEXT NOT NULL,
    remote_addr TEXT,
    outcome     TEXT NOT NULL,
    body        BYTEA NOT NULL
);
CREATE INDEX c2b_bodies_receipt ON c2b_bodies (receipt);
"""),
    (6, """
-- Daraja's initiator requests (refunds by Reversal, code checks by Transaction Status,
-- Account Balance): each row before Daraja is called; its result URL names it
CREATE TABLE initiator_requests (
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
    answer_body   BYTEA,
    fingerprint   TEXT NOT NULL,      -- the initiator configuration that sent it
    attempts      INTEGER NOT NULL DEFAULT 1,
    requested_at  TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    completed_at  TEXT
);
CREATE UNIQUE INDEX initiator_requests_key ON initiator_requests (owner, idem_key)
    WHERE idem_key IS NOT NULL;
-- at most one refund of a receipt that is not a definite failure
CREATE UNIQUE INDEX initiator_one_refund ON initiator_requests (receipt)
    WHERE kind = 'refund' AND status <> 'failed';
CREATE INDEX initiator_requests_receipt
    ON initiator_requests (receipt, kind, requested_at);
CREATE INDEX initiator_requests_status ON initiator_requests (status, requested_at);
CREATE INDEX initiator_requests_kind ON initiator_requests (kind, requested_at);
-- every result and queue timeout Daraja POSTed, as it came (phone numbers masked)
CREATE TABLE initiator_results (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,        -- result | timeout
    received_at TEXT NOT NULL,
    remote_addr TEXT,
    outcome     TEXT NOT NULL,
    body        BYTEA NOT NULL
);
CREATE INDEX initiator_results_request ON initiator_results (request_id);
-- an initiator refused (wrong credential, locked): no call until its configuration changes
CREATE TABLE initiator_stops (
    fingerprint TEXT PRIMARY KEY,
    result_code TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    at          DOUBLE PRECISION NOT NULL
);
-- a receipt attached to one merchant reference, once: one code pays for one order
CREATE TABLE receipt_claims (
    receipt    TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    reference  TEXT NOT NULL,
    claimed_at TEXT NOT NULL
);
"""),
    (7, """
-- a person's console sign-in: the cookie names it; sign-out ends it for every host
CREATE TABLE console_sessions (
    id          TEXT PRIMARY KEY,
    person      TEXT NOT NULL,        -- person@owner, as GATEWAY_CONSOLE_KEYS names them
    key_hash    TEXT NOT NULL,        -- which key signed in: a removed key ends its sessions
    created_at  DOUBLE PRECISION NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL,
    ended_at    DOUBLE PRECISION
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);
"""),
    (8, """
-- what a person did from the console (a refund, a query, a redelivery, a code check)
CREATE TABLE console_actions (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          DOUBLE PRECISION NOT NULL,
    person      TEXT NOT NULL,        -- person@owner
    tx_id       TEXT,                 -- the payment (or receipt, or event) it concerns
    action      TEXT NOT NULL,        -- requery | refund | redeliver | verify
    outcome     TEXT NOT NULL
);
CREATE INDEX console_actions_tx ON console_actions (tx_id);
"""),
    (9, """
-- payment links a merchant sends a customer (/pay/<id>): each a fixed amount, until it
-- expires, is revoked or is used up
CREATE TABLE payment_links (
    id          TEXT PRIMARY KEY,     -- pl_ + 22 random characters: the URL is its only key
    owner       TEXT NOT NULL,
    amount      INTEGER NOT NULL,
    reference   TEXT NOT NULL,
    description TEXT NOT NULL,
    max_uses    INTEGER NOT NULL,
    uses        INTEGER NOT NULL DEFAULT 0,
    expires_at  DOUBLE PRECISION NOT NULL,
    revoked_at  DOUBLE PRECISION,
    created_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX payment_links_owner ON payment_links (owner, created_at);
"""),
    (10, """
ALTER TABLE transactions ADD COLUMN link_id TEXT;
CREATE INDEX transactions_link ON transactions (link_id, phone);
"""),
)
# The server's clock: every host reads the same one for token expiry, leases and buckets.
NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"


@lru_cache(maxsize=512)
def _sql(text):
    """The ledger's SQL (qmark and :name parameters) in psycopg's format style."""
    text = text.replace("%", "%%").replace("?", "%s")
    return re.sub(r"(?<![:\w]):([a-z_]+)", r"%(\1)s", text)


class RoundTrips:
    """Calls, statements sent to the server and network round trips (waits for its
    answer), per ledger step, since the ledger opened. A pipelined write is one round trip
    however many statements it sends, plus one for each result read before it ends."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {}  # step → [calls, statements, round trips]

    def add(self, step, statements, round_trips):
        with self._lock:
            counts = self._counts.setdefault(step, [0, 0, 0])
            counts[0] += 1
            counts[1] += statements
            counts[2] += round_trips

    def snapshot(self):
        """{step: (statements, round trips, calls)}."""
        with self._lock:
            return {step: (n, trips, calls) for step, (calls, n, trips) in self._counts.items()}


class _Result:
    """A statement's result inside a pipelined write: reading it before the write ends
    waits for the server (one round trip for everything sent so far); after, it is free."""

    __slots__ = ("_cur", "_tx")

    def __init__(self, cur, tx):
        self._cur, self._tx = cur, tx

    def fetchone(self):
        self._tx.reading()
        return self._cur.fetchone()

    def fetchall(self):
        self._tx.reading()
        return self._cur.fetchall()

    def __iter__(self):
        return iter(self.fetchall())

    @property
    def rowcount(self):
        self._tx.reading()
        return self._cur.rowcount


class _Tx:
    """A connection inside one transaction, speaking the ledger's SQL and counting what it
    sends: `pipelined`, statements wait in the pipeline until a result is read or the
    write ends; else each statement is its own round trip."""

    def __init__(self, conn, pipelined):
        self.conn = conn
        self.pipelined = pipelined
        self.statements = 0
        self.round_trips = 0
        self._unanswered = False  # statements sent whose answers were not waited for

    def execute(self, sql, args=()):
        self.statements += 1
        cur = self.conn.execute(_sql(sql), args)
        if not self.pipelined:
            self.round_trips += 1
            return cur
        self._unanswered = True
        return _Result(cur, self)

    def reading(self):
        if self._unanswered and self.conn._pipeline is not None:
            self.round_trips += 1  # psycopg flushes and waits for every answer so far
            self._unanswered = False

    def ended(self):
        """The write's end: a pipeline's sync is one round trip (COMMIT's answer always
        needs one); without a pipeline, BEGIN and COMMIT were sent apart, one each."""
        if self.pipelined:
            self.round_trips += 1
        else:
            self.statements += 2
            self.round_trips += 2


class PostgresLedger(Ledger):
    Error = psycopg.Error if psycopg is not None else OSError
    Permanent = (psycopg.IntegrityError, psycopg.DataError) if psycopg is not None else ()
    dialect = Dialect(seq="seq", for_update=" FOR UPDATE", skip_locked=" FOR UPDATE SKIP LOCKED")
    shared_by_hosts = True

    def __init__(self, url, *, clock, events=None, receipt_rules=None, request_events=None,
                 pool_size=8, migrate=True, wait_s=5.0):
        if psycopg is not None and not psycopg.Pipeline.is_supported():
            raise LedgerOpenError(
                "the PostgreSQL ledger needs psycopg's pipeline mode (libpq 14 or newer):"
                " install psycopg[binary] (requirements-postgres.txt) or a newer libpq")
        if psycopg is None:
            raise LedgerOpenError(
                "GATEWAY_DB is a PostgreSQL URL but psycopg is not installed:"
                " pip install 'mpesa-wsgi[postgres]' (from a clone: pip install -r"
                " requirements-postgres.txt)")
        super().__init__(clock=clock, events=events, receipt_rules=receipt_rules,
                         request_events=request_events)
        self.path = config.masked_url(url)
        self._commits, self._count_lock = 0, threading.Lock()
        self._trips = RoundTrips()
        self._idle_since = weakref.WeakKeyDictionary()  # connection → when it went back
        self._checking = threading.Lock()  # held while a thread checks the idle connections
        self._pool = ConnectionPool(
            # wait_s: a request waits this long for a connection, then 503 ledger_unavailable
            url, min_size=1, max_size=pool_size, timeout=wait_s, open=False,
            # A server host that vanishes (power, network) is noticed in about 15 s, not the
            # kernel's 15 minutes: TCP keepalives and a bound on unacknowledged data.
            kwargs={"autocommit": True, "row_factory": dict_row,
                    "connect_timeout": CONNECT_TIMEOUT_S, "application_name": "mpesa-gateway",
                    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3,
                    "keepalives_count": 3, "tcp_user_timeout": 15000},
            configure=self._returned, check=self._check_if_idle, reset=self._returned,
            name="ledger")
        try:
            self._pool.open(wait=True, timeout=wait_s + CONNECT_TIMEOUT_S)
            if migrate:
                self.migrate()
        except LedgerOpenError:
            self._pool.close()
            raise
        except Exception as exc:
            self._pool.close()
            raise LedgerOpenError(f"the PostgreSQL ledger {self.path} cannot be opened:"
                                  f" {self._why(url, exc)}") from None

    @staticmethod
    def _why(url, exc):
        """What the server said, in one line: the pool only says it gave up waiting, so
        one direct connection asks (refused, no such role, no CONNECT grant, bad password)."""
        if isinstance(exc, PoolTimeout):
            try:
                psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S).close()
            except psycopg.Error as direct:
                exc = direct
        message = " ".join(str(exc).split())
        for password in config.url_passwords(url):  # libpq may quote a piece of the URL
            message = message.replace(password, config.MASK)
        return message

    def migrate(self):
        """Apply the steps not applied yet; returns the schema version. Two processes
        starting at once take turns (an advisory lock), so each step runs once. A ledger
        already up to date is only read: a role granted just the rows (deploy/postgresql/
        grants.sql) starts. Missing privileges are one LedgerOpenError naming the grants."""
        try:
            applied = self._applied()
        except psycopg.errors.InsufficientPrivilege as exc:
            raise LedgerOpenError(
                f"the PostgreSQL ledger {self.path}: {exc.diag.message_primary}; this role"
                " lacks the grants on the ledger's tables (run grants.sql, in the source"
                " repository's deploy/postgresql/, as their owner)") from None
        if not applied >= {version for version, _ in MIGRATIONS}:
            try:
                self._apply_migrations()
            except (psycopg.errors.InsufficientPrivilege,
                    psycopg.errors.InvalidSchemaName) as exc:
                raise LedgerOpenError(
                    f"the PostgreSQL ledger {self.path}: {exc.diag.message_primary}; the"
                    " schema is missing or needs an upgrade, and this role may not make it"
                    " (run `migrate` as the tables' owner, then grants.sql from the source"
                    " repository's deploy/postgresql/)") from None
        self._check_grants()
        return MIGRATIONS[-1][0]

    def _check_grants(self):
        """Every ledger table's rows (and sequences) usable by this role, found at start-up
        rather than at the first payment or callback: else one LedgerOpenError naming what
        is missing."""
        missing = [row["name"] for row in self._read(
            "SELECT c.relname AS name FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema()"
            " AND ((c.relkind = 'r' AND c.relname <> 'schema_migrations' AND NOT ("
            " has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'INSERT')"
            " AND has_table_privilege(c.oid, 'UPDATE') AND has_table_privilege(c.oid, 'DELETE')))"
            " OR (c.relkind = 'S' AND NOT has_sequence_privilege(c.oid, 'USAGE')))"
            " ORDER BY c.relname")]
        if missing:
            raise LedgerOpenError(
                f"the PostgreSQL ledger {self.path}: this role may not read and write the rows"
                f" of {', '.join(missing)} (run grants.sql, in the source repository's"
                " deploy/postgresql/, as the tables' owner)")

    def _applied(self):
        """The schema versions applied so far (none in an empty database)."""
        if self._read("SELECT to_regclass('schema_migrations') AS t")[0]["t"] is None:
            return set()
        return {r["version"] for r in self._read("SELECT version FROM schema_migrations")}

    def _apply_migrations(self):
        """Apply the steps not applied yet, under the migration lock."""
        with self._plain_write() as tx:
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (MIGRATE_LOCK,))
            tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY"
                       " KEY, applied_at DOUBLE PRECISION NOT NULL)")
            done = {r["version"] for r in tx.execute("SELECT version FROM schema_migrations")}
            for version, script in MIGRATIONS:
                if version not in done:
                    tx.statements += 1
                    tx.round_trips += 1
                    tx.conn.execute(script)
                    tx.execute("INSERT INTO schema_migrations (version, applied_at)"
                               " VALUES (?, ?)", (version, self._clock()))
                    log.info("ledger migrated to version=%d", version)
        return MIGRATIONS[-1][0]

    def _returned(self, conn):
        """The pool's configure and reset hooks: the connection is new, or went back to
        the pool, now."""
        self._idle_since[conn] = time.monotonic()

    def _check_if_idle(self, conn):
        """The pool's check, run when a connection is taken: one idle for IDLE_CHECK_S (a
        server may have restarted meanwhile), or one the server wrote to or closed while
        it sat in the pool, is asked an empty query; a broken one is replaced."""
        if (time.monotonic() - self._idle_since.get(conn, 0.0) >= IDLE_CHECK_S
                or self._spoken_to(conn)):
            self._trips.add("pool_check", 1, 1)
            try:
                ConnectionPool.check_connection(conn)
            except Exception:
                # The server went away: its other idle connections are as dead as this one.
                # Checked (and replaced) now, so this request gets a new one at once, not
                # after the pool has backed off through each of them.
                self._pool.check()
                raise

    @staticmethod
    def _spoken_to(conn):
        """An idle connection has nothing to read unless the server said something: its
        goodbye when it shut down or restarted (or a closed socket). Found with a
        zero-timeout poll of the socket, not a round trip."""
        try:
            fd = conn.pgconn.socket
            if hasattr(select, "poll"):  # any descriptor number (select() stops at 1024)
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                return bool(poller.poll(0))
            return bool(select.select([fd], [], [], 0)[0])  # Windows
        except (OSError, ValueError, psycopg.OperationalError):
            return True

    def _broken(self, conn, exc):
        """A call failed: if its connection broke (the server restarted or went away),
        every idle connection is checked, so the next calls get working ones: on a thread
        of its own, one at a time, as a host that vanished makes each check wait for the
        keepalives. (A statement timeout or a deadlock leaves the connection whole.)"""
        if (conn.broken or conn.closed) and self._checking.acquire(blocking=False):
            threading.Thread(target=self._check_idle, name="ledger-pool-check",
                             daemon=True).start()

    def _check_idle(self):
        try:
            self._pool.check()
        except Exception:  # the failed call has said what failed
            log.debug("ledger pool check failed", exc_info=True)
        finally:
            self._checking.release()

    @contextmanager
    def _write(self, step=None, prelude=None):
        """One pipelined write transaction (see the module docstring). BEGIN and COMMIT
        are statements in the pipeline (psycopg's `transaction()` would sync the pipeline
        on the way in and out); `prelude(tx)` runs first, in the same pipeline, outside
        this transaction (the fleet's rate bucket). `step`: the counts' name for it,
        by default the contract method that writes."""
        step = step or sys._getframe(2).f_code.co_name  # the caller of `with self._write()`
        with self._pool.connection() as conn:
            tx = _Tx(conn, pipelined=True)
            try:
                with conn.pipeline():
                    if prelude is not None:
                        prelude(tx)
                    tx.execute("BEGIN")
                    yield tx
                    tx.execute("COMMIT")
            except BaseException as exc:
                self._end_failed(conn)
                self._broken(conn, exc)
                raise
            finally:
                tx.ended()
                self._trips.add(step, tx.statements, tx.round_trips)
        with self._count_lock:
            self._commits += 1

    @staticmethod
    def _end_failed(conn):
        """After a failed write, the transaction it left open (a statement failed before
        COMMIT, or the block raised) is rolled back before the pool takes the connection."""
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            try:
                conn.rollback()
            except psycopg.Error:
                log.debug("ledger rollback after a failed write failed", exc_info=True)

    @contextmanager
    def _plain_write(self):
        """A write transaction without a pipeline: for migration scripts (several
        statements in one string, which a pipeline's extended protocol refuses)."""
        with self._pool.connection() as conn, conn.transaction():
            tx = _Tx(conn, pipelined=False)
            try:
                yield tx
            finally:
                tx.ended()
                self._trips.add("migrate", tx.statements, tx.round_trips)

    @property
    def commit_counts(self):
        """(writes made durable, COMMITs): one each here, PostgreSQL's own commit path
        (its WAL writer groups concurrent commits' flushes by itself)."""
        with self._count_lock:
            return self._commits, self._commits

    @property
    def round_trips(self):
        return self._trips.snapshot()

    def _read(self, sql, args=(), step="read"):
        with self._pool.connection() as conn:
            try:
                rows = conn.execute(_sql(sql), args).fetchall()
            except Exception as exc:
                self._broken(conn, exc)
                raise
            finally:
                self._trips.add(step, 1, 1)
            return rows

    def _serialize(self, conn, names):
        """Every name's advisory lock in one statement, before the statements that follow
        it in the write (the key's, then the phone's, then the link's, in the order given:
        a select list is evaluated in order, the same for every writer)."""
        if names:
            conn.execute("SELECT " + ", ".join(
                ["pg_advisory_xact_lock(hashtextextended(?, 0))"] * len(names)), tuple(names))

    def writable(self):
        try:
            with self._write() as tx:
                tx.execute("INSERT INTO heartbeat (id, at) VALUES (1, ?)"
                           " ON CONFLICT (id) DO UPDATE SET at = excluded.at", (self._clock(),))
        except self.Error:
            return False
        return True

    def close(self):
        self._pool.close()

    # --- state the fleet shares (fleet.py): one OAuth token, one bucket per owner ---------

    def fleet_token(self, margin_s):
        """(token, seconds left) if the fleet's token has more than `margin_s` left."""
        row = self._read_one(f"SELECT token, expires_at - {NOW} AS ttl FROM fleet_token"
                             " WHERE id = 1")
        if row and row["token"] and row["ttl"] > margin_s:
            return row["token"], row["ttl"]
        return None

    def take_token_lease(self, lease_s, margin_s):
        """Become the one fetcher of a new token, if nobody holds the lease and the token
        is missing or due; True if this caller got it."""
        with self._write() as tx:
            row = tx.execute(
                f"UPDATE fleet_token SET lease_until = {NOW} + ? WHERE id = 1"
                f" AND lease_until <= {NOW} AND (token IS NULL OR expires_at - {NOW} <= ?)"
                " RETURNING id", (lease_s, margin_s)).fetchone()
        return row is not None

    def put_token(self, token, expires_in):
        """The lease holder's new token, for every process; the lease ends."""
        with self._write() as tx:
            tx.execute(f"UPDATE fleet_token SET token = ?, expires_at = {NOW} + ?,"
                       " lease_until = 0 WHERE id = 1", (token, expires_in))

    def release_token_lease(self):
        with self._write() as tx:
            tx.execute("UPDATE fleet_token SET lease_until = 0 WHERE id = 1")

    def drop_token(self, token):
        """Daraja called `token` invalid: nobody uses it again (unless already replaced)."""
        with self._write() as tx:
            tx.execute("UPDATE fleet_token SET token = NULL, expires_at = 0 WHERE token = ?",
                       (token,))

    RATE_GRANTED = "current_setting('mpesa.rate_granted', true) = 'true'"

    @staticmethod
    def _bucket(key, rate, burst):
        """Refill `key`'s bucket by the server's clock and take a token if there is one:
        the statement and its arguments (RETURNING granted, tokens)."""
        refilled = f"LEAST(?, b.tokens + ({NOW} - b.updated_at) * ?)"
        sql = ("INSERT INTO rate_buckets AS b (key, tokens, updated_at, granted)"
               f" VALUES (?, ? - 1, {NOW}, TRUE) ON CONFLICT (key) DO UPDATE SET"
               f" granted = {refilled} >= 1,"
               f" tokens = {refilled} - CASE WHEN {refilled} >= 1 THEN 1 ELSE 0 END,"
               f" updated_at = {NOW} RETURNING granted, tokens")
        return sql, (key, burst, *(burst, rate) * 3)

    def take_rate_token(self, key, rate, burst):
        """One write per call (a QR code's): take a token of `key`'s bucket. 0.0 if
        allowed, else seconds until one is free. Not a durability promise, so its commit
        does not wait for the disk (synchronous_commit off for it alone)."""
        with self._write(step="rate") as tx:
            tx.execute("SET LOCAL synchronous_commit TO off")
            taken = tx.execute(*self._bucket(key, rate, burst))
        row = taken.fetchone()
        return 0.0 if row["granted"] else (1.0 - row["tokens"]) / rate

    def _rate_step(self, key, rate, burst):
        """A push's token, taken in the push's own round trip: the bucket's statement runs
        in a transaction of its own ahead of the push's, in the same pipeline (so its row
        lock ends at once, and its commit does not wait for the disk), and leaves its
        answer in a session setting that the push's INSERT reads (RATE_GRANTED). Returns
        (prelude, the INSERT's condition, wait(): 0.0 or seconds until a token is free)."""
        taken = []

        def prelude(tx):
            sql, args = self._bucket(key, rate, burst)
            tx.execute("BEGIN")
            tx.execute("SET LOCAL synchronous_commit TO off")
            taken.append(tx.execute(
                f"WITH b AS ({sql}) SELECT granted, tokens, set_config('mpesa.rate_granted',"
                " CASE WHEN granted THEN 'true' ELSE 'false' END, false) AS said FROM b",
                args))
            tx.execute("COMMIT")

        def wait():
            row = taken[0].fetchone()
            return 0.0 if row["granted"] else (1.0 - row["tokens"]) / rate

        return prelude, self.RATE_GRANTED, wait
