"""Test helpers: constants, clocks, servers, pollers and ledger readers the tests share.

Fixtures live in conftest.py; everything a test imports by name lives here.
"""

import base64
import contextlib
import json
import os
import pathlib
import re
import shutil
import socket
import sqlite3
import struct
import subprocess
import tempfile
import threading
import time
import zlib

import pytest
import urllib3
from webtest import TestApp
from webtest.http import StopableWSGIServer

from mpesa_devtools import simulator

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
SECRET = "test-secret-0123456789abcdef"


def serve(app, threads=8):
    """Serve a WSGI app with waitress on 127.0.0.1 and an OS-chosen port."""
    server = StopableWSGIServer.create(app, host="127.0.0.1", port=0, threads=threads,
                                       expose_tracebacks=False)
    return server, f"http://127.0.0.1:{server.effective_port}"


def free_port(pair=False, span=None):
    """A port free now (and, with pair, the next one too; with span, the next span - 1)
    for a subprocess to bind."""
    span = span or (2 if pair else 1)
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span - 1 > 65535:
            continue
        try:
            for extra in range(1, span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + extra))
        except OSError:
            continue
        return port
    raise RuntimeError("no free run of ports")


def self_signed_cert(folder, common_name):
    """(cert, key) paths of a throwaway self-signed certificate, or skip without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={common_name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def at_once(count, work):
    """Run work(n) on `count` threads released together; the results (or errors) by n."""
    barrier = threading.Barrier(count)
    results = {}

    def run(n):
        barrier.wait(60)
        try:
            results[n] = work(n)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            results[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == count
    return results


def wait_for(predicate, timeout=5.0, interval=0.02):
    """Poll until predicate() is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(interval)


