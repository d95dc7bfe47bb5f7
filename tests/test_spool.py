"""Nothing lost while the ledger is away: the local spool, the right reason, a receipt that
pays once.

The outages are real: another connection holding SQLite's write lock past the gateway's
wait, or the PostgreSQL server stopped with `pg_ctl stop -m immediate` and started again.
"""

import json
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading

import pytest

import mpesa_ledger as store
from helpers import (
    API_KEY,
    BOTH_ENGINES,
    ROOT_DIR,
    FakeClock,
    callbacks_of,
    free_port,
    new_row,
    wait_for,
)
from mpesa_gateway import recording
from mpesa_ledger.spool import Spool, read_entries, spool_files

ENGINES = BOTH_ENGINES
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def gateway_env(gateway_env):
    """A ledger call gives up after half a second, so an outage outlasts every retry."""
    return dict(gateway_env, GATEWAY_DB_WAIT_S="0.5")


# --- the spool itself -----------------------------------------------------------------------


def test_an_entry_is_on_disk_before_append_returns_in_a_private_file(tmp_path):
    spool = Spool(tmp_path / "spool")
    assert spool_files(spool.directory) == []  # made at the first entry, not before
    assert spool.append({"kind": "accepted", "tx_id": "tx_1"}) is True
    [path] = spool_files(spool.directory)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    [entry] = read_entries(path)
    assert entry["tx_id"] == "tx_1" and entry["id"] == spool.pending()[0]["id"]
    spool.applied(spool.pending()[0])
    assert read_entries(path) == [] and spool.depth() == 0  # emptied once all are applied
    spool.close()
    assert spool_files(spool.directory) == []  # an empty spool leaves nothing behind


def test_a_spool_held_by_a_live_process_is_left_alone_and_adopted_once_it_is_not(tmp_path):
    first, second = Spool(tmp_path), Spool(tmp_path)
    first.append({"kind": "callback", "tx_id": "tx_1"})
    assert second.adopt_orphans() == 0  # held: its process lives
    first.close()  # stopped with an entry left: the file stays
    assert second.adopt_orphans() == 1
    assert [e["tx_id"] for e in second.pending()] == ["tx_1"]
    assert spool_files(tmp_path) == [second.path]  # the orphan's file is gone
    assert [e["tx_id"] for e in read_entries(second.path)] == ["tx_1"]  # durable in ours


def test_a_torn_last_line_is_skipped_and_said(tmp_path, caplog):
    spool = Spool(tmp_path)
    spool.append({"kind": "accepted", "tx_id": "tx_1"})
    with open(spool.path, "ab") as f:
        f.write(b'{"kind":"callback","tx_id":"tx_2"')  # a crash in the middle of a write
    with caplog.at_level(logging.WARNING):
        assert [e["tx_id"] for e in read_entries(spool.path)] == ["tx_1"]
    assert "torn_last_line" in caplog.text


def test_a_spool_that_cannot_be_written_says_so_and_keeps_the_entry_in_memory(tmp_path,
                                                                                 caplog):
    def full_disk(fd):
        raise OSError(28, "No space left on device")

    spool = Spool(tmp_path, fsync=full_disk)
    with caplog.at_level(logging.CRITICAL):
        assert spool.append({"kind": "accepted", "tx_id": "tx_1"}) is False
    assert "spool write_failed" in caplog.text
    assert spool.depth() == 1  # still replayed by this process, but not durable


def test_a_write_that_fails_half_way_is_cut_back_so_the_next_entry_reads(tmp_path):
    failures = []

    def flaky_fsync(fd):
        if failures:
            raise failures.pop()
        os.fsync(fd)

    spool = Spool(tmp_path, fsync=flaky_fsync)
    assert spool.append({"kind": "accepted", "tx_id": "tx_1"}) is True
    failures.append(OSError(5, "I/O error"))
    assert spool.append({"kind": "accepted", "tx_id": "tx_2"}) is False  # not durable
    assert spool.append({"kind": "accepted", "tx_id": "tx_3"}) is True
    assert [e["tx_id"] for e in read_entries(spool.path)] == ["tx_1", "tx_3"]
    assert [e["tx_id"] for e in spool.pending()] == ["tx_1", "tx_2", "tx_3"]  # tx_2: memory


