"""CSV exports: a payments or receipts listing as a sheet a person matches against the
M-Pesa statement.

Owns the columns of each export, every row of a filter walked page by page (at most
MAX_ROWS), and neutralising cells a spreadsheet would run as a formula (a value that
begins with `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'`; every cell
quoted) or that would show a phone number (masked): account numbers and names are typed
by customers. `GET /transactions.csv` and `GET /receipts.csv`
(API keys) and the console's exports (a person's session) call the same functions.
"""

import csv
import io
import threading

import config as settings
import validation
from mpesa_gateway.resources import receipt_resource, transaction_resource
from mpesa_gateway.wire import BadRequest, Reply, ServiceUnavailable, retry_after

PAYMENT_COLUMNS = ("receipt", "reference", "amount", "status", "created_at", "updated_at",
                   "phone")
RECEIPT_COLUMNS = ("receipt", "channel", "reference", "amount", "paid_at", "received_at",
                   "transaction_id", "payer_name", "msisdn", "anomalies")
MAX_ROWS = 100_000  # an export is a month or so of a busy shop, not the whole ledger
PAGE = 5000
AT_ONCE = 2  # exports running at once: each holds a server thread for seconds


class Slots:
    """The exports an app runs at once: AT_ONCE in all, one per owner (so one key
    exporting in a loop holds one slot, never every one). Services holds one."""

    def __init__(self):
        self._all = threading.BoundedSemaphore(AT_ONCE)
        self._lock = threading.Lock()
        self._owners = set()

    def acquire(self, owner):
        with self._lock:
            if owner in self._owners:
                return False
            if not self._all.acquire(blocking=False):
                return False
            self._owners.add(owner)
            return True

    def release(self, owner):
        with self._lock:
            self._owners.discard(owner)
            self._all.release()
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    """A value as a cell no spreadsheet runs as a formula, and no phone number in clear (a
    customer may type one as an account number)."""
    text = "" if value is None else ",".join(value) if isinstance(value, list) else str(value)
    text = validation.mask_phones_in(text)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _sheet(columns, rows):
    out = io.StringIO()
    # Every cell quoted: a locale whose list separator is ";" splits none of them.
    writer = csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_ALL)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([safe_cell(row[c]) for c in columns])
    return out.getvalue().encode("utf-8")


def _walk(page, cursor_of):
    """Every row of a filter: `page(after)` → (rows, more); a 400 past MAX_ROWS (a sheet
    cut short would be matched against a statement as if it were whole)."""
    after, found = None, []
    while True:
        rows, more = page(after)
        found.extend(rows)
        if len(found) > MAX_ROWS:
            raise BadRequest(f"the filter selects more than {MAX_ROWS:,} rows: narrow the"
                             " dates", code="export_too_large")
        if not more or not rows:
            return found
        after = cursor_of(rows[-1])


def attachment(name, make, running, owner):
    """The CSV `make()` builds, as a download, if `running` (the app's Slots) has room for
    `owner`'s (None: every owner's) — each export holds a server thread while it reads the
    ledger — else 503 with Retry-After."""
    if not running.acquire(owner):
        raise ServiceUnavailable("another export is running; retry in a few seconds",
                                 code="exports_busy", headers=retry_after(5))
    try:
        body = make()
    finally:
        running.release(owner)
    return Reply(200, body, (("Content-Type", "text/csv; charset=utf-8"),
                             ("Content-Disposition", f'attachment; filename="{name}"'),
                             ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")))


def payments_csv(ledger, query, owner):
    """The payments a ListQuery selects (of `owner`; None: every owner's), as CSV bytes."""
    def page(after):
        return ledger.list_page(
            statuses=query.statuses, since=query.since, until=query.until,
            reference=query.reference, receipt=query.receipt, phone=query.phone,
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
