"""What each ledger step costs on PostgreSQL, counted by the engine (statements sent and
network round trips), asserted exactly: a change that adds a round trip to a payment's
path fails here. One step, one round trip (a pipeline); settling a callback is two (its
reads, then its writes with COMMIT). A throwaway cluster on 127.0.0.1."""

import json
import re

import pytest
from webtest import TestApp

import config
import mpesa_ledger as store
import mpesa_wsgi
from helpers import API_KEY, at_once, base_env, callback_path
from mpesa_gateway import settlement
from mpesa_ledger import postgres

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def ledger(pg_url):
    lg = store.open_ledger(pg_url, pool_size=4)
    yield lg
    lg.close()


def cost(ledger, call):
    """(what `call()` returned, {step: (statements, round trips)} it added)."""
    before = ledger.round_trips
    result = call()
    after = ledger.round_trips
    return result, {step: (n - before.get(step, (0, 0, 0))[0],
                           t - before.get(step, (0, 0, 0))[1])
                    for step, (n, t, _) in after.items() if (n, t, _) != before.get(step)}


def trips(spent):
    return sum(t for _, t in spent.values())


def success(row, receipt="RCP0000001"):
    return settlement.Outcome(status=store.SUCCEEDED, reason=None, result_code="0",
                              result_desc="ok", checkout_request_id=row["checkout_request_id"],
                              merchant_request_id="m", receipt=receipt, amount=row["amount"])


def begin(ledger, phone="254712000001", key="k1", rate=None):
    return ledger.begin_push(phone=phone, amount=10, reference="R", description="D",
                             idempotency=store.Idempotency("shop", key, "h"), phone_lock_s=60,
                             owner="shop", rate=rate)


def test_begin_push_is_one_round_trip_whatever_it_decides(ledger):
    begun, spent = cost(ledger, lambda: begin(ledger))
    assert begun.kind == store.Start.NEW
    # BEGIN, the advisory locks, the expired key's DELETE, the INSERT, the key's INSERT,
    # the two reads that say why when nothing is inserted, COMMIT: one trip.
    assert spent == {"begin_push": (8, 1)}
    again, spent = cost(ledger, lambda: begin(ledger))  # the same key: in flight
    assert again.kind == store.Start.IN_FLIGHT and again.row["id"] == begun.row["id"]
    assert spent == {"begin_push": (8, 1)}
    busy, spent = cost(ledger, lambda: begin(ledger, key="k2"))  # another key, same phone
    assert busy.kind == store.Start.PHONE_BUSY and busy.row["id"] == begun.row["id"]
    assert spent == {"begin_push": (8, 1)}


def test_the_fleets_rate_bucket_rides_in_the_same_round_trip(ledger):
    first, spent = cost(ledger, lambda: begin(ledger, rate=("shop", 0.01, 1)))
    assert first.kind == store.Start.NEW
    # + the bucket's own transaction ahead (BEGIN, SET LOCAL, the bucket, COMMIT)
    assert spent == {"begin_push": (12, 1)}
    refused, spent = cost(ledger, lambda: begin(ledger, phone="254712000009", key="k9",
                                                rate=("shop", 0.01, 1)))
    assert refused.kind == store.Start.RATE_LIMITED and 90 < refused.wait_s <= 100
    assert spent == {"begin_push": (12, 1)}
    assert ledger.count_by_status() == {"pending": 1}  # the refused push wrote no row


def test_a_refused_push_writes_nothing_on_the_connection_a_granted_one_used(pg_url):
    """The grant lives in a session setting, set by every push's own bucket statement
    before its INSERT reads it: on the one connection where the last push was granted,
    the next, refused, writes no row."""
    lg = store.open_ledger(pg_url, pool_size=1)  # one connection: every push shares it
    try:
        assert begin(lg, phone="254712000011", key="a", rate=("o", 0.01, 1)).kind == "new"
        assert begin(lg, phone="254712000012", key="b", rate=("o", 0.01, 1)).kind == (
            store.Start.RATE_LIMITED)
        assert lg.count_by_status() == {"pending": 1}
    finally:
        lg.close()


