"""A scripted fake Daraja on a raw loopback socket, for fault injection.

Each request to a known path takes the next step scripted for that path; a step
writes raw bytes (or sleeps, drips, resets the connection). Every request is
logged, so a test can assert the exact number of upstream calls, and every step
that has run to its end is counted, so a test can wait for a held answer to be over
(`wait_done`) instead of sleeping. An unscripted request is answered 500 and
recorded in `unexpected`.
"""

import json
import socket
import struct
import threading
import time

KINDS = {
    "/oauth/v1/generate": "oauth",
    "/mpesa/stkpush/v1/processrequest": "push",
    "/mpesa/stkpushquery/v1/query": "query",
    "/mpesa/c2b/v1/registerurl": "register",
    "/mpesa/c2b/v2/registerurl": "register",
    "/mpesa/qrcode/v1/generate": "qr",
    "/mpesa/reversal/v1/request": "reversal",
    "/mpesa/transactionstatus/v1/query": "status",
    "/mpesa/accountbalance/v1/query": "balance",
}
CLOSE = "close"


def raw_response(status, body=b"", content_type="application/json", extra=()):
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def reply(status, body=b"", **kwargs):
    """Step: answer with a status and a JSON (or raw) body."""
    data = raw_response(status, body, **kwargs)

    def step(conn, request):
        conn.sendall(data)

    return step


def token(value="fake-token-1", expires_in="3599"):
    return reply(200, {"access_token": value, "expires_in": expires_in})


def accepted(checkout="ws_CO_26112026120000000712345678"):
    return reply(200, {"MerchantRequestID": "ac7b-470b-8df7-23ab3cef38271071873",
                       "CheckoutRequestID": checkout, "ResponseCode": "0",
                       "ResponseDescription": "Success. Request accepted for processing",
                       "CustomerMessage": "Success. Request accepted for processing"})


def error(status, code, message):
    return reply(status, {"requestId": "1c5b-4ba8-815c-ac45c57a3db01495926",
                          "errorCode": code, "errorMessage": message})


def sleep(seconds, then=None):
    """Step: hold the request (past the client's read timeout), then maybe answer."""

    def step(conn, request):
        time.sleep(seconds)
        if then is not None:
            then(conn, request)
        return CLOSE

    return step


def reset():
    """Step: read the request, then drop the connection with a TCP reset."""

    def step(conn, request):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return CLOSE

    return step


def truncated():
    """Step: send headers promising 400 bytes, a few of them, then close."""

    def step(conn, request):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 400\r\n\r\n" + b'{"MerchantRequestID":"x",')
        return CLOSE

    return step


def drip(interval, chunks=100):
    """Step: a 200 whose body arrives one byte per `interval` seconds."""

    def step(conn, request):
        conn.sendall(raw_response(200, b" " * chunks)[:-chunks])
        for _ in range(chunks):
            time.sleep(interval)
            try:
                conn.sendall(b" ")
            except OSError:
                break
        return CLOSE

    return step


def oversized(size=10 * 1024 * 1024):
    def step(conn, request):
        body = b'{"pad":"' + b"x" * size + b'"}'
        try:
            conn.sendall(raw_response(200, body))
        except OSError:
            pass  # the client stopped reading, as it should
        return CLOSE

    return step


class FakeDaraja:
    def __init__(self, tls=None, **script):
        self.tls = tls  # an ssl.SSLContext to serve https (e.g. with a self-signed cert)
        self.script = {kind: list(steps) for kind, steps in script.items()}
        self.requests = []  # (kind, method, path, headers, body)
        self.unexpected = []
        self._lock = threading.Lock()
        self._done = {}  # kind → steps that ran to their end
        self._step_ended = threading.Condition(self._lock)
        self._conns = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self._sock.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def count(self, kind):
        with self._lock:
            return sum(1 for r in self.requests if r[0] == kind)

    def wait_done(self, kind, steps, timeout=30.0):
        """Wait until `steps` scripted steps for `kind` have run to their end (a held
        answer is over); True if they did within `timeout`."""
        with self._step_ended:
            return self._step_ended.wait_for(lambda: self._done.get(kind, 0) >= steps,
                                             timeout)

    def close(self):
        """Stop listening and drop every open connection (later connects are refused)."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                except OSError:
                    pass

    def _accept(self):
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
        except OSError:  # the client refused our certificate: nothing was requested
            conn.close()
            return
        reader = conn.makefile("rb")
        try:
            while True:
                request = _read_request(reader)
                if request is None:
                    return
                method, path, headers, body = request
                kind = KINDS.get(path.split("?", 1)[0], "other")
                with self._lock:
                    self.requests.append((kind, method, path, headers, body))
                    steps = self.script.get(kind)
                    step = steps.pop(0) if steps else None
                if step is None:
                    with self._lock:
                        self.unexpected.append((method, path))
                    conn.sendall(raw_response(500, b"unscripted", content_type="text/plain"))
                    continue
                try:
                    outcome = step(conn, request)
                finally:
                    with self._step_ended:
                        self._done[kind] = self._done.get(kind, 0) + 1
                        self._step_ended.notify_all()
                if outcome == CLOSE:
                    return
        except OSError:
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass


def _read_request(reader):
    line = reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers = {}
    while True:
        h = reader.readline().decode("latin-1")
        if h in ("\r\n", "\n", ""):
            break
        name, _, value = h.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", 0) or 0))
    return method, path, headers, body
