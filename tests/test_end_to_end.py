"""Gateway and simulator on real loopback sockets: every scenario phone, end to end."""

import re
import sqlite3
import time
import urllib.request
from urllib.parse import urlsplit

import pytest
from webtest import TestApp

import config
import mpesa_wsgi
from conftest import API_KEY, SECRET, wait_for
from ledger import Ledger
from payments import callback_signature

FINAL = ("succeeded", "failed", "rejected", "unknown")


@pytest.mark.parametrize("phone, status, reason, result_code", [
    ("0712345678", "succeeded", None, "0"),
    ("254708374149", "failed", "unreachable", "1037"),
    ("254711000001", "failed", "insufficient_funds", "1"),
    ("254711001032", "failed", "cancelled", "1032"),
    ("254711002001", "failed", "wrong_pin", "2001"),
    ("254711001019", "failed", "expired", "1019"),
])
def test_scenario_phone_ends_in_documented_status(gateway, phone, status, reason, result_code):
    res = gateway.push({"phone": phone, "amount": 10, "reference": "INV001"})
    assert res.json["status"] == "pending"
    assert res.json["checkout_request_id"].startswith("ws_CO_")
    final = gateway.wait_status(res.json["id"], *FINAL)
    assert (final["status"], final["reason"], final["result_code"]) == (status, reason, result_code)
    assert (final["receipt"] is not None) == (status == "succeeded")
    assert final["phone"].startswith("254") and "*" in final["phone"]


def test_success_with_lost_callback_stays_pending(gateway, sim):
    res = gateway.push({"phone": "254711009999", "amount": 10})
    time.sleep(sim.sim.settings.callback_delay_s + 0.4)
    assert gateway.get(res.json["id"]).json["status"] == "pending"
    assert sim.stats()["callbacks_scheduled"] == 0
    # Daraja knows it was paid: only a query can tell (reconciliation settles it).
    answer = gateway.app.daraja.stk_query(res.json["checkout_request_id"])
    assert (answer.pending, answer.result_code) == (False, "0")


def test_callback_sent_twice_settles_once_and_records_both(gateway, sim):
    res = gateway.push({"phone": "254711000002", "amount": 25})
    final = gateway.wait_status(res.json["id"], *FINAL)
    wait_for(lambda: sim.stats()["callbacks_sent"] == 2)
    outcomes = [c["outcome"] for c in gateway.app.ledger.callbacks(res.json["id"])]
    assert outcomes == ["applied", "duplicate"]
    assert gateway.get(res.json["id"]).json == final


def test_subscriber_lock_is_409_with_retry_after_and_a_rejected_row(gateway):
    res = gateway.push({"phone": "254711005001", "amount": 10}, status=409)
    assert res.json["error"]["code"] == "subscriber_busy"
    assert res.headers["Retry-After"] == "60"
    tx_id = re.search(r"tx_[0-9a-f]+", res.json["error"]["message"]).group(0)
    row = gateway.get(tx_id).json
    assert (row["status"], row["reason"]) == ("rejected", "subscriber_busy")


def test_spike_arrest_is_503_with_retry_after_and_nothing_pending(gateway):
    res = gateway.push({"phone": "254711005002", "amount": 10}, status=503)
    assert res.json["error"]["code"] == "upstream_unavailable"
    assert int(res.headers["Retry-After"]) > 0
    tx_id = re.search(r"tx_[0-9a-f]+", res.json["error"]["message"]).group(0)
    assert gateway.get(tx_id).json["status"] == "rejected"


def test_daraja_refusal_is_502_naming_the_error_code(gateway_env):
    app = mpesa_wsgi.create_app(config.load_config(dict(gateway_env, MPESA_PASSKEY="wrong")))
    try:
        res = TestApp(app).post_json("/stkpush", {"phone": "0712345009", "amount": 10},
                                     headers={"Authorization": f"Bearer {API_KEY}"}, status=502)
        assert res.json["error"]["code"] == "daraja_rejected"
        assert "500.001.1001" in res.json["error"]["message"]
        assert "Wrong credentials" not in res.text  # no upstream payloads
        tx_id = re.search(r"tx_[0-9a-f]+", res.json["error"]["message"]).group(0)
        row = app.ledger.get(tx_id)
        assert (row["status"], row["reason"], row["result_code"]) == (
            "rejected", "daraja_rejected", "500.001.1001")
    finally:
        app.close()


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 1.2, "slow_answer_s": 1.5}],
                         indirect=True)
