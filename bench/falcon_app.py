"""The gateway's HTTP API written with Falcon, for comparison with the raw WSGI version.

Same routes, bodies and status codes. Everything that is not the web layer is the
gateway's own: config, validation, token cache, Daraja client, ledger, metrics and the
payment flows of `mpesa_gateway.payments` over its `Services` (plain values in, a
`Reply` out). Falcon does the
routing, request parsing, response rendering and the per-request bookkeeping, in its
own idiom: resource classes with responders, `req.get_media()`, `resp.media`,
middleware and error handlers.

Serve: `waitress-serve --call bench.falcon_app:create_app`.
"""

import functools
import json
import logging
import time

import falcon

from mpesa_gateway import logs, monitoring, wire
from mpesa_gateway import payments as gw
from mpesa_gateway.services import build_services

log = logging.getLogger(__name__)


def render(req, resp, reply):
    req.context.reply = reply  # what the access line names
    resp.status = reply.status
    for name, value in reply.headers:
        resp.set_header(name, value)
    if isinstance(reply.body, bytes):
        resp.data = reply.body
    else:
        resp.media = reply.body


class Accounting:
    """Middleware: request id in, X-Request-Id out, metrics and the access line."""

    def __init__(self, core):
        self.core = core

    def process_request(self, req, resp):
        req.context.started = time.monotonic()
        req.context.reply = None
        req.context.request_id = logs.request_id_from(req.get_header("X-Request-Id"))
        req.context.token = logs.REQUEST_ID.set(req.context.request_id)

    def process_response(self, req, resp, resource, req_succeeded):
        resp.set_header("X-Request-Id", req.context.request_id)
        route = req.uri_template or "unmatched"
        reply = req.context.reply
        monitoring.account(self.core.metrics, req.method, route, int(resp.status_code),
                           time.monotonic() - req.context.started,
                           reply and reply.tx_id, reply and reply.phone)
        logs.REQUEST_ID.reset(req.context.token)


class Resource:
    def __init__(self, core):
        self.core = core

    def load_json(self, req):
        if req.content_length and req.content_length > self.core.config.max_body:
            raise wire.PayloadTooLarge()
        if req.content_type is None or req.content_type.split(";")[0].strip() != falcon.MEDIA_JSON:
            raise wire.UnsupportedMediaType()
        return req.get_media()

    def load_raw(self, req):
        data = req.bounded_stream.read(self.core.config.max_body + 1)
        if len(data) > self.core.config.max_body:
            raise wire.PayloadTooLarge()
        return data


class Health(Resource):
    def on_get(self, req, resp):
        render(req, resp, self.core.health.answer())


class StkPush(Resource):
    def on_post(self, req, resp):
        render(req, resp, gw.start_payment(self.core, req.auth, lambda: self.load_json(req),
                                           req.get_header("Idempotency-Key")))


class Transactions(Resource):
    def on_get(self, req, resp):
        render(req, resp, gw.transactions_page(self.core, req.auth, req.query_string))


class Transaction(Resource):
    def on_get(self, req, resp, ref):
        render(req, resp, gw.read_transaction(self.core, req.auth, ref))


class Callback(Resource):
    def on_post(self, req, resp, tx_id, sig):
        render(req, resp, gw.receive_callback(self.core, tx_id, sig, req.env,
                                              lambda: self.load_raw(req)))


class Events(Resource):
    def on_get(self, req, resp):
        render(req, resp, gw.events_page(self.core, req.auth, req.query_string))


class Event(Resource):
    def on_get(self, req, resp, event_id):
        render(req, resp, gw.read_event(self.core, req.auth, event_id))

    def on_post_redeliver(self, req, resp, event_id):
        render(req, resp, gw.redeliver_event(self.core, req.auth, event_id))


class Metrics(Resource):
    def on_get(self, req, resp):
        render(req, resp, gw.metrics_text(self.core, req.auth))


class OpenAPI(Resource):
    def on_get(self, req, resp):
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.core.openapi


def api_error(req, resp, exc, params):
    req.context.reply = exc  # it names its transaction and phone too
    resp.status = exc.status
    resp.media = exc.body()
    for name, value in exc.headers:
        resp.set_header(name, value)


FALCON_ERRORS = {  # Falcon's own HTTP errors, in the gateway's error shape
    400: lambda: wire.BadRequest("the body is not valid UTF-8 JSON", code="invalid_json"),
    404: wire.NotFound,
    405: wire.MethodNotAllowed,
    413: wire.PayloadTooLarge,
    415: wire.UnsupportedMediaType,
}


def http_error(req, resp, exc, params):
    error = FALCON_ERRORS.get(exc.status_code, wire.ApiError)()
    error.headers = [(k, v) for k, v in (exc.headers or {}).items() if k.lower() == "allow"]
    api_error(req, resp, error, params)


def unhandled(req, resp, exc, params):
    log.exception("unhandled error")
    api_error(req, resp, wire.ApiError(), params)


class GatewayApp(falcon.App):
    """falcon.App with room for the shared core (falcon.App itself has __slots__)."""

    mpesa_gateway = None


def create_app(config=None):
    core = build_services(config)  # the shared, non-web half: ledger, client, …
    app = GatewayApp(middleware=[Accounting(core)])
    app.req_options.strip_url_path_trailing_slash = False
    compact = falcon.media.JSONHandler(
        dumps=functools.partial(json.dumps, separators=(",", ":"), ensure_ascii=False))
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = compact
    app.add_route("/health", Health(core))
    app.add_route("/stkpush", StkPush(core))
    app.add_route("/transactions", Transactions(core))
    app.add_route("/transactions/{ref}", Transaction(core))
    app.add_route("/callback/{tx_id}/{sig}", Callback(core))
    app.add_route("/events", Events(core))
    app.add_route("/events/{event_id}", Event(core))
    app.add_route("/events/{event_id}/redeliver", Event(core), suffix="redeliver")
    app.add_route("/metrics", Metrics(core))
    app.add_route("/openapi.json", OpenAPI(core))
    # Falcon consults handlers most-specific first.
    app.add_error_handler(Exception, unhandled)
    app.add_error_handler(falcon.HTTPError, http_error)
    app.add_error_handler(wire.ApiError, api_error)
    app.mpesa_gateway = core
    return app
