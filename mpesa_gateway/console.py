"""The operator console: read-only pages for people, over the services they are given.

Owns what each console page shows and who may see it: the sign-in form (rate-limited per
client address) and sign-out; payments with filters and cursor pages; one payment's
timeline (its request, Daraja's answer, callbacks as read — never their bodies —,
reconciler queries, webhook events and each attempt, receipts matched, refunds); receipts
(the ones that need a look first); what needs attention, with what to do; today and the
last 30 days as a chart with its numbers; and the CSV exports of a filter. Nothing here
changes a payment. Sessions are `sessions`'s; HTML is `pages`'s; the chart `charts`'s.
"""

import ipaddress
import logging
import re
import time
from datetime import date, timedelta
from urllib.parse import parse_qs, urlencode

import mpesa_ledger as store
import validation
from mpesa_gateway import charts, exports, settlement, sources
from mpesa_gateway.pages import (
    STYLE,
    Markup,
    document,
    field,
    h,
    link,
    select,
    table,
)
from mpesa_gateway.resources import receipt_resource, refund_resource, transaction_resource
from mpesa_gateway.wire import ApiError, Reply

log = logging.getLogger(__name__)

MAX_FORM = 2048
SUMMARY_DAYS = 30
STATUS_OPTIONS = [(s, s) for s in validation.STATUSES]


def _reply(page):
    status, body, headers = page
    return Reply(status, body, headers)


def _redirect(location, *headers):
    return Reply(303, b"", (("Location", location), ("Cache-Control", "no-store"), *headers))


class _LedgerAway(Exception):
    """The session could not be read: a 503 page, not the sign-in form."""


def _signed_in(services, environ):
    try:
        return services.sessions.current(environ)
    except services.ledger.Error as exc:
        services.ledger_watch.failed("console", exc)
        raise _LedgerAway() from None


def _unavailable(person):
    return _reply(document("The ledger cannot be reached", h(
        "p", {"class": "problem"}, "The ledger cannot be reached right now; try again in a"
        " minute."), person, status=503))


def _guarded(page_flow):
    """A page for a signed-in person: anyone else is sent to the sign-in form; a ledger
    that cannot be read is a 503 page, not a traceback."""
    def flow(services, environ, *args):
        if not services.sessions.enabled:
            return _off()
        try:
            person = _signed_in(services, environ)
        except _LedgerAway:
            return _unavailable(None)
        if person is None:
            return _redirect("/console")
        try:
            return page_flow(services, environ, person, *args)
        except services.ledger.Error as exc:
            services.ledger_watch.failed("console", exc)
            return _unavailable(person)
    flow.__name__ = page_flow.__name__
    flow.__doc__ = page_flow.__doc__
    return flow


def _off():
    return _reply(document("The console is off", h(
        "p", None, "No console keys are set: GATEWAY_CONSOLE_KEYS=person@owner:KEY turns the"
        " console on."), status=404))


# --- signing in and out ---------------------------------------------------------------


def style(services, environ):
    del services, environ
    return Reply(200, STYLE, (("Content-Type", "text/css; charset=utf-8"),
                              ("Cache-Control", "max-age=3600"),
                              ("X-Content-Type-Options", "nosniff")))


def home(services, environ):
    """GET /console: the sign-in form, or the payments page for a signed-in person."""
    if not services.sessions.enabled:
        return _off()
    try:
        if _signed_in(services, environ) is not None:
            return _redirect("/console/payments")
    except _LedgerAway:
        return _unavailable(None)
    return _reply(_sign_in_page())


def _sign_in_page(problem=None, status=200):
    content = [h("p", {"id": "error", "role": "alert"}, problem) if problem else "",
               h("form", {"id": "sign-in", "method": "post", "action": "/console/sign-in"},
                 field("key", "Console key", kind="password", autocomplete="current-password",
                       required=True),
                 h("button", {"type": "submit"}, "Sign in")),
               h("p", None, "Your own key, from GATEWAY_CONSOLE_KEYS. A merchant's API key"
                 " does not open the console.")]
    return document("Sign in", content, status=status)