# --- replay: in order, once, whatever came first ------------------------------------------


def paid_callback(checkout, receipt="UKQ5555555"):
    return json.dumps({"Body": {"stkCallback": {
        "MerchantRequestID": "m", "CheckoutRequestID": checkout, "ResultCode": 0,
        "ResultDesc": "ok", "CallbackMetadata": {"Item": [
            {"Name": "Amount", "Value": 10}, {"Name": "MpesaReceiptNumber", "Value": receipt},
        ]}}}}).encode()


def test_a_callback_spooled_before_the_push_answer_replays_right(ledger_target, tmp_path):
    ledger = store.open_ledger(ledger_target)
    spool = Spool(tmp_path)
    try:
        idem = store.Idempotency("default", "order-1", "h")
        row = ledger.begin_push(phone="254712345678", amount=10, reference="R",
                                description="D", idempotency=idem).row
        checkout = "ws_CO_07122026101010555712345678"
        first = b'{"id":"%s","status":"pending"}' % row["id"].encode()  # what the merchant got
        # The push's answer is retried for seconds: its callback reaches the spool first.
        spool.append(recording.callback(row["id"], paid_callback(checkout), "127.0.0.1", 1.0))
        spool.append(recording.accepted(row["id"], checkout, "m", 2.0, store.PinnedAnswer(
            idem, row["id"], 202, first)))
        assert recording.replay(spool, ledger) == 2
        settled = ledger.get(checkout)
        assert (settled["id"], settled["status"], settled["receipt"]) == (
            row["id"], "succeeded", "UKQ5555555")
        again = ledger.begin_push(phone="254712345678", amount=10, reference="R",
                                  description="D", idempotency=idem)
        assert (again.kind, again.body) == (store.Start.REPLAY, first)
        # Replayed again (a crash before the spool was emptied): nothing applies twice.
        for entry in [e for e in read_entries(spool.path)] if spool.path else []:
            recording.apply(ledger, entry)
        assert [c["outcome"] for c in callbacks_of(ledger, row["id"])] == ["applied"]
    finally:
        spool.close()
        ledger.close()


def test_a_late_refusal_cannot_free_a_key_a_newer_request_holds(ledger_target, tmp_path):
    ledger = store.open_ledger(ledger_target)
    spool = Spool(tmp_path)
    try:
        idem = store.Idempotency("default", "order-2", "h")
        first = ledger.begin_push(phone="254712345678", amount=10, reference="R",
                                  description="D", idempotency=idem).row
        # Its refusal was committed but reported failed (a connection lost in COMMIT), so it
        # was spooled too; the merchant retried with the key and got a new payment.
        ledger.mark_not_accepted(first["id"], "rejected", "upstream_unavailable", release=idem)
        spool.append(recording.not_accepted(first["id"], "rejected", "upstream_unavailable",
                                            3.0, release=idem))
        second = ledger.begin_push(phone="254712345679", amount=10, reference="R",
                                   description="D", idempotency=idem)
        assert second.kind == store.Start.NEW
        assert recording.replay(spool, ledger) == 1
        third = ledger.begin_push(phone="254712345679", amount=10, reference="R",
                                  description="D", idempotency=idem)
        assert (third.kind, third.row["id"]) == (store.Start.IN_FLIGHT, second.row["id"])
    finally:
        spool.close()
        ledger.close()


