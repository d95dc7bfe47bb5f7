"""The operator console: pages for people, over the services they are given.

Owns what each console page shows and who may see it: the sign-in form (rate-limited per
client address) and sign-out; payments with filters and cursor pages; one payment's
timeline (its request, Daraja's answer, callbacks as read — never their bodies —,
reconciler queries, webhook events and each attempt, receipts matched, refunds); receipts
(the ones that need a look first); what needs attention, with what to do; today and the
last 30 days as a chart with its numbers; the CSV exports of a filter; and the actions of
a person bound to one owner (ask Daraja again, refund with a confirm step, send an event
again, check a code, revoke a payment link; the links are listed too), each from a form carrying the session's CSRF token, recorded with
the person's name and shown in the payment's timeline. Sessions are `sessions`'s; HTML is
`pages`'s; the chart `charts`'s; refunds and checks `refunds`'s.
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
    void,
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


def _person_or_answer(services, environ):
    """(the signed-in Person, None), or (None, the answer for anyone else: the console
    off, the ledger away, or the sign-in form)."""
    if not services.sessions.enabled:
        return None, _off()
    try:
        person = _signed_in(services, environ)
    except _LedgerAway:
        return None, _unavailable(None)
    if person is None:
        return None, _redirect("/console")
    return person, None


def _guarded(page_flow):
    """A page for a signed-in person: anyone else is sent to the sign-in form; a ledger
    that cannot be read is a 503 page, not a traceback."""
    def flow(services, environ, *args):
        person, early = _person_or_answer(services, environ)
        if early is not None:
            return early
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
    row = _own_payment(services, person, ref)
    if row is None:
        return _no_payment(person)
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
    content = [summary, _actions(services, person, row), h("h2", None, "Timeline"),
               h("ol", {"id": "timeline"}, [h("li", None, h("time", None, at), " ",
                                              _shown(text)) for at, text in entries]),
               h("p", None, link("/console/payments", "Back to payments"))]
    return _reply(document(f"Payment {row['id']}", content, person))


def _actions(services, person, row):
    """The payment's action forms, for a person bound to its owner."""
    if not person.can_act:
        return ""
    forms = []
    if row["checkout_request_id"] and row["status"] in (store.PENDING, store.SUBMITTING,
                                                         store.UNKNOWN):
        forms.append(h("form", {"id": "requery", "method": "post",
                                "action": f"/console/payments/{row['id']}/requery"},
                       _csrf(services, person),
                       h("button", {"type": "submit"}, "Ask Daraja again now")))
    if row["status"] == store.SUCCEEDED and row["receipt"]:
        forms.append(h("p", None, link(f"/console/payments/{row['id']}/refund", "Refund…",
                                       id="refund-link")))
    for event in services.ledger.timeline_of(row["id"])["events"]:
        forms.append(h("form", {"class": "redeliver", "method": "post",
                                "action": f"/console/events/{event['id']}/redeliver"},
                       _csrf(services, person),
                       h("button", {"type": "submit"},
                         f"Send the {event['type']} event again")))
    if not forms:
        return ""
    return h("section", {"id": "actions"}, h("h2", None, "Actions"), forms)


