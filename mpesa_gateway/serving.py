"""Serving with waitress directly: a request's headers must arrive within a bound.

Owns the waitress channel the gateway serves with. waitress closes a connection that
stays silent for `channel_timeout`, but one that sends a header byte every few seconds
is never silent: enough of them hold every connection the server keeps and lock out
everyone else (/health included) for as long as they trickle. `BoundedHeadersChannel`
closes a connection whose request line and headers have not all arrived within
GATEWAY_HEADER_TIMEOUT of their first byte (nginx's `client_header_timeout` does the
same in front of it). A body, once the headers are in, is bounded by the body limit and
`channel_timeout` as before.
"""

import logging
import time

from waitress.channel import HTTPChannel

log = logging.getLogger(__name__)


class BoundedHeadersChannel(HTTPChannel):
    """waitress's HTTPChannel with a deadline on each request's headers."""

    header_timeout = 20.0  # set per server by bound_headers()
    _headers_since = 0.0  # when the first byte of the request being read came

    def received(self, data):
        if data:
            now = time.monotonic()
            if self.request is None:  # these bytes start a new request
                self._headers_since = now
            elif (not self.request.headers_finished
                  and now - self._headers_since > self.header_timeout):
                log.warning("connection closed: its request headers took longer than %g s"
                            " (GATEWAY_HEADER_TIMEOUT)", self.header_timeout)
                self.will_close = True
                return False
        return super().received(data)


def bound_headers(server, timeout):
    """Make `server` (waitress.create_server's, one listening socket) take connections as
    channels whose request headers must arrive within `timeout` seconds."""
    server.channel_class = type("BoundedHeadersChannel", (BoundedHeadersChannel,),
                                {"header_timeout": float(timeout)})
    return server
