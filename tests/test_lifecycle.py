"""Start-up and shut-down: bad input is one clear message; a failed commit is rolled back;
the reconciler's current query finishes before the ledger closes, however the app is run."""

import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from fake_daraja import FakeDaraja, accepted, reply, sleep, token
from helpers import ROOT_DIR, base_env
from mpesa_ledger import SqliteLedger


def child_env(**env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
    clean.update(env)
    return clean


def run(args, env, timeout=60):
    return subprocess.run([sys.executable, "mpesa_wsgi.py", *args], cwd=ROOT_DIR, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- bad start-up input: one message, exit 2, never a traceback --------------------------


def test_an_unopenable_ledger_is_one_message_and_exit_2(tmp_path):
    env = child_env(**base_env("http://127.0.0.1:9", tmp_path / "missing" / "dir" / "x.db"))
    proc = run([], env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "GATEWAY_DB" in proc.stderr and "missing" in proc.stderr


@pytest.mark.parametrize("port", ["abc", "70000", "65535"])
def test_a_bad_demo_port_is_one_message_and_exit_2(tmp_path, port):
    proc = run(["--demo"], child_env(GATEWAY_PORT=port, GATEWAY_DB=str(tmp_path / "d.db")))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "GATEWAY_PORT" in proc.stderr


def test_a_port_in_use_is_one_message_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        env = child_env(**base_env("http://127.0.0.1:9", tmp_path / "p.db"),
                        GATEWAY_PORT=str(taken.getsockname()[1]))
        proc = run([], env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "GATEWAY_PORT" in proc.stderr


# --- a failed COMMIT ----------------------------------------------------------------------


class FailingCommit:
    """On every ledger connection: once `armed`, the next new row makes COMMIT itself fail,
    for real (a deferred foreign-key violation, checked by SQLite at COMMIT); with
    `refuse_rollback`, ROLLBACK is refused too (an authorizer)."""

    def __init__(self, refuse_rollback=False):
        self.refuse_rollback = refuse_rollback
        self.connections = []

    def __call__(self, conn):
        self.connections.append(conn)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.executescript("""
            CREATE TEMP TABLE armed (on_ INTEGER);
            INSERT INTO temp.armed VALUES (0);
            CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY);
            CREATE TEMP TABLE child (parent_id INTEGER
                REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);
        """)
        if self.refuse_rollback:
            conn.set_authorizer(lambda action, arg1, *_: sqlite3.SQLITE_DENY if (
                action == sqlite3.SQLITE_TRANSACTION and arg1 == "ROLLBACK")
                else sqlite3.SQLITE_OK)

    def arm(self, on=True):
        conn = self.connections[-1]
        # On the ledger's table, which exists only once the ledger has made its schema.
        conn.execute("CREATE TEMP TRIGGER IF NOT EXISTS break_commit AFTER INSERT ON"
                     " main.transactions WHEN (SELECT on_ FROM temp.armed) = 1"
                     " BEGIN INSERT INTO child VALUES (42); END")
        conn.execute("UPDATE temp.armed SET on_ = ?", (int(on),))


def new_row(ledger, phone="254712345678"):
    return ledger.begin_push(phone=phone, amount=10, reference="R", description="D").row


def count_rows(path):
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM transactions").fetchone()[0]


def test_a_failed_commit_is_rolled_back_and_the_error_kept(tmp_path):
    failing, path = FailingCommit(), str(tmp_path / "c.db")
    ledger = SqliteLedger(path, on_connect=failing)
    try:
        new_row(ledger, phone="254712345670")  # opens the writing connection (group commit)
        failing.arm()  # on the newest connection: the writer
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            new_row(ledger)
        failing.arm(False)
        new_row(ledger, phone="254712345679")  # the connection is usable: nothing left open
        assert count_rows(path) == 2  # the failed write is gone
        assert len(failing.connections) == 2  # the reader and the same writer
    finally:
        ledger.close()


def test_a_connection_that_cannot_roll_back_is_discarded(tmp_path, caplog):
    failing, path = FailingCommit(refuse_rollback=True), str(tmp_path / "d.db")
    ledger = SqliteLedger(path, on_connect=failing)
    try:
        new_row(ledger, phone="254712345670")  # opens the writing connection (group commit)
        failing.arm()
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            new_row(ledger)  # the COMMIT's error, not the ROLLBACK's
        assert any("rollback_failed" in r.getMessage() for r in caplog.records)
        new_row(ledger, phone="254712345679")
        assert len(failing.connections) == 3  # a fresh writer took over
        assert count_rows(path) == 2
    finally:
        ledger.close()


# --- shutdown in order -------------------------------------------------------------------


def final_answer(checkout):
    return reply(200, {"ResponseCode": "0", "MerchantRequestID": "m",
                       "CheckoutRequestID": checkout, "ResultCode": "0", "ResultDesc": "ok"})


CHILD = textwrap.dedent("""
    import sys, time
    from webtest import TestApp
    import config, mpesa_wsgi, os
    app = mpesa_wsgi.create_app(config.load_config(os.environ))  # as waitress-serve --call does
    tx = TestApp(app).post_json("/stkpush", {"phone": "0712345678", "amount": 10},
                                headers={"Authorization": "Bearer " + sys.argv[1]}).json
    deadline = time.monotonic() + 30
    while app.services.ledger.get(tx["id"])["claimed_until"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the reconciler has claimed the row and is querying
    print(tx["id"], flush=True)
    sys.exit(0)  # no close(): the process just ends, mid-query
""")


def test_the_reconcilers_query_finishes_when_the_process_exits(tmp_path):
    checkout = "ws_CO_26112026120000000712345678"
    fake = FakeDaraja(oauth=[token()], push=[accepted(checkout)],
                      query=[sleep(1.5, then=final_answer(checkout))])
    env = child_env(**dict(base_env(fake.url, tmp_path / "x.db"), GATEWAY_RECONCILE="on",
                           MPESA_RECONCILE_AFTER_S="0", MPESA_RECONCILE_BACKOFF_S="0.1",
                           MPESA_READ_TIMEOUT="3"))
    from helpers import API_KEY
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, API_KEY], cwd=ROOT_DIR, env=env,
                              capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr
        tx_id = proc.stdout.strip()
        ledger = SqliteLedger(str(tmp_path / "x.db"))
        assert ledger.get(tx_id)["status"] == "succeeded"  # settled before the exit
        ledger.close()
        assert fake.count("query") == 1
    finally:
        fake.close()


def test_closing_the_app_lets_the_current_query_settle_first(tmp_path):
    from webtest import TestApp

    import config
    import mpesa_wsgi
    from helpers import API_KEY, wait_for

    checkout = "ws_CO_26112026120000000712345670"
    fake = FakeDaraja(oauth=[token()], push=[accepted(checkout)],
                      query=[sleep(1.0, then=final_answer(checkout))])
    env = dict(base_env(fake.url, tmp_path / "y.db"), GATEWAY_RECONCILE="on",
               MPESA_RECONCILE_AFTER_S="0", MPESA_RECONCILE_BACKOFF_S="0.1",
               MPESA_READ_TIMEOUT="3")
    app = mpesa_wsgi.create_app(config.load_config(env))
    try:
        tx = TestApp(app).post_json("/stkpush", {"phone": "0712345670", "amount": 10},
                                    headers={"Authorization": f"Bearer {API_KEY}"}).json
        wait_for(lambda: fake.count("query") == 1, timeout=30)  # the query is in flight
        closer = threading.Thread(target=app.services.close)
        closer.start()
        closer.join(60)
        ledger = SqliteLedger(str(tmp_path / "y.db"))
        assert ledger.get(tx["id"])["status"] == "succeeded"
        ledger.close()
    finally:
        fake.close()


@pytest.mark.parametrize("setting", [
    {"GATEWAY_HOST": "nonexistent.invalid"}, {"GATEWAY_CPU_AFFINITY": "4096"},
], ids=["host", "cpu"])
def test_a_host_or_cpu_this_machine_lacks_is_one_message_and_exit_2(tmp_path, setting):
    env = child_env(**base_env("http://127.0.0.1:9", tmp_path / "h.db"), **setting)
    proc = run([], env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and next(iter(setting)) in proc.stderr


def test_a_simulator_setting_typo_stops_the_demo(tmp_path):
    proc = run(["--demo"], child_env(MPESA_SIM_LATENCY="1000", GATEWAY_DB=str(tmp_path / "d.db"),
                                     GATEWAY_PORT="18650"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "MPESA_SIM_LATENCY" in proc.stderr


def test_a_callers_request_id_is_scrubbed_like_any_message():
    import io
    import logging

    from mpesa_gateway import logs

    stream = io.StringIO()
    handler = logs.configure("INFO", "json", ["attack-key-0123456789abcdef"], stream=stream)
    try:
        for rid in ("254712345678", "attack-key-0123456789abcdef",
                    "ws_CO_26112026224229249717000011", "order-0712345678"):
            token = logs.REQUEST_ID.set(rid)
            logging.getLogger("mpesa_wsgi.access").info(
                "request", extra={"sanitized": True, "fields": {}})
            logs.REQUEST_ID.reset(token)
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    for leaked in ("254712345678", "attack-key-0123456789abcdef", "717000011", "0712345678"):
        assert leaked not in text
    assert text.count('"request_id"') == 4


def test_redaction_leaves_transaction_ids_whole():
    from mpesa_gateway import logs

    scrub = logs.RedactFilter().scrub
    assert scrub("tx=tx_01a21962ba0728533716dbb5 phone=254712345678") == (
        "tx=tx_01a21962ba0728533716dbb5 phone=2547******678")


OLD_SCHEMA = """
CREATE TABLE transactions (
    id TEXT PRIMARY KEY, checkout_request_id TEXT UNIQUE, merchant_request_id TEXT,
    status TEXT NOT NULL, reason TEXT, phone TEXT NOT NULL, amount INTEGER NOT NULL,
    reference TEXT NOT NULL, description TEXT NOT NULL, result_code TEXT, result_desc TEXT,
    receipt TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    next_check_at REAL NOT NULL DEFAULT 0, check_attempts INTEGER NOT NULL DEFAULT 0,
    claimed_until REAL NOT NULL DEFAULT 0);
INSERT INTO transactions (id, status, phone, amount, reference, description, created_at,
    updated_at) VALUES ('tx_01a2000000000000000000aa', 'succeeded', '254712000099', 10, 'R',
    'D', '2026-11-01T00:00:00Z', '2026-11-01T00:00:00Z');
"""


def test_a_ledger_from_before_owners_is_migrated_in_place(tmp_path):
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    ledger = SqliteLedger(path)
    try:
        row = ledger.get("tx_01a2000000000000000000aa")
        assert (row["status"], row["owner"]) == ("succeeded", None)  # kept, and unowned
        new = ledger.begin_push(phone="254712000098", amount=5, reference="R",
                                description="D", owner="shop").row
        assert new["owner"] == "shop"
        rows, _ = ledger.list_page(owner="default", with_unowned=True)
        assert [r["id"] for r in rows] == ["tx_01a2000000000000000000aa"]
    finally:
        ledger.close()
    SqliteLedger(path).close()  # a second start finds nothing to do


@pytest.mark.parametrize("checkout", ["ws_CO_260520211133524545712345678",
                                      "ws_CO_23052022122137653708374149"])
def test_checkout_request_ids_are_masked_in_any_log_line(checkout):
    from mpesa_gateway import logs

    clean = logs.RedactFilter().scrub(f"query {checkout} failed")
    assert checkout not in clean and clean.endswith("******" + checkout[-3:] + " failed")
