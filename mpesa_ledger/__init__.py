"""The ledger: the only code that touches a database.

`open_ledger(target)` chooses the engine GATEWAY_DB names: `sqlite.SqliteLedger` for a
file path, `postgres.PostgresLedger` for a postgresql:// URL (its driver imported only
then). Both keep `contract.Ledger`, whose SQL is written once; `states` holds the
statuses, ids and values the calls trade; `group_commit` is SQLite's shared commit;
`move` copies one ledger into another. Nothing here imports the gateway: the payment
flows hand the ledger what it stores.
"""

import time

from mpesa_ledger.contract import Ledger, LedgerOpenError
from mpesa_ledger.sqlite import SqliteLedger
from mpesa_ledger.states import (
    FAILED,
    FINAL,
    IDEMPOTENCY_TTL_S,
    PENDING,
    REJECTED,
    REQUEST_ACTIVE,
    SUBMITTING,
    SUCCEEDED,
    UNKNOWN,
    Begun,
    Idempotency,
    LinkLimits,
    NewEvent,
    NewRequest,
    PinnedAnswer,
    ReceiptRules,
    Start,
    epoch,
    iso_utc,
    new_tx_id,
)

__all__ = [
    "FAILED",
    "FINAL",
    "IDEMPOTENCY_TTL_S",
    "PENDING",
    "REJECTED",
    "REQUEST_ACTIVE",
    "SUBMITTING",
    "SUCCEEDED",
    "UNKNOWN",
    "Begun",
    "Idempotency",
    "Ledger",
    "LinkLimits",
    "LedgerOpenError",
    "NewEvent",
    "NewRequest",
    "PinnedAnswer",
    "ReceiptRules",
    "SqliteLedger",
    "Start",
    "epoch",
    "is_postgres",
    "iso_utc",
    "new_tx_id",
    "open_ledger",
]


def is_postgres(target):
    return target.startswith(("postgresql://", "postgres://"))


def open_ledger(target, *, clock=time.time, events=None, receipt_rules=None,
                request_events=None, pool_size=8, migrate=True, wait_s=5.0):
    """The ledger GATEWAY_DB names: a postgresql:// URL (pooled to `pool_size` connections,
    a caller waiting at most `wait_s` for one), or a SQLite file path (a write waiting at
    most `wait_s` for another process's lock). `events(before,
    after, outcome)`: the webhook event of a status change, written in its commit;
    `request_events(before, after)`: an initiator request's (a refund, a code check).
    Raises LedgerOpenError."""
    if is_postgres(target):
        from mpesa_ledger import postgres  # only here: SQLite users never import the driver

        return postgres.PostgresLedger(target, clock=clock, events=events,
                                       receipt_rules=receipt_rules,
                                       request_events=request_events, pool_size=pool_size,
                                       migrate=migrate, wait_s=wait_s)
    try:
        return SqliteLedger(target, clock=clock, events=events, receipt_rules=receipt_rules,
                            request_events=request_events, busy_timeout_s=wait_s)
    except SqliteLedger.Error as exc:
        raise LedgerOpenError(f"GATEWAY_DB cannot be opened as a SQLite ledger ({target}):"
                              f" {exc}") from None
