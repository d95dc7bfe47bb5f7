"""Serving with waitress directly: a request must arrive within a bound.

Owns the waitress channel the gateway serves with. waitress closes a connection that
stays silent for `channel_timeout`, but one that sends a byte every few seconds is never
silent: enough of them hold every connection the server keeps and lock out everyone
else (/health included) for as long as they trickle. `BoundedRequestChannel` closes a
connection whose request (line, headers and body: at most GATEWAY_MAX_BODY) has not all
arrived within GATEWAY_REQUEST_READ_TIMEOUT of its first byte (nginx's
`client_header_timeout` and `client_body_timeout` do the same in front of it).
"""

import logging
import time

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer

log = logging.getLogger(__name__)


class BoundedRequestChannel(HTTPChannel):
    """waitress's HTTPChannel with a deadline on reading each request."""

    read_timeout = 20.0  # set per server by bound_requests()
    _timed = None  # the request (waitress's parser) being timed
    _since = 0.0  # when its first byte came

    def received(self, data):
        now = time.monotonic()
        request = self.request
        if (data and request is not None and request is self._timed
                and not request.completed and now - self._since > self.read_timeout):
            log.info("connection closed: its request took longer than %g s to arrive"
                     " (GATEWAY_REQUEST_READ_TIMEOUT)", self.read_timeout)
            self.will_close = True
            return False
        result = super().received(data)
        if self.request is not None and self.request is not self._timed:
            self._timed, self._since = self.request, now  # a request began in this chunk
        return result


def bound_requests(server, timeout):
    """Make `server` (waitress.create_server's: one listener, or several when the host
    name has several addresses) take connections as channels whose requests must arrive
    within `timeout` seconds."""
    channel = type("BoundedRequestChannel", (BoundedRequestChannel,),
                   {"read_timeout": float(timeout)})
    listeners = ([server] if isinstance(server, BaseWSGIServer) else
                 [d for d in server.map.values() if isinstance(d, BaseWSGIServer)])
    for listener in listeners:
        listener.channel_class = channel
    return server
