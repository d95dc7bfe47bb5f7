"""The SQLite ledger with settlement's rules: durability, row life cycle, settling."""

import multiprocessing
import sys
import threading

import pytest

import mpesa_ledger as store
from helpers import FakeClock, callbacks_of, new_row, read_only
from mpesa_gateway import settlement
from mpesa_gateway.settlement import CallbackRecord, Outcome
from mpesa_ledger import SqliteLedger


@pytest.fixture
def clock():
    return FakeClock(1_790_000_000.0)


@pytest.fixture
def ledger(ledger_target, clock):
    lg = store.open_ledger(ledger_target, clock=clock)
    yield lg
    lg.close()


def record(ledger, tx_id, body, source, outcome):
    """A callback: stored and applied in one commit, as the callback path does it."""
    return settlement.apply(ledger, tx_id, outcome, callback=CallbackRecord(body, source))


def success(checkout="ws_CO_1", amount=10, receipt="UKQ1234567"):
    return Outcome(status="succeeded", reason=None, result_code="0", result_desc="ok",
                      checkout_request_id=checkout, receipt=receipt, amount=amount)


def failure(code="1032", reason="cancelled", checkout="ws_CO_1"):
    return Outcome(status="failed", reason=reason, result_code=code, result_desc="x",
                      checkout_request_id=checkout)


def test_wal_and_full_sync_on_every_connection(tmp_path, clock):
    path = str(tmp_path / "pragmas.db")
    opened = []  # every connection the ledger opens, as it opens it
    lg = SqliteLedger(path, clock=clock, busy_timeout_s=7.5, on_connect=opened.append)
    try:
        writers = [threading.Thread(target=new_row, args=(lg, f"25471234500{n}"))
                   for n in range(2)]
        for t in writers:
            t.start()
        for t in writers:
            t.join(30)
        new_row(lg, phone="254712345009")
        # The constructor's (this thread's, for reads) and the one writer (group commit),
        # whichever threads write.
        assert len(opened) == 2
        for conn in opened:
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 7500
    finally:
        lg.close()
    with read_only(path) as conn:  # WAL is a property of the file itself
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM transactions").fetchone()[0] == 3


def test_new_row_is_submitting_and_found_by_either_id(ledger):
    row = new_row(ledger)
    assert row["status"] == store.SUBMITTING and row["id"].startswith("tx_")
    ledger.mark_accepted(row["id"], "ws_CO_1", "m-1")
    assert ledger.get(row["id"])["status"] == store.PENDING
    assert ledger.get("ws_CO_1")["id"] == row["id"]
    assert ledger.get("ws_CO_nope") is None


def test_rows_survive_closing_and_reopening(tmp_path, clock):
    path = str(tmp_path / "reopen.db")
    first = SqliteLedger(path, clock=clock)
    row = new_row(first)
    first.mark_accepted(row["id"], "ws_CO_1", "m-1")
    record(first, row["id"], b"{}", "127.0.0.1", success())
    first.close()
    second = SqliteLedger(path, clock=clock)
    assert second.get(row["id"])["status"] == "succeeded"
    assert len(callbacks_of(second, row["id"])) == 1
    second.close()


def test_interrupted_rows_older_than_the_cutoff_become_unknown(ledger, clock):
    old = new_row(ledger, phone="254712345001")
    clock.now += 30
    young = new_row(ledger, phone="254712345002")
    assert ledger.recover_interrupted(older_than_s=20) == 1
    assert ledger.get(old["id"])["status"] == "unknown"
    assert ledger.get(old["id"])["reason"] == "interrupted"
    assert ledger.get(young["id"])["status"] == store.SUBMITTING


def test_a_result_that_beats_the_push_answer_is_kept(ledger):
    row = new_row(ledger)
    outcome, _ = record(ledger, row["id"], b"{}", None, failure())
    assert outcome == "applied"
    after = ledger.mark_accepted(row["id"], "ws_CO_1", "m-1")
    assert (after["status"], after["checkout_request_id"]) == ("failed", "ws_CO_1")


def test_not_accepted_only_moves_submitting_rows(ledger):
    row = new_row(ledger)
    ledger.mark_accepted(row["id"], "ws_CO_1", "m")
    assert ledger.mark_not_accepted(row["id"], "unknown", "read_timeout")["status"] == "pending"


def test_duplicate_callback_changes_nothing_but_is_recorded(ledger):
    row = new_row(ledger)
    ledger.mark_accepted(row["id"], "ws_CO_1", "m-1")
    assert record(ledger, row["id"], b"1", None, success())[0] == "applied"
    before = ledger.get(row["id"])
    assert record(ledger, row["id"], b"2", None, success())[0] == "duplicate"
    assert ledger.get(row["id"]) == before
    assert [c["outcome"] for c in callbacks_of(ledger, row["id"])] == ["applied", "duplicate"]


