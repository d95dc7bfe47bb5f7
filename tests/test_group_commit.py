"""Group commit (SQLite): concurrent writes share one transaction and one fsync, and
nothing weakens: each write returns only once durable, a failing write fails only its
own caller, a failed COMMIT fails its whole batch, and the counts show in /metrics."""

import sqlite3
import threading
import time

import pytest
from webtest import TestApp

from helpers import API_KEY, FakeClock, at_once, read_only
from mpesa_ledger import SqliteLedger


@pytest.fixture
def ledger(tmp_path):
    lg = SqliteLedger(str(tmp_path / "group.db"), clock=FakeClock(1_790_000_000.0))
    yield lg
    lg.close()


def new_row(ledger, n):
    return ledger.begin_push(phone=f"2547120{n:05d}", amount=10, reference="R", description="D").row


def test_concurrent_writes_share_commits_and_every_one_is_durable(ledger):
    commits0, batches0 = ledger.commit_counts
    for _ in range(5):
        rows = at_once(16, lambda n: new_row(ledger, n))
        assert all(isinstance(r, dict) for r in rows.values())
    commits, batches = ledger.commit_counts
    assert commits - commits0 == 80
    assert batches - batches0 < 80  # fewer fsyncs than writes: they were grouped
    with read_only(ledger.path) as conn:  # on disk, seen by another connection
        assert conn.execute("SELECT COUNT(*) FROM transactions").fetchone()[0] == 80


def test_a_failing_write_fails_only_its_own_caller(ledger):
    rows = [new_row(ledger, n) for n in range(8)]
    for row in rows:
        ledger.mark_accepted(row["id"], f"ws_CO_{row['id']}", "m")

    def rules_for(n):
        def rules(row, receipt_holder):
            if n == 3:
                raise ValueError("this write's own bug")
            from mpesa_gateway.settlement import Decision
            return Decision("applied", {"status": "succeeded", "receipt": f"UKQ{n:07d}"})
        return rules

    results = at_once(8, lambda n: ledger.settle(rows[n]["id"], rules_for(n)))
    assert isinstance(results[3], ValueError)
    assert [ledger.get(r["id"])["status"] for r in rows] == [
        "pending" if n == 3 else "succeeded" for n in range(8)]


def test_a_failed_commit_fails_every_write_of_its_batch_and_the_next_batch_works(tmp_path):
    armed = threading.Event()
    opened = []

    def on_connect(conn):
        opened.append(conn)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.create_function("armed", 0, lambda: int(armed.is_set()))
        conn.executescript(
            "CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY);"
            "CREATE TEMP TABLE child (p INTEGER REFERENCES parent (id)"
            " DEFERRABLE INITIALLY DEFERRED);")

    lg = SqliteLedger(str(tmp_path / "fail.db"), on_connect=on_connect)
    try:
        new_row(lg, 0)  # opens the writer
        opened[-1].execute("CREATE TEMP TRIGGER broken AFTER INSERT ON main.transactions"
                           " WHEN armed() BEGIN INSERT INTO child VALUES (1); END")
        armed.set()  # every COMMIT now fails its deferred foreign key
        results = at_once(6, lambda n: new_row(lg, n + 1))
        assert all(isinstance(r, sqlite3.IntegrityError) for r in results.values())
        armed.clear()
        new_row(lg, 99)
        with read_only(lg.path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM transactions").fetchone()[0] == 2
    finally:
        lg.close()


def test_a_keyed_payment_costs_two_commits_before_its_answer_and_one_per_callback(gateway,
                                                                                  sim):
    ledger = gateway.services.ledger
    commits0, _ = ledger.commit_counts
    res = gateway.testapp.post_json("/stkpush", {"phone": "0712345678", "amount": 10},
                                    headers={"Authorization": f"Bearer {API_KEY}",
                                             "Idempotency-Key": "order-1"})
    assert ledger.commit_counts[0] - commits0 == 2  # the row; the outcome with its answer
    gateway.wait_status(res.json["id"], "succeeded", timeout=30)
    assert ledger.commit_counts[0] - commits0 == 3  # and the callback: one
    replay = gateway.testapp.post_json("/stkpush", {"phone": "0712345678", "amount": 10},
                                       headers={"Authorization": f"Bearer {API_KEY}",
                                                "Idempotency-Key": "order-1"})
    assert replay.json == res.json  # the stored answer, from that one commit


def test_commits_and_batches_show_in_metrics(gateway, sim):
    gateway.push({"phone": "0712345679", "amount": 10})
    text = TestApp(gateway.app).get("/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                 if line.startswith("mpesa_gateway_ledger_"))
    commits = float(lines["mpesa_gateway_ledger_commits_total"])
    batches = float(lines["mpesa_gateway_ledger_batches_total"])
    assert commits >= 2 and 1 <= batches <= commits
    assert "# TYPE mpesa_gateway_ledger_batches_total counter" in text


def test_an_error_that_ends_the_whole_transaction_fails_exactly_the_writes_it_undid(tmp_path):
    """An interrupt (like a full disk or an I/O error) rolls back the whole transaction,
    not one statement: every caller told "done" must be on disk, and every caller told
    it failed must not be."""
    opened = []
    lg = SqliteLedger(str(tmp_path / "interrupt.db"), on_connect=opened.append)
    try:
        new_row(lg, 0)  # opens the writer
        writer = opened[-1]
        writer.create_function("boom", 0, lambda: writer.interrupt() or 0)
        writer.execute("CREATE TEMP TRIGGER boom AFTER INSERT ON main.transactions"
                       " WHEN NEW.phone = '254799999999' BEGIN SELECT boom(); END")
        for _ in range(3):
            results = at_once(12, lambda n: (
                lg.begin_push(phone="254799999999", amount=10, reference="R", description="D").row
                if n == 5 else new_row(lg, n)))
            assert isinstance(results[5], sqlite3.Error)
            with read_only(lg.path) as conn:
                on_disk = {r[0] for r in conn.execute("SELECT id FROM transactions")}
            for result in results.values():
                if isinstance(result, dict):
                    assert result["id"] in on_disk  # told done: durable
        with read_only(lg.path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM transactions WHERE phone ="
                                " '254799999999'").fetchone()[0] == 0
            total = conn.execute("SELECT COUNT(*) FROM transactions").fetchone()[0]
        assert total == lg.commit_counts[0]  # on disk: exactly the writes reported done
    finally:
        lg.close()


def test_a_write_inside_a_write_is_refused_at_once(ledger):
    row = new_row(ledger, 1)

    def rules(current, receipt_holder):
        new_row(ledger, 2)  # a write from inside a write's statements

    with pytest.raises(RuntimeError, match="inside another write"):
        ledger.settle(row["id"], rules)
    assert new_row(ledger, 3)["status"] == "submitting"  # the ledger still writes


def test_writers_waiting_for_a_lock_another_process_holds_fail_together(tmp_path):
    lg = SqliteLedger(str(tmp_path / "busy.db"), busy_timeout_s=2.0)
    holder = sqlite3.connect(lg.path, isolation_level=None)
    try:
        new_row(lg, 0)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        results = at_once(8, lambda n: new_row(lg, n + 1))
        took = time.monotonic() - started
        assert all(isinstance(r, sqlite3.OperationalError) for r in results.values())
        assert took < 10  # together, about one busy timeout; one after another: 16 s
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        lg.close()
