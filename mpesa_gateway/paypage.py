"""The customer's pay page: a payment link opened on a phone.

Owns `/pay/<link>` (the merchant's display name, the amount and reference, a phone field,
the Paybill route as a fallback) and its push (`POST /pay/<link>`: the STK push under the
same rules as a merchant's — the phone lock, push slots — plus the link's: its uses, at
most PROMPTS_PER_PHONE prompts per phone, a few prompts a second per link and per client
address), and the status page a push leads to (`/pay/<link>/<tx>/<sig>`, signed, so it
shows that one payment and nothing of any other): kept up to date while the prompt is open
by its one script of its own (`/pay/live.js`, which updates the `aria-live` region in
place, so a screen reader announces the change), or, with JavaScript off, by the page
refreshing itself (`<noscript><meta refresh>`), ending at `succeeded` with the receipt or a failure with
a plain next step. Same safety as the console's pages (`pages`).
"""

import hashlib
import hmac
import logging
from urllib.parse import parse_qs

import config as settings
import mpesa_ledger as store
import validation
from mpesa_gateway import links, sources
from mpesa_gateway.pages import Markup, field, h, link, void
from mpesa_gateway.pages import HEADERS as PAGE_HEADERS
from mpesa_gateway.payments import push_through_link
from mpesa_gateway.resources import transaction_resource
from mpesa_gateway.wire import ApiError, Reply

log = logging.getLogger(__name__)

PROMPTS_PER_PHONE = 3
PER_LINK_PER_S, PER_LINK_BURST = 0.5, 5
# Generous: customers on mobile data share carrier addresses (CGNAT) by the thousand.
PER_ADDRESS_PER_S, PER_ADDRESS_BURST = 2.0, 20
REFRESH_S = 3
UNKNOWN_REFRESH_S = 10
MAX_FORM = 1024
# What a failed prompt's result code tells the customer to do (daraja_api.md §4.1).
NEXT_STEPS = {
    "1032": "You cancelled the prompt. Try again when you are ready.",
    "1037": "No answer from your phone. Check that it is on and has signal, then try again.",
    "1": "There is not enough money on this M-Pesa account. Top up, then try again.",
    "2001": "The M-Pesa PIN was wrong. Try again with the right PIN.",
    "1019": "The prompt expired before it was answered. Try again.",
    "1001": "Your phone had another M-Pesa prompt open. Wait a minute, then try again.",
}


# A status page may run one script of its own (it updates the status in place, so a screen
# reader announces the change); nothing else, and nothing from elsewhere.
LIVE_CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self';"
            " img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
LIVE_HEADERS = tuple((name, LIVE_CSP if name == "Content-Security-Policy" else value)
                     for name, value in PAGE_HEADERS)
LIVE_JS = b"""\
// The pay page's status, kept up to date in place: the live region's new words are
// announced. Without script, the page refreshes itself instead (<noscript>).
(function () {
  var box = document.getElementById("status");
  function poll() {
    var wait = parseInt(box.getAttribute("data-refresh") || "0", 10);
    if (!wait) { return; }
    setTimeout(function () {
      fetch(window.location.href, {cache: "no-store", credentials: "same-origin"})
        .then(function (answer) { return answer.text(); })
        .then(function (text) {
          var fresh = new DOMParser().parseFromString(text, "text/html")
            .getElementById("status");
          if (fresh) {
            box.setAttribute("data-status", fresh.getAttribute("data-status"));
            box.setAttribute("data-refresh", fresh.getAttribute("data-refresh") || "0");
            box.replaceChildren.apply(box, Array.prototype.slice.call(fresh.childNodes));
          }
          poll();
        })
        .catch(poll);
    }, wait * 1000);
  }
  if (box) { poll(); }
})();
"""