class FakeClock:
    """A clock the test moves by hand: callable (one reading), or as the app's clock
    (`wall()` and `monotonic()` move together)."""

    def __init__(self, start=1000.0):
        self.now = start

    def __call__(self):
        return self.now

    def wall(self):
        return self.now

    def monotonic(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class OffsetClock:
    """The real clocks, plus an offset the test adds to (time passes at once for every
    part of the app that was given this clock)."""

    def __init__(self):
        self.offset = 0.0

    def wall(self):
        return time.time() + self.offset

    def monotonic(self):
        return time.monotonic() + self.offset

    def advance(self, seconds):
        self.offset += seconds


BOTH_ENGINES = ("sqlite", "postgresql")


def base_env(sim_url, db_path, callback_base="http://127.0.0.1:9", spool_dir=None):
    """A gateway's environment for tests. A PostgreSQL ledger's spool goes to a new
    temporary folder unless `spool_dir` says where (a SQLite one's sits beside the file)."""
    if spool_dir is None and str(db_path).startswith("postgresql://"):
        spool_dir = tempfile.mkdtemp(prefix="mpesa-spool-")
    return {
        "MPESA_CONSUMER_KEY": simulator.DEMO_CONSUMER_KEY,
        "MPESA_CONSUMER_SECRET": simulator.DEMO_CONSUMER_SECRET,
        "MPESA_SHORTCODE": simulator.SANDBOX_SHORTCODE,
        "MPESA_PASSKEY": simulator.SANDBOX_PASSKEY,
        "MPESA_CALLBACK_BASE_URL": callback_base,
        "MPESA_BASE_URL": sim_url,
        "MPESA_CONNECT_TIMEOUT": "1",
        "MPESA_READ_TIMEOUT": "0.5",
        "GATEWAY_DB": str(db_path),
        "GATEWAY_API_KEYS": f"{API_KEY},other:{OTHER_KEY}",
        "GATEWAY_SECRET": SECRET,
        "GATEWAY_THREADS": "8",
        "GATEWAY_RECONCILE": "off",
        **({"GATEWAY_SPOOL_DIR": str(spool_dir)} if spool_dir is not None else {}),
    }


class LateApp:
    """Bind the server first, then plug in the app whose config needs the server's port."""

    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


@contextlib.contextmanager
def served_simulator(**settings):
    """The Daraja simulator (SimSettings from `settings`) on a loopback socket: (its app,
    its URL); stopped at the end."""
    sim_app = simulator.Simulator(simulator.SimSettings(**settings))
    server, url = serve(sim_app, threads=16)
    try:
        yield sim_app, url
    finally:
        server.shutdown()
        sim_app.stop()


@contextlib.contextmanager
def served_gateway(env, clock=None):
    """The gateway with settings `env` on a real loopback socket, so the simulator's
    callbacks and results reach it (MPESA_CALLBACK_BASE_URL is its URL), as a
    GatewayHandle; stopped and its services closed at the end. `clock`: the app's (its
    own real one when None; the handle then gets an OffsetClock of its own)."""
    import config
    import mpesa_wsgi

    late = LateApp()
    server, url = serve(late)
    late.app = mpesa_wsgi.create_app(config.load_config(dict(env, MPESA_CALLBACK_BASE_URL=url)),
                                     clock=clock)
    try:
        yield GatewayHandle(late.app, url, server, clock or OffsetClock())
    finally:
        server.shutdown()
        late.app.services.close()


class GatewayHandle:
    def __init__(self, app, url, server, clock):
        self.app, self.url, self.server, self.clock = app, url, server, clock
        self.services = app.services
        self.testapp = TestApp(app, lint=True)
        self.auth = {"Authorization": f"Bearer {API_KEY}"}

    def push(self, body, status=202, **kwargs):
        return self.testapp.post_json("/stkpush", body, headers=self.auth, status=status, **kwargs)

    def get(self, ref, status=200):
        return self.testapp.get(f"/transactions/{ref}", headers=self.auth, status=status)

    def wait_status(self, tx_id, *statuses, timeout=5.0):
        return wait_for(lambda: (r := self.get(tx_id).json)["status"] in statuses and r,
                        timeout=timeout)


def soak_examples(default):
    """Examples per Hypothesis test: SOAK_EXAMPLES when set (make soak), else `default`."""
    raw = os.environ.get("SOAK_EXAMPLES", "").strip()
    return int(raw) if raw else default


@contextlib.contextmanager
def read_only(path):
    """A separate read-only connection to a ledger file (what is really on disk), closed
    on leaving the block."""
    conn = sqlite3.connect(pathlib.Path(path).resolve().as_uri() + "?mode=ro", uri=True)
    try:
        yield conn
    finally:
        conn.close()


PUSH = {"phone": "0712345678", "amount": 10}


class Harness:
    """A gateway in front of a scripted fake Daraja: pushes, rows and upstream calls."""

    def __init__(self, fake, app):
        self.fake, self.app = fake, app
        self.testapp = TestApp(app, lint=True)

    def push(self, status, body=PUSH, **headers):
        return self.testapp.post_json("/stkpush", body, status=status,
                                      headers={"Authorization": f"Bearer {API_KEY}", **headers})

    def row(self, res):
        tx_id = res.json["id"] if "id" in res.json else re.search(
            r"tx_[0-9a-f]+", res.json["error"]["message"]).group(0)
        return self.app.services.ledger.get(tx_id)

    def calls(self):
        return self.fake.count("oauth"), self.fake.count("push")


# --- reading a ledger as a test does: what is stored, not what the API shows -------------


def new_row(ledger, phone="254712345678", amount=10, reference="R", description="D",
            **kw):
    """Commit a new `submitting` row, as a push does before Daraja is called; the row."""
    return ledger.begin_push(phone=phone, amount=amount, reference=reference,
                             description=description, **kw).row


def events_of(ledger, tx_id=None):
    """A ledger's webhook events (of one transaction), in written order, each with its
    attempts."""
    rows = ledger._read("SELECT * FROM events" + (" WHERE tx_id = ?" if tx_id else "")
                        + f" ORDER BY {ledger.dialect.seq}", (tx_id,) if tx_id else ())
    for row in rows:
        row["attempts_log"] = ledger._read(
            "SELECT * FROM event_attempts WHERE event_id = ? ORDER BY id", (row["id"],))
    return rows


def callbacks_of(ledger, tx_id):
    """The stored callbacks of one transaction, oldest first."""
    return ledger._read("SELECT * FROM callbacks WHERE tx_id = ? ORDER BY id", (tx_id,))


def callback_path(services, tx_id):
    """The path of a transaction's signed callback URL (what Safaricom POSTs to)."""
    return "/" + services.signer.url(tx_id).split("/", 3)[3]


class Outage:
    """The ledger away: SQLite's write lock held by another connection, or the PostgreSQL
    server stopped (immediate: as if it crashed) and started again."""

    def __init__(self, engine, db, cluster=None):
        self.engine, self.db, self.cluster, self._holder = engine, db, cluster, None

    def begin(self):
        if self.engine == "sqlite":
            self._holder = sqlite3.connect(self.db, isolation_level=None)
            self._holder.execute("BEGIN IMMEDIATE")
        else:
            self.cluster.stop("immediate")

    def end(self):
        if self.engine == "sqlite":
            self._holder.execute("ROLLBACK")
            self._holder.close()
        else:
            self.cluster.start()


# --- the simulator's C2B and QR APIs, over HTTP --------------------------------------------

PAYBILL = "600984"  # the sandbox's C2B test shortcode (174379 cannot register URLs)
SIM_C2B_PHONE = "254712345678"  # no scenario
SIM_HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2.0, read=15.0))