def test_recording_dara_jas_answer_with_its_pinned_reply_is_one_round_trip(ledger):
    row = begin(ledger).row
    pin = store.PinnedAnswer(store.Idempotency("shop", "k1", "h"), row["id"], 202, b"{}")
    accepted, spent = cost(ledger, lambda: ledger.mark_accepted(row["id"], "ws_CO_1", "m",
                                                                pin=pin))
    assert accepted["status"] == store.PENDING and accepted["checkout_request_id"] == "ws_CO_1"
    assert spent == {"mark_accepted": (4, 1)}  # BEGIN, UPDATE, the pin, COMMIT
    replay = begin(ledger)
    assert (replay.kind, replay.status_code, replay.body) == (store.Start.REPLAY, 202, b"{}")


def test_settling_a_callback_is_two_round_trips_with_its_event(pg_url):
    events = []

    def on_change(before, after, outcome):
        events.append((before["status"], after["status"], after["receipt"]))
        return store.NewEvent(after["id"], "shop", "payment.succeeded", b"{}")

    lg = store.open_ledger(pg_url, pool_size=4, events=on_change)
    try:
        row = begin(lg).row
        lg.mark_accepted(row["id"], "ws_CO_1", "m")
        row = lg.get(row["id"])
        record = settlement.CallbackRecord(b'{"Body": {}}', "127.0.0.1")
        (name, after), spent = cost(lg, lambda: settlement.apply(lg, row["id"], success(row),
                                                                 callback=record))
        assert (name, after["status"], after["receipt"]) == ("applied", "succeeded",
                                                             "RCP0000001")
        assert events == [("pending", "succeeded", "RCP0000001")]
        assert spent["settle_callback"][1] == 2 and trips(spent) == 2
        # the same callback again: a duplicate, stored, no event, still two
        (name, _), spent = cost(lg, lambda: settlement.apply(lg, row["id"], success(row),
                                                             callback=record))
        assert name == "duplicate" and trips(spent) == 2 and len(events) == 1
        stored = lg._read("SELECT outcome FROM callbacks WHERE tx_id = ? ORDER BY id",
                          (row["id"],))
        assert [c["outcome"] for c in stored] == ["applied", "duplicate"]
    finally:
        lg.close()


def test_a_receipt_taken_between_the_two_round_trips_leaves_the_row_alone(ledger):
    """Two payments settling with one receipt at once (two hosts): one gets it; the
    other's callback is stored as an anomaly and its row is not changed."""
    rows = []
    for n in range(2):
        row = begin(ledger, phone=f"25471200002{n}", key=f"r{n}").row
        rows.append(ledger.mark_accepted(row["id"], f"ws_CO_r{n}", "m"))
    record = settlement.CallbackRecord(b"{}", "127.0.0.1")
    results = at_once(2, lambda n: settlement.apply(ledger, rows[n]["id"],
                                                    success(rows[n], "RCPSAME001"),
                                                    callback=record))
    names = sorted(name for name, _ in results.values())
    assert names == ["anomaly", "applied"]
    statuses = sorted(ledger.get(r["id"])["status"] for r in rows)
    assert statuses == ["pending", "succeeded"]
    stored = ledger._read("SELECT outcome FROM callbacks ORDER BY id")
    assert sorted(c["outcome"] for c in stored) == ["anomaly", "applied"]


