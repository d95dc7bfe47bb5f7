"""CSV exports: a payments or receipts listing as a sheet a person matches against the
M-Pesa statement.

Owns the columns of each export, every row of a filter walked page by page (at most
MAX_ROWS), and neutralising cells a spreadsheet would run as a formula (a value that
begins with `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'`): account
numbers and names are typed by customers. `GET /transactions.csv` and `GET /receipts.csv`
(API keys) and the console's exports (a person's session) call the same functions.
"""

import csv
import io

import config as settings
from mpesa_gateway.resources import receipt_resource, transaction_resource
from mpesa_gateway.wire import Reply

PAYMENT_COLUMNS = ("receipt", "reference", "amount", "status", "created_at", "updated_at",
                   "phone")
RECEIPT_COLUMNS = ("receipt", "channel", "reference", "amount", "paid_at", "received_at",
                   "transaction_id", "payer_name", "msisdn", "anomalies")
MAX_ROWS = 100_000  # an export is a month or so of a busy shop, not the whole ledger
PAGE = 1000
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    """A value as a cell no spreadsheet runs as a formula."""
    text = "" if value is None else ",".join(value) if isinstance(value, list) else str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _sheet(columns, rows):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([safe_cell(row[c]) for c in columns])
    return out.getvalue().encode("utf-8")


def _walk(page, cursor_of):
    """Every row of a filter: `page(after)` → (rows, more)."""
    after, seen = None, 0
    while seen < MAX_ROWS:
        rows, more = page(after)
        yield from rows[:MAX_ROWS - seen]
        seen += len(rows)
        if not more or not rows:
            return
        after = cursor_of(rows[-1])


def attachment(name, body):
    return Reply(200, body, (("Content-Type", "text/csv; charset=utf-8"),
                             ("Content-Disposition", f'attachment; filename="{name}"'),
                             ("Cache-Control", "no-store")))


def payments_csv(ledger, query, owner):
    """The payments a ListQuery selects (of `owner`; None: every owner's), as CSV bytes."""
    def page(after):
        return ledger.list_page(
            statuses=query.statuses, since=query.since, until=query.until,
            reference=query.reference, receipt=query.receipt, phone_suffix=query.phone,
            after=after or query.after, limit=PAGE, owner=owner,
            with_unowned=owner == settings.DEFAULT_OWNER)

    rows = _walk(page, lambda r: (r["created_at"], r["id"]))
    return _sheet(PAYMENT_COLUMNS, (transaction_resource(r) for r in rows))


def receipts_csv(ledger, query, owner):
    """The receipts a ReceiptQuery selects (of `owner`; None: everyone's), as CSV bytes."""
    def page(after):
        return ledger.receipts_page(owner=owner, reference=query.reference, since=query.since,
                                    until=query.until, channel=query.channel,
                                    after=after or query.after, limit=PAGE)

    rows = _walk(page, lambda r: (r["at"], r["receipt"]))
    return _sheet(RECEIPT_COLUMNS, (receipt_resource(r) for r in rows))
