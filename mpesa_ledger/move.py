"""Moving house: copy one ledger into another (SQLite into PostgreSQL, usually).

Owns `python mpesa_wsgi.py migrate-ledger --from <path> --to <url>`: every table the
gateway keeps (payments, callbacks, idempotency keys, webhook events and their
attempts, the receipts taken, Paybill/Till confirmations, initiator requests and their results,
receipt claims, console sessions and actions, payment links, the spool entries applied)
copied in one target transaction, in each table's written order, into a target that must
be empty; then
counts and the sum of amounts verified on both sides.
Run it with the gateway stopped: rows written to the source during the copy are not in it.
"""

import contextlib
import os
import pathlib
import sqlite3

import config
from mpesa_ledger import is_postgres, open_ledger

# (table, order of writing, columns the target numbers itself)
TABLES = (
    ("transactions", "created_at, id", ()),
    ("idempotency_keys", "created_at, scope, key", ()),
    ("callbacks", "id", ("id",)),
    ("events", "{seq}", ("seq",)),
    ("event_attempts", "id", ("id",)),
    ("receipts", "created_at, receipt", ()),
    ("applied_entries", "applied_at, id", ()),
    ("c2b_receipts", "received_at, receipt", ()),
    ("c2b_bodies", "id", ("id",)),
    ("initiator_requests", "requested_at, id", ()),
    ("initiator_results", "id", ("id",)),
    ("initiator_stops", "at, fingerprint", ()),
    ("receipt_claims", "claimed_at, receipt", ()),
    ("console_sessions", "created_at, id", ()),
    ("console_actions", "id", ("id",)),
    ("payment_links", "created_at, id", ()),
)


class MoveError(Exception):
    """The copy was refused or did not verify (nothing is committed to the target)."""


def totals(one):
    """What must match after a copy: each table's row count and the sum of amounts.
    `one(sql)`: the first row of a query (on a ledger, or inside its open transaction)."""
    counts = {table: one(f"SELECT COUNT(*) AS n FROM {table}")["n"] for table, _, _ in TABLES}
    amount = one("SELECT COALESCE(SUM(amount), 0) AS s FROM transactions")["s"]
    return counts, int(amount)


def move(source, target):
    """Copy `source` into the empty `target`; returns the verified totals."""
    before = totals(source._read_one)
    if any(totals(target._read_one)[0].values()):
        raise MoveError("the target ledger is not empty; refusing to overwrite it")
    with target._write() as tx:
        for table, order, generated in TABLES:
            rows = source._read(f"SELECT * FROM {table} ORDER BY "
                                + order.format(seq=source.dialect.seq))
            for row in rows:
                columns = [c for c in row if c not in generated]
                tx.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES"
                           f" ({', '.join('?' * len(columns))})",
                           tuple(_plain(row[c]) for c in columns))
        copied = totals(lambda sql: tx.execute(sql).fetchone())
        if copied != before:
            raise MoveError(f"the copy does not verify: source {before}, copy {copied}")
    return before


def _is_sqlite_ledger(path):
    """An existing SQLite file with the gateway's tables, opened read-only (so a wrong
    path is neither created nor changed)."""
    if not os.path.isfile(path):
        return False
    try:
        with contextlib.closing(sqlite3.connect(
                f"{pathlib.Path(path).resolve().as_uri()}?mode=ro", uri=True)) as conn:
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error:
        return False
    return {"transactions", "callbacks", "idempotency_keys"} <= names


def _plain(value):
    return bytes(value) if isinstance(value, memoryview) else value


def run(source_target, to_target):
    """The command: open both, copy, print the totals; MoveError/LedgerOpenError raised."""
    source_target, to_target = (config.ledger_target(t) for t in (source_target, to_target))
    if not is_postgres(to_target) and source_target == to_target:
        raise MoveError("--from and --to name the same ledger")
    if not is_postgres(source_target) and not _is_sqlite_ledger(source_target):
        raise MoveError(f"--from {source_target}: no gateway ledger there (a mistyped path"
                        " would otherwise copy nothing and say so)")
    source = open_ledger(source_target)
    try:
        target = open_ledger(to_target)
        try:
            counts, amount = move(source, target)
        finally:
            target.close()
    finally:
        source.close()
    return counts, amount