def test_failure_after_success_never_unsettles(ledger):
    row = new_row(ledger)
    ledger.mark_accepted(row["id"], "ws_CO_1", "m-1")
    record(ledger, row["id"], b"1", None, success())
    assert record(ledger, row["id"], b"2", None, failure())[0] == "ignored"
    assert ledger.get(row["id"])["status"] == "succeeded"


def test_success_with_receipt_overrides_an_earlier_failure(ledger):
    row = new_row(ledger)
    ledger.mark_accepted(row["id"], "ws_CO_1", "m-1")
    record(ledger, row["id"], b"1", None, failure())
    assert record(ledger, row["id"], b"2", None, success())[0] == "override"
    after = ledger.get(row["id"])
    assert (after["status"], after["receipt"], after["reason"]) == ("succeeded", "UKQ1234567", None)


@pytest.mark.parametrize("outcome", [
    success(amount=11), success(amount=None), success(receipt=None), success(checkout="ws_CO_2"),
])
def test_unverifiable_success_is_stored_as_anomaly_and_not_applied(ledger, outcome):
    row = new_row(ledger)
    ledger.mark_accepted(row["id"], "ws_CO_1", "m-1")
    assert record(ledger, row["id"], b"x", None, outcome)[0] == "anomaly"
    assert ledger.get(row["id"])["status"] == "pending"
    assert callbacks_of(ledger, row["id"])[0]["body"] == b"x"


def test_unknown_row_is_settled_by_a_late_result(ledger):
    row = new_row(ledger)
    ledger.mark_not_accepted(row["id"], "unknown", "read_timeout")
    assert record(ledger, row["id"], b"x", None, success())[0] == "applied"
    after = ledger.get(row["id"])
    assert (after["status"], after["checkout_request_id"]) == ("succeeded", "ws_CO_1")


def test_malformed_and_orphan_callbacks_are_still_stored(ledger):
    row = new_row(ledger)
    assert record(ledger, row["id"], b"garbage", None, None)[0] == "malformed"
    assert record(ledger, "tx_gone", b"{}", None, success()) == ("unknown_transaction",
                                                                        None)
    assert callbacks_of(ledger, row["id"])[0]["body"] == b"garbage"
    assert callbacks_of(ledger, "tx_gone")[0]["outcome"] == "unknown_transaction"


def test_concurrent_writers_from_many_threads_lose_nothing(ledger, ledger_target):
    ids, errors = [], []

    def worker(n):
        try:
            for i in range(20):
                ids.append(new_row(ledger, phone=f"2547{n:02d}{i:06d}")["id"])
        except ledger.Error as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    other = store.open_ledger(ledger_target)  # what was committed, seen by another connection
    assert other.count_by_status() == {"pending": 160} and len(set(ids)) == 160
    other.close()


def _open_and_write(path, barrier):
    barrier.wait(60)  # all processes open the brand-new file at the same moment
    opened = SqliteLedger(path)
    new_row(opened, phone="254712345678", amount=1)
    opened.close()


def test_processes_opening_a_new_ledger_at_once_all_succeed(tmp_path):
    # Switching a new file to WAL takes an exclusive lock that SQLite refuses at once,
    # without waiting, when another process opens the same new file.
    ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    for round_ in range(10):
        path = str(tmp_path / f"new{round_}.db")
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=_open_and_write, args=(path, barrier)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(90)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        with read_only(path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM transactions").fetchone()[0] == 3


def test_events_of_a_payment_are_delivered_in_written_order_whatever_the_clocks(
        ledger_target):
    clock = FakeClock(2000.0)

    def event(before, after, outcome):
        return store.NewEvent(after["id"], "default", after["status"], b"{}")

    ledger = store.open_ledger(ledger_target, clock=clock, events=event)
    row = new_row(ledger, phone="254712345678")
    ledger.mark_accepted(row["id"], "ws_CO_1", "m")
    settlement.apply(ledger, row["id"], failure("1032"))
    clock.now = 1900.0  # the late success is written by a process whose clock lags
    settlement.apply(ledger, row["id"], success())
    clock.now = 2100.0
    first = ledger.claim_event(60)
    assert first["type"] == "failed"
    assert ledger.claim_event(60) is None  # the success waits for the failure
    ledger.record_attempt(first["id"], first["claimed_until"], due_at=first["next_attempt_at"],
                          status_code=200,
                          duration_ms=1, error=None, delivered=True)
    assert ledger.claim_event(60)["type"] == "succeeded"