def _page(title, content, status=200, refresh=None, live=False):
    """A page of the customer's; `refresh`: seconds until it looks again (`live`: a script
    updates the status in place, and the page refreshes itself only without script)."""
    meta = [void("meta", {"charset": "utf-8"}),
            void("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
            h("title", None, title),
            void("link", {"rel": "stylesheet", "href": "/console/style.css"})]
    if refresh:
        tag = void("meta", {"http-equiv": "refresh", "content": str(refresh)})
        meta.append(h("noscript", None, tag) if live else tag)
    if live:
        meta.append(h("script", {"src": "/pay/live.js", "defer": True}))
    body = Markup("<!doctype html>") + h(
        "html", {"lang": "en"}, h("head", None, meta),
        h("body", None, h("main", {"id": "main", "class": "pay"}, content)))
    return Reply(status, body.encode("utf-8"), LIVE_HEADERS if live else PAGE_HEADERS)


def live_script(services, environ):
    """GET /pay/live.js: the status page's one script."""
    del services, environ
    return Reply(200, LIVE_JS, (("Content-Type", "text/javascript; charset=utf-8"),
                                ("Cache-Control", "max-age=3600"),
                                ("X-Content-Type-Options", "nosniff")))


def _merchant(config, owner):
    return dict(config.owner_names).get(owner) or config.qr_merchant_name


def _status_sig(services, link_id, tx_id):
    key = hmac.new(services.config.secret.encode(), b"mpesa-wsgi pay page",
                   hashlib.sha256).digest()
    return hmac.new(key, f"{link_id}/{tx_id}".encode(), hashlib.sha256).hexdigest()[:32]


def _open_link(services, link_id):
    row = services.ledger.link(link_id) if links.link_ok(link_id) else None
    if row is None:
        return None, None
    return row, links.state_of(row, services.clock.wall())


def _ledger_away(services, exc):
    services.ledger_watch.failed("pay_page", exc)
    return _page("Try again shortly", h("p", None, "Payments cannot be taken right now; try"
                                        " again in a minute."), 503)


def _header(services, row):
    return [h("p", {"class": "merchant"}, _merchant(services.config, row["owner"])),
            h("h1", None, f"Pay KES {row['amount']:,}"),
            h("p", None, "Reference ", h("strong", None, row["reference"]))]


def _fallback(services, row):
    """The Paybill route, after a failed prompt: its account number (the link's reference)
    then names that payment, so the Paybill payment counts as the link's use. Not for a
    link of several uses (an account number several payments share names none) nor for
    the default reference (which never names a payment)."""
    cfg = services.config
    if (cfg.transaction_type != settings.PAYBILL or row["max_uses"] != 1
            or row["reference"].lower() == cfg.default_reference.lower()):
        return ""
    return h("p", {"id": "paybill"}, "Or pay from the M-Pesa menu: Lipa na M-Pesa, Paybill ",
             h("strong", None, cfg.c2b_shortcode), ", account number ",
             h("strong", None, row["reference"]), f", KES {row['amount']:,}.")


def pay_page(services, environ, link_id, problem=None, status=200):
    """GET /pay/<link>: what is asked, and the phone field (or why it cannot be paid)."""
    try:
        row, state = _open_link(services, link_id)
    except services.ledger.Error as exc:
        return _ledger_away(services, exc)
    if row is None:
        return _page("No such link", h("p", None, "This payment link does not exist."), 404)
    if state != "active":
        words = {"expired": "This payment link has expired.",
                 "revoked": "This payment link was withdrawn.",
                 "used_up": "This payment link has been paid."}[state]
        return _page("Not payable", [*_header(services, row), h("p", {"id": "state"}, words),
                                     h("p", None, "Ask the merchant for a new link.")], 410)
    form = h("form", {"id": "pay", "method": "post", "action": f"/pay/{row['id']}"},
             field("phone", "Your M-Pesa phone number", kind="tel", inputmode="tel",
                   autocomplete="tel", required=True, placeholder="07XX XXX XXX"),
             h("button", {"type": "submit"}, f"Pay KES {row['amount']:,}"))
    content = [*_header(services, row),
               h("p", {"id": "error", "role": "alert"}, problem) if problem else "",
               form, h("p", None, "A prompt appears on your phone: enter your M-Pesa PIN"
                       " there. Nothing is taken before you do.")]
    return _page(f"Pay {_merchant(services.config, row['owner'])}", content, status)


def pay(services, environ, link_id, load_body):
    """POST /pay/<link>: one prompt to the phone the customer gave, then its status page."""
    try:
        row, state = _open_link(services, link_id)
    except services.ledger.Error as exc:
        return _ledger_away(services, exc)
    if row is None or state != "active":
        return pay_page(services, environ, link_id)
    try:
        form = parse_qs(load_body(MAX_FORM).decode("utf-8", "replace"), max_num_fields=4)
        phone = validation.normalize_phone((form.get("phone") or [""])[0])
    except (ValueError, ApiError):
        return pay_page(services, environ, link_id, "That is not a Safaricom number: write"
                        " it as 07XX XXX XXX or 2547XX XXX XXX.", 400)
    address = sources.client_address(environ, services.config.trusted_proxies)
    # Per address, and per link from that address: one client cannot shut a link for all.
    wait = services.pay_per_address.acquire(address) or services.pay_per_link.acquire(
        f"{row['id']} {address}")
    if wait:
        page = pay_page(services, environ, link_id, "Too many tries just now; wait"
                        f" {int(wait) + 1} seconds and try again.", 429)
        return Reply(page.status, page.body,
                     tuple(page.headers) + (("Retry-After", str(int(wait) + 1)),))
    push = validation.PushRequest(phone=phone, amount=row["amount"],
                                  reference=row["reference"], description=row["description"])
    limits = store.LinkLimits(row["id"], row["max_uses"], PROMPTS_PER_PHONE)
    try:
        reply = push_through_link(services, row["owner"], push, limits)
    except ApiError as exc:
        open_one = _open_payment(services, row["id"], phone) if exc.code == \
            "payment_in_progress" else None
        if open_one is not None:  # a second tap: the first prompt's page
            return _to_status(services, row["id"], open_one, phone)
        return pay_page(services, environ, link_id, _refusal(exc), exc.status)
    tx_id = reply.body["id"]
    log.info("pay_page push link=%s… tx=%s", row["id"][:7], tx_id)  # (its id is its key)
    return _to_status(services, row["id"], tx_id, phone)


def _to_status(services, link_id, tx_id, phone):
    location = f"/pay/{link_id}/{tx_id}/{_status_sig(services, link_id, tx_id)}"
    return Reply(303, b"", (("Location", location), ("Cache-Control", "no-store")),
                 tx_id=tx_id, phone=phone)


def _open_payment(services, link_id, phone):
    """The id of this link's payment to `phone` whose prompt is still open, or None."""
    try:
        rows, _ = services.ledger.list_page(statuses=("pending",), phone=phone, limit=5)
    except services.ledger.Error:
        return None
    return next((r["id"] for r in rows if r.get("link_id") == link_id), None)


def _refusal(exc):
    return {"link_used_up": "This link has been paid, or a payment through it is under way.",
            "link_phone_done": "This phone has had its prompts from this link. Pay from the"
                               " M-Pesa menu instead, or ask the merchant.",
            "payment_in_progress": "Your phone has a prompt open already: answer it, or wait"
                                   " a minute.",
            "subscriber_busy": "Your phone has another M-Pesa prompt open: wait a minute,"
                               " then try again.",
            }.get(exc.code, "The payment could not be started just now; try again in a"
                            " minute.")


def status_page(services, environ, link_id, tx_id, sig):
    """GET /pay/<link>/<tx>/<sig>: this payment's status, refreshed while the prompt is open;
    signed, so no other payment can be looked at from here."""
    expected = _status_sig(services, link_id, tx_id)
    if not hmac.compare_digest(sig.encode(), expected.encode()):
        return _page("No such payment", h("p", None, "This page does not exist."), 404)
    try:
        row, _ = _open_link(services, link_id)
        payment = services.ledger.get(tx_id) if validation.tx_id_ok(tx_id) else None
    except services.ledger.Error as exc:
        services.ledger_watch.failed("pay_page", exc)
        return _page("Checking…", h("p", None, "Checking the payment; this page refreshes."),
                     503, refresh=REFRESH_S)
    if row is None or payment is None or payment.get("link_id") != link_id:
        return _page("No such payment", h("p", None, "This page does not exist."), 404)
    view = transaction_resource(payment)
    again = link(f"/pay/{link_id}", "Try again", id="again")
    if view["status"] == "pending":
        said, refresh = [h("p", None, f"A prompt was sent to {view['phone']}: enter your"
                           " M-Pesa PIN on your phone."),
                         h("p", None, "This page updates by itself.")], REFRESH_S
    elif view["status"] == "succeeded":
        said, refresh = [h("p", None, "Paid. Thank you!"),
                         h("p", None, "M-Pesa receipt ", h("strong", {"id": "receipt"},
                                                         view["receipt"]))], None
    elif view["status"] == "unknown":  # not final: a result may still come
        said, refresh = [h("p", None, "We could not confirm the payment yet. Check your"
                           " M-Pesa messages before paying again; this page keeps"
                           " checking.")], UNKNOWN_REFRESH_S
    else:
        step = NEXT_STEPS.get(str(view["result_code"] or ""),
                              "The payment did not go through. Try again, or pay from the"
                              " M-Pesa menu.")
        said, refresh = [h("p", None, step), h("p", None, again)], None
    content = [*_header(services, row),
               h("div", {"id": "status", "role": "status", "aria-live": "polite",
                         "data-status": view["status"], "data-refresh": refresh or 0},
                 h("p", {"class": f"status-{view['status']}"},
                   {"pending": "Waiting for your PIN…", "succeeded": "Paid",
                    "failed": "Not paid", "rejected": "Not paid",
                    "unknown": "Not confirmed yet"}[view["status"]]), said,
                 _fallback(services, row) if view["status"] in ("failed", "rejected")
                 else "")]
    return _page(f"Payment {view['status']}", content, refresh=refresh, live=True)
