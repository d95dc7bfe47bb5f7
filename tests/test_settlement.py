"""Money-state rules and Daraja's weather, end to end: the simulator on loopback as Daraja,
the gateway's own WSGI app, the real ledger file."""

import json
import re

import pytest

from helpers import BOTH_ENGINES, callbacks_of, new_row
from mpesa_gateway import settlement
from mpesa_gateway.settlement import Outcome

ENGINES = BOTH_ENGINES  # on each ledger engine

FINAL = ("succeeded", "failed", "rejected", "unknown")


def send_callback(gateway, tx, body, status=200):
    path = "/" + gateway.services.signer.url(tx["id"]).split("/", 3)[3]
    return gateway.testapp.post(path, body if isinstance(body, bytes) else json.dumps(body),
                                content_type="application/json", status=status)


def stk(tx, code, items=None, checkout=None, metadata=True):
    body = {"MerchantRequestID": "m", "CheckoutRequestID": checkout or tx["checkout_request_id"],
            "ResultCode": code, "ResultDesc": "x"}
    if items is not None:
        body["CallbackMetadata"] = {"Item": items}
    elif metadata is not True:
        body["CallbackMetadata"] = metadata
    return {"Body": {"stkCallback": body}}


def paid(amount, receipt="UKQ1234567"):
    return [{"Name": "Amount", "Value": amount}, {"Name": "MpesaReceiptNumber", "Value": receipt},
            {"Name": "Balance"}]


# --- 3c: result codes, the status table of docs/api.md ------------------------------------


@pytest.mark.parametrize("phone, reason, result_code", [
    ("254711001025", "push_failed", "1025"),
    ("254711019999", "push_failed", "9999"),
    ("254711000017", "duplicate_request", "17"),
    ("254711000026", "system_busy", "26"),
    ("254711001031", "cancelled", "1031"),
    ("254711002028", "misconfigured", "2028"),
    ("254711000003", "misconfigured", "SFC_IC0003"),
])
def test_new_result_codes_end_in_their_reason(gateway, phone, reason, result_code):
    tx = gateway.push({"phone": phone, "amount": 10}).json
    final = gateway.wait_status(tx["id"], *FINAL)
    assert (final["status"], final["reason"], final["result_code"]) == (
        "failed", reason, result_code)


def test_misconfigured_result_is_an_error_naming_the_settings(gateway, log_hygiene):
    tx = gateway.push({"phone": "254711002028", "amount": 10}).json
    gateway.wait_status(tx["id"], "failed")
    errors = [t for t in log_hygiene.texts if "misconfigured" in t]
    assert errors and "MPESA_TRANSACTION_TYPE" in errors[0] and "MPESA_PARTY_B" in errors[0]


@pytest.mark.parametrize("phone", ["254711000111", "254711000112"], ids=["masked", "absent"])
def test_a_success_whose_phone_number_is_masked_or_absent_still_settles(gateway, phone):
    tx = gateway.push({"phone": phone, "amount": 10}).json
    final = gateway.wait_status(tx["id"], *FINAL)
    assert final["status"] == "succeeded" and final["receipt"]


# --- 3a, 3b, 3d: what a callback may do -------------------------------------------------


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 60}], indirect=True)
def test_a_signed_success_never_moves_a_rejected_row(gateway):
    res = gateway.push({"phone": "254711005002", "amount": 10}, status=503)  # spike arrest
    tx_id = re.search(r"tx_[0-9a-f]+", res.json["error"]["message"]).group(0)
    tx = {"id": tx_id, "checkout_request_id": "ws_CO_26112026120000000711005002"}
    send_callback(gateway, tx, stk(tx, 0, paid(10.0)))
    row = gateway.get(tx_id).json
    assert (row["status"], row["receipt"]) == ("rejected", None)
    assert [c["outcome"] for c in callbacks_of(gateway.services.ledger, tx_id)] == ["anomaly"]


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 60}], indirect=True)
@pytest.mark.parametrize("metadata", [{}, None], ids=["empty", "absent"])
def test_a_failure_callback_with_empty_or_no_metadata_is_valid(gateway, metadata):
    tx = gateway.push({"phone": "0712340001", "amount": 10}).json
    body = stk(tx, 1032, metadata=metadata) if metadata is not None else stk(tx, 1032)
    assert send_callback(gateway, tx, body).json == {"ResultCode": 0, "ResultDesc": "Accepted"}
    row = gateway.get(tx["id"]).json
    assert (row["status"], row["reason"]) == ("failed", "cancelled")


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 60}], indirect=True)
@pytest.mark.parametrize("amount, status", [
    (10, "succeeded"), (10.0, "succeeded"), ("10", "succeeded"), ("10.00", "succeeded"),
    ("1e1", "pending"), ("10.5", "pending"), (" 10", "pending"), ("0x0A", "pending"),
])
def test_callback_amount_is_a_number_or_a_plain_decimal_string(gateway, amount, status):
    tx = gateway.push({"phone": "0712340002", "amount": 10}).json
    send_callback(gateway, tx, stk(tx, 0, paid(amount)))
    assert gateway.get(tx["id"]).json["status"] == status
    expected = "applied" if status == "succeeded" else "anomaly"
    assert [c["outcome"] for c in callbacks_of(gateway.services.ledger, tx["id"])] == [expected]


