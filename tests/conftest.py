"""Shared fixtures: the Daraja simulator and the gateway, each on a real loopback socket."""

import base64
import contextlib
import logging
import os
import pathlib
import re
import shutil
import socket
import sqlite3
import subprocess
import threading
import time

import pytest
from webtest import TestApp
from webtest.http import StopableWSGIServer

import config
import mpesa_wsgi
import simulator

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


class SimHandle:
    def __init__(self, sim, server, url):
        self.sim, self.server, self.url = sim, server, url

    def stats(self):
        return self.sim.stats()


def pytest_addoption(parser):
    parser.addoption("--skip-crash", action="store_true",
                     help="skip the SIGKILL crash-restart test (CI always runs it)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--skip-crash"):
        skip = pytest.mark.skip(reason="--skip-crash given")
        for item in items:
            if "crash" in item.keywords:
                item.add_marker(skip)


# --- log hygiene: every record of every test is checked -------------------------------

_SIMULATORS = []  # every simulator of the run, for the tokens it issued
_PASSWORD_PREFIX = base64.b64encode(
    (simulator.SANDBOX_SHORTCODE + simulator.SANDBOX_PASSKEY).encode()).decode()[:20]
_SECRETS = (
    API_KEY, OTHER_KEY, SECRET, simulator.DEMO_CONSUMER_KEY, simulator.DEMO_CONSUMER_SECRET,
    simulator.SANDBOX_PASSKEY, _PASSWORD_PREFIX, "fake-token-1",
    base64.b64encode(
        f"{simulator.DEMO_CONSUMER_KEY}:{simulator.DEMO_CONSUMER_SECRET}".encode()).decode(),
)
# Not inside a longer token: a transaction id's random hex can hold such a run of digits.
_FULL_MSISDN = re.compile(r"(?<![0-9A-Za-z])(?:\+?254|0)[17][0-9]{8}(?![0-9A-Za-z])")
_SIGNATURE = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
_CHECKOUT_ID = re.compile(r"ws_CO_[0-9]{20,}")  # its last 9 digits are the customer's phone


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.texts = []

    def emit(self, record):
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.texts.append(text)


@pytest.fixture(autouse=True)
def log_hygiene():
    """Fail any test whose log lines carry a secret, a token, a signature or a full MSISDN."""
    capture, root = _Capture(), logging.getLogger()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
    tokens = [t for s in _SIMULATORS for t in s.issued_tokens]
    for text in capture.texts:
        for secret in (*_SECRETS, *tokens):
            assert secret not in text, f"a secret reached the log: {text[:200]!r}"
        assert not _FULL_MSISDN.search(text), f"a full phone number reached the log: {text!r}"
        assert not _SIGNATURE.search(text), f"a callback signature reached the log: {text!r}"
        assert not _CHECKOUT_ID.search(text), f"an unmasked CheckoutRequestID: {text!r}"


@pytest.fixture
def sim_settings(request):
    """Fast callbacks; a test may override fields with indirect parametrization."""
    overrides = getattr(request, "param", {})
    return simulator.SimSettings(**dict(dict(callback_delay_s=0.3, slow_answer_s=1.0),
                                        **overrides))


@pytest.fixture
def sim(sim_settings):
    simulator_app = simulator.Simulator(sim_settings)
    _SIMULATORS.append(simulator_app)
    server, url = serve(simulator_app, threads=16)
    yield SimHandle(simulator_app, server, url)
    server.shutdown()
    simulator_app.stop()


def base_env(sim_url, db_path, callback_base="http://127.0.0.1:9"):
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
    }


class _LateApp:
    """Bind the server first, then plug in the app whose config needs the server's port."""

    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


class GatewayHandle:
    def __init__(self, app, url, server, clock):
        self.app, self.url, self.server, self.clock = app, url, server, clock
        self.testapp = TestApp(app, lint=True)
        self.auth = {"Authorization": f"Bearer {API_KEY}"}

    def push(self, body, status=202, **kwargs):
        return self.testapp.post_json("/stkpush", body, headers=self.auth, status=status, **kwargs)

    def get(self, ref, status=200):
        return self.testapp.get(f"/transactions/{ref}", headers=self.auth, status=status)

    def wait_status(self, tx_id, *statuses, timeout=5.0):
        return wait_for(lambda: (r := self.get(tx_id).json)["status"] in statuses and r,
                        timeout=timeout)


@pytest.fixture
def engine(request):
    """The ledger engine of the gateway fixtures: SQLite, unless the module says
    `ENGINES = BOTH_ENGINES`: then each of its tests that uses a gateway runs on both."""
    return getattr(request, "param", "sqlite")


BOTH_ENGINES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc):
    engines = getattr(metafunc.module, "ENGINES", None)
    chosen = any(m.args and m.args[0] == "engine"  # a test that names its own engines
                 for m in metafunc.definition.iter_markers("parametrize"))
    if engines and "engine" in metafunc.fixturenames and not chosen:
        metafunc.parametrize("engine", engines, indirect=True)


@pytest.fixture
def gateway_env(sim, tmp_path, engine, request):
    target = (tmp_path / "ledger.db" if engine == "sqlite"
              else request.getfixturevalue("pg_url"))
    return base_env(sim.url, target)


@pytest.fixture
def gateway(gateway_env):
    """The gateway app (WebTest) and the same app on a real socket, for callbacks."""
    late = _LateApp()
    server, url = serve(late)
    env = dict(gateway_env, MPESA_CALLBACK_BASE_URL=url)
    clock = OffsetClock()
    late.app = mpesa_wsgi.create_app(config.load_config(env), clock=clock)
    yield GatewayHandle(late.app, url, server, clock)
    server.shutdown()
    late.app.close()


# --- soak figures and sizes (make soak) -----------------------------------------------

_FIGURES = []  # summary lines tests report, printed at the end of the run


def soak_examples(default):
    """Examples per Hypothesis test: SOAK_EXAMPLES when set (make soak), else `default`."""
    raw = os.environ.get("SOAK_EXAMPLES", "").strip()
    return int(raw) if raw else default


@pytest.fixture
def report_figures():
    """report_figures(line): a line for the "figures" section at the end of the run."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


@contextlib.contextmanager
def read_only(path):
    """A separate read-only connection to a ledger file (what is really on disk), closed
    on leaving the block."""
    conn = sqlite3.connect(pathlib.Path(path).resolve().as_uri() + "?mode=ro", uri=True)
    try:
        yield conn
    finally:
        conn.close()




# --- PostgreSQL: a throwaway cluster for the run, a fresh database per test -----------------

@pytest.fixture(scope="session")
def pg_cluster():
    import postgres_server

    reason = postgres_server.missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    cluster = postgres_server.Cluster()
    yield cluster
    cluster.close()


@pytest.fixture
def pg_url(pg_cluster):
    """The URL of a new, empty PostgreSQL database."""
    return pg_cluster.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_target(request, tmp_path):
    """Where a ledger lives, once per engine: every ledger promise is tested on both."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")
