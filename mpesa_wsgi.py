"""mpesa-wsgi: the WSGI app.

Owns the HTTP surface and nothing else: `create_app()` (builds the services once
and wraps them), the request helpers (bounded body reading, strict JSON), the
literal route table, the plain handler functions, and the small WSGI callable
that routes, calls, renders errors in one shape and accounts for the request.
The payment flows live in `mpesa_gateway.payments`, refunds and code checks in
`mpesa_gateway.refunds`; the command line in `cli.py`,
which `main` (the `mpesa-wsgi` command, `python mpesa_wsgi.py …`) hands `create_app` to.

Importing this module needs no environment; building the app does.
"""

import logging
import os
import time

import config as settings
from mpesa_gateway import console, links, logs, monitoring, payments, paypage, refunds
from mpesa_gateway.services import build_services
from mpesa_gateway.wire import (
    STATUS_LINES,
    ApiError,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Reply,
    UnsupportedMediaType,
    decode_json,
    dumps,
)

log = logging.getLogger("mpesa_wsgi")


class Request:
    """The WSGI environ, read the way the handlers need it."""

    __slots__ = ("environ",)

    def __init__(self, environ):
        self.environ = environ

    def header(self, name):
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"))

    def body(self, limit):
        """The raw body, at most `limit` bytes; never an unbounded read."""
        raw_length = self.environ.get("CONTENT_LENGTH") or ""
        if raw_length:
            if not raw_length.isdigit():
                raise BadRequest("Content-Length must be a number", code="invalid_request")
            length = int(raw_length)
            if length > limit:
                raise PayloadTooLarge(f"the body must be at most {limit} bytes")
            data = self.environ["wsgi.input"].read(length)
        else:
            # No length (e.g. chunked): read one byte past the limit to detect excess.
            data = self.environ["wsgi.input"].read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"the body must be at most {limit} bytes")
        return data

    def json(self, limit):
        """The decoded JSON body: 415 unless JSON, 413 past the limit, 400 if malformed."""
        if not self._is_json():
            raise UnsupportedMediaType()
        return decode_json(self.body(limit))

    def optional_json(self, limit):
        """Like json(), but a POST with no body at all is an empty object."""
        data = self.body(limit)
        if not data:
            return {}
        if not self._is_json():
            raise UnsupportedMediaType()
        return decode_json(data)

    def _is_json(self):
        ctype = self.environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        return ctype == "application/json"


# --- handlers: (req, services, *path params) -> a Reply; errors raised ----------------------


def health(req, s):
    return s.health.answer()


def metrics_page(req, s):
    return payments.metrics_text(s, req.header("Authorization"))


def openapi(req, s):
    return Reply(200, s.openapi, (("Content-Type", "application/json"),))


def list_transactions(req, s):
    return payments.transactions_page(s, req.header("Authorization"),
                                      req.environ.get("QUERY_STRING", ""))


def stk_push(req, s):
    return payments.start_payment(s, req.header("Authorization"),
                                  lambda: req.json(s.config.max_body),
                                  req.header("Idempotency-Key"))


def get_transaction(req, s, ref):
    return payments.read_transaction(s, req.header("Authorization"), ref)


def list_events(req, s):
    return payments.events_page(s, req.header("Authorization"),
                                req.environ.get("QUERY_STRING", ""))


def get_event(req, s, event_id):
    return payments.read_event(s, req.header("Authorization"), event_id)


def redeliver(req, s, event_id):
    return payments.redeliver_event(s, req.header("Authorization"), event_id)


def callback(req, s, tx_id, sig):
    return payments.receive_callback(s, tx_id, sig, req.environ,
                                     lambda: req.body(s.config.max_body))


def payment_qr(req, s):
    return payments.payment_qr(s, req.header("Authorization"),
                               lambda: req.json(s.config.max_body))


def transactions_csv(req, s):
    return payments.transactions_csv(s, req.header("Authorization"),
                                     req.environ.get("QUERY_STRING", ""))


def receipts_csv(req, s):
    return payments.receipts_csv(s, req.header("Authorization"),
                                 req.environ.get("QUERY_STRING", ""))


def list_receipts(req, s):
    return payments.receipts_page(s, req.header("Authorization"),
                                  req.environ.get("QUERY_STRING", ""))


def get_receipt(req, s, number):
    return payments.read_receipt(s, req.header("Authorization"), number)


def c2b(req, s, kind, sig):
    return payments.receive_c2b(s, kind, sig, req.environ,
                                lambda: req.body(s.config.max_body))


