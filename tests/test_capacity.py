"""Keep answering under a rush and under abuse: push slots reserve threads for callbacks,
reads and health; waitress bounds bodies and idle connections; labels stay bounded; an
unsigned callback is an unknown path. Real waitress servers on 127.0.0.1."""

import http.client
import itertools
import json
import logging
import random
import socket
import string
import threading

import pytest
from webtest import TestApp

import cli
import config
import mpesa_wsgi
from fake_daraja import FakeDaraja, accepted, raw_response, token
from helpers import API_KEY, base_env, callbacks_of, wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def held(release, checkout):
    """Fake Daraja step: hold the push until `release` is set, then accept it."""
    def step(conn, request):
        release.wait(60)
        conn.sendall(raw_response(200, {
            "MerchantRequestID": "m", "CheckoutRequestID": checkout, "ResponseCode": "0",
            "ResponseDescription": "Success", "CustomerMessage": "Success"}))
    return step


def checkout(n):
    return f"ws_CO_2611202612000000{n:03d}712345678"


class Served:
    """The gateway under real waitress (cli's settings), in a thread, on a free port."""

    def __init__(self, env):
        self.config = config.load_config(env)
        self.app = mpesa_wsgi.create_app(self.config)
        self.server = cli.create_server(self.app, "127.0.0.1", 0, self.config)
        self.port = self.server.effective_port
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, headers=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, dict(resp.getheaders()), (json.loads(data) if data[:1] == b"{"
                                                          else data)
        finally:
            conn.close()

    def close(self):
        self.server.close()
        self.app.services.close()


@pytest.fixture
def served(tmp_path):
    made = []

    def make(fake, **env):
        settings = dict(base_env(fake.url, tmp_path / f"s{len(made)}.db"),
                        MPESA_READ_TIMEOUT="30", GATEWAY_PHONE_LOCK_S="0", GATEWAY_BURST="100",
                        GATEWAY_RATE="100", **env)
        s = Served(settings)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_a_push_without_a_free_slot_is_503_at_once_and_leaves_nothing(served):
    release = threading.Event()
    fake = FakeDaraja(oauth=[token()], push=[held(release, checkout(0)), accepted(checkout(1))])
    s = served(fake, GATEWAY_THREADS="5")  # one push slot, four threads in reserve
    assert s.config.push_slots == 1
    first = threading.Thread(target=s.request, args=("POST", "/stkpush", json.dumps(
        {"phone": "0712345678", "amount": 10}), AUTH))
    first.start()
    try:
        wait_for(lambda: fake.count("push") == 1, timeout=30)
        status, headers, body = s.request("POST", "/stkpush", json.dumps(
            {"phone": "0712345679", "amount": 10}), dict(AUTH, **{"Idempotency-Key": "k2"}))
        assert (status, body["error"]["code"], headers["Retry-After"]) == (
            503, "gateway_busy", "1")
        assert s.app.services.ledger.count_by_status() == {"pending": 1}  # no row for the busy one
        health = s.request("GET", "/health")[2]["checks"]
        assert (health["push_slots"], health["push_slots_in_use"]) == (1, 1)
        assert "mpesa_gateway_push_busy_total 1.0" in s.request("GET", "/metrics")[2].decode()
    finally:
        release.set()
        first.join(30)
    # The key was never pinned: the same key now goes through.
    status, _, body = s.request("POST", "/stkpush", json.dumps(
        {"phone": "0712345679", "amount": 10}), dict(AUTH, **{"Idempotency-Key": "k2"}))
    assert (status, body["status"]) == (202, "pending")
    assert fake.count("push") == 2
    fake.close()


def test_the_reserve_serves_health_reads_and_callbacks_while_every_slot_is_busy(served):
    release = threading.Event()
    fake = FakeDaraja(oauth=[token()], push=[held(release, checkout(n)) for n in range(4)])
    s = served(fake, GATEWAY_THREADS="8")  # four slots, four in reserve
    assert s.config.push_slots == 4
    existing = TestApp(s.app).post_json  # a payment to read and call back, made beforehand
    fake.script["push"].insert(0, accepted(checkout(99)))
    tx = existing("/stkpush", {"phone": "0712300000", "amount": 10},
                  headers={"Authorization": f"Bearer {API_KEY}"}).json
    answers = []

    def push(n):
        answers.append(s.request("POST", "/stkpush", json.dumps(
            {"phone": f"07123{n:05d}", "amount": 10}), AUTH, timeout=60))

    rush = [threading.Thread(target=push, args=(n,)) for n in range(12)]  # 3 × the slots
    for t in rush:
        t.start()
    try:
        wait_for(lambda: fake.count("push") == 5, timeout=30)  # every slot is at Daraja
        wait_for(lambda: sum(1 for a in answers if a[0] == 503) == 8, timeout=30)
        # All four slots held, every worker a push could take is taken: the reserve answers.
        checks = s.request("GET", "/health", timeout=10)[2]["checks"]
        assert checks["push_slots_in_use"] == 4
        assert s.request("GET", f"/transactions/{tx['id']}", headers=AUTH,
                         timeout=10)[0] == 200
        callback = {"Body": {"stkCallback": {
            "MerchantRequestID": "m", "CheckoutRequestID": checkout(99), "ResultCode": 1032,
            "ResultDesc": "Request cancelled by user"}}}
        path = "/" + s.app.services.signer.url(tx["id"]).split("/", 3)[3]
        assert s.request("POST", path, json.dumps(callback),
                         {"Content-Type": "application/json"}, timeout=10)[0] == 200
        assert not release.is_set() and len(answers) == 8  # the held pushes still wait
    finally:
        release.set()
        for t in rush:
            t.join(60)
    assert sorted(a[0] for a in answers) == [202] * 4 + [503] * 8
    assert all(a[2]["error"]["code"] == "gateway_busy" for a in answers if a[0] == 503)