def sign_in(services, environ, load_body):
    """POST /console/sign-in: a person's key (a form), a few tries a minute per address."""
    if not services.sessions.enabled:
        return _off()
    if not _same_site(environ):  # a form on another site signing a browser in
        return _reply(_sign_in_page("Sign in from this page.", 403))
    address = sources.client_address(environ, services.config.trusted_proxies)
    wait = services.sign_ins.acquire(_limit_key(address))
    if wait:
        status, body, headers = _sign_in_page(
            f"Too many tries from this address; wait {int(wait) + 1} seconds.", 429)
        return Reply(status, body, headers + (("Retry-After", str(int(wait) + 1)),))
    try:
        form = parse_qs(load_body(MAX_FORM).decode("utf-8", "replace"), max_num_fields=5)
    except (ValueError, ApiError):
        return _reply(_sign_in_page("The form could not be read.", 400))
    key = (form.get("key") or [""])[0].strip()
    try:
        services.sessions.sign_out(environ)  # a sign-in ends the session it replaces
        started = services.sessions.sign_in(key) if key else None
    except services.ledger.Error as exc:
        services.ledger_watch.failed("console", exc)
        return _unavailable(None)
    if started is None:
        log.warning("console sign_in refused ip=%s", address)
        return _reply(_sign_in_page("That key is not a console key.", 401))
    person, value = started
    log.info("console sign_in person=%s", person.label)
    return _redirect("/console/payments", ("Set-Cookie", services.sessions.cookie(environ, value)))


def _same_site(environ):
    """Does a sign-in or sign-out come from this site's own page? A browser says where a
    POST came from: Sec-Fetch-Site, else an Origin (pages send no referrer, so a browser
    may say Origin: null for its own form). A client that says nothing (curl) is let
    through."""
    fetch_site = environ.get("HTTP_SEC_FETCH_SITE")
    if fetch_site is not None:
        return fetch_site in ("same-origin", "none")
    origin = environ.get("HTTP_ORIGIN")
    if origin is None or origin == "null":
        return True
    return origin.split("://", 1)[-1] == environ.get("HTTP_HOST", "")


def _limit_key(address):
    """Whose sign-in tries count together: an IPv4 address, or an IPv6 /64 (one client
    has all of it)."""
    if ":" in address:
        try:
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        except ValueError:
            return address
    return address


def sign_out(services, environ):
    """POST /console/sign-out: the session ends (on every host) and its cookie goes; not
    from another site's page."""
    if not _same_site(environ):
        return _redirect("/console")
    try:
        services.sessions.sign_out(environ)
    except services.ledger.Error as exc:
        services.ledger_watch.failed("console", exc)
        return _unavailable(None)
    return _redirect("/console", ("Set-Cookie", services.sessions.cleared(environ)))


# --- payments -------------------------------------------------------------------------


def _filters(query_string):
    """The console's filter form, as the API's listing query (blank fields dropped; the
    date range's `until` day included)."""
    raw = parse_qs(query_string or "", keep_blank_values=True)
    kept = {}
    for name, values in raw.items():
        values = [v.strip() for v in values if v.strip()]
        if values:
            kept[name] = values
    until = kept.get("until", [""])
    if len(until) == 1 and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", until[0]):
        try:  # a date: the whole day is in the range
            kept["until"] = [(date.fromisoformat(until[0]) + timedelta(days=1)).isoformat()]
        except (ValueError, OverflowError):
            pass  # the listing's own check says what is wrong with it
    return kept


def _export_filters(query_string):
    """The filters of an export: the page's, without its page (limit, cursor)."""
    kept = _filters(query_string)
    return urlencode({k: v for k, v in kept.items() if k not in ("limit", "cursor")},
                     doseq=True)


def _owner_of(person):
    return person.owner  # None: every owner


def _masked_checkout(value):
    return f"{value[:6]}…{value[-3:]}" if value and len(value) > 12 else value


def _shown(text):
    """Text a customer or merchant typed, as a page shows it: any phone number masked."""
    return validation.mask_phones_in(text)


def _payment_row(r):
    view = transaction_resource(r)
    return [link(f"/console/payments/{view['id']}", view["created_at"]),
            h("span", {"class": f"status-{view['status']}"}, view["status"]),
            f"KES {view['amount']:,}", _shown(view["reference"]), view["receipt"] or "",
            view["phone"]]


