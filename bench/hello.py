"""A bare WSGI app answering the gateway's /health JSON: the server's physical limit here.

No routing, no checks, no logging: what waitress alone costs on this machine. The
`/health` row of the benchmark is compared with this one.
"""

import json
import time


def app(environ, start_response):
    body = json.dumps({"status": "ok", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime()),
                       "version": "0.1.0"}, separators=(",", ":")).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def create_app():
    return app