def test_an_entry_that_can_never_apply_is_set_aside_and_the_rest_go_on(tmp_path, caplog):
    ledger = store.open_ledger(str(tmp_path / "l.db"))
    spool = Spool(tmp_path)
    try:
        row = new_row(ledger)
        spool.append({"kind": "from_a_newer_version", "tx_id": row["id"]})
        spool.append(recording.accepted(row["id"], "ws_CO_07122026101010777712345678", "m",
                                        4.0, None))
        with caplog.at_level(logging.CRITICAL):
            assert recording.replay(spool, ledger) == 1
        assert ledger.get(row["id"])["status"] == "pending"
        assert spool.depth() == 0 and "set aside" in caplog.text
        [kept] = read_entries(str(tmp_path / "mpesa-spool-quarantine.jsonl"))
        assert kept["kind"] == "from_a_newer_version"  # kept for an operator, not lost
    finally:
        spool.close()
        ledger.close()


# --- the outages of the issue: the payment settles, findable by its CheckoutRequestID ------


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 0.5}], indirect=True)
def test_a_payment_made_while_the_ledger_is_away_settles_once_it_is_back(gateway, sim, outage):
    entered, release = threading.Event(), threading.Event()

    def hold(payload):  # the push is at Daraja when the ledger goes away
        entered.set()
        release.wait(30)

    sim.sim.on_push = hold
    answer = {}
    headers = dict(AUTH, **{"Idempotency-Key": "order-17"})
    client = threading.Thread(target=lambda: answer.update(res=gateway.testapp.post_json(
        "/stkpush", {"phone": "0712345017", "amount": 10}, headers=headers, status="*")))
    client.start()
    assert entered.wait(30)
    outage.begin()
    try:
        release.set()
        client.join(60)
        first = answer["res"]
        assert first.status_int == 202 and first.json["status"] == "pending"
        checkout = first.json["checkout_request_id"]
        assert checkout.startswith("ws_CO_")
        # The callback comes while the ledger is still away: stored (spooled), acknowledged.
        wait_for(lambda: sim.stats()["callbacks_sent"] == 1, timeout=30)
        assert sim.stats()["callbacks_failed"] == 0
        assert gateway.services.spool.depth() == 2
        metrics = gateway.testapp.get("/metrics").text
        assert "mpesa_gateway_spool_entries 2" in metrics
        gateway.clock.advance(1)  # past /health's one-second cache
        health = gateway.testapp.get("/health", status="*").json
        assert health["checks"]["spool_depth"] == 2
        assert health["checks"]["spool_oldest_s"] >= 0
    finally:
        outage.end()
    row = wait_for(lambda: (r := gateway.testapp.get(f"/transactions/{checkout}", headers=AUTH,
                                                     status="*")).status_int == 200
                   and r.json["status"] == "succeeded" and r.json, timeout=90)
    assert row["id"] == first.json["id"] and row["receipt"]
    assert [c["outcome"] for c in callbacks_of(gateway.services.ledger, row["id"])] == [
        "applied"]
    wait_for(lambda: gateway.services.spool.depth() == 0, timeout=30)  # all of it applied
    assert sim.stats()["pushes"] == 1  # never sent twice
    again = gateway.testapp.post_json("/stkpush", {"phone": "0712345017", "amount": 10},
                                      headers=headers, status=202)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.body == first.body  # the first answer, pinned from the spool


# --- the right reason, and a row reachable once its CheckoutRequestID is known -------------


