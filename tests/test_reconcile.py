"""Reconciliation: lost callbacks are recovered by STK query, never guessed."""

import logging
import os
import subprocess
import sys
import time

import pytest
from webtest import TestApp

import config
import mpesa_ledger as store
import mpesa_wsgi
from fake_daraja import FakeDaraja, accepted, error, reply, token
from helpers import API_KEY, BOTH_ENGINES, ROOT_DIR, FakeClock, base_env, new_row, wait_for
from mpesa_gateway.reconciler import Reconciler

ENGINES = BOTH_ENGINES  # on each ledger engine

FAST = {"GATEWAY_RECONCILE": "on", "MPESA_RECONCILE_AFTER_S": "0.2",
        "MPESA_RECONCILE_BACKOFF_S": "0.1", "MPESA_RECONCILE_DEADLINE_S": "30"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def reconciler_of(app, **seams):
    """A reconciler over the app's own ledger, Daraja client and settings."""
    return Reconciler(app.services.ledger, app.services.daraja, app.services.config, **seams)


def make_app(env, clock=None, **overrides):
    return mpesa_wsgi.create_app(config.load_config(dict(env, **overrides)), clock=clock)


def test_lost_callback_is_settled_by_the_background_query(gateway_env, sim):
    app = make_app(gateway_env, **FAST)
    try:
        testapp = TestApp(app)
        tx = testapp.post_json("/stkpush", {"phone": "254711009999", "amount": 10},
                               headers=AUTH, status=202).json
        row = wait_for(lambda: (r := app.services.ledger.get(tx["id"]))["status"] == "succeeded"
                       and r,
                       timeout=30)
        assert (row["result_code"], row["receipt"]) == ("0", None)  # a query carries no receipt
        assert sim.stats()["callbacks_scheduled"] == 0 and sim.stats()["queries"] >= 1
    finally:
        app.services.close()


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 600}], indirect=True)
def test_still_processing_4999_keeps_the_row_pending_and_backs_off(gateway_env, sim):
    clock = FakeClock(time.time())  # the app's and the reconciler's time: moved by hand
    app = make_app(gateway_env, clock, MPESA_RECONCILE_AFTER_S="0",
                   MPESA_RECONCILE_BACKOFF_S="10")
    try:
        tx = TestApp(app).post_json("/stkpush", {"phone": "254711009999", "amount": 10},
                                    headers=AUTH, status=202).json
        rec = reconciler_of(app, clock=clock.wall)
        assert rec.run_once() == {"not_yet": 1}
        row = app.services.ledger.get(tx["id"])
        assert (row["status"], row["check_attempts"]) == ("pending", 1)
        assert rec.run_once() == {}  # backing off: not due yet
        clock.advance(9)
        assert rec.run_once() == {}  # still inside the first 10 s
        clock.advance(1.5)
        assert rec.run_once() == {"not_yet": 1}
        assert app.services.ledger.get(tx["id"])["check_attempts"] == 2
        clock.advance(19)
        assert rec.run_once() == {}  # the second wait doubled to 20 s
        clock.advance(1.5)
        assert rec.run_once() == {"not_yet": 1}
        assert app.services.ledger.get(tx["id"])["status"] == "pending"
        assert sim.stats()["queries"] == 3
    finally:
        app.services.close()


def scripted_app(tmp_path, fake, clock=None, **overrides):
    env = dict(base_env(fake.url, tmp_path / "r.db"), MPESA_RECONCILE_AFTER_S="0",
               MPESA_RECONCILE_BACKOFF_S="0.05", MPESA_READ_TIMEOUT="5", **overrides)
    app = make_app(env, clock)
    TestApp(app).post_json("/stkpush", {"phone": "0712345678", "amount": 10}, headers=AUTH,
                           status=202)
    return app


@pytest.mark.parametrize("answer", [
    error(500, "500.001.1001", "The transaction is being processed"),
    error(500, "500.001.1001", "The transaction does not Exist"),
    error(200, "500.001.1001", ""),
    reply(200, {"ResponseCode": "0", "ResultCode": "4999", "CheckoutRequestID": "ws_CO_1",
                "ResultDesc": "The transaction is still under processing"}),
])
def test_not_yet_answers_never_fail_a_payment(tmp_path, answer):
    fake = FakeDaraja(oauth=[token()], push=[accepted()], query=[answer])
    app = scripted_app(tmp_path, fake)
    try:
        assert reconciler_of(app).run_once() == {"not_yet": 1}
        rows = app.services.ledger.count_by_status()
        assert rows == {"pending": 1}
        assert fake.count("query") == 1
    finally:
        app.services.close()
        fake.close()


def test_terminal_query_answer_settles_with_the_same_rules_as_a_callback(tmp_path):
    checkout = "ws_CO_26112026120000000712345678"
    fake = FakeDaraja(oauth=[token()], push=[accepted(checkout)], query=[reply(200, {
        "ResponseCode": "0", "MerchantRequestID": "m", "CheckoutRequestID": checkout,
        "ResultCode": "1032", "ResultDesc": "Request Cancelled by user."})])
    app = scripted_app(tmp_path, fake)
    try:
        assert reconciler_of(app).run_once() == {"failed": 1}
        row = app.services.ledger.get(checkout)
        assert (row["status"], row["reason"], row["result_code"]) == (
            "failed", "cancelled", "1032")
    finally:
        app.services.close()
        fake.close()


