"""The reconciler under Daraja's weather: it never gives up on a throttle, keeps asking
about `unknown` payments, is loud about permanent refusals, claims one row at a time and
paces itself. Time is an injected clock; Daraja is a scripted fake on loopback."""

import logging
import os
import subprocess
import sys
import threading

import pytest
from webtest import TestApp

import config
import mpesa_wsgi
from fake_daraja import FakeDaraja, accepted, error, reply, reset, sleep, token
from helpers import API_KEY, BOTH_ENGINES, ROOT_DIR, FakeClock, base_env
from mpesa_gateway import reconciler as rec_module
from mpesa_gateway.reconciler import Reconciler

ENGINES = BOTH_ENGINES  # on each ledger engine

AUTH = {"Authorization": f"Bearer {API_KEY}"}
NOT_YET = error(500, "500.001.1001", "The transaction is being processed")


def checkout(n):
    return f"ws_CO_2611202612000000{n:03d}712345678"


def final(n, code="0"):
    return reply(200, {"ResponseCode": "0", "MerchantRequestID": "m",
                       "CheckoutRequestID": checkout(n), "ResultCode": code,
                       "ResultDesc": "The service request is processed successfully."})


class Setup:
    """An app on a fake clock whose pushes are all accepted; a reconciler on the same clock."""

    def __init__(self, tmp_path, payments, query, **env):
        self.fake = FakeDaraja(oauth=[token() for _ in range(4)], push=[accepted(checkout(n))
                                                      for n in range(payments)], query=query)
        self.clock = FakeClock(1_790_000_000.0)
        settings = dict(base_env(self.fake.url, tmp_path / "r.db"), MPESA_RECONCILE_AFTER_S="60",
                        MPESA_RECONCILE_BACKOFF_S="10", MPESA_RECONCILE_DEADLINE_S="900",
                        MPESA_READ_TIMEOUT="0.3", GATEWAY_PHONE_LOCK_S="0", **env)
        self.app = mpesa_wsgi.create_app(config.load_config(settings), clock=self.clock)
        self.waits = []
        self.ids = [TestApp(self.app).post_json("/stkpush", {"phone": "0712345678", "amount": 10},
                                                headers=AUTH, status=202).json["id"]
                    for _ in range(payments)]

    def reconciler(self, **kwargs):
        services = self.app.services
        return Reconciler(services.ledger, services.daraja, services.config, clock=self.clock,
                          wait=self.waits.append, **kwargs)

    def row(self, i=0):
        return self.app.services.ledger.get(self.ids[i])

    def close(self):
        self.app.services.close()
        self.fake.close()


@pytest.fixture
def setup(tmp_path):
    made = []

    def make(payments=1, query=(), **env):
        s = Setup(tmp_path, payments, list(query), **env)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("weather", [
    reset(), reply(503, b"busy", content_type="text/plain"),
    error(500, "500.003.1001", "Internal Server Error"),
    error(500, "500.003.02", "Error Occurred: Spike Arrest Violation"),
], ids=["dropped", "5xx", "internal", "spike"])
def test_past_the_deadline_weather_reschedules_and_never_gives_up(setup, weather):
    # The query policy retries a dropped connection once, so script enough of them.
    s = setup(query=[weather, weather])
    s.clock.advance(1000)  # past MPESA_RECONCILE_DEADLINE_S
    result = s.reconciler().run_once()
    assert "expired" not in result and sum(result.values()) == 1
    row = s.row()
    assert (row["status"], row["check_attempts"]) == ("pending", 1)
    assert row["next_check_at"] > s.clock.now  # asked again later


def test_past_the_deadline_only_a_definite_not_yet_ends_a_row_unknown(setup, caplog):
    s = setup(query=[NOT_YET])
    s.clock.advance(1000)
    with caplog.at_level(logging.ERROR, logger="reconciler"):
        assert s.reconciler().run_once() == {"expired": 1}
    assert (s.row()["status"], s.row()["reason"]) == ("unknown", "no_final_result")
    assert any("no_final_result" in r.getMessage() for r in caplog.records)