def test_an_outcome_recorded_after_recovery_names_what_happened(ledger_target):
    clock = FakeClock(2_000_000_000.0)
    ledger = store.open_ledger(ledger_target, clock=clock)
    try:
        accepted, timed_out = new_row(ledger), new_row(ledger, phone="254712345679")
        clock.advance(600)
        assert ledger.recover_interrupted(300) == 2  # recovery's guess: `interrupted`
        row = ledger.mark_accepted(accepted["id"], "ws_CO_07122026000000000712345678", "m",
                                   at=clock() - 590, once="entry-1")
        assert (row["status"], row["reason"]) == ("unknown", "ledger_unavailable")
        assert row["checkout_request_id"] == "ws_CO_07122026000000000712345678"
        assert ledger.get("ws_CO_07122026000000000712345678")["id"] == accepted["id"]
        row = ledger.mark_not_accepted(timed_out["id"], "unknown", "read_timeout",
                                       at=clock() - 590, once="entry-2")
        assert (row["status"], row["reason"]) == ("unknown", "read_timeout")
        # An entry replayed twice (a crash between its commit and emptying the spool):
        # applied once.
        again = ledger.mark_not_accepted(timed_out["id"], "rejected", "daraja_rejected",
                                         once="entry-2")
        assert (again["status"], again["reason"]) == ("unknown", "read_timeout")
    finally:
        ledger.close()


# --- a receipt pays once --------------------------------------------------------------------


def signed_callback(gateway, tx, receipt, amount=10):
    body = {"Body": {"stkCallback": {
        "MerchantRequestID": tx["merchant_request_id"],
        "CheckoutRequestID": tx["checkout_request_id"], "ResultCode": 0, "ResultDesc": "ok",
        "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": amount},
                                      {"Name": "MpesaReceiptNumber", "Value": receipt}]}}}}
    path = "/" + gateway.services.signer.url(tx["id"]).split("/", 3)[3]
    return gateway.testapp.post(path, json.dumps(body), content_type="application/json")


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 60}], indirect=True)
def test_a_receipt_another_payment_holds_is_an_anomaly_not_money(gateway, caplog):
    paid = gateway.push({"phone": "0712345021", "amount": 10}).json
    other = gateway.push({"phone": "0712345022", "amount": 10}).json
    signed_callback(gateway, paid, "UKQ7777777")
    assert gateway.get(paid["id"]).json["status"] == "succeeded"
    with caplog.at_level(logging.ERROR):
        signed_callback(gateway, other, "UKQ7777777")  # stored and acknowledged, not applied
    row = gateway.get(other["id"]).json
    assert (row["status"], row["receipt"]) == ("pending", None)
    assert [c["outcome"] for c in callbacks_of(gateway.services.ledger, other["id"])] == [
        "anomaly"]
    assert "reason=receipt_reused" in caplog.text
    signed_callback(gateway, paid, "UKQ7777777")  # its own receipt again: a duplicate
    assert [c["outcome"] for c in callbacks_of(gateway.services.ledger, paid["id"])] == [
        "applied", "duplicate"]


def test_receipts_already_in_an_older_ledger_are_taken_by_their_first_payment(tmp_path):
    path = str(tmp_path / "old.db")
    ledger = store.open_ledger(path)
    first, second = new_row(ledger), new_row(ledger, phone="254712345679")
    ledger.close()
    with sqlite3.connect(path) as conn:  # as version 2 left it: no receipts table
        conn.execute("DROP TABLE receipts")
        conn.execute("UPDATE transactions SET status = 'succeeded', receipt = 'UKQ1111111'")
        conn.execute("PRAGMA user_version = 2")
    ledger = store.open_ledger(path)
    try:
        assert ledger._read("SELECT receipt, tx_id FROM receipts") == [
            {"receipt": "UKQ1111111", "tx_id": min(first["id"], second["id"])}]
    finally:
        ledger.close()


# --- the commands: inspect a spool, reach a row by its CheckoutRequestID --------------------