def test_read_timeout_answers_unknown_once_and_the_callback_settles_it(gateway, sim):
    res = gateway.push({"phone": "254711000408", "amount": 10})
    assert (res.json["status"], res.json["reason"]) == ("unknown", "read_timeout")
    assert sim.stats()["pushes"] == 1  # never resent
    final = gateway.wait_status(res.json["id"], "succeeded")
    assert final["receipt"] and final["checkout_request_id"].startswith("ws_CO_")
    assert sim.stats()["pushes"] == 1


def test_ledger_row_is_committed_before_daraja_is_called(gateway, sim):
    seen = []

    def on_push(payload):
        path = urlsplit(payload["CallBackURL"]).path
        tx_id = path.split("/")[2]
        with sqlite3.connect(gateway.app.config.db_path) as conn:  # another connection
            row = conn.execute("SELECT status, amount FROM transactions WHERE id = ?",
                               (tx_id,)).fetchone()
        seen.append((path, row))

    sim.sim.on_push = on_push
    res = gateway.push({"phone": "0712345001", "amount": 42})
    path, row = seen[0]
    assert row == ("submitting", 42)
    assert re.fullmatch(rf"/callback/{res.json['id']}/[0-9a-f]{{32}}", path)


def _post(url, data):
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_wrong_callback_signature_is_404_and_stores_nothing(gateway):
    res = gateway.push({"phone": "0712345002", "amount": 10})
    tx_id = res.json["id"]
    good = callback_signature(SECRET, tx_id)
    for sig in ("0" * 32, good[:-1] + ("0" if good[-1] != "0" else "1"), good.upper(), "x"):
        status, body = _post(f"{gateway.url}/callback/{tx_id}/{sig}", b'{"Body":{}}')
        assert status == 404 and b"not_found" in body
    status, _ = _post(f"{gateway.url}/callback/tx_other/{good}", b"{}")
    assert status == 404
    time.sleep(0.5)  # let the real callback land
    assert all(c["outcome"] != "malformed" for c in gateway.app.ledger.callbacks(tx_id))
    assert gateway.app.ledger.callbacks("tx_other") == []


def test_replayed_callback_changes_nothing(gateway):
    res = gateway.push({"phone": "0712345003", "amount": 10})
    final = gateway.wait_status(res.json["id"], *FINAL)
    stored = gateway.app.ledger.callbacks(res.json["id"])[0]["body"]
    url = gateway.app.callback_url(res.json["id"])
    assert _post(url, stored) == (200, b'{"ResultCode":0,"ResultDesc":"Accepted"}')
    assert gateway.get(res.json["id"]).json == final
    assert [c["outcome"] for c in gateway.app.ledger.callbacks(res.json["id"])] == [
        "applied", "duplicate"]


def test_malformed_callback_is_stored_and_answered_400(gateway):
    res = gateway.push({"phone": "0712345004", "amount": 10})
    url = gateway.app.callback_url(res.json["id"])
    status, body = _post(url, b'{"Body": "nope"}')
    assert status == 400 and b"invalid_callback" in body
    stored = gateway.app.ledger.callbacks(res.json["id"])
    assert stored[0]["body"] == b'{"Body": "nope"}' and stored[0]["outcome"] == "malformed"


def test_payments_survive_closing_and_reopening_the_ledger(gateway):
    res = gateway.push({"phone": "0712345005", "amount": 77})
    final = gateway.wait_status(res.json["id"], *FINAL)
    gateway.app.ledger.close()
    reopened = Ledger(gateway.app.config.db_path)
    row = reopened.get(res.json["checkout_request_id"])
    assert (row["id"], row["status"], row["amount"], row["receipt"]) == (
        final["id"], "succeeded", 77, final["receipt"])
    reopened.close()


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 0.05, "slow_answer_s": 0.35}],
                         indirect=True)
def test_callback_that_beats_the_push_answer_is_kept(gateway, sim):
    res = gateway.push({"phone": "254711000408", "amount": 10})
    # The callback was applied while Daraja's answer was still on its way.
    assert res.json["status"] == "succeeded"
    row = gateway.get(res.json["id"]).json
    assert row["checkout_request_id"].startswith("ws_CO_") and row["receipt"]
    assert [c["outcome"] for c in gateway.app.ledger.callbacks(row["id"])] == ["applied"]