def test_a_body_over_the_limit_is_refused_from_its_content_length(served):
    fake = FakeDaraja()
    s = served(fake)
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        # Announce 100 MB, send none of it: the answer must come without reading a byte.
        sock.sendall(b"POST /stkpush HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413")
    assert fake.requests == []
    fake.close()


def test_idle_half_sent_connections_do_not_lock_others_out(served):
    fake = FakeDaraja()
    s = served(fake)
    idle = []
    try:
        for _ in range(150):  # more than waitress's default connection_limit of 100
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
            idle.append(sock)
        status, _, body = s.request("GET", "/health", timeout=20)
        assert (status, body["status"]) == (200, "ok")
    finally:
        for sock in idle:
            sock.close()
        fake.close()


def test_invented_methods_add_no_metric_series_and_no_log_bulk(gateway, log_hygiene):
    def series():
        text = gateway.testapp.get("/metrics").text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines()
                if line.startswith("mpesa_gateway_http_requests_total")}

    gateway.testapp.get("/health")
    app = TestApp(gateway.app, lint=False)  # these methods are invented on purpose
    rng = random.Random(7)
    app.request("/health", method="FOO", status=405)
    app.request("/stkpush", method="BAR", status=405)
    app.request("/nope", method="BAZ", status=404)
    series()  # the scrape's own series exists from here on
    before = series()
    for _ in range(3000):
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(3, 12)))
        app.request(rng.choice(["/health", "/stkpush", "/nope"]), method=name,
                    status=(404, 405))
    huge = "X" * 100_000
    app.request("/health", method=huge, status=405)
    after = series()
    assert after == before
    assert any('method="other"' in s for s in after)
    text = gateway.testapp.get("/metrics").text
    assert huge not in text and len(text) < 50_000
    assert not any(huge in t for t in log_hygiene.texts)


@pytest.mark.parametrize("sig", ["0" * 32, "nope"])
def test_an_unsigned_callback_is_404_and_writes_no_warning(gateway_env, sig, caplog):
    app = mpesa_wsgi.create_app(config.load_config(dict(
        gateway_env, MPESA_CALLBACK_IP_POLICY="enforce", MPESA_CALLBACK_IPS="127.0.0.2")))
    try:
        with caplog.at_level(logging.INFO):
            TestApp(app).post(f"/callback/tx_0123456789abcdef01234567/{sig}", b"{}",
                              content_type="application/json",
                              extra_environ={"REMOTE_ADDR": "127.0.0.9"}, status=404)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert callbacks_of(app.services.ledger, "tx_0123456789abcdef01234567") == []
    finally:
        app.services.close()


def test_push_slots_must_leave_a_reserve():
    env = dict(base_env("http://127.0.0.1:9", "x.db"), GATEWAY_THREADS="8",
               GATEWAY_PUSH_SLOTS="5")
    with pytest.raises(config.ConfigError, match="GATEWAY_PUSH_SLOTS"):
        config.load_config(env)
    assert config.load_config(dict(env, GATEWAY_PUSH_SLOTS="4")).push_slots == 4
    assert config.load_config(dict(env, GATEWAY_THREADS="32", GATEWAY_PUSH_SLOTS="")
                              ).push_slots == 24
    with pytest.raises(config.ConfigError, match="GATEWAY_THREADS"):
        config.load_config(dict(env, GATEWAY_THREADS="4", GATEWAY_PUSH_SLOTS=""))


def test_clients_trickling_headers_or_a_body_are_cut_and_health_answers_again(served):
    fake = FakeDaraja()
    s = served(fake, GATEWAY_CONNECTION_LIMIT="6", GATEWAY_REQUEST_READ_TIMEOUT="1")
    stop, cut = threading.Event(), []

    def trickle(head):  # headers that never end, or a body: one byte at a time
        sock = socket.create_connection(("127.0.0.1", s.port))
        try:
            sock.sendall(head)
            for byte in itertools.cycle(b"aaaaaaaa"):
                sock.sendall(bytes([byte]))
                if stop.wait(0.2):
                    return
        except OSError:
            cut.append(1)  # the server closed it
        finally:
            sock.close()

    heads = [b"GET /health HTTP/1.1\r\nX-Pad: ",
             b"POST /stkpush HTTP/1.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 16000\r\n\r\n"]
    clients = [threading.Thread(target=trickle, args=(heads[n % 2],), daemon=True)
               for n in range(6)]
    for t in clients:
        t.start()
    try:
        # They held every connection the server keeps; past the header bound they are cut
        # and /health is answered (it never would be while they trickle, else).
        wait_for(lambda: _health_ok(s), timeout=60, interval=0.2)
        wait_for(lambda: len(cut) == 6, timeout=60)
    finally:
        stop.set()
        fake.close()


def _health_ok(s):
    try:
        return s.request("GET", "/health", timeout=1)[0] == 200
    except OSError:
        return False