@_guarded
def payments(services, environ, person):
    """GET /console/payments: newest first, filtered, a page at a time."""
    kept = _filters(environ.get("QUERY_STRING", ""))
    shown = {k: v for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()
             if k != "cursor"}
    problem, rows, more = None, [], False
    try:
        query = validation.parse_list_query(urlencode(kept, doseq=True))
    except validation.ValidationError as exc:
        problem, query = exc.message, None
    if query is not None:
        owner = _owner_of(person)
        rows, more = services.ledger.list_page(
            statuses=query.statuses, since=query.since, until=query.until,
            reference=query.reference, receipt=query.receipt, phone=query.phone,
            after=query.after, limit=query.limit, owner=owner,
            with_unowned=owner == "default")
    one = {k: v[0] for k, v in shown.items()}
    form = h("form", {"id": "filters", "class": "filters", "method": "get",
                      "action": "/console/payments"},
             select("status", "Status", STATUS_OPTIONS, shown.get("status", ()),
                    multiple=True),
             field("since", "From (date)", one.get("since"), kind="date"),
             field("until", "To (date)", one.get("until"), kind="date"),
             field("reference", "Reference", one.get("reference")),
             field("receipt", "M-Pesa receipt", one.get("receipt")),
             field("phone", "Phone: last 3 digits, or the whole number", one.get("phone"),
                   inputmode="tel"),
             h("button", {"type": "submit"}, "Filter"))
    filters_qs = urlencode({k: v for k, v in shown.items() if k != "limit"}, doseq=True)
    nav = []
    if more:
        cursor = validation.encode_cursor(rows[-1]["created_at"], rows[-1]["id"])
        nav.append(link("/console/payments?" + urlencode(dict(shown, cursor=cursor),
                                                          doseq=True),
                        "Next page", rel="next", id="next"))
    content = [form,
               h("p", {"id": "error", "role": "alert"}, problem) if problem else "",
               h("p", None, link("/console/payments.csv?" + filters_qs, "Export CSV",
                                 id="export"),
                 " (every payment this filter selects)"),
               table("payments", "Payments, newest first",
                     ("Created", "Status", "Amount", "Reference", "Receipt", "Phone"),
                     [_payment_row(r) for r in rows], "No payment matches."),
               h("p", None, nav)]
    return _reply(document("Payments", content, person, status=400 if problem else 200))


@_guarded
def payments_csv(services, environ, person):
    """GET /console/payments.csv: every payment of the current filter."""
    return _export(services, environ, person, "payments.csv",
                   lambda qs: validation.parse_list_query(qs, validation.EXPORT_PARAMS),
                   exports.payments_csv)


def _export(services, environ, person, name, parse, sheet):
    """A CSV of the page's filter (of the person's owner), or the 400 page saying why."""
    try:
        query = parse(_export_filters(environ.get("QUERY_STRING", "")))
    except validation.ValidationError as exc:
        return _reply(document("Export", h("p", {"id": "error", "role": "alert"},
                                           exc.message), person, status=400))
    try:
        owner = _owner_of(person)
        return exports.attachment(name, lambda: sheet(services.ledger, query, owner),
                                  services.exports, owner)
    except ApiError as exc:  # too many rows, or other exports running: said as a page
        return _reply(document("Export", h("p", {"id": "error", "role": "alert"},
                                           exc.message), person, status=exc.status,
                               headers=exc.headers))


# --- one payment ----------------------------------------------------------------------


@_guarded
def payment(services, environ, person, ref):
    """GET /console/payments/<id>: the payment and everything that happened to it."""
    # (Its id only: a CheckoutRequestID ends with the phone's digits, and URLs are logged.)
    row = services.ledger.get(ref) if validation.tx_id_ok(ref) else None
    if row is None or not person.sees(row):
        return _reply(document("No such payment", h("p", None, "No payment with that id."),
                               person, status=404))
    view = transaction_resource(row)
    facts = [("Status", view["status"]), ("Reason", view["reason"] or "—"),
             ("Amount", f"KES {view['amount']:,}"), ("Reference", _shown(view["reference"])),
             ("Description", _shown(view["description"])), ("Phone", view["phone"]),
             ("M-Pesa receipt", view["receipt"] or "—"),
             ("Result", f"{view['result_code']} {view['result_desc'] or ''}"
              if view["result_code"] is not None else "—"),
             ("Owner", row.get("owner") or "default")]
    summary = h("dl", None, [(h("dt", None, k), h("dd", None, v)) for k, v in facts])
    entries = timeline(services.ledger, row)
    content = [summary, h("h2", None, "Timeline"),
               h("ol", {"id": "timeline"}, [h("li", None, h("time", None, at), " ",
                                              _shown(text)) for at, text in entries]),
               h("p", None, link("/console/payments", "Back to payments"))]
    return _reply(document(f"Payment {row['id']}", content, person))