def test_a_receipt_another_host_takes_during_the_decision_is_receipt_reused(ledger, pg_url):
    """Deterministically between settle's two round trips: while its rules decide,
    another host's payment takes the receipt. The row is left alone, the callback is
    stored as an anomaly, and no event is written."""
    other_host = store.open_ledger(pg_url, pool_size=1)
    try:
        rows = []
        for n in range(2):
            row = begin(ledger, phone=f"25471200004{n}", key=f"t{n}").row
            rows.append(ledger.mark_accepted(row["id"], f"ws_CO_t{n}", "m"))
        outcome = success(rows[0], "RCPTAKEN01")

        def rules(row, holder):
            if row["id"] == rows[0]["id"]:  # the other host settles first, meanwhile
                settlement.apply(other_host, rows[1]["id"], success(rows[1], "RCPTAKEN01"))
            return settlement.decide(row, outcome, holder)

        name, after = ledger.settle(rows[0]["id"], rules, receipt="RCPTAKEN01",
                                    checkout_request_id="ws_CO_t0",
                                    callback=settlement.CallbackRecord(b"{}", "127.0.0.1"))
        assert name == "anomaly" and after["status"] == store.PENDING
        assert ledger.get(rows[0]["id"])["status"] == store.PENDING
        assert ledger.get(rows[1]["id"])["receipt"] == "RCPTAKEN01"
        stored = ledger._read("SELECT outcome FROM callbacks WHERE tx_id = ?", (rows[0]["id"],))
        assert [c["outcome"] for c in stored] == ["anomaly"]
    finally:
        other_host.close()


def test_a_reconcile_claim_is_one_statement_and_one_round_trip(ledger):
    row = begin(ledger).row
    ledger.mark_accepted(row["id"], "ws_CO_1", "m")
    claimed, spent = cost(ledger, lambda: ledger.claim_next(older_than_s=0, lease_s=60,
                                                            unknown_window_s=0))
    assert claimed["id"] == row["id"]
    assert spent == {"claim_next": (3, 1)}  # BEGIN, UPDATE … (SELECT … SKIP LOCKED), COMMIT
    nothing, spent = cost(ledger, lambda: ledger.claim_next(older_than_s=0, lease_s=60,
                                                            unknown_window_s=0))
    assert nothing is None and spent == {"claim_next": (3, 1)}


def test_the_webhook_senders_claim_is_one_statement_and_one_round_trip(ledger):
    nothing, spent = cost(ledger, lambda: ledger.claim_event(60))
    assert nothing is None and spent == {"claim_event": (3, 1)}


def test_a_busy_pool_checks_no_connection_and_an_idle_one_is_checked(ledger, monkeypatch):
    _, spent = cost(ledger, lambda: [ledger.get("tx_none") for _ in range(20)])
    assert spent == {"read": (20, 20)}  # no empty query ahead of each
    monkeypatch.setattr(postgres, "IDLE_CHECK_S", 0.0)  # every connection counts as idle
    _, spent = cost(ledger, lambda: ledger.get("tx_none"))
    assert spent == {"pool_check": (1, 1), "read": (1, 1)}


def test_a_whole_payment_through_the_gateway_is_four_round_trips(sim, pg_url):
    """POST /stkpush, Daraja's answer, the callback: begin (1), the answer (1), the
    callback (2), read from /metrics as an operator would. (The simulator's own callbacks
    go nowhere here: the test brings the one it measures.)"""
    app = mpesa_wsgi.create_app(config.load_config(dict(
        base_env(sim.url, pg_url), GATEWAY_PHONE_LOCK_S="60")))
    t = TestApp(app)
    try:
        t.post_json("/stkpush", {"phone": "0712000031", "amount": 10}, headers=AUTH,
                    status=202)  # the token, the connections: warm
        ledger = app.services.ledger
        before = ledger.round_trips
        tx = t.post_json("/stkpush", {"phone": "0712000032", "amount": 10}, headers=AUTH,
                         status=202).json
        success = {"Body": {"stkCallback": {
            "MerchantRequestID": "m", "CheckoutRequestID": tx["checkout_request_id"],
            "ResultCode": 0, "ResultDesc": "ok", "CallbackMetadata": {"Item": [
                {"Name": "Amount", "Value": 10},
                {"Name": "MpesaReceiptNumber", "Value": "UKQ7777778"}]}}}}
        t.post(callback_path(app.services, tx["id"]), json.dumps(success),
               content_type="application/json", status=200)
        after = ledger.round_trips
        assert ledger.get(tx["id"])["status"] == "succeeded"
        spent = {step: after[step][1] - before.get(step, (0, 0, 0))[1] for step in after
                 if after[step] != before.get(step)}
        assert spent == {"begin_push": 1, "mark_accepted": 1, "settle_callback": 2}
        metrics = t.get("/metrics").text
        counted = dict(re.findall(r'ledger_(\w+)_total\{step="begin_push"\} ([0-9.]+)', metrics))
        # two pushes, each: the fleet's bucket (BEGIN, SET LOCAL, the bucket, COMMIT), then
        # BEGIN, the phone's lock, the INSERT, the busy phone's read, COMMIT
        assert counted == {"statements": "18.0", "round_trips": "2.0", "steps": "2.0"}
    finally:
        app.services.close()


