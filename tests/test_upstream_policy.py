"""Daraja weather at the gateway (issue: nothing stuck, nothing hangs), against a scripted
fake Daraja on loopback: definite refusals are `rejected` and free the key, every wait is
bounded by one call policy, and a push that may have been sent never answers 500."""

import re
import sqlite3
import threading
import time

import pytest
from webtest import TestApp

import config
import mpesa_ledger as store
import mpesa_wsgi
from fake_daraja import FakeDaraja, accepted, error, reply, reset, sleep, token
from helpers import API_KEY, base_env, wait_for
from mpesa_gateway import daraja, metrics
from mpesa_gateway.services import Services
from mpesa_ledger import SqliteLedger

PUSH = {"phone": "0712345678", "amount": 10}
KEY = {"Idempotency-Key": "order-1"}


# --- 1a: refusals before the STK service are `rejected`, never `unknown` ---------------


@pytest.mark.parametrize("code, message", [
    ("500.002.1001", "Service is currently under maintenance. Please try again later"),
    ("500.003.03", "Quota Violation"),
    ("500.003.02", "Error Occurred: Spike Arrest Violation"),
])
def test_maintenance_and_quota_are_503_rejected_and_the_key_is_freed(harness, code, message):
    h = harness(oauth=[token()], push=[error(500, code, message), accepted()])
    res = h.push(503, **KEY)
    assert res.json["error"]["code"] == "upstream_unavailable"
    assert int(res.headers["Retry-After"]) >= 1
    row = h.row(res)
    assert (row["status"], row["reason"], row["result_code"]) == (
        "rejected", "upstream_unavailable", code)
    # Nothing reached a customer: the same key may try again, and this time it goes through.
    assert h.push(202, **KEY).json["status"] == "pending"
    assert h.calls() == (1, 2)


def test_a_success_labelled_html_is_still_a_success(harness):
    # Parsed Daraja JSON wins over a wrong Content-Type: treating it as a proxy page would
    # release the key and let a retry prompt the customer twice.
    h = harness(oauth=[token()], push=[reply(200, {
        "MerchantRequestID": "m", "CheckoutRequestID": "ws_CO_26112026120000000712345678",
        "ResponseCode": "0", "ResponseDescription": "Success", "CustomerMessage": "Success"},
        content_type="text/html")])
    res = h.push(202, **KEY)
    assert res.json["status"] == "pending"
    assert h.push(202, **KEY).headers["Idempotent-Replayed"] == "true"
    assert h.calls() == (1, 1)


@pytest.mark.parametrize("step", [
    error(500, "500.003.1001", "Internal Server Error"),
    reply(502, b"<html>Bad Gateway</html>", content_type="text/html"),
    reply(500, b"", content_type="text/plain"),
], ids=["internal-server-error", "5xx-html", "5xx-empty"])
def test_a_5xx_that_may_have_been_processed_stays_unknown_and_pinned(harness, step):
    h = harness(oauth=[token()], push=[step])
    res = h.push(202, **KEY)
    assert (res.json["status"], res.json["reason"]) == ("unknown", "upstream_error")
    replay = h.push(202, **KEY)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert h.calls() == (1, 1)  # never resent


# --- 2a/2b: one policy per API, every wait bounded ---------------------------------------


def test_oauth_makes_exactly_the_policys_attempts(harness):
    # Three answers that may each be retried: the policy allows three attempts in all, not
    # urllib3's per-kind counters plus one.
    h = harness(oauth=[reset(), reset(), reply(500, b"x", content_type="text/plain"), token()])
    res = h.push(503)
    assert h.app.services.daraja.policies["oauth"].attempts == 3
    assert h.calls() == (3, 0)
    assert h.row(res)["status"] == "rejected"
    h.fake.script["oauth"].clear()  # the fourth step was never asked for


def test_a_good_answer_after_retries_is_not_thrown_away(harness):
    # Two read timeouts, then a token: the body's deadline counts from the call's start
    # with the policy's retries in it, so the third answer is used.
    h = harness(oauth=[sleep(0.6), sleep(0.6), token()], push=[accepted()])
    assert h.push(202).json["status"] == "pending"
    assert h.calls() == (3, 1)


def test_an_upstream_retry_after_is_never_slept_on(harness):
    h = harness(oauth=[reply(503, {"error": "busy"}, extra=("Retry-After: 3600",)), token()],
                push=[accepted()])
    answers = []
    worker = threading.Thread(target=lambda: answers.append(h.push(202)), daemon=True)
    worker.start()
    worker.join(h.app.services.daraja.policies["oauth"].longest_s)  # not the hour Daraja asked for
    assert answers and answers[0].json["status"] == "pending"
    assert h.calls() == (2, 1)


