"""The gateway's HTTP API written with Flask, for comparison with the raw WSGI version.

Same routes, bodies and status codes. Everything that is not the web layer is the
gateway's own: config, validation, token cache, Daraja client, ledger, metrics and the
payment flows of `mpesa_gateway.payments` over its `Services` (plain values in, a
`Reply` out). Flask does the
routing, request parsing, response rendering and the per-request bookkeeping, in its
own idiom: decorated views, `request.get_json()`, `jsonify`, error handlers and
before/after-request hooks.

Serve: `waitress-serve --call bench.flask_app:create_app`.
"""

import logging
import time

import flask
from werkzeug.exceptions import HTTPException

from mpesa_gateway import logs, monitoring, wire
from mpesa_gateway import payments as gw
from mpesa_gateway.services import build_services

log = logging.getLogger(__name__)

WERKZEUG_ERRORS = {  # Werkzeug's own HTTP errors, in the gateway's error shape
    400: (wire.BadRequest, "invalid_json"),
    404: (wire.NotFound, None),
    405: (wire.MethodNotAllowed, None),
    413: (wire.PayloadTooLarge, None),
    415: (wire.UnsupportedMediaType, None),
}


def create_app(config=None):
    core = build_services(config)  # the shared, non-web half: ledger, client, …
    app = flask.Flask(__name__)
    app.json.sort_keys = False
    app.json.compact = True
    app.json.ensure_ascii = False
    app.config["MAX_CONTENT_LENGTH"] = core.config.max_body
    app.extensions["mpesa_gateway"] = core

    def respond(reply):
        flask.g.reply = reply  # what the access line names
        headers = list(reply.headers)
        if isinstance(reply.body, bytes):
            return flask.Response(reply.body, reply.status, headers)
        return flask.jsonify(reply.body), reply.status, headers

    def auth():
        return flask.request.headers.get("Authorization")

    @app.before_request
    def begin():
        flask.g.started = time.monotonic()
        flask.g.request_id = logs.request_id_from(flask.request.headers.get("X-Request-Id"))
        flask.g.context = logs.REQUEST_ID.set(flask.g.request_id)

    @app.after_request
    def account(response):
        rule = flask.request.url_rule
        route = rule.rule.replace("<", "{").replace(">", "}") if rule else "unmatched"
        reply = flask.g.get("reply")
        response.headers["X-Request-Id"] = flask.g.get("request_id", "-")
        monitoring.account(core.metrics, flask.request.method, route, response.status_code,
                           time.monotonic() - flask.g.get("started", time.monotonic()),
                           reply and reply.tx_id, reply and reply.phone)
        return response

    @app.teardown_request
    def end(_exc):
        context = flask.g.pop("context", None)
        if context is not None:
            logs.REQUEST_ID.reset(context)

    @app.errorhandler(wire.ApiError)
    def api_error(exc):
        flask.g.reply = exc  # it names its transaction and phone too
        return flask.jsonify(exc.body()), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def http_error(exc):
        kind, code = WERKZEUG_ERRORS.get(exc.code, (wire.ApiError, None))
        error = kind(code=code) if code else kind()
        headers = [(k, v) for k, v in exc.get_headers() if k == "Allow"]
        return flask.jsonify(error.body()), error.status, headers

    @app.errorhandler(Exception)
    def unhandled(exc):
        log.exception("unhandled error")
        return flask.jsonify(wire.ApiError().body()), 500

    @app.get("/health")
    def health():
        return respond(core.health.answer())

    @app.post("/stkpush")
    def stk_push():
        return respond(gw.start_payment(core, auth(), flask.request.get_json,
                                        flask.request.headers.get("Idempotency-Key")))

    @app.get("/transactions")
    def transactions():
        return respond(gw.transactions_page(core, auth(),
                                            flask.request.query_string.decode("latin-1")))

    @app.get("/transactions/<ref>")
    def transaction(ref):
        return respond(gw.read_transaction(core, auth(), ref))

    @app.post("/callback/<tx_id>/<sig>")
    def callback(tx_id, sig):
        return respond(gw.receive_callback(core, tx_id, sig,
                                           flask.request.environ, flask.request.get_data))

    @app.get("/events")
    def events():
        return respond(gw.events_page(core, auth(), flask.request.query_string.decode("latin-1")))

    @app.get("/events/<event_id>")
    def event(event_id):
        return respond(gw.read_event(core, auth(), event_id))

    @app.post("/events/<event_id>/redeliver")
    def redeliver(event_id):
        return respond(gw.redeliver_event(core, auth(), event_id))

    @app.get("/metrics")
    def metrics():
        return respond(gw.metrics_text(core, auth()))

    @app.get("/openapi.json")
    def openapi():
        return flask.Response(core.openapi, 200, content_type="application/json")

    return app