def refund_transaction(req, s, ref):
    return refunds.refund_payment(s, req.header("Authorization"), ref,
                                  lambda: req.optional_json(s.config.max_body),
                                  req.header("Idempotency-Key"))


def refund_receipt(req, s, number):
    return refunds.refund_receipt(s, req.header("Authorization"), number,
                                  lambda: req.optional_json(s.config.max_body),
                                  req.header("Idempotency-Key"))


def verify_receipt(req, s, number):
    return refunds.verify_receipt(s, req.header("Authorization"), number)


def claim_receipt(req, s, number):
    return refunds.claim_receipt(s, req.header("Authorization"), number,
                                 lambda: req.json(s.config.max_body))


def create_link(req, s):
    return links.create_link(s, req.header("Authorization"),
                             lambda: req.json(s.config.max_body))


def list_links(req, s):
    return links.list_links(s, req.header("Authorization"))


def get_link(req, s, link_id):
    return links.read_link(s, req.header("Authorization"), link_id)


def revoke_link(req, s, link_id):
    return links.revoke_link(s, req.header("Authorization"), link_id)


def pay_page(req, s, link_id):
    return paypage.pay_page(s, req.environ, link_id)


def pay(req, s, link_id):
    return paypage.pay(s, req.environ, link_id, req.body)


def pay_script(req, s):
    return paypage.live_script(s, req.environ)


def pay_status(req, s, link_id, tx_id, sig):
    return paypage.status_page(s, req.environ, link_id, tx_id, sig)


def balance(req, s):
    return refunds.balance(s, req.header("Authorization"))


def result(req, s, kind, request_id, sig):
    return refunds.receive_result(s, kind, request_id, sig, req.environ,
                                  lambda: req.body(s.config.max_body))


def console_sign_in(req, s):
    return console.sign_in(s, req.environ, req.body)


def console_page(page):
    """A console page's handler: its flow reads the request's cookie and query itself."""
    return lambda req, s, *params: page(s, req.environ, *params)


def console_action(action):
    """A console action's handler: its flow reads the cookie and the form itself."""
    return lambda req, s, *params: action(s, req.environ, req.body, *params)


# Literal paths: auditable at a glance. Value: {method: handler}.
ROUTES = {
    "/health": {"GET": health},
    "/stkpush": {"POST": stk_push},
    "/transactions": {"GET": list_transactions},
    "/metrics": {"GET": metrics_page},
    "/openapi.json": {"GET": openapi},
    "/events": {"GET": list_events},
    "/receipts": {"GET": list_receipts},
    "/qr": {"POST": payment_qr},
    "/balance": {"GET": balance},
    "/transactions.csv": {"GET": transactions_csv},
    "/receipts.csv": {"GET": receipts_csv},
    "/payment_links": {"GET": list_links, "POST": create_link},
    "/pay/live.js": {"GET": pay_script},
    # The console: pages for people (HTML), read-only, behind a person's sign-in.
    "/console": {"GET": console_page(console.home)},
    "/console/sign-in": {"POST": console_sign_in},
    "/console/sign-out": {"POST": console_page(console.sign_out)},
    "/console/style.css": {"GET": console_page(console.style)},
    "/console/payments": {"GET": console_page(console.payments)},
    "/console/payments.csv": {"GET": console_page(console.payments_csv)},
    "/console/receipts": {"GET": console_page(console.receipts)},
    "/console/receipts.csv": {"GET": console_page(console.receipts_csv)},
    "/console/attention": {"GET": console_page(console.attention)},
    "/console/summary": {"GET": console_page(console.summary)},
    "/console/verify": {"POST": console_action(console.verify)},
    "/console/links": {"GET": console_page(console.links_page)},
}
# (prefix, route template for logs, number of path segments after it, {method: handler})
PREFIX_ROUTES = (
    ("/transactions/", "/transactions/{id}", 1, {"GET": get_transaction}),
    ("/transactions/", "/transactions/{id}/refund", 2, {"POST": refund_transaction}),
    ("/callback/", "/callback/{tx_id}/{sig}", 2, {"POST": callback}),
    ("/c2b/", "/c2b/{kind}/{sig}", 2, {"POST": c2b}),
    ("/receipts/", "/receipts/{receipt}", 1, {"GET": get_receipt}),
    ("/receipts/", "/receipts/{receipt}/refund", 2, {"POST": refund_receipt}),
    ("/receipts/", "/receipts/{receipt}/verify", 2, {"POST": verify_receipt}),
    ("/receipts/", "/receipts/{receipt}/claim", 2, {"POST": claim_receipt}),
    ("/results/", "/results/{kind}/{request}/{sig}", 3, {"POST": result}),
    ("/payment_links/", "/payment_links/{id}", 1, {"GET": get_link}),
    ("/payment_links/", "/payment_links/{id}/revoke", 2, {"POST": revoke_link}),
    # The customer's pay page (HTML): a payment link opened on a phone.
    ("/pay/", "/pay/{link}", 1, {"GET": pay_page, "POST": pay}),
    ("/pay/", "/pay/{link}/{tx}/{sig}", 3, {"GET": pay_status}),
    ("/events/", "/events/{id}", 1, {"GET": get_event}),
    ("/events/", "/events/{id}/redeliver", 2, {"POST": redeliver}),
    ("/console/payments/", "/console/payments/{id}", 1,
     {"GET": console_page(console.payment)}),
    ("/console/payments/", "/console/payments/{id}/requery", 2,
     {"POST": console_action(console.requery)}),
    ("/console/payments/", "/console/payments/{id}/refund", 2,
     {"GET": console_page(console.refund_page), "POST": console_action(console.refund)}),
    ("/console/events/", "/console/events/{id}/redeliver", 2,
     {"POST": console_action(console.redeliver)}),
    ("/console/links/", "/console/links/{id}/revoke", 2,
     {"POST": console_action(console.revoke_link)}),
)
# Each prefix route with its template's segments after the prefix, split once.
_PREFIXES = tuple((*route, route[1][len(route[0]):].split("/")) for route in PREFIX_ROUTES)


