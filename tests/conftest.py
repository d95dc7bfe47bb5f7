"""Shared fixtures: the Daraja simulator and the gateway, each on a real loopback socket;
the run's hooks (log hygiene, engines, soak figures). Helpers live in helpers.py."""

import base64
import logging
import os
import re

import pytest

import config
import mpesa_wsgi
from fake_daraja import FakeDaraja
from helpers import (
    API_KEY,
    OTHER_KEY,
    SECRET,
    Harness,
    OffsetClock,
    Outage,
    base_env,
    serve,
    served_gateway,
)
from mpesa_devtools import simulator


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


@pytest.fixture
def engine(request):
    """The ledger engine of the gateway fixtures: SQLite, unless the module says
    `ENGINES = BOTH_ENGINES`: then each of its tests that uses a gateway runs on both."""
    return getattr(request, "param", "sqlite")


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
    return base_env(sim.url, target, spool_dir=tmp_path / "spool")


@pytest.fixture
def gateway(gateway_env):
    """The gateway app (WebTest) and the same app on a real socket, for callbacks."""
    with served_gateway(gateway_env, clock=OffsetClock()) as handle:
        yield handle


@pytest.fixture
def harness(tmp_path):
    """harness(**script): a Harness over a new FakeDaraja with that script; at the end, no
    unscripted upstream call may have been made."""
    made = []

    def make(tls=None, **script):
        fake = FakeDaraja(tls=tls, **script)
        env = dict(base_env(fake.url, tmp_path / f"faults{len(made)}.db"),
                   MPESA_CONNECT_TIMEOUT="0.3", MPESA_READ_TIMEOUT="0.3")
        h = Harness(fake, mpesa_wsgi.create_app(config.load_config(env)))
        made.append(h)
        return h

    yield make
    for h in made:
        h.app.services.close()
        h.fake.close()
        assert h.fake.unexpected == [], "the gateway made an unscripted upstream call"


# --- soak figures and sizes (make soak) -----------------------------------------------

_FIGURES = []  # summary lines tests report, printed at the end of the run


@pytest.fixture
def report_figures(request):
    """report_figures(line): a line for the "figures" section at the end of the run. It
    travels with the test's report, so it reaches the end of a parallel run too."""
    return lambda line: request.node.user_properties.append(("figure", line))


def pytest_runtest_logreport(report):
    if report.when == "call":
        _FIGURES.extend(value for name, value in report.user_properties if name == "figure")


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


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


@pytest.fixture
def outage(request, engine, gateway_env):
    cluster = request.getfixturevalue("pg_cluster") if engine == "postgresql" else None
    away = Outage(engine, gateway_env["GATEWAY_DB"], cluster)
    yield away
    if away._holder is not None and engine == "sqlite":
        away._holder.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_target(request, tmp_path):
    """Where a ledger lives, once per engine: every ledger promise is tested on both."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


# --- the package: built from this checkout, installed into a fresh venv outside it ----------

@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """The `mpesa-wsgi` command of a wheel built from this checkout and installed, with its
    dependencies from the package index, into a new virtual environment in a temp dir
    (never the checkout: what runs is what the wheel holds)."""
    import shutil
    import subprocess
    import sys

    from helpers import ROOT_DIR

    root = tmp_path_factory.mktemp("package")
    source = root / "source"  # a copy: building writes build/ and *.egg-info beside it
    shutil.copytree(ROOT_DIR, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "__pycache__", "*.db", "*.db-*", "spool", "node_modules", "tests",
        "bench", "examples", "docs", "deploy"))
    venv = root / "venv"
    run = dict(capture_output=True, text=True, timeout=600, cwd=root)
    steps = [[sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
              str(root / "dist"), str(source)],
             [sys.executable, "-m", "venv", str(venv)]]
    for step in steps:
        proc = subprocess.run(step, **run)
        assert proc.returncode == 0, proc.stderr
    wheels = list((root / "dist").glob("mpesa_wsgi-*.whl"))
    assert len(wheels) == 1, wheels
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", str(wheels[0]),
                           "-c", os.path.join(ROOT_DIR, "requirements.txt")],  # the pins
                          **run)
    assert proc.returncode == 0, proc.stderr
    return {"command": str(venv / "bin" / "mpesa-wsgi"), "venv": venv, "wheel": wheels[0]}
