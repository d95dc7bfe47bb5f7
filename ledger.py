"""The payment ledger: SQLite, the only module that touches the database.

Owns the schema, the connections (one per thread; WAL, synchronous=FULL, a busy
timeout, `BEGIN IMMEDIATE` for every write), the life of a transaction row and
the append-only callback log.  The rules that keep money safe live here:

- a row is committed in state `submitting` *before* Daraja is called;
- a callback's raw body is stored and applied in one committed transaction;
- one settle step applies an STK result, whoever brings it, idempotently: a
  final state never changes, except that a success with a receipt overrides an
  earlier failure (flagged as an anomaly);
- on startup, rows left in `submitting` become `unknown`, never re-sent.
"""

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
    updated_at          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transactions_status ON transactions (status, created_at);
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


def new_tx_id():
    return "tx_" + secrets.token_hex(12)


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


class Ledger:
    def __init__(self, path, *, clock=time.time):
        self.path = path
        self._clock = clock
        self._local = threading.local()
        self._all = []  # every connection opened, so close() can reach them
        self._all_lock = threading.Lock()
        self._conn().executescript(SCHEMA)

    # --- connections --------------------------------------------------------

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # One connection per thread; check_same_thread=False only so close() can end it.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a commit we acknowledged survives power loss
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

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
        now = self._now()
        row = dict(id=new_tx_id(), status=SUBMITTING, phone=phone, amount=amount,
                   reference=reference, description=description, created_at=now, updated_at=now)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO transactions (id, status, phone, amount, reference, description,"
                " created_at, updated_at) VALUES (:id, :status, :phone, :amount, :reference,"
                " :description, :created_at, :updated_at)", row)
        return self.get(row["id"])

    def mark_accepted(self, tx_id, checkout_request_id, merchant_request_id):
        """Daraja queued the prompt. A result that already arrived is kept."""
        with self._write() as conn:
            conn.execute(
                "UPDATE transactions SET status = CASE status WHEN ? THEN ? ELSE status END,"
                " checkout_request_id = COALESCE(checkout_request_id, ?),"
                " merchant_request_id = COALESCE(merchant_request_id, ?), updated_at = ?"
                " WHERE id = ?",
                (SUBMITTING, PENDING, checkout_request_id, merchant_request_id, self._now(), tx_id))
        return self.get(tx_id)

    def mark_not_accepted(self, tx_id, status, reason, result_code=None, result_desc=None):
        """The push was refused (`rejected`) or its fate is unknown (`unknown`)."""
        with self._write() as conn:
            conn.execute(
                "UPDATE transactions SET status = ?, reason = ?, result_code = ?, result_desc = ?,"
                " updated_at = ? WHERE id = ? AND status = ?",
                (status, reason, result_code, result_desc, self._now(), tx_id, SUBMITTING))
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