def match(method, path):
    """(handler, route template, params) or raise 404/405. A template's `{name}` segments
    are the params; its other segments must be as written."""
    methods, template, params = ROUTES.get(path), path, ()
    if methods is None:
        for prefix, prefix_template, count, candidate, wanted in _PREFIXES:
            if path.startswith(prefix):
                parts = tuple(path[len(prefix):].split("/"))
                if len(parts) == count and all(parts) and all(
                        w.startswith("{") or w == p for w, p in zip(wanted, parts)):
                    methods, template = candidate, prefix_template
                    params = tuple(p for w, p in zip(wanted, parts) if w.startswith("{"))
                    break
    if methods is None:
        raise NotFound()
    if method not in methods:
        raise MethodNotAllowed(headers=[("Allow", ", ".join(sorted(methods)))])
    return methods[method], template, params


# --- the app ----------------------------------------------------------------------------


class Gateway:
    """The WSGI application: routes, calls, renders, accounts. Nothing else."""

    def __init__(self, services):
        self.services = services

    def __call__(self, environ, start_response):
        request_id = logs.request_id_from(environ.get("HTTP_X_REQUEST_ID"))
        token = logs.REQUEST_ID.set(request_id)  # every line of this request carries it
        try:
            return self.wsgi_app(environ, start_response, request_id)
        finally:
            logs.REQUEST_ID.reset(token)

    def wsgi_app(self, environ, start_response, request_id):
        """Route, call, render, account. Nothing else lives here."""
        started = time.monotonic()
        route = None
        try:
            handler, route, params = match(environ["REQUEST_METHOD"],
                                           environ.get("PATH_INFO", ""))
            reply = handler(Request(environ), self.services, *params)
        except ApiError as exc:
            reply = Reply(exc.status, exc.body(), exc.headers, exc.tx_id, exc.phone)
        except Exception:
            log.exception("unhandled error route=%s", route)
            reply = Reply(500, ApiError().body())
        body, headers = reply.body, list(reply.headers)
        payload = body if isinstance(body, bytes) else dumps(body)
        if not any(name == "Content-Type" for name, _ in headers):
            headers.append(("Content-Type", "application/json"))
        headers += [("Content-Length", str(len(payload))), ("X-Request-Id", request_id)]
        start_response(STATUS_LINES[reply.status], headers)
        monitoring.account(self.services.metrics, environ["REQUEST_METHOD"], route or "unmatched",
                           reply.status, time.monotonic() - started, reply.tx_id, reply.phone)
        return [payload]


def create_app(config=None, *, clock=None):
    """Build the app once: config (from the environment unless given), then the services.

    Under `waitress-serve --call` or gunicorn this is the entry point: if nobody has set
    up logging yet, set it up as `python mpesa_wsgi.py` does (redaction, access lines)."""
    if config is None:
        config = settings.load_config(os.environ)
    if not logging.getLogger().handlers:
        logs.configure(config.log_level, config.log_format, config.secret_values())
    return Gateway(build_services(config, clock=clock))


def main(argv=None):
    """The `mpesa-wsgi` console command (and `python mpesa_wsgi.py`): hand create_app to the
    command line, which never imports this module, so it is loaded once."""
    import cli

    return cli.main(create_app, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