def timeline(ledger, row):
    """[(ISO time, what happened)] of a payment, oldest first: what the ledger holds."""
    found = ledger.timeline_of(row["id"])
    entries = [(row["created_at"], f"Requested: KES {row['amount']:,} from"
                f" {transaction_resource(row)['phone']}, reference {row['reference']}.")]
    if row["checkout_request_id"]:
        entries.append((row["created_at"], "Daraja accepted the prompt (CheckoutRequestID"
                        f" {_masked_checkout(row['checkout_request_id'])})."))
    elif row["status"] in (store.REJECTED, store.UNKNOWN):
        entries.append((row["updated_at"], f"Daraja's answer: {row['status']}"
                        f" ({row['reason'] or 'no reason'})."))
    for cb in found["callbacks"]:
        outcome = settlement.from_raw_callback(bytes(cb["body"]))
        said = (f"result {outcome.result_code}" + (f", receipt {outcome.receipt}"
                                                   if outcome.receipt else "")
                if outcome is not None else "not a valid STK result")
        entries.append((cb["received_at"], f"Callback received from {cb['remote_addr']}:"
                        f" {said} ({cb['outcome']})."))
    if row.get("check_attempts"):
        entries.append((row["updated_at"], f"Queried by the reconciler"
                        f" {row['check_attempts']} time(s)."))
    for event in found["events"]:
        at = store.iso_utc(event["created_at"])
        entries.append((at, f"Webhook event {event['type']} ({event['status']})."))
        for attempt in event["attempts_log"]:
            code = attempt["status_code"] if attempt["status_code"] is not None else "no answer"
            entries.append((store.iso_utc(attempt["at"]), f"Delivery attempt of"
                            f" {event['type']}: {code} in {attempt['duration_ms']:.0f} ms"
                            + (f" ({attempt['error']})" if attempt["error"] else "") + "."))
    for receipt in ledger.receipts_of(row["id"]):
        entries.append((receipt["at"], f"Paybill payment matched: receipt {receipt['receipt']},"
                        f" KES {receipt['amount']}."))
    for request in found["requests"]:
        refund = refund_resource(request)
        entries.append((request["requested_at"], f"Refund asked (attempt"
                        f" {request['attempts']}): now {refund['status']}."))
        if refund["completed_at"]:
            entries.append((refund["completed_at"], f"Refund {refund['status']}"
                            + (f": {refund['message']}" if refund["message"] else "")
                            + (f", reversal receipt {refund['receipt']}" if refund["receipt"]
                               else "") + "."))
    if row["status"] != store.PENDING and row["status"] != store.SUBMITTING:
        entries.append((row["updated_at"], f"Now {transaction_resource(row)['status']}."))
    return sorted(entries, key=lambda e: e[0])


# --- receipts -------------------------------------------------------------------------


def _receipt_row(r):
    view = receipt_resource(r)
    return [view["receipt"], view["channel"], f"KES {view['amount']:,}"
            if view["amount"] is not None else "—", _shown(view["reference"] or ""),
            link(f"/console/payments/{view['transaction_id']}", view["transaction_id"])
            if view["transaction_id"] else "unmatched",
            ", ".join(view["anomalies"]) or "—", view["received_at"]]


RECEIPT_HEADERS = ("Receipt", "Channel", "Amount", "Account / reference", "Payment",
                   "Anomalies", "Received")


@_guarded
def receipts(services, environ, person):
    """GET /console/receipts: the Paybill/Till receipts that need a look first, then all."""
    owner = _owner_of(person)
    look, look_count = services.ledger.receipts_to_look_at(owner=owner)
    rows, _ = services.ledger.receipts_page(owner=owner, limit=100)
    look_rows = [[*_receipt_row(dict(r, channel="c2b", reference=r["account"],
                                     at=r["received_at"], tx_id=r["matched_tx_id"]))]
                 for r in look]
    content = [h("p", None, link("/console/receipts.csv", "Export CSV", id="export")),
               table("receipts-look", f"Need a look ({look_count}, the newest"
                     f" {len(look)} here): Paybill payments no payment claims, or odd",
                     RECEIPT_HEADERS, look_rows, "Every Paybill receipt is matched."),
               table("receipts", "Receipts, newest first", RECEIPT_HEADERS,
                     [_receipt_row(r) for r in rows], "No receipts yet.")]
    return _reply(document("Receipts", content, person))


@_guarded
def receipts_csv(services, environ, person):
    """GET /console/receipts.csv: every receipt of the filter."""
    return _export(services, environ, person, "receipts.csv",
                   lambda qs: validation.parse_receipts_query(
                       qs, validation.RECEIPT_EXPORT_PARAMS), exports.receipts_csv)


# --- needs attention ----------------------------------------------------------------