def test_a_connection_the_server_said_goodbye_on_is_replaced_when_taken(pg_cluster, pg_url):
    """A server restart while the pool's connections are fresh (used within the idle
    check's 10 s): the first call after it still works, because a connection the server
    closed is readable and is checked when taken, with no round trip for the others."""
    lg = store.open_ledger(pg_url, pool_size=2)
    try:
        assert lg.get("tx_none") is None  # a fresh, just-used connection in the pool
        pg_cluster.stop()
        pg_cluster.start()
        _, spent = cost(lg, lambda: lg.get("tx_none"))
        assert spent["read"] == (1, 1) and spent["pool_check"][1] >= 1
        _, spent = cost(lg, lambda: lg.get("tx_none"))
        assert spent == {"read": (1, 1)}  # a healthy connection is not checked again
    finally:
        lg.close()


def test_a_restart_with_a_full_pool_of_fresh_connections_costs_no_call(pg_cluster, pg_url):
    """Every pooled connection dies with the server: the first that is taken and found
    dead has the others checked at once, so the call gets a new connection rather than
    waiting out the pool's back-off through each dead one (5 s: a 503)."""
    lg = store.open_ledger(pg_url, pool_size=8, wait_s=5.0)
    try:
        at_once(8, lambda n: lg._read("SELECT pg_sleep(0.2)"))  # eight connections, just used
        assert lg._pool.get_stats()["pool_size"] == 8
        pg_cluster.stop()
        pg_cluster.start()
        assert [lg.get("tx_none") for _ in range(3)] == [None, None, None]
    finally:
        lg.close()


def test_every_write_is_counted_under_the_step_that_makes_it(ledger):
    _, spent = cost(ledger, lambda: ledger.prune_idempotency())
    assert spent == {"prune_idempotency": (4, 1)}


def waits_in_trace(text):
    """The waits for the server in a libpq protocol trace: a Sync, a Flush not right after
    a Sync (psycopg ends a pipeline with both), or a simple-protocol Query."""
    waits, previous = 0, None
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 4 or parts[1] != "F":
            continue
        kind = parts[3]
        if kind in ("Sync", "Query") or (kind == "Flush" and previous != "Sync"):
            waits += 1
        previous = kind
    return waits


def test_the_count_is_what_goes_over_the_wire(pg_url, tmp_path):
    """The engine's counter against libpq's own trace of the connection: a sync psycopg
    made behind the counter's back (a `transaction()` inside a pipeline, say) fails here."""
    lg = store.open_ledger(pg_url, pool_size=1)  # one connection: every step traced
    trace = tmp_path / "libpq.trace"
    try:
        with open(trace, "w") as out:
            with lg._pool.connection() as conn:
                conn.pgconn.trace(out.fileno())
            before = lg.round_trips
            row = begin(lg, rate=("shop", 100.0, 100)).row
            pin = store.PinnedAnswer(store.Idempotency("shop", "k1", "h"), row["id"], 202, b"{}")
            lg.mark_accepted(row["id"], "ws_CO_1", "m", pin=pin)
            settlement.apply(lg, row["id"], success(lg.get(row["id"])),
                             callback=settlement.CallbackRecord(b"{}", "127.0.0.1"))
            lg.claim_next(older_than_s=0, lease_s=60, unknown_window_s=0)
            after = lg.round_trips
            with lg._pool.connection() as conn:
                conn.pgconn.untrace()
        counted = sum(t - before.get(step, (0, 0, 0))[1] for step, (_, t, _) in after.items())
        assert counted == 6  # begin 1, answer 1, read 1, callback 2, claim 1
        assert waits_in_trace(trace.read_text()) == counted
    finally:
        lg.close()
