"""Webhooks across processes: two senders sharing a ledger deliver each event once; an
event committed before a SIGKILL is delivered after the restart with its webhook-id;
hostile answers (10 MB, too slow) cannot hold the sender. Real processes and servers on
127.0.0.1."""

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from standardwebhooks import Webhook

import config
import mpesa_ledger as store
from helpers import API_KEY, ROOT_DIR, base_env, events_of, free_port, new_row, serve, wait_for
from mpesa_devtools.receiver import request_headers
from mpesa_gateway import settlement, webhooks
from mpesa_gateway.settlement import Outcome
from mpesa_ledger import SqliteLedger

SECRET = "whsec_" + base64.b64encode(b"merchant-signing-secret-0123456789").decode()


class Receiver:
    def __init__(self, delay_s=0.0, answer=b""):
        self.delay_s, self.answer = delay_s, answer
        self.ids = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        headers = request_headers(environ)
        Webhook(SECRET).verify(body, headers)  # every delivery is signed right
        time.sleep(self.delay_s)
        with self.lock:
            self.ids.append(headers["webhook-id"])
        start_response("200 OK", [("Content-Length", str(len(self.answer)))])
        return [self.answer]


@pytest.fixture
def receiver():
    made = []

    def make(**kwargs):
        r = Receiver(**kwargs)
        server, r.url = serve(r, threads=8)
        made.append(server)
        return r

    yield make
    for server in made:
        server.shutdown()


def env_for(db, url, **extra):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
    clean.update(base_env("http://127.0.0.1:9", db), GATEWAY_WEBHOOK_URLS=f"default:{url}",
                 GATEWAY_WEBHOOK_SECRETS=f"default:{SECRET}",
                 GATEWAY_WEBHOOK_ALLOW_PRIVATE="on", **extra)
    return clean


def settled_events(db, url, count):
    """`count` payments settled by their callbacks, each leaving one event in the outbox."""
    cfg = config.load_config(env_for(db, url))
    ledger = store.open_ledger(str(db), events=webhooks.Outbox(cfg).event_for)
    for n in range(count):
        row = new_row(ledger, phone=f"2547120{n:05d}")
        checkout = f"ws_CO_2611202612000000{n:03d}712000000"
        ledger.mark_accepted(row["id"], checkout, "m")
        settlement.apply(ledger, row["id"], Outcome(
            "succeeded", None, "0", "ok", checkout, receipt=f"UKQ{n:07d}", amount=10))
    ids = [e["id"] for e in events_of(ledger)]
    ledger.close()
    return ids


def test_two_processes_sharing_a_ledger_deliver_each_event_once(ledger_target, receiver):
    slow = receiver(delay_s=0.1)  # both senders are busy at the same time
    ids = settled_events(ledger_target, slow.url, 20)
    procs = [subprocess.Popen([sys.executable, "mpesa_wsgi.py", "deliver"], cwd=ROOT_DIR,
                              env=env_for(ledger_target, slow.url),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(slow.ids) == sorted(ids)  # each event once, none twice
    counts = [int(o.split("delivered=")[1].split()[0]) for o in outputs if "delivered=" in o]
    assert len(counts) == 2 and sum(counts) == 20  # both took a share


def test_an_event_committed_before_a_sigkill_is_delivered_after_the_restart(tmp_path,
                                                                          receiver, sim):
    r = receiver()
    port = free_port()
    db = tmp_path / "kill.db"
    env = dict(env_for(db, r.url, GATEWAY_WEBHOOK_SENDER="off"), GATEWAY_PORT=str(port),
               MPESA_BASE_URL=sim.url, MPESA_CALLBACK_BASE_URL=f"http://127.0.0.1:{port}")
    first = subprocess.Popen([sys.executable, "mpesa_wsgi.py"], cwd=ROOT_DIR, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import json
        import urllib.request
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        base = f"http://127.0.0.1:{port}"

        def call(method, path, body=None):
            req = urllib.request.Request(base + path, method=method, data=body, headers={
                "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
            with opener.open(req, timeout=10) as resp:
                return json.loads(resp.read())

        wait_for(lambda: _up(opener, base), timeout=20)
        tx = call("POST", "/stkpush", b'{"phone":"0712345690","amount":10}')
        wait_for(lambda: call("GET", f"/transactions/{tx['id']}")["status"] == "succeeded",
                 timeout=30)
    finally:
        first.send_signal(signal.SIGKILL)  # the status and its event are committed; not sent
        first.wait(10)
    ledger = SqliteLedger(str(db))
    [event] = events_of(ledger, tx["id"])
    ledger.close()
    assert event["status"] == "pending" and r.ids == []
    second = subprocess.Popen([sys.executable, "mpesa_wsgi.py"], cwd=ROOT_DIR,
                              env=dict(env, GATEWAY_WEBHOOK_SENDER="on"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: r.ids, timeout=30)
        assert r.ids == [event["id"]]  # the same webhook-id, once
    finally:
        second.terminate()
        second.wait(30)


def _up(opener, base):
    try:
        with opener.open(base + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


class RawEndpoint:
    """A merchant endpoint written on a bare socket, to answer in ways no WSGI server
    would: `answer(conn)` writes whatever it likes after the request arrives."""

    def __init__(self, answer):
        self.answer, self.sent = answer, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/events"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(65536)  # the request (small: one event)
            with contextlib.suppress(OSError):
                self.answer(self, conn)

    def close(self):
        self.listener.close()
        self.thread.join(30)


def one_attempt(tmp_path, url, **sender):
    """Deliver one settled event to `url`; (results, seconds taken, the event after)."""
    settled_events(tmp_path / "one.db", url, 1)
    cfg = config.load_config(env_for(tmp_path / "one.db", url))
    ledger = SqliteLedger(str(tmp_path / "one.db"))
    try:
        started = time.monotonic()
        results = webhooks.Sender(ledger, cfg, **sender).run_once()
        return results, time.monotonic() - started, events_of(ledger)[0]
    finally:
        ledger.close()


def test_a_10_mb_answer_is_not_read_and_still_counts_as_delivered(tmp_path):
    def huge(endpoint, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
        for _ in range(64 * 16):  # 64 MB in 64 KB pieces, until the sender hangs up
            conn.sendall(b"x" * 65536)
            endpoint.sent += 65536

    endpoint = RawEndpoint(huge)
    results, took, event = one_attempt(tmp_path, endpoint.url)
    endpoint.close()
    assert results == {"delivered": 1} and took < webhooks.TIMEOUT_S
    assert endpoint.sent < 32 << 20  # it hung up after 1 KB (what is left is socket buffers)
    assert event["attempts_log"][0]["status_code"] == 200


def test_an_endpoint_that_drips_its_answer_is_cut_at_the_timeout_of_wall_time(tmp_path):
    def drip(endpoint, conn):
        for byte in b"HTTP/1.1 200 OK\r\n" * 100:  # one byte a second: never a read timeout
            conn.sendall(bytes([byte]))
            time.sleep(1)

    endpoint = RawEndpoint(drip)
    results, took, event = one_attempt(tmp_path, endpoint.url, timeout_s=2)  # 10 s in service
    endpoint.close()
    assert results == {"pending": 1}
    assert took < 2 + 3  # one byte a second would have held it for 100 s
    assert event["attempts_log"][0]["error"] == "timed out after 2 s"
    assert event["attempts_log"][0]["status_code"] is None