@_guarded
def attention(services, environ, person):
    """GET /console/attention: what needs a person, and what to do about each."""
    cfg, now = services.config, services.clock.wall()
    expected_s = cfg.reconcile_deadline_s
    found = services.ledger.attention(owner=_owner_of(person),
                                      pending_before=store.iso_utc(now - expected_s))
    short = ("Created", "Status", "Amount", "Reference", "Receipt", "Phone")
    sections = [
        ("Payments whose result is unknown", found["unknown_count"], table(
            "unknown", "Unknown payments", short, [_payment_row(r) for r in found["unknown"]],
            "None."), "The customer may or may not have paid. The reconciler keeps asking"
         " Daraja for a while; check the M-Pesa statement for the amount and time, and ask"
         " the customer for their SMS before giving goods or asking them to pay again."),
        ("Payments pending longer than expected", found["late_count"], table(
            "late", "Late payments", short, [_payment_row(r) for r in found["late"]],
            "None."), f"Pending for more than {int(expected_s // 60)} minutes: is the"
         " reconciler running (GATEWAY_RECONCILE, or `reconcile` from cron)?"),
    ]
    hooks = [[w["owner"], int(w["dead"] or 0), int(w["failing"] or 0)]
             for w in found["webhooks"]]
    spool = services.spool.depth()
    refusals = services.reconciler.refusals if services.reconciler is not None else 0
    content = [h("section", None, h("h2", None, f"{title} ({count})"), body,
                 h("p", None, advice)) for title, count, body, advice in sections]
    content += [
        h("section", None, h("h2", None, "Webhook endpoints failing"),
          table("webhooks", "Undelivered events by owner", ("Owner", "Dead", "Retrying"),
                hooks, "Every event was delivered."),
          h("p", None, "Check the owner's endpoint (GATEWAY_WEBHOOK_URLS) answers 2xx and"
            " verifies the signature with its secret; dead events can be sent again with"
            " POST /events/<id>/redeliver.")),
        h("section", None, h("h2", None, "Reconcile refusals"),
          h("p", None, f"{refusals} query refusal(s) since Daraja last answered (as this"
            " process saw them)."
            + (" Daraja refuses the reconciler's queries: check MPESA_SHORTCODE, MPESA_PASSKEY"
               " and the app's credentials." if refusals else " Nothing to do."))),
        h("section", None, h("h2", None, "The local spool"),
          h("p", None, f"{spool} entr{'y' if spool == 1 else 'ies'} in the spool of this"
            " process, waiting for the ledger."
            + (" The ledger was away: they are applied as soon as it is back; if the number"
               " stays, check the ledger (GET /health)." if spool else " Nothing to do."))),
    ]
    return _reply(document("Needs attention", content, person))


# --- summary ---------------------------------------------------------------------------


@_guarded
def summary(services, environ, person):
    """GET /console/summary: today and the last 30 days, counts and shillings by status,
    as a chart drawn here and the numbers beside it."""
    today = date(*time.gmtime(services.clock.wall())[:3])
    days = [(today - timedelta(days=n)).isoformat() for n in range(SUMMARY_DAYS - 1, -1, -1)]
    rows = services.ledger.daily_totals(days[0] + "T00:00:00Z", owner=_owner_of(person))
    counts = {(r["day"], r["status"]): r["n"] for r in rows}
    shillings = {(r["day"], r["status"]): r["amount"] for r in rows}
    statuses = [s for s, _ in charts.COLOURS]

    def totals(selected):
        return [[s, sum(counts.get((d, s), 0) for d in selected),
                 f"KES {sum(shillings.get((d, s), 0) for d in selected):,}"] for s in statuses]

    by_day = [[d, *[counts.get((d, s), 0) for s in statuses],
               f"KES {sum(shillings.get((d, s), 0) for s in ('succeeded',)):,}"]
              for d in reversed(days) if any(counts.get((d, s)) for s in statuses)]
    content = [
        h("h2", None, f"Today ({today.isoformat()}, UTC)"),
        table("today", "Today by status", ("Status", "Payments", "Shillings"),
              totals([today.isoformat()])),
        h("h2", None, f"The last {SUMMARY_DAYS} days"),
        Markup(charts.daily_bars(days, counts, f"Payments per day, the last {SUMMARY_DAYS}"
                                 " days, by status")),
        table("summary", f"The last {SUMMARY_DAYS} days by status",
              ("Status", "Payments", "Shillings"), totals(days)),
        table("days", "Each day", ("Day", *statuses, "Shillings received"), by_day,
              "No payments in these days."),
    ]
    return _reply(document("Summary", content, person))