def test_deadline_without_a_final_answer_makes_the_row_unknown_and_logs_error(tmp_path,
                                                                              caplog):
    processing = error(500, "500.001.1001", "The transaction is being processed")
    fake = FakeDaraja(oauth=[token()], push=[accepted()], query=[processing, processing])
    clock = FakeClock(time.time())
    app = scripted_app(tmp_path, fake, clock, MPESA_RECONCILE_DEADLINE_S="30")
    try:
        rec = reconciler_of(app, clock=clock.wall)
        assert rec.run_once() == {"not_yet": 1}  # before the deadline: asked again later
        assert app.services.ledger.count_by_status() == {"pending": 1}
        clock.advance(31)  # past the deadline (created_at has 1 s resolution)
        with caplog.at_level(logging.ERROR, logger="reconciler"):
            assert rec.run_once() == {"expired": 1}
        assert app.services.ledger.count_by_status() == {"unknown": 1}
        row = app.services.ledger.get("ws_CO_26112026120000000712345678")
        assert row["reason"] == "no_final_result"
        assert any("no_final_result" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.ERROR)
        assert fake.count("query") == 2
    finally:
        app.services.close()
        fake.close()


def test_two_claimers_never_hold_the_same_row(gateway_env, sim):
    app = make_app(gateway_env)
    try:
        for n in range(3):
            TestApp(app).post_json("/stkpush", {"phone": f"071234500{n}", "amount": 10},
                                   headers=AUTH, status=202)
        first = store.open_ledger(app.services.config.db_path)  # two processes, or two hosts
        second = store.open_ledger(app.services.config.db_path)
        claim = dict(older_than_s=0, lease_s=30, unknown_window_s=3600)
        a = [first.claim_next(**claim), first.claim_next(**claim)]
        b = second.claim_next(**claim)
        assert None not in a and b is not None
        assert len({a[0]["id"], a[1]["id"], b["id"]}) == 3
        assert second.claim_next(**claim) is None and first.claim_next(**claim) is None
        first.close()
        second.close()
    finally:
        app.services.close()


def _wait_until_decided(client, checkout_id):
    """Poll Daraja's (the simulator's) STK query until the payment's result is decided."""
    wait_for(lambda: not client.stk_query(checkout_id).pending, timeout=30, interval=0.05)


def test_a_late_callback_after_query_settlement_adds_the_receipt(gateway_env, sim):
    app = make_app(gateway_env, MPESA_RECONCILE_AFTER_S="0")
    try:
        tx = TestApp(app).post_json("/stkpush", {"phone": "254711009999", "amount": 10},
                                    headers=AUTH, status=202).json
        _wait_until_decided(app.services.daraja, tx["checkout_request_id"])
        assert reconciler_of(app).run_once() == {"succeeded": 1}
        assert app.services.ledger.get(tx["id"])["receipt"] is None  # a query carries no receipt
        body = (b'{"Body":{"stkCallback":{"MerchantRequestID":"m","CheckoutRequestID":"%s",'
                b'"ResultCode":0,"ResultDesc":"ok","CallbackMetadata":{"Item":['
                b'{"Name":"Amount","Value":10.0},{"Name":"MpesaReceiptNumber","Value":'
                b'"UKQ7777777"}]}}}}' % tx["checkout_request_id"].encode())
        path = app.services.signer.url(tx["id"]).split("127.0.0.1", 1)[1].split("/", 1)[1]
        TestApp(app).post("/" + path, body, content_type="application/json", status=200)
        row = app.services.ledger.get(tx["id"])
        assert (row["status"], row["receipt"]) == ("succeeded", "UKQ7777777")
    finally:
        app.services.close()


def test_reconcile_command_does_the_same_work_once(gateway_env, sim):
    app = make_app(gateway_env)
    tx = TestApp(app).post_json("/stkpush", {"phone": "254711009999", "amount": 10},
                                headers=AUTH, status=202).json
    _wait_until_decided(app.services.daraja, tx["checkout_request_id"])
    app.services.close()
    queries_before = sim.stats()["queries"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
    env.update(gateway_env, MPESA_RECONCILE_AFTER_S="0")
    proc = subprocess.run([sys.executable, "mpesa_wsgi.py", "reconcile"], cwd=ROOT_DIR, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "reconcile succeeded=1" in proc.stdout
    reopened = store.open_ledger(gateway_env["GATEWAY_DB"])
    assert reopened.get(tx["id"])["status"] == "succeeded"
    reopened.close()
    assert sim.stats()["queries"] - queries_before == 1  # the command asked once


def test_rows_abandoned_mid_push_become_unknown_without_a_restart(gateway_env, sim):
    clock = FakeClock(time.time())
    app = mpesa_wsgi.create_app(config.load_config(gateway_env), clock=clock)
    try:
        row = new_row(app.services.ledger, phone="254712345678")
        rec = reconciler_of(app, clock=clock.wall)
        assert rec.run_once() == {}  # young: its push may still be in flight elsewhere
        clock.advance(app.services.daraja.longest_push_s + 1)
        assert rec.run_once() == {"interrupted": 1}
        after = app.services.ledger.get(row["id"])
        assert (after["status"], after["reason"]) == ("unknown", "interrupted")
        assert sim.stats()["pushes"] == 0  # never (re-)sent
    finally:
        app.services.close()