def cli(env, *args):
    return subprocess.run([sys.executable, "mpesa_wsgi.py", *args], cwd=ROOT_DIR, env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_spool_command_shows_entries_with_phones_masked(tmp_path):
    spool = Spool(tmp_path)
    checkout = "ws_CO_07122026101010123712345678"
    spool.append(recording.accepted("tx_1", checkout, "m", 2_000_000_000.0, None))
    raw = json.dumps({"Body": {"stkCallback": {
        "MerchantRequestID": "m", "CheckoutRequestID": checkout, "ResultCode": 0,
        "ResultDesc": "ok", "CallbackMetadata": {"Item": [
            {"Name": "Amount", "Value": 10}, {"Name": "MpesaReceiptNumber", "Value": "UKQ1"},
            {"Name": "PhoneNumber", "Value": 254712345678}]}}}}).encode()
    spool.append(recording.callback("tx_1", raw, "196.201.214.200", 2_000_000_001.0))
    proc = cli(dict(os.environ), "spool", "--dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "entries=2" in proc.stdout and "accepted tx=tx_1" in proc.stdout
    assert "callback result_code=0 status=succeeded amount=10" in proc.stdout
    assert "712345678" not in proc.stdout  # the CheckoutRequestID's phone digits are masked
    spool.close()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_reconcile_tx_reaches_a_row_by_its_checkout_id_or_once_told_it(gateway, gateway_env):
    tx = gateway.push({"phone": "0711009999", "amount": 10}).json  # its callback never comes
    wait_for(lambda: not gateway.services.daraja.stk_query(tx["checkout_request_id"]).pending,
             timeout=30)
    env = dict(os.environ, **gateway_env)
    proc = cli(env, "reconcile", "--tx", tx["checkout_request_id"])
    assert proc.returncode == 0, proc.stderr
    assert "result=succeeded" in proc.stdout
    lost = new_row(gateway.services.ledger, phone="254712345032")  # its answer never recorded
    assert gateway.services.ledger.recover_interrupted(0) == 1  # ...and recovery came
    proc = cli(env, "reconcile", "--tx", lost["id"])
    assert "result=nothing_to_query" in proc.stdout  # no CheckoutRequestID: nothing to ask
    proc = cli(env, "reconcile", "--tx", lost["id"], "--checkout-request-id",
               "ws_CO_07122026101010999712345032")
    assert proc.returncode == 0, proc.stderr
    learnt = gateway.services.ledger.get(lost["id"])
    assert learnt["checkout_request_id"] == "ws_CO_07122026101010999712345032"
    assert learnt["reason"] == "ledger_unavailable"  # named for what happened
    proc = cli(env, "reconcile", "--tx", tx["id"], "--checkout-request-id",
               "ws_CO_07122026101010999712345033")
    assert proc.returncode == 1 and "not learnt" in proc.stderr  # it has one already


# --- a SIGKILL while the spool holds entries loses none of them ----------------------------


@pytest.mark.crash
@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 0.5}], indirect=True)
def test_a_sigkill_while_the_spool_holds_entries_loses_none(sim, gateway_env):
    from test_smoke import clean_env, http, stop

    port = free_port()
    env = clean_env(**dict(gateway_env, GATEWAY_PORT=str(port),
                           MPESA_CALLBACK_BASE_URL=f"http://127.0.0.1:{port}"))
    base = f"http://127.0.0.1:{port}"

    def start():
        proc = subprocess.Popen([sys.executable, "mpesa_wsgi.py"], cwd=ROOT_DIR, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: http("GET", f"{base}/health")[0] in (200, 503), timeout=30,
                 interval=0.1)
        return proc

    proc = start()
    holder = sqlite3.connect(gateway_env["GATEWAY_DB"], isolation_level=None)
    try:
        entered, release = threading.Event(), threading.Event()
        sim.sim.on_push = lambda payload: (entered.set(), release.wait(30))
        answer = {}
        client = threading.Thread(target=lambda: answer.update(r=http(
            "POST", f"{base}/stkpush", {"phone": "0712345041", "amount": 10}, API_KEY)))
        client.start()
        assert entered.wait(30)
        holder.execute("BEGIN IMMEDIATE")  # the row is written, the push is out: ledger away
        release.set()
        client.join(60)
        status, body = answer["r"]
        assert status == 202 and body["checkout_request_id"]
        wait_for(lambda: sim.stats()["callbacks_sent"] == 1, timeout=30)  # spooled: 200
        proc.send_signal(signal.SIGKILL)  # with two entries in the spool, none in the ledger
        proc.wait(10)
        [spooled] = spool_files(gateway_env["GATEWAY_SPOOL_DIR"])
        assert sorted(e["kind"] for e in read_entries(spooled)) == ["accepted", "callback"]
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
        if proc.poll() is None:  # the test failed before its SIGKILL: leave nothing running
            proc.kill()
            proc.wait(10)
    proc = start()  # adopts the dead process's spool and applies it before anything else
    try:
        status, row = http("GET", f"{base}/transactions/{body['checkout_request_id']}",
                           key=API_KEY)
        assert (status, row["status"], row["id"]) == (200, "succeeded", body["id"])
        assert sim.stats()["pushes"] == 1
    finally:
        assert stop(proc) == 0
    assert spool_files(gateway_env["GATEWAY_SPOOL_DIR"]) == []