def test_every_bound_is_derived_from_the_call_policies(harness):
    h = harness()
    client = h.app.services.daraja
    oauth, push, query = (client.policies[k] for k in ("oauth", "stk_push", "stk_query"))
    assert (push.attempts, push.retry_read, push.retry_statuses) == (2, False, ())
    # A token fetch and the push, then after "Invalid Access Token" a second fetch and
    # the one resend.
    assert client.longest_push_s == 2 * (oauth.longest_s + push.longest_s)
    assert client.longest_query_s == 2 * (oauth.longest_s + query.longest_s)
    with pytest.raises(AttributeError):
        push.attempts = 5  # immutable
    retry = push.retry()
    assert (retry.total, retry.read, retry.status, retry.respect_retry_after_header) == (
        1, 0, 0, False)
    # urllib3 reads an empty set as "every method"; a POST must never be in it.
    assert retry.allowed_methods and "POST" not in retry.allowed_methods


def header_drip(seconds):
    """Fake Daraja step: the status line and headers, one byte every 0.1 s for `seconds`.
    urllib3's read timeout is per read, so this holds a fetch past its policy."""
    def step(conn, request):
        data = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"x" * int(seconds * 10)
        for byte in data:
            time.sleep(0.1)
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return "close"
        return "close"
    return step


def test_token_waiters_give_up_after_the_oauth_deadline_with_503(tmp_path):
    fake = FakeDaraja(oauth=[header_drip(7)])
    env = dict(base_env(fake.url, tmp_path / "w.db"), MPESA_CONNECT_TIMEOUT="0.2",
               MPESA_READ_TIMEOUT="0.2", GATEWAY_PHONE_LOCK_S="0")
    app = mpesa_wsgi.create_app(config.load_config(env))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    leader = threading.Thread(target=lambda: TestApp(app).post_json(
        "/stkpush", PUSH, headers=headers, status="*"), daemon=True)
    leader.start()
    try:
        wait_for(lambda: fake.count("oauth") == 1, timeout=30)  # the leader is fetching
        started = time.monotonic()
        res = TestApp(app).post_json("/stkpush", dict(PUSH, phone="0712345670"),
                                     headers=headers, status=503)
        waited = time.monotonic() - started
        assert res.json["error"]["code"] == "upstream_unavailable"
        assert app.services.daraja.policies["oauth"].longest_s <= waited < 6.5  # bounded, not 7 s
        assert fake.count("oauth") == 1  # the waiter never fetched a second token
    finally:
        leader.join(30)
        app.services.close()
        fake.close()


# --- 2c: once a prompt may have been sent, no 500 ------------------------------------------


def _app_with_ledger(tmp_path, fake, on_connect, **env):
    env = dict(base_env(fake.url, tmp_path / "c.db"), MPESA_READ_TIMEOUT="0.3", **env)
    cfg = config.load_config(env)
    ledger = SqliteLedger(cfg.db_path, on_connect=on_connect)
    client = daraja.DarajaClient(cfg, daraja.build_pool(cfg))
    services = Services(cfg, ledger, client, metrics.GatewayMetrics("t", lambda: {}))
    return mpesa_wsgi.Gateway(services)


def deny(action_wanted, table_wanted, switch):
    """An sqlite3 authorizer: refuse one kind of statement on one table while switched on."""

    def authorizer(action, arg1, arg2, dbname, source):
        if switch.is_set() and action == action_wanted and arg1 == table_wanted:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    return lambda conn: conn.set_authorizer(authorizer)


def test_failing_to_store_the_idempotent_answer_still_answers_202(tmp_path, caplog):
    switch = threading.Event()
    fake = FakeDaraja(oauth=[token()], push=[accepted()])
    app = _app_with_ledger(tmp_path, fake, deny(sqlite3.SQLITE_UPDATE, "idempotency_keys",
                                                switch))
    try:
        switch.set()
        res = TestApp(app).post_json("/stkpush", PUSH, status=202, headers={
            "Authorization": f"Bearer {API_KEY}", **KEY})
        assert res.json["status"] == "pending" and res.json["id"].startswith("tx_")
        assert any(r.levelname == "WARNING" and "ledger unavailable" in r.getMessage()
                   for r in caplog.records)  # the watch's one line
        switch.clear()
        # The key was never pinned, yet a retry finds the row: no second prompt.
        again = TestApp(app).post_json("/stkpush", PUSH, status=202, headers={
            "Authorization": f"Bearer {API_KEY}", **KEY})
        assert again.json["id"] == res.json["id"]
        assert fake.count("push") == 1
    finally:
        app.services.close()
        fake.close()