def test_rules_are_one_pure_function_for_callbacks_and_queries():
    row = {"checkout_request_id": None, "status": "unknown", "amount": 10, "receipt": None,
           "result_code": None}
    query = Outcome("failed", "cancelled", "1032", "x", "ws_CO_1", source="query")
    decision = settlement.decide(row, query)
    assert decision.outcome == "applied"
    assert decision.changes["checkout_request_id"] == "ws_CO_1"  # learnt from the result
    rejected = dict(row, status="rejected")
    assert settlement.decide(rejected, query).outcome == "anomaly"


# --- 1a, 3a through the simulator's weather -----------------------------------------------


def test_maintenance_weather_is_503_and_nothing_is_left_pending(gateway, sim):
    sim.sim.set_weather(push="maintenance")
    res = gateway.push({"phone": "0712340003", "amount": 10}, status=503)
    assert res.json["error"]["code"] == "upstream_unavailable"
    assert gateway.services.ledger.count_by_status() == {"rejected": 1}
    assert sim.stats()["pushes_accepted"] == 0


def test_html_weather_is_502_saying_the_base_url_looks_wrong(gateway, sim):
    sim.sim.set_weather(push="html")
    res = gateway.push({"phone": "0712340004", "amount": 10}, status=502)
    assert "base URL" in res.json["error"]["message"]


def test_an_internal_error_push_is_unknown_until_its_signed_callback_settles_it(gateway, sim):
    sim.sim.set_weather(push="internal")  # processed, but answered 500.003.1001
    tx = gateway.push({"phone": "0712340005", "amount": 10}).json
    assert (tx["status"], tx["checkout_request_id"]) == ("unknown", None)
    final = gateway.wait_status(tx["id"], "succeeded")
    assert final["checkout_request_id"].startswith("ws_CO_") and final["receipt"]


# --- 1e: an interrupted push blocks the phone ----------------------------------------------


def test_a_push_interrupted_by_a_crash_blocks_the_phone_like_a_pending_one(gateway, sim):
    row = new_row(gateway.services.ledger, phone="254712340006", amount=10, reference="R",
                                    description="D")
    gateway.services.ledger.recover_interrupted(older_than_s=0)
    assert gateway.services.ledger.get(row["id"])["status"] == "unknown"
    res = gateway.push({"phone": "0712340006", "amount": 10}, status=409)
    assert res.json["error"]["code"] == "payment_in_progress"
    assert sim.stats()["pushes"] == 0  # no second prompt
    gateway.clock.advance(gateway.services.config.phone_lock_s + 1)
    assert gateway.push({"phone": "0712340006", "amount": 10}).json["status"] == "pending"


def test_a_push_answered_with_an_internal_error_blocks_the_phone_until_settled(gateway, sim):
    sim.sim.set_weather(push="internal")  # unknown, no CheckoutRequestID: a prompt may be open
    tx = gateway.push({"phone": "0712340007", "amount": 10}).json
    res = gateway.push({"phone": "0712340007", "amount": 10}, status=409)
    assert res.json["error"]["code"] == "payment_in_progress"
    gateway.wait_status(tx["id"], "succeeded")  # its callback settles it
    sim.sim.set_weather(push="ok")
    assert gateway.push({"phone": "0712340007", "amount": 10}).json["status"] == "pending"