# --- a quiet outage: one WARNING when it starts, one INFO when it ends -----------------------


def test_an_outage_is_one_warning_and_one_info_however_many_calls_fail(gateway, outage,
                                                                         caplog):
    caplog.set_level(logging.DEBUG)
    outage.begin()
    try:
        for n in range(5):  # every one of them fails on the ledger
            gateway.testapp.post_json("/stkpush", {"phone": f"07123450{n:02d}", "amount": 10},
                                      headers=AUTH, status=503)
            # A read between them (SQLite reads on under a writer's lock) is no "back".
            gateway.testapp.get("/transactions", headers=AUTH, status="*")
    finally:
        outage.end()
    wait_for(lambda: gateway.testapp.post_json(
        "/stkpush", {"phone": "0712345099", "amount": 10}, headers=AUTH,
        status="*").status_int == 202, timeout=90, interval=0.5)
    ours = [r for r in caplog.records if r.name.startswith(("mpesa", "mpesa_wsgi"))]
    said = [(r.levelname, r.getMessage().split(" where=")[0].split(" after ")[0])
            for r in ours if r.levelno >= logging.INFO and "ledger" in r.getMessage()
            and not r.name.endswith("access")]
    assert said == [("WARNING", "ledger unavailable"), ("INFO", "ledger available again")]
    assert not [r for r in ours if r.levelno >= logging.INFO and r.exc_info]  # DEBUG only
    failures = [float(line.split()[-1])  # counted where they happened (PostgreSQL: the
                for line in gateway.testapp.get("/metrics").text.splitlines()  # rate limit)
                if line.startswith("mpesa_gateway_ledger_failures_total{")]
    assert sum(failures) >= 5


def test_only_this_users_private_spools_are_adopted_as_money(tmp_path, caplog):
    folder = tmp_path / "spool"
    folder.mkdir(mode=0o700)
    planted = folder / "mpesa-spool-1-planted.jsonl"  # another user's, or open to others
    planted.write_bytes(b'{"id":"sp_x","kind":"callback","tx_id":"tx_1"}\n')
    planted.chmod(0o644)
    odd = folder / "mpesa-spool-2-odd.jsonl"  # ours, but a line that is not an entry
    odd.write_bytes(b'{}\n[1,2,3]\n')
    odd.chmod(0o600)
    spool = Spool(folder)
    with caplog.at_level(logging.CRITICAL):
        assert spool.adopt_orphans() == 0
    assert "not_adopted file=mpesa-spool-1-planted.jsonl" in caplog.text
    assert planted.exists() and spool.depth() == 0
    assert len(read_entries(str(folder / "mpesa-spool-quarantine.jsonl"))) == 2  # set aside
    open_to_all = tmp_path / "shared"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    assert "not this user's alone" in Spool(open_to_all).probe()
    assert Spool(open_to_all).append({"kind": "accepted", "tx_id": "tx_1"}) is False