def test_failing_to_record_unknown_still_answers_202_unknown_and_spools_it(tmp_path, caplog):
    switch = threading.Event()
    fake = FakeDaraja(oauth=[token()], push=[sleep(1.0, then=accepted())])
    app = _app_with_ledger(tmp_path, fake, deny(sqlite3.SQLITE_UPDATE, "transactions", switch))
    try:
        switch.set()
        res = TestApp(app).post_json("/stkpush", PUSH, status=202, headers={
            "Authorization": f"Bearer {API_KEY}"})
        assert (res.json["status"], res.json["reason"]) == ("unknown", "read_timeout")
        assert any(r.levelname == "INFO" and "spooled" in r.getMessage()
                   and res.json["id"] in r.getMessage() for r in caplog.records)
        switch.clear()
        # The ledger still says `submitting` until the spool is replayed; then it says
        # what happened (never re-sent).
        assert app.services.ledger.get(res.json["id"])["status"] == store.SUBMITTING
        assert app.services.replay_spool() == 1
        row = app.services.ledger.get(res.json["id"])
        assert (row["status"], row["reason"]) == ("unknown", "read_timeout")
        assert fake.count("push") == 1
    finally:
        app.services.close()
        fake.close()


def test_an_unexpected_error_after_the_push_may_have_gone_is_202_unknown(tmp_path):
    fake = FakeDaraja(oauth=[token()], push=[accepted()])
    cfg = config.load_config(base_env(fake.url, tmp_path / "u.db"))

    def broken_observer(api, outcome, seconds):
        if api == "stk_push":
            raise RuntimeError("a bug in the metrics, after the push was sent")

    client = daraja.DarajaClient(cfg, daraja.build_pool(cfg), observer=broken_observer)
    services = Services(cfg, SqliteLedger(cfg.db_path), client,
                        metrics.GatewayMetrics("t", lambda: {}))
    app = mpesa_wsgi.Gateway(services)
    try:
        res = TestApp(app).post_json("/stkpush", PUSH, status=202, headers={
            "Authorization": f"Bearer {API_KEY}"})
        assert (res.json["status"], res.json["reason"]) == ("unknown", "internal_error")
        assert app.services.ledger.get(res.json["id"])["status"] == "unknown"  # never re-sent
        assert fake.count("push") == 1
    finally:
        app.services.close()
        fake.close()


def test_a_refusal_the_ledger_cannot_record_is_spooled_and_frees_the_key_once_recorded(
        tmp_path):
    switch = threading.Event()
    fake = FakeDaraja(oauth=[token()], push=[
        error(500, "500.003.02", "Error Occurred: Spike Arrest Violation"), accepted()])
    app = _app_with_ledger(tmp_path, fake, deny(sqlite3.SQLITE_UPDATE, "transactions", switch))
    auth = {"Authorization": f"Bearer {API_KEY}", **KEY}
    try:
        switch.set()
        res = TestApp(app).post_json("/stkpush", PUSH, status=503, headers=auth)
        assert res.json["error"]["code"] == "upstream_unavailable"  # what Daraja said
        assert app.services.spool.depth() == 1
        again = TestApp(app).post_json("/stkpush", PUSH, status=409, headers=auth)
        assert again.json["error"]["code"] == "idempotency_key_in_use"  # not recorded yet
        switch.clear()
        assert app.services.replay_spool() == 1  # the replayer's work, done here
        row = app.services.ledger.get(re.search(r"tx_[0-9a-f]+", res.json["error"]["message"])[0])
        assert (row["status"], row["reason"]) == ("rejected", "upstream_unavailable")
        TestApp(app).post_json("/stkpush", PUSH, status=202, headers=auth)  # the key is free
        assert fake.count("push") == 2
    finally:
        app.services.close()
        fake.close()


def test_a_refusal_neither_the_ledger_nor_the_spool_can_record_says_so_and_keeps_the_key(
        tmp_path):
    switch = threading.Event()
    fake = FakeDaraja(oauth=[token()], push=[
        error(500, "500.003.02", "Error Occurred: Spike Arrest Violation")])
    (tmp_path / "a-file").write_text("not a directory")
    app = _app_with_ledger(tmp_path, fake, deny(sqlite3.SQLITE_UPDATE, "transactions", switch),
                           GATEWAY_SPOOL_DIR=str(tmp_path / "a-file" / "spool"))
    try:
        switch.set()
        res = TestApp(app).post_json("/stkpush", PUSH, status=503, headers={
            "Authorization": f"Bearer {API_KEY}", **KEY})
        assert res.json["error"]["code"] == "ledger_unavailable"
        assert "do not retry with the same Idempotency-Key" in res.json["error"]["message"]
        switch.clear()
        again = TestApp(app).post_json("/stkpush", PUSH, status=409, headers={
            "Authorization": f"Bearer {API_KEY}", **KEY})  # honest: the key is still taken
        assert again.json["error"]["code"] == "idempotency_key_in_use"
        assert fake.count("push") == 1
    finally:
        app.services.close()
        fake.close()