ACTION_WORDS = {"requery": "asked Daraja again", "refund": "asked for a refund",
                "redeliver": "sent an event again", "verify": "checked the code",
                "revoke_link": "revoked the payment link"}


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
    for action in ledger.actions_of(row["id"]):
        entries.append((store.iso_utc(action["at"]), f"{action['person']} (console)"
                        f" {ACTION_WORDS.get(action['action'], action['action'])}:"
                        f" {action['outcome']}."))
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
    check = (h("form", {"id": "verify", "class": "filters", "method": "post",
                        "action": "/console/verify"},
               _csrf(services, person), field("code", "Is this M-Pesa code real?"),
               h("button", {"type": "submit"}, "Check")) if person.can_act else "")
    content = [check, h("p", None, link("/console/receipts.csv", "Export CSV", id="export")),
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



# --- actions: a person bound to one owner, from the console's own pages --------------------


def _form(load_body):
    try:
        return parse_qs(load_body(MAX_FORM).decode("utf-8", "replace"), max_num_fields=8)
    except (ValueError, ApiError):
        return None


def _said(person, title, text, back, status=200):
    return _reply(document(title, [h("p", {"id": "outcome", "role": "status"}, text),
                                   h("p", None, link(back, "Back"))], person, status=status))


def _acting(action_flow):
    """An action: a signed-in person bound to an owner (person@* reads only), a POST from
    this site's page carrying its session's CSRF token; each is recorded with its person."""
    def flow(services, environ, load_body, *args):
        person, early = _person_or_answer(services, environ)
        if early is not None:
            return early
        form = _form(load_body)
        token = (form or {}).get("csrf", [""])[0]
        if form is None or not _same_site(environ) or not services.sessions.csrf_ok(
                person, token):
            log.warning("console action refused person=%s: no valid form token", person.label)
            return _said(person, "Not done", "This form is stale or came from another page:"
                         " go back, reload the page and try again.", "/console/payments", 403)
        if not person.can_act:
            return _said(person, "Not done", f"{person.name} reads every owner's payments"
                         " and changes none (a key of person@*).", "/console/payments", 403)
        try:
            return action_flow(services, environ, person, form, *args)
        except services.ledger.Error as exc:
            services.ledger_watch.failed("console", exc)
            return _unavailable(person)
    flow.__name__ = action_flow.__name__
    flow.__doc__ = action_flow.__doc__
    return flow


def _csrf(services, person):
    return void("input", {"type": "hidden", "name": "csrf",
                          "value": services.sessions.csrf_token(person)})


def _own_payment(services, person, ref):
    """The payment `ref` names, if the person may see it. By its id only: a
    CheckoutRequestID ends with the phone's digits, and URLs are logged."""
    row = services.ledger.get(ref) if validation.tx_id_ok(ref) else None
    return row if row is not None and person.sees(row) else None


def _no_payment(person):
    return _reply(document("No such payment", h("p", None, "No payment with that id."),
                           person, status=404))


def _done(services, person, subject, action, outcome):
    """Record and log an action that happened. It already happened: a ledger that cannot
    record it now is logged loudly, and the person is still told what was done."""
    log.info("console action person=%s action=%s subject=%s outcome=%s", person.label, action,
             subject, outcome)
    try:
        services.ledger.record_action(person.label, subject, action, outcome)
    except services.ledger.Error as exc:
        services.ledger_watch.failed("console", exc)
        log.error("console action not recorded in the ledger person=%s action=%s subject=%s"
                  " outcome=%s", person.label, action, subject, outcome)


@_acting
def requery(services, environ, person, form, ref):
    """POST /console/payments/<id>/requery: ask Daraja now what became of a payment."""
    row = _own_payment(services, person, ref)
    if row is None:
        return _said(person, "No such payment", "No payment with that id.", "/console/payments",
                     404)
    if services.requeries.acquire(person.owner):  # Daraja throttles an app's queries
        return _said(person, "Not yet", "Daraja was asked just now; try again in a few"
                     " seconds.", f"/console/payments/{row['id']}", 429)
    result, after = services.new_reconciler().check_now(row["id"])
    _done(services, person, row["id"], "requery", result)
    status = transaction_resource(after)["status"] if after else "unknown"
    return _said(person, "Asked Daraja", f"Daraja's answer: {result.replace('_', ' ')}."
                 f" The payment is now {status}.", f"/console/payments/{row['id']}")


@_guarded
def refund_page(services, environ, person, ref):
    """GET /console/payments/<id>/refund: the confirm step, with the amount and receipt."""
    row = _own_payment(services, person, ref)
    if row is None:
        return _no_payment(person)
    view = transaction_resource(row)
    if not person.can_act or view["status"] != "succeeded" or not view["receipt"]:
        why = ("a key of person@* changes nothing" if not person.can_act else
               f"only a succeeded payment with its receipt can be refunded (this one is"
               f" {view['status']})")
        return _reply(document("No refund", h("p", None, f"Not refundable: {why}."), person,
                               status=409 if person.can_act else 403))
    content = [h("p", None, f"Send KES {view['amount']:,} back to {view['phone']}, the whole"
                 f" of payment {view['id']} (M-Pesa receipt {view['receipt']}), by Daraja's"
                 " Reversal? This cannot be undone."),
               h("form", {"id": "refund", "method": "post",
                          "action": f"/console/payments/{view['id']}/refund"},
                 _csrf(services, person),
                 h("button", {"type": "submit"},
                   f"Refund KES {view['amount']:,} to {view['phone']}")),
               h("p", None, link(f"/console/payments/{view['id']}", "Cancel"))]
    return _reply(document("Refund this payment?", content, person))


@_acting
def refund(services, environ, person, form, ref):
    """POST /console/payments/<id>/refund: the refund the confirm step showed (the same
    session asking twice sends it once: its key is the session's and the payment's)."""
    from mpesa_gateway import refunds
    from mpesa_gateway.auth import Caller

    row = _own_payment(services, person, ref)
    if row is None:
        return _said(person, "No such payment", "No payment with that id.", "/console/payments",
                     404)
    key = f"console:{person.session_id}:{row['id']}"
    try:
        reply = refunds.refund_for(services, Caller(person.owner), row["id"], False, key)
    except ApiError as exc:
        _done(services, person, row["id"], "refund", exc.code)
        return _said(person, "Refund not sent", exc.message, f"/console/payments/{row['id']}",
                     exc.status)
    said = reply.body["refund"]
    again = any(name == "Idempotent-Replayed" for name, _ in reply.headers)
    _done(services, person, row["id"], "refund",
          said["status"] + (" (the same request again: nothing more sent)" if again else ""))
    return _said(person, "Refund asked", f"The refund is {said['status']}"
                 + (f": {said['message']}" if said.get("message") else "")
                 + ". Its result shows on the payment's page.",
                 f"/console/payments/{row['id']}")


@_acting
def redeliver(services, environ, person, form, event_id):
    """POST /console/events/<id>/redeliver: send a webhook event again."""
    event = services.ledger.event(event_id) if validation.event_id_ok(event_id) else None
    if event is None or event["owner"] != person.owner:
        return _said(person, "No such event", "No event with that id.", "/console/payments",
                     404)
    back = (f"/console/payments/{event['tx_id']}" if validation.tx_id_ok(event["tx_id"])
            else "/console/receipts")
    if services.redeliveries.acquire(person.owner):
        _done(services, person, event["tx_id"], "redeliver", "rate_limited")
        return _said(person, "Not yet", "Too many redeliveries just now; try again in a few"
                     " seconds.", back, 429)
    services.ledger.redeliver(event_id)
    _done(services, person, event["tx_id"], "redeliver", event["type"])
    return _said(person, "Sent again", f"Event {event['type']} goes out again at the"
                 " sender's next pass.", back)


@_acting
def verify(services, environ, person, form):
    """POST /console/verify: is this M-Pesa code real? (as POST /receipts/<code>/verify)."""
    from mpesa_gateway import refunds
    from mpesa_gateway.auth import Caller

    code = (form.get("code") or [""])[0]
    try:
        reply = refunds.verify_for(services, Caller(person.owner), code)
    except ApiError as exc:
        if exc.code != "invalid_receipt":  # (a code that is no code concerns nothing)
            _done(services, person, code.strip().upper(), "verify", exc.code)
        return _said(person, "Not checked", exc.message, "/console/receipts", exc.status)
    said = reply.body["verified"]
    receipt = reply.body["receipt"]
    # On the payment's timeline when the code is the person's own payment's.
    _done(services, person, reply.tx_id or receipt, "verify", f"{receipt} {said['status']}")
    words = {"found": f"Real: KES {said.get('amount')}, {said.get('completed_at') or ''}",
             "checking": "Asked Daraja; its answer shows on the receipt in a moment (reload"
                         " the receipts page)",
             "not_found": "Not found for this shortcode"}.get(said["status"], said["status"])
    return _said(person, f"Code {receipt}", words, "/console/receipts")


# --- payment links ---------------------------------------------------------------------


@_guarded
def links_page(services, environ, person):
    """GET /console/links: the owner's payment links (everyone's for person@*), with a
    revoke form for a person bound to the owner."""
    from mpesa_gateway import links

    now = services.clock.wall()
    rows = services.ledger.links_page(owner=_owner_of(person), limit=links.LIST_LIMIT)
    shown = []
    for row in rows:
        view = links.link_resource(row, services.config.callback_base_url, now)
        revoke = (h("form", {"method": "post", "action": f"/console/links/{view['id']}/revoke"},
                    _csrf(services, person), h("button", {"type": "submit"}, "Revoke"))
                  if person.can_act and view["status"] == "active" else "")
        shown.append([view["created_at"], f"KES {view['amount']:,}", _shown(view["reference"]),
                      view["status"], f"{view['uses']} of {view['max_uses']}",
                      view["expires_at"], h("code", None, view["url"]), revoke])
    content = [h("p", None, "Links are made with the API (POST /payment_links, a merchant's"
                 " key); send one to a customer to pay from."),
               table("links", "Payment links, newest first",
                     ("Created", "Amount", "Reference", "Status", "Used", "Expires", "Link",
                      "Revoke"), shown, "No payment links yet.")]
    return _reply(document("Payment links", content, person))


@_acting
def revoke_link(services, environ, person, form, link_id):
    """POST /console/links/<id>/revoke: the link takes no more payments."""
    from mpesa_gateway import links

    row = (services.ledger.revoke_link(link_id, person.owner) if links.link_ok(link_id)
           else None)
    if row is None:
        return _said(person, "No such link", "No payment link with that id.", "/console/links",
                     404)
    _done(services, person, link_id, "revoke_link", "revoked")
    return _said(person, "Revoked", "The link takes no more payments; those made stand.",
                 "/console/links")