class SimulatorApi:
    """A minimal client of the simulator's C2B and QR APIs, as a merchant's code talks to
    Daraja: a token, then Register URL, Simulate, Dynamic QR."""

    def __init__(self, url):
        self.url = url
        self._token = None

    def call(self, path, body=None, token=None, method="POST"):
        headers = {"Content-Type": "application/json"}
        if token is not False:
            headers["Authorization"] = f"Bearer {token or self.token()}"
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        return SIM_HTTP.request(method, self.url + path, body=data, headers=headers)

    def token(self):
        if self._token is None:
            basic = f"{simulator.DEMO_CONSUMER_KEY}:{simulator.DEMO_CONSUMER_SECRET}"
            res = SIM_HTTP.request(
                "GET", self.url + "/oauth/v1/generate?grant_type=client_credentials",
                headers={"Authorization": "Basic " + base64.b64encode(basic.encode()).decode()})
            assert res.status == 200, res.data
            self._token = res.json()["access_token"]
        return self._token

    def register(self, shortcode=PAYBILL, version="v1", response_type="Completed",
                 confirmation="http://127.0.0.1:9/c2b/confirm",
                 validation="http://127.0.0.1:9/c2b/validate", **changes):
        body = {"ShortCode": shortcode, "ResponseType": response_type,
                "ConfirmationURL": confirmation, "ValidationURL": validation, **changes}
        return self.call(f"/mpesa/c2b/{version}/registerurl",
                         {k: v for k, v in body.items() if v is not None})

    def simulate(self, shortcode=PAYBILL, command="CustomerPayBillOnline", amount=10,
                 msisdn=SIM_C2B_PHONE, bill_ref="INV-17", version="v1", **changes):
        body = {"ShortCode": shortcode, "CommandID": command, "Amount": amount,
                "Msisdn": msisdn, "BillRefNumber": bill_ref, **changes}
        return self.call(f"/mpesa/c2b/{version}/simulate",
                         {k: v for k, v in body.items() if v is not None})

    def paid(self, **kwargs):
        res = self.simulate(**kwargs)
        assert res.status == 200, res.data
        return res.json()


def png_pixels(data):
    """(width, height, grey bytes: 0 black, 255 white) of a greyscale or palette PNG of at
    most 8 bits a pixel: a PNG reader in the standard library, enough for segno's output."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, idat = 8, {}, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + chunk) == struct.unpack(">I", data[pos + 8 + length:
                                                                    pos + 12 + length])[0]
        if kind == b"IDAT":
            idat += chunk
        else:
            chunks[kind] = chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert colour in (0, 3) and depth in (1, 2, 4, 8) and interlace == 0
    raw, stride = zlib.decompress(idat), (width * depth + 7) // 8
    rows, previous, pos = [], bytearray(stride), 0
    for _ in range(height):
        kind, row = raw[pos], bytearray(raw[pos + 1:pos + 1 + stride])
        pos += 1 + stride
        for i in range(stride):  # bytes per pixel is 1 at these depths
            left, up = row[i - 1] if i else 0, previous[i]
            upleft = previous[i - 1] if i else 0
            if kind == 1:
                row[i] = (row[i] + left) & 255
            elif kind == 2:
                row[i] = (row[i] + up) & 255
            elif kind == 3:
                row[i] = (row[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - upleft
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                row[i] = (row[i] + (left if pa <= pb and pa <= pc else up if pb <= pc
                                    else upleft)) & 255
        rows.append(row)
        previous = row
    palette = chunks.get(b"PLTE")
    grey = bytearray()
    for row in rows:
        for x in range(width):
            bit = x * depth
            value = (row[bit // 8] >> (8 - depth - bit % 8)) & ((1 << depth) - 1)
            if colour == 3:
                value = palette[3 * value]  # the red channel: segno's colours are grey
            else:
                value = value * 255 // ((1 << depth) - 1)
            grey.append(value)
    return width, height, bytes(grey)