def test_an_unknown_payment_is_queried_hourly_and_still_ends_succeeded(setup):
    s = setup(query=[NOT_YET, NOT_YET, final(0)])
    s.clock.advance(1000)
    r = s.reconciler()
    assert r.run_once() == {"expired": 1}
    s.clock.advance(60)
    assert r.run_once() == {}  # not due: an unknown row is asked about hourly
    s.clock.advance(rec_module.UNKNOWN_RECHECK_S)
    assert r.run_once() == {"not_yet": 1}
    assert s.row()["status"] == "unknown"
    s.clock.advance(rec_module.UNKNOWN_RECHECK_S)
    assert r.run_once() == {"succeeded": 1}  # the callback was lost in an incident
    assert (s.row()["status"], s.row()["result_code"]) == ("succeeded", "0")
    assert s.fake.count("query") == 3


def test_unknown_payments_are_left_alone_after_72_hours(setup):
    s = setup(query=[NOT_YET])
    s.clock.advance(1000)
    r = s.reconciler()
    assert r.run_once() == {"expired": 1}
    s.clock.advance(rec_module.UNKNOWN_WINDOW_S + 1)
    assert r.run_once() == {}
    assert s.fake.count("query") == 1


@pytest.mark.parametrize("message", ["Wrong credentials", "Merchant does not exist"])
def test_permanent_query_refusals_are_one_error_per_pass_counted_and_in_health(setup, caplog,
                                                                              message):
    refusal = error(500, "500.001.1001", message)
    s = setup(payments=3, query=[refusal] * 3)
    s.clock.advance(120)
    refusals = []
    with caplog.at_level(logging.ERROR, logger="reconciler"):
        assert s.reconciler(on_refusal=lambda: refusals.append(1)).run_once() == {"refused": 3}
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == 1 and message in lines[0] and "rows=3" in lines[0]
    assert len(refusals) == 3
    assert all(s.row(i)["status"] == "pending" for i in range(3))  # weather is not a result


def test_refusals_show_in_metrics_and_health(tmp_path):
    fake = FakeDaraja(oauth=[token()], push=[accepted(checkout(0))],
                      query=[error(500, "500.001.1001", "Wrong credentials")])
    env = dict(base_env(fake.url, tmp_path / "m.db"), GATEWAY_RECONCILE="on",
               MPESA_RECONCILE_AFTER_S="0", MPESA_RECONCILE_BACKOFF_S="0.05",
               GATEWAY_PHONE_LOCK_S="0")
    app = mpesa_wsgi.create_app(config.load_config(env))
    try:
        testapp = TestApp(app)
        testapp.post_json("/stkpush", {"phone": "0712345678", "amount": 10}, headers=AUTH,
                          status=202)
        from helpers import wait_for
        wait_for(lambda: app.services.metrics.reconcile_refusals.value() == 1, timeout=15)
        text = testapp.get("/metrics").text
        assert "mpesa_gateway_reconcile_query_refusals_total 1.0" in text
        wait_for(lambda: testapp.get("/health").json["checks"]["reconcile_query_refusals"] == 1,
                 timeout=15)
    finally:
        app.services.close()
        fake.close()


def test_a_pass_is_paced_and_ends_early_on_spike_arrest(setup):
    spike = error(500, "500.003.02", "Error Occurred: Spike Arrest Violation")
    s = setup(payments=4, query=[final(0), final(1), spike], MPESA_RECONCILE_QPS="4")
    s.clock.advance(120)
    assert s.reconciler().run_once() == {"succeeded": 2, "throttled": 1}
    assert s.waits == [0.25, 0.25]  # 1 / MPESA_RECONCILE_QPS between queries
    assert s.fake.count("query") == 3  # the fourth row waits for the next pass
    assert [s.row(i)["status"] for i in range(4)].count("pending") == 2


def test_each_claim_is_one_row_leased_for_one_query(setup):
    s = setup(payments=2)
    s.clock.advance(120)
    lease_s = s.app.services.daraja.longest_query_s
    claim = dict(older_than_s=60, lease_s=lease_s, unknown_window_s=3600)
    first = s.app.services.ledger.claim_next(**claim)
    assert first["claimed_until"] == s.clock.now + lease_s  # the lease
    assert s.app.services.ledger.get(first["id"])["claimed_until"] == first["claimed_until"]
    second = s.app.services.ledger.claim_next(**claim)
    assert second["id"] != first["id"]
    assert s.app.services.ledger.claim_next(**claim) is None
    s.clock.advance(s.app.services.daraja.longest_query_s + 1)  # a crashed holder's lease lapses
    assert s.app.services.ledger.claim_next(**claim) is not None


