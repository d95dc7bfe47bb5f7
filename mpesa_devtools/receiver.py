"""The demo's merchant endpoint: a small WSGI app that verifies each webhook and prints it.

Owns what `python mpesa_wsgi.py --demo` starts on GATEWAY_PORT + 2, and the reading of a
webhook request's headers that it and the tests' receivers share. A merchant would use
a Standard Webhooks library; this one checks with the gateway's own `verify`.
"""

import json
import time

from mpesa_gateway.webhooks import verify


def request_headers(environ):
    """A receiver's request headers by lower-case name (`webhook-id`, ...) from a WSGI
    environ: what a verifier needs."""
    return {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
            if k.startswith("HTTP_")}


def describe(event_type, data):
    """One line about an event's data, by its type."""
    if event_type == "receipt.received":
        return (f"{data['receipt']} amount={data['amount']} account={data['reference']}"
                f" matched={data['transaction_id']}")
    if event_type.startswith("payment.refund"):
        refund = data["refund"]
        return (f"{data['transaction_id'] or data['receipt']} refund={refund['status']}"
                f" reversal={refund['receipt']}")
    if event_type == "receipt.verified":
        return f"{data['receipt']} verified={data['verified']['status']}"
    return f"{data['id']} status={data['status']}"


class DemoReceiver:
    """The demo's merchant endpoint: verifies each event and prints it as it arrives."""

    def __init__(self, secret, out, clock=time.time):
        self._secret, self._out, self._clock = secret, out, clock

    def __call__(self, environ, start_response):
        body = environ["wsgi.input"].read(min(int(environ.get("CONTENT_LENGTH") or 0), 65536))
        headers = request_headers(environ)
        try:
            verify(self._secret, headers, body, self._clock())
        except ValueError:
            print("webhook refused: signature did not verify", file=self._out, flush=True)
            start_response("400 Bad Request", [("Content-Length", "0")])
            return [b""]
        try:
            event = json.loads(body)
            said = describe(event["type"], event["data"])
            print(f"webhook {event['type']} {said} (signature verified)", file=self._out,
                  flush=True)
            status = "204 No Content"
        except (ValueError, KeyError, TypeError):
            print("webhook refused: signed, but not an event this receiver knows", file=self._out,
                  flush=True)
            status = "400 Bad Request"
        start_response(status, [("Content-Length", "0")])
        return [b""]