def test_two_reconcilers_on_one_ledger_never_query_a_row_twice_even_when_daraja_is_slow(setup):
    slow = [sleep(0.2, then=final(n)) for n in range(6)]
    s = setup(payments=6, query=slow)
    s.clock.advance(120)
    a, b = s.reconciler(), s.reconciler()
    results = []
    threads = [threading.Thread(target=lambda r=r: results.append(r.run_once())) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(sum(r.values()) for r in results) == 6
    assert s.fake.count("query") == 6
    assert all(s.row(i)["status"] == "succeeded" for i in range(6))


def test_reconcile_tx_queries_one_row_now(tmp_path):
    fake = FakeDaraja(oauth=[token(), token()], push=[accepted(checkout(0))], query=[final(0)])
    env = dict(base_env(fake.url, tmp_path / "tx.db"))
    app = mpesa_wsgi.create_app(config.load_config(env))
    tx = TestApp(app).post_json("/stkpush", {"phone": "0712345678", "amount": 10}, headers=AUTH,
                                status=202).json
    app.services.close()
    child = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
    child.update(env)  # MPESA_RECONCILE_AFTER_S stays 60: --tx does not wait for the schedule
    try:
        proc = subprocess.run([sys.executable, "mpesa_wsgi.py", "reconcile", "--tx", tx["id"]],
                              cwd=ROOT_DIR, env=child, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert f"reconcile tx={tx['id']} result=succeeded status=succeeded" in proc.stdout
        assert fake.count("query") == 1
        missing = subprocess.run([sys.executable, "mpesa_wsgi.py", "reconcile", "--tx",
                                  "tx_nope"], cwd=ROOT_DIR, env=child, capture_output=True,
                                 text=True, timeout=60)
        assert missing.returncode == 1 and "not found" in missing.stderr
    finally:
        fake.close()


def echo_final(then=None):
    """Fake Daraja step: a terminal success for whichever CheckoutRequestID was asked
    about; `then(body)` runs first (the query is in flight meanwhile)."""
    import json as _json

    def step(conn, request):
        asked = _json.loads(request[3])["CheckoutRequestID"]
        if then is not None:
            then(asked)
        reply(200, {"ResponseCode": "0", "MerchantRequestID": "m", "CheckoutRequestID": asked,
                    "ResultCode": "0", "ResultDesc": "ok"})(conn, request)
    return step


def test_a_daraja_slower_than_a_batch_cannot_make_two_processes_query_one_row(setup):
    s = setup(payments=6)
    s.clock.advance(120)
    lease = s.app.services.daraja.longest_query_s
    other = s.reconciler()
    slow = []

    def slow_daraja(asked):
        slow.append(asked)
        s.clock.advance(lease / 4)  # each query takes a quarter of a lease: within bounds,
        if len(slow) == 5:          # but five of them outlast a lease taken for a batch
            other.run_once()  # another process's pass, while this query is in flight

    s.fake.script["query"] = [echo_final(slow_daraja) for _ in range(12)]
    s.reconciler().run_once()
    asked = [r[4] for r in s.fake.requests if r[0] == "query"]
    assert len(asked) == len(set(asked)) == 6  # every row queried once, by one process
    assert all(s.row(i)["status"] == "succeeded" for i in range(6))


def test_reconcile_tx_does_not_query_a_row_another_process_holds(setup):
    s = setup(query=[final(0)])
    held = s.app.services.ledger.claim(s.ids[0], 60)
    assert held is not None
    assert s.reconciler().check_now(s.ids[0])[0] == "busy"
    assert s.fake.count("query") == 0
    s.clock.advance(61)  # the holder died: its lease lapses
    assert s.reconciler().check_now(s.ids[0])[0] == "succeeded"


def test_a_lapsed_lease_cannot_release_or_reschedule_the_new_holders_claim(setup):
    s = setup()
    first = s.app.services.ledger.claim(s.ids[0], 30)
    s.clock.advance(31)
    second = s.app.services.ledger.claim(s.ids[0], 30)
    s.app.services.ledger.reschedule(s.ids[0], s.clock.now + 999, first["claimed_until"])
    row = s.row()
    assert (row["claimed_until"], row["check_attempts"]) == (second["claimed_until"], 0)
    assert s.app.services.ledger.give_up(s.ids[0], 0, first["claimed_until"]) is False
