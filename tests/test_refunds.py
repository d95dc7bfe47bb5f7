"""Refunds, code checks, claims and the balance, through Daraja's initiator APIs: the
gateway's own WSGI app, the simulator over a real loopback socket posting its results to
the gateway's real socket, both engines. A request is committed before Daraja is called,
a refund is never sent twice, a result is stored before it is acknowledged, a refused
initiator stops every call, and nothing an owner may not see is shown."""

import contextlib
import json
import subprocess
import sys

import pytest

import config
import mpesa_ledger as store
from helpers import (
    API_KEY,
    BOTH_ENGINES,
    OTHER_KEY,
    PAYBILL,
    ROOT_DIR,
    SimulatorApi,
    at_once,
    events_of,
    wait_for,
)
from mpesa_devtools import simulator
from mpesa_gateway import initiator, recording
from mpesa_gateway.auth import CallbackSigner

ENGINES = BOTH_ENGINES
ADMIN = "admin-key-0123456789abcdef"
PAID_PHONE = "254712345601"
DEADLINE_S = 30


@pytest.fixture
def sim_settings(request):
    """Results a fraction of a second after the acknowledgement."""
    return simulator.SimSettings(**dict(dict(callback_delay_s=0.3, slow_answer_s=1.0,
                                             result_delay_s=0.2),
                                        **getattr(request, "param", {})))


@pytest.fixture
def initiator_env(sim, tmp_path):
    """The simulator's initiator: its name, its password and its certificate (the gateway
    makes the SecurityCredential from them at start-up, as in production)."""
    cert = tmp_path / "simulator-cert.pem"
    cert.write_bytes(sim.sim.initiator_certificate_pem())
    return {"MPESA_INITIATOR_NAME": simulator.SANDBOX_INITIATOR_NAME,
            "MPESA_INITIATOR_PASSWORD": simulator.SANDBOX_INITIATOR_PASSWORD,
            "MPESA_CERT_FILE": str(cert)}


@pytest.fixture
def gateway_env(gateway_env, initiator_env, request):
    """`default` has a webhook endpoint (events written, never sent: no sender); ADMIN is
    an operator's key; menu payments go to the sandbox's C2B shortcode."""
    return {**gateway_env, **initiator_env, "GATEWAY_ADMIN_KEYS": ADMIN,
            "MPESA_C2B_SHORTCODE": PAYBILL,
            "GATEWAY_WEBHOOK_URLS": "default:http://127.0.0.1:9/events",
            "GATEWAY_WEBHOOK_SECRETS": "default:whsec_" + "A" * 32,
            "GATEWAY_WEBHOOK_ALLOW_PRIVATE": "on", "GATEWAY_WEBHOOK_SENDER": "off",
            **getattr(request, "param", {})}


def auth(key=API_KEY, idempotency_key=None):
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def paid(gateway, phone=PAID_PHONE, amount=10):
    """A succeeded STK payment, its receipt from the simulator's callback."""
    tx = gateway.push({"phone": phone, "amount": amount}).json
    return gateway.wait_status(tx["id"], "succeeded", timeout=DEADLINE_S)


def refund(gateway, tx_id, key="refund-1", status=202, body=None, api_key=API_KEY):
    headers = auth(api_key, key)
    if body is None:
        return gateway.testapp.post(f"/transactions/{tx_id}/refund", headers=headers,
                                    status=status)
    return gateway.testapp.post_json(f"/transactions/{tx_id}/refund", body, headers=headers,
                                     status=status)


def refund_of(gateway, tx_id, *statuses):
    return wait_for(lambda: (r := gateway.get(tx_id).json["refund"]) and r["status"] in statuses
                    and r, timeout=DEADLINE_S, interval=0.1)


def sim_count(sim, name):
    return sim.stats().get(name, 0)


# --- refunds ----------------------------------------------------------------------------


def test_a_refund_reverses_a_succeeded_payment_and_says_so(gateway, sim):
    tx = paid(gateway)
    res = refund(gateway, tx["id"])
    assert res.json["transaction_id"] == tx["id"] and res.json["receipt"] == tx["receipt"]
    assert res.json["refund"]["status"] == "pending" and res.json["refund"]["amount"] == 10
    done = refund_of(gateway, tx["id"], "refunded")
    assert done["receipt"] and done["receipt"] != tx["receipt"]  # the reversal's own
    assert done["completed_at"] and done["reason"] is None
    assert gateway.get(tx["id"]).json["status"] == "succeeded"  # the payment itself stands
    assert sim_count(sim, "reversals") == 1
    [event] = [e for e in events_of(gateway.services.ledger, tx["id"])
               if e["type"].startswith("payment.refund")]
    body = json.loads(event["body"])
    assert body["type"] == "payment.refunded" and body["data"]["refund"]["status"] == "refunded"
    assert body["data"]["transaction_id"] == tx["id"]


def test_one_refund_per_payment_the_same_key_replays_another_is_refused(gateway, sim):
    tx = paid(gateway, "254712345602")
    first = refund(gateway, tx["id"], "key-a")
    again = refund(gateway, tx["id"], "key-a")
    assert again.json == first.json and again.headers["Idempotent-Replayed"] == "true"
    refund_of(gateway, tx["id"], "refunded")
    other = refund(gateway, tx["id"], "key-b", status=409)
    assert other.json["error"]["code"] == "refund_exists"
    assert "refunded" in other.json["error"]["message"]
    # The key bound to another request: refused, not a second refund.
    tx2 = paid(gateway, "254712345603")
    assert refund(gateway, tx2["id"], "key-a", status=422).json["error"]["code"] == \
        "idempotency_key_reused"
    assert sim_count(sim, "reversals") == 1


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 60}], indirect=True)
def test_only_a_succeeded_payment_is_refunded(gateway, sim):
    pending = gateway.push({"phone": "254712345604", "amount": 10}).json
    res = refund(gateway, pending["id"], status=409)
    assert res.json["error"]["code"] == "not_refundable"
    assert "pending" in res.json["error"]["message"]
    assert sim_count(sim, "reversals") == 0


def test_a_failed_payment_is_not_refunded(gateway, sim):
    tx = gateway.push({"phone": "254711000001", "amount": 10}).json
    gateway.wait_status(tx["id"], "failed", timeout=DEADLINE_S)
    assert "failed" in refund(gateway, tx["id"], status=409).json["error"]["message"]


def test_who_may_refund(gateway, sim):
    tx = paid(gateway, "254712345605")
    assert refund(gateway, tx["id"], api_key=OTHER_KEY, status=404).json["error"]["code"] == \
        "not_found"
    assert refund(gateway, tx["id"], api_key=ADMIN, status=403).json["error"]["code"] == \
        "admin_key"
    res = gateway.testapp.post(f"/transactions/{tx['id']}/refund", headers=auth(), status=400)
    assert res.json["error"]["code"] == "idempotency_key_required"
    assert refund(gateway, tx["id"], body={"amount": 5}, status=400).json["error"][
        "code"] == "unknown_field"
    assert refund(gateway, tx["id"], body={"retry": "yes"}, status=400).json["error"][
        "code"] == "invalid_retry"
    assert gateway.testapp.post(f"/transactions/{tx['id']}/refund", b"x",
                                headers=auth(API_KEY, "k"), content_type="text/plain",
                                status=415)
    assert sim_count(sim, "reversals") == 0
    assert gateway.get(tx["id"]).json["refund"] is None


def test_a_paybill_payment_is_refunded_by_its_receipt(gateway, sim):
    api = SimulatorApi(sim.url)
    assert api.register(confirmation=gateway.services.signer.c2b_url("confirmation"),
                        validation=gateway.services.signer.c2b_url("validation")).status == 200
    assert api.simulate(amount=25, bill_ref="INV-R1").status == 200
    receipt = wait_for(lambda: gateway.services.ledger.receipts_page(channel="c2b")[0],
                       timeout=DEADLINE_S, interval=0.1)[0]["receipt"]
    res = gateway.testapp.post(f"/receipts/{receipt}/refund",
                               headers=auth(API_KEY, "c2b-refund"), status=202)
    assert res.json["refund"]["amount"] == 25 and res.json["transaction_id"] is None
    done = wait_for(lambda: (r := gateway.testapp.get(
        f"/receipts/{receipt}", headers=auth()).json["refund"])["status"] == "refunded" and r,
        timeout=DEADLINE_S, interval=0.1)
    assert done["receipt"] != receipt
    assert gateway.testapp.get(f"/receipts/{receipt}", headers=auth(OTHER_KEY), status=404)


@pytest.mark.parametrize("sim_settings", [{"result_delay_s": 0.2}], indirect=True)
def test_a_queue_timeout_is_unknown_never_resent_and_an_operator_retry_settles_it(
        gateway, sim):
    tx = paid(gateway, "254712345606")
    sim.sim.set_initiator(mode="timeout")
    refund(gateway, tx["id"], "t-1")
    unknown = refund_of(gateway, tx["id"], "unknown")
    assert unknown["reason"] == "queue_timeout" and "retry" in unknown["next_step"]
    assert refund(gateway, tx["id"], "t-2", status=409).json["error"]["code"] == \
        "refund_exists"
    assert sim_count(sim, "reversals") == 1  # never sent again by itself
    sim.sim.set_initiator(mode="normal")
    res = refund(gateway, tx["id"], "t-3", body={"retry": True})
    assert res.json["refund"]["attempts"] == 2
    done = refund_of(gateway, tx["id"], "refunded")
    assert done["reason"] is None  # the first never reached the books: this one did it
    assert sim_count(sim, "reversals") == 2


def test_a_result_that_never_comes_becomes_unknown(gateway, sim):
    tx = paid(gateway, "254712345607")
    sim.sim.set_initiator(mode="silent")
    refund(gateway, tx["id"], "s-1")
    assert gateway.get(tx["id"]).json["refund"]["status"] == "pending"
    gateway.clock.advance(initiator.RESULT_WAIT_S + 1)
    gateway.services.new_reconciler().run_once()
    row = gateway.get(tx["id"]).json["refund"]
    assert (row["status"], row["reason"]) == ("unknown", "no_result")
    assert sim_count(sim, "reversals") == 1


def test_a_refund_cut_off_before_daraja_answered_is_unknown_and_never_sent(gateway, sim):
    """As after a SIGKILL between the row and the Daraja call: the row is committed
    `submitting`; recovery calls it unknown (interrupted); nothing is sent by itself."""
    tx = paid(gateway, "254712345608")
    ledger = gateway.services.ledger
    begun = ledger.begin_request(store.NewRequest(
        kind="refund", owner="default", fingerprint=gateway.services.initiator.fingerprint,
        receipt=tx["receipt"], tx_id=tx["id"], amount=10,
        idempotency=store.Idempotency("default", "cut", "h")))
    assert begun.kind == store.Start.NEW
    gateway.clock.advance(gateway.services.daraja.longest_initiator_s + 1)
    gateway.services.new_reconciler().run_once()
    row = gateway.get(tx["id"]).json["refund"]
    assert (row["status"], row["reason"]) == ("unknown", "interrupted")
    assert refund(gateway, tx["id"], "cut-2", status=409).json["error"]["code"] == \
        "refund_exists"
    assert sim_count(sim, "reversals") == 0


# --- a refused initiator stops every call ---------------------------------------------


@pytest.mark.parametrize("gateway_env", [{"MPESA_INITIATOR_PASSWORD": "wrong-password"}],
                         indirect=True)
def test_a_wrong_credential_stops_every_initiator_call_until_the_config_changes(
        gateway, sim, gateway_env):
    tx = paid(gateway, "254712345609")
    refund(gateway, tx["id"], "w-1")
    failed = refund_of(gateway, tx["id"], "failed")
    assert failed["reason"] == "wrong_credential" and "MPESA_INITIATOR_NAME" in \
        failed["message"]
    calls = sim_count(sim, "reversals")
    res = refund(gateway, tx["id"], "w-2", status=503)
    assert res.json["error"]["code"] == "initiator_stopped"
    verify = gateway.testapp.post("/receipts/QKX1A2B3C4/verify", headers=auth(), status=503)
    assert verify.json["error"]["code"] == "initiator_stopped"
    assert sim_count(sim, "reversals") == calls  # nothing more reached Daraja
    balance = gateway.testapp.get("/balance", headers=auth(ADMIN)).json
    assert balance["stopped"]["result_code"] == "2001"
    assert sim_count(sim, "account_balance") == 0
    # An operator who unlocked the operator on the portal may lift the stop as it is.
    import cli

    cfg = config.load_config(dict(gateway_env, MPESA_CALLBACK_BASE_URL=gateway.url))
    assert cli.resume_initiator(cfg) == 0
    assert gateway.services.ledger.initiator_stop(gateway.services.initiator.fingerprint) \
        is None
    assert cli.resume_initiator(cfg) == 0  # nothing to lift: said, not an error
    # The configuration changes (the right password): calls go again.
    import mpesa_wsgi

    env = dict(gateway_env, MPESA_CALLBACK_BASE_URL=gateway.url,
               MPESA_INITIATOR_PASSWORD=simulator.SANDBOX_INITIATOR_PASSWORD)
    fixed = mpesa_wsgi.create_app(config.load_config(env))
    try:
        assert fixed.services.initiator.fingerprint != gateway.services.initiator.fingerprint
        from webtest import TestApp

        # (Its result reaches the first app's socket: the same ledger takes it.)
        res = TestApp(fixed).post(f"/transactions/{tx['id']}/refund",
                                  headers=auth(API_KEY, "w-3"), status=202)
        assert res.json["refund"]["status"] == "pending"
        assert refund_of(gateway, tx["id"], "refunded")
    finally:
        fixed.services.close()


# --- code checks and claims -----------------------------------------------------------


def test_a_code_the_ledger_holds_is_answered_at_once(gateway, sim):
    tx = paid(gateway, "254712345610")
    res = gateway.testapp.post(f"/receipts/{tx['receipt'].lower()}/verify", headers=auth(),
                               status=200)
    assert res.json["verified"]["status"] == "found"
    assert res.json["verified"]["source"] == "ledger"
    assert res.json["verified"]["amount"] == 10
    other = gateway.testapp.post(f"/receipts/{tx['receipt']}/verify", headers=auth(OTHER_KEY),
                                 status=200)
    assert other.json["verified"]["status"] == "found"
    assert "payer" not in other.json["verified"]  # payer details: the owner's only
    assert sim_count(sim, "transaction_status") == 0


def test_a_code_nobody_issued_is_not_found_for_this_shortcode(gateway, sim):
    res = gateway.testapp.post("/receipts/QKX1A2B3C4/verify", headers=auth(), status=202)
    assert res.json["verified"]["status"] == "checking"
    again = gateway.testapp.post("/receipts/QKX1A2B3C4/verify", headers=auth(), status=202)
    assert again.json["verified"]["status"] in ("checking", "not_found")
    done = wait_for(lambda: (r := gateway.testapp.get(
        "/receipts/QKX1A2B3C4", headers=auth()).json["verified"])["status"] != "checking" and r,
        timeout=DEADLINE_S, interval=0.1)
    assert done["status"] == "not_found"
    assert done["message"] == "no such M-Pesa receipt for this shortcode"
    assert sim_count(sim, "transaction_status") == 1
    # Another owner sees nothing of this check.
    gateway.testapp.get("/receipts/QKX1A2B3C4", headers=auth(OTHER_KEY), status=404)
    [event] = [e for e in events_of(gateway.services.ledger, "QKX1A2B3C4")]
    assert json.loads(event["body"])["type"] == "receipt.verified"
    # A code that was never real cannot pay for an order.
    res = gateway.testapp.post_json("/receipts/QKX1A2B3C4/claim", {"reference": "ORDER-1"},
                                    headers=auth(), status=409)
    assert res.json["error"]["code"] == "receipt_not_verified"


@pytest.mark.parametrize("code", ["short", "QKX1A2B3C4!", "A" * 21])
def test_a_malformed_code_is_a_400(gateway, sim, code):
    res = gateway.testapp.post(f"/receipts/{code}/verify", headers=auth(), status=400)
    assert res.json["error"]["code"] == "invalid_receipt"


def test_one_code_pays_for_one_order(gateway, sim):
    tx = paid(gateway, "254712345611")
    path = f"/receipts/{tx['receipt']}/claim"
    first = gateway.testapp.post_json(path, {"reference": "ORDER-1"}, headers=auth(),
                                      status=201)
    assert first.json["claimed_by"]["reference"] == "ORDER-1"
    assert gateway.testapp.post_json(path, {"reference": "ORDER-1"}, headers=auth(),
                                     status=200).json == first.json
    taken = gateway.testapp.post_json(path, {"reference": "ORDER-2"}, headers=auth(),
                                      status=409)
    assert taken.json["error"]["code"] == "receipt_claimed"
    assert gateway.testapp.post_json(path, {"reference": "ORDER-3"}, headers=auth(OTHER_KEY),
                                     status=404)
    for bad in ("bad/ref", "  ", " ORDER-1"):
        assert gateway.testapp.post_json(path, {"reference": bad}, headers=auth(),
                                         status=400)
    shown = gateway.testapp.get(f"/receipts/{tx['receipt'].lower()}", headers=auth()).json
    assert shown["claimed_by"]["reference"] == "ORDER-1" and shown["claimed_by"]["yours"]


def test_a_refunded_code_pays_for_no_order(gateway, sim):
    tx = paid(gateway, "254712345613")
    refund(gateway, tx["id"], "r-claim")
    res = gateway.testapp.post_json(f"/receipts/{tx['receipt']}/claim",
                                    {"reference": "ORDER-9"}, headers=auth(), status=409)
    assert res.json["error"]["code"] == "receipt_refunded"


# --- the balance ------------------------------------------------------------------------


def test_the_balance_is_asked_at_most_every_ten_minutes_and_shown_with_its_age(gateway, sim):
    assert gateway.testapp.get("/balance", headers=auth(), status=403)
    first = gateway.testapp.get("/balance", headers=auth(ADMIN)).json
    assert first["accounts"] is None and first["refreshing"] is True
    shown = wait_for(lambda: (b := gateway.testapp.get(
        "/balance", headers=auth(ADMIN)).json)["accounts"] and b, timeout=DEADLINE_S,
        interval=0.1)
    names = [a["name"] for a in shown["accounts"]]
    assert "Working Account" in names and shown["age_s"] >= 0 and shown["stopped"] is None
    assert shown["last_query"]["status"] == "answered" and shown["refreshing"] is False
    assert sim_count(sim, "account_balance") == 1
    metrics = gateway.testapp.get("/metrics").text
    assert 'mpesa_gateway_account_balance_kes{account="Working Account"}' in metrics
    gateway.clock.advance(600 + 1)
    gateway.testapp.get("/balance", headers=auth(ADMIN))
    wait_for(lambda: sim_count(sim, "account_balance") == 2, timeout=DEADLINE_S)


# --- results: signed, stored before acknowledged ---------------------------------------


def result_body(code=0, **params):
    items = [{"Key": k, "Value": v} for k, v in params.items()]
    return json.dumps({"Result": {
        "ResultType": 0, "ResultCode": code, "ResultDesc": "desc",
        "OriginatorConversationID": "oc-1", "ConversationID": "AG_20261207_1",
        "TransactionID": "XXXXXXXXXX" if code else "RZX0000001",
        "ResultParameters": {"ResultParameter": items[0] if len(items) == 1 else items}}}
    ).encode()


def result_path(gateway, request_id, kind="result"):
    return "/" + gateway.services.signer.result_url(kind, request_id).split("/", 3)[3]


def test_a_forged_or_unsigned_result_is_not_found_and_stores_nothing(gateway, caplog):
    path = result_path(gateway, "rq_0123")
    for bad in (path[:-1] + ("0" if path[-1] != "0" else "1"),
                path.replace("/results/result/", "/results/timeout/"),
                path.replace("/results/result/", "/results/other/")):
        gateway.testapp.post(bad, result_body(), content_type="application/json", status=404)
    assert gateway.services.ledger._read("SELECT * FROM initiator_results") == []
    signature = path.rsplit("/", 1)[1]
    assert signature not in caplog.text


def test_a_result_for_a_request_the_ledger_does_not_know_is_an_anomaly_never_money(gateway):
    res = gateway.testapp.post(result_path(gateway, "rq_unknown"), result_body(),
                               content_type="application/json", status=200)
    assert res.json == {"ResultCode": 0, "ResultDesc": "Accepted"}
    [stored] = gateway.services.ledger._read("SELECT * FROM initiator_results")
    assert stored["outcome"] == "unknown_request"


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"Result": {}}',
                                 b'{"Result": {"ResultCode": {"x": 1}}}'])
def test_a_malformed_result_is_stored_and_refused_and_changes_nothing(gateway, raw):
    begun = gateway.services.ledger.begin_request(store.NewRequest(
        kind="verify", owner="default", fingerprint=gateway.services.initiator.fingerprint,
        receipt="QKX0000011"))
    res = gateway.testapp.post(result_path(gateway, begun.row["id"]), raw,
                               content_type="application/json", status=400)
    assert res.json["error"]["code"] == "invalid_result"
    [stored] = gateway.services.ledger._read("SELECT outcome, body FROM initiator_results")
    assert stored["outcome"] == "malformed" and bytes(stored["body"]) == raw
    assert gateway.services.ledger.request(begun.row["id"])["status"] == "submitting"


def test_a_payer_s_number_in_a_result_is_never_kept_in_clear(gateway, caplog):
    begun = gateway.services.ledger.begin_request(store.NewRequest(
        kind="verify", owner="default", fingerprint=gateway.services.initiator.fingerprint,
        receipt="QKX0000009"))
    gateway.testapp.post(result_path(gateway, begun.row["id"]), result_body(
        0, DebitPartyName="254712345678 - JANE DOE", Amount=50,
        FinalisedTime="20261207101500", TransactionStatus="Completed"),
        content_type="application/json")
    [stored] = gateway.services.ledger._read("SELECT body FROM initiator_results")
    assert b"254712345678" not in bytes(stored["body"])
    shown = gateway.testapp.get("/receipts/QKX0000009", headers=auth()).json["verified"]
    assert shown == dict(shown, status="found", amount=50,
                         completed_at="2026-12-07T07:15:00Z", transaction_status="Completed")
    # The payer only on the caller's own receipt: a code the ledger does not hold is not.
    assert "payer" not in shown
    [kept] = gateway.services.ledger._read("SELECT details FROM initiator_requests")
    assert "2547******678 - JANE DOE" in kept["details"] and "254712345678" not in kept[
        "details"]
    assert "254712345678" not in caplog.text


def test_a_result_while_the_ledger_is_away_is_spooled_acknowledged_and_applied_once(
        gateway, outage):
    begun = gateway.services.ledger.begin_request(store.NewRequest(
        kind="verify", owner="default", fingerprint=gateway.services.initiator.fingerprint,
        receipt="QKX0000010"))
    outage.begin()
    try:
        res = gateway.testapp.post(result_path(gateway, begun.row["id"]), result_body(2032),
                                   content_type="application/json", status=200)
        assert res.json["ResultCode"] == 0
        [entry] = gateway.services.spool.pending()
    finally:
        outage.end()
    ledger = gateway.services.ledger

    def settled():
        try:
            row = ledger.request(begun.row["id"])
        except ledger.Error:
            return None
        return row if row["status"] == "succeeded" else None

    assert wait_for(settled, timeout=60, interval=0.2)["reason"] == "not_found"
    wait_for(lambda: gateway.services.spool.depth() == 0, timeout=60, interval=0.2)
    recording.apply(ledger, entry)  # the same entry again: never twice
    assert [r["outcome"] for r in ledger._read("SELECT outcome FROM initiator_results")] == [
        "not_found"]


# --- without an initiator: a clear 501, and everything else as before ---------------------


@pytest.fixture
def plain_gateway_env(gateway_env):
    return {k: v for k, v in gateway_env.items() if not k.startswith(
        ("MPESA_INITIATOR", "MPESA_CERT", "MPESA_SECURITY"))}


def test_without_an_initiator_these_features_say_which_settings_and_payments_go_on(
        plain_gateway_env, gateway_env, sim):
    from webtest import TestApp

    import mpesa_wsgi

    app = mpesa_wsgi.create_app(config.load_config(plain_gateway_env))
    try:
        t = TestApp(app)
        for method, path, key in (("POST", "/transactions/tx_1/refund", API_KEY),
                                  ("POST", "/receipts/QKX1A2B3C4/verify", API_KEY),
                                  ("POST", "/receipts/QKX1A2B3C4/refund", API_KEY),
                                  ("GET", "/balance", ADMIN)):
            res = t.request(path, method=method, headers=auth(key, "k"), status=501)
            assert res.json["error"]["code"] == "initiator_not_configured", path
            assert "MPESA_INITIATOR_NAME" in res.json["error"]["message"]
        assert t.post_json("/stkpush", {"phone": "254712345612", "amount": 1},
                           headers=auth(), status=202)
    finally:
        app.services.close()


# --- the credential ------------------------------------------------------------------


def test_the_credential_is_made_from_the_password_and_the_certificate(sim, tmp_path):
    """RSA PKCS#1 v1.5 with the certificate's key: randomised, one key-length block; the
    simulator decrypting it is the refunds above (and 2001 with a wrong password)."""
    import base64

    pem = sim.sim.initiator_certificate_pem()
    made = initiator.encrypt_password("Safaricom123!!", pem)
    assert len(base64.b64decode(made)) == 256  # a 2048-bit key's block
    assert made != initiator.encrypt_password("Safaricom123!!", pem)  # randomised padding
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    assert len(base64.b64decode(initiator.encrypt_password("p", der))) == 256  # a .cer too
    with pytest.raises(config.ConfigError, match="not an X.509 certificate"):
        initiator.encrypt_password("p", b"not a certificate")


@pytest.mark.parametrize("changes, problem", [
    ({"MPESA_INITIATOR_NAME": "api"}, "needs MPESA_SECURITY_CREDENTIAL"),
    ({"MPESA_SECURITY_CREDENTIAL": "abc"}, "MPESA_INITIATOR_NAME is required"),
    ({"MPESA_INITIATOR_NAME": "api", "MPESA_SECURITY_CREDENTIAL": "abc",
      "MPESA_INITIATOR_PASSWORD": "p"}, "set one of them"),
    ({"MPESA_INITIATOR_NAME": "api", "MPESA_INITIATOR_PASSWORD": "p",
      "MPESA_CERT_FILE": "/nonexistent.cer"}, "MPESA_CERT_FILE is not a readable file"),
])
def test_initiator_settings_go_together(gateway_env, plain_gateway_env, changes, problem):
    with pytest.raises(config.ConfigError) as caught:
        config.load_config(dict(plain_gateway_env, **changes))
    assert problem in str(caught.value)
    assert "abc" not in str(caught.value) and "Safaricom" not in str(caught.value)


def test_secrets_of_the_initiator_are_masked(gateway_env):
    cfg = config.load_config(dict(gateway_env))
    shown = cfg.by_variable()
    assert shown["MPESA_INITIATOR_PASSWORD"] == config.MASK
    assert simulator.SANDBOX_INITIATOR_PASSWORD in cfg.secret_values()
    assert simulator.SANDBOX_INITIATOR_PASSWORD not in repr(cfg)


def test_without_the_cryptography_package_one_clear_message(gateway_env, tmp_path):
    """A password and a certificate need the optional extra: said in one line at start."""
    script = ("import sys; sys.modules['cryptography'] = None\n"
              "import config, json\n"
              "from mpesa_gateway import initiator\n"
              "env = json.loads(sys.argv[1])\n"
              "try:\n"
              "    initiator.from_config(config.load_config(env))\n"
              "except config.ConfigError as exc:\n"
              "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(gateway_env)],
                         cwd=ROOT_DIR, capture_output=True, text=True, timeout=60)
    assert "pip install 'mpesa-wsgi[initiator]'" in out.stdout, out.stderr
    assert simulator.SANDBOX_INITIATOR_PASSWORD not in out.stdout + out.stderr


def test_a_result_parameter_may_be_one_object_or_a_list():
    one = initiator.from_raw(result_body(0, Amount="10.00"))
    many = initiator.from_raw(result_body(0, Amount=10, ReceiptNo="RZX0000001"))
    assert one.parameters == {"Amount": "10.00"} and initiator.amount_of("10.00") == 10
    assert many.parameters["ReceiptNo"] == "RZX0000001"
    failure = initiator.from_raw(result_body("R000002"))
    assert failure.code == "R000002" and failure.transaction_id is None
    assert initiator.from_raw(b'{"Result": {"ResultCode": null}}') is None
    assert initiator.balances("Working Account|KES|700000.00|700000.00|0.00|0.00&Utility"
                              " Account|KES|228037.00|228037.00|0.00|0.00&junk")[1] == {
        "name": "Utility Account", "currency": "KES", "available": 228037.0,
        "uncleared": 228037.0, "reserved": 0.0, "unreserved": 0.0}


def test_result_urls_carry_no_daraja_keyword_and_differ_per_kind_and_request():
    signer = CallbackSigner("s" * 32, "https://pay.example.com")
    urls = {signer.result_url(k, r) for k in ("result", "timeout") for r in ("rq_1", "rq_2")}
    assert len(urls) == 4
    for url in urls:
        assert not any(word in url.lower() for word in (
            "mpesa", "m-pesa", "safaricom", "exe", "cmd", "sql", "query"))
    assert signer.result_signature("result", "rq_1") != signer.signature("rq_1")


# --- the client: what each answer means (a scripted fake Daraja) -----------------------------

ACK = {"OriginatorConversationID": "5118-111210482-1", "ConversationID": "AG_20261207_2010",
       "ResponseCode": "0", "ResponseDescription": "Accept the service request successfully."}


@pytest.fixture
def fake_client(tmp_path):
    import fake_daraja as fake
    from helpers import base_env
    from mpesa_gateway import daraja

    made = []

    def make(**script):
        server = fake.FakeDaraja(**script)
        cfg = config.load_config(dict(base_env(server.url, tmp_path / "c.db"),
                                      MPESA_CONNECT_TIMEOUT="0.3", MPESA_READ_TIMEOUT="0.3"))
        client = daraja.DarajaClient(cfg, daraja.build_pool(cfg))
        made.append((server, client))
        return server, client

    yield make
    for server, client in made:
        client.close()
        server.close()
        assert server.unexpected == []


def reverse(client):
    who = initiator.Initiator("api", "credential", "fp")
    return client.reversal(initiator=who, receipt="UKQ0000001", amount=10,
                           receiver_party="174379", result_url="http://127.0.0.1:9/r",
                           timeout_url="http://127.0.0.1:9/t", remarks="Refund")


def test_an_acknowledgement_carries_daraja_s_ids(fake_client):
    import fake_daraja as fake

    server, client = fake_client(oauth=[fake.token()], reversal=[fake.reply(200, ACK)])
    ack = reverse(client)
    assert (ack.conversation_id, ack.originator_conversation_id) == (
        "AG_20261207_2010", "5118-111210482-1")
    [sent] = [json.loads(r[4]) for r in server.requests if r[0] == "reversal"]
    assert sent["RecieverIdentifierType"] == "11" and sent["CommandID"] == "TransactionReversal"
    assert sent["Amount"] == "10" and sent["SecurityCredential"] == "credential"


def test_a_reversal_that_may_have_been_sent_is_never_resent(fake_client):
    import fake_daraja as fake
    from mpesa_gateway import daraja

    server, client = fake_client(oauth=[fake.token()], reversal=[fake.sleep(2)])
    with pytest.raises(daraja.DarajaError) as caught:
        reverse(client)
    assert caught.value.outcome == daraja.UNKNOWN
    assert server.count("reversal") == 1


def test_an_invalid_token_is_refreshed_and_the_request_sent_once_more(fake_client):
    import fake_daraja as fake

    server, client = fake_client(
        oauth=[fake.token("t1"), fake.token("t2")],
        reversal=[fake.error(404, "404.001.03", "Invalid Access Token"), fake.reply(200, ACK)])
    assert reverse(client).conversation_id == "AG_20261207_2010"
    assert server.count("reversal") == 2 and server.count("oauth") == 2


@pytest.mark.parametrize("answer, outcome", [
    (("error", 500, "500.003.02", "Spike Arrest Violation"), "unavailable"),
    (("error", 400, "400.002.02", "Bad Request - Invalid Remarks"), "rejected"),
    (("reply", 200, {"ResponseCode": "1", "ResponseDescription": "no"}), "rejected"),
    (("error", 500, "500.003.1001", "Internal Server Error"), "unknown"),
])
def test_what_a_refusal_means(fake_client, answer, outcome):
    import fake_daraja as fake
    from mpesa_gateway import daraja

    step = fake.error(*answer[1:]) if answer[0] == "error" else fake.reply(*answer[1:])
    _, client = fake_client(oauth=[fake.token()], reversal=[step])
    with pytest.raises(daraja.DarajaError) as caught:
        reverse(client)
    assert caught.value.outcome == outcome


def test_a_retry_of_a_reversal_that_was_done_is_recorded_refunded_not_paid_twice(gateway, sim):
    """Daraja did the reversal but its result never came (unknown/no_result); the operator's
    retry is answered R000001 'already reversed': the refund is refunded, once."""
    tx = paid(gateway, "254712345614")
    sim.sim.set_initiator(mode="silent")  # processed, the result never sent
    refund(gateway, tx["id"], "d-1")
    gateway.clock.advance(initiator.RESULT_WAIT_S + 1)
    gateway.services.new_reconciler().run_once()
    assert refund_of(gateway, tx["id"], "unknown")["reason"] == "no_result"
    sim.sim.set_initiator(mode="normal")
    refund(gateway, tx["id"], "d-2", body={"retry": True})
    done = refund_of(gateway, tx["id"], "refunded")
    assert done["reason"] == "already_reversed" and done["attempts"] == 2
    assert done["message"] == "the payment was already reversed"
    reversals = [r for api, r in sim.sim.initiator_requests if api == "reversal"]
    assert reversals == [tx["receipt"], tx["receipt"]]  # the retry only: asked, not paid twice


# --- more of what can go wrong -----------------------------------------------------------


@pytest.fixture
def second_gateway(gateway_env, tmp_path):
    """another_gateway(**env changes): the same settings, served on its own socket (its
    results come to it), e.g. its own ledger, or a Daraja that cannot be reached."""
    from webtest import TestApp

    from helpers import served_gateway

    with contextlib.ExitStack() as made:
        def make(**changes):
            handle = made.enter_context(served_gateway(dict(gateway_env, **changes)))
            return TestApp(handle.app), handle.services

        yield make


def test_a_code_paid_elsewhere_is_found_by_transaction_status_and_may_be_claimed(
        gateway, sim, second_gateway, tmp_path):
    """Paid through one gateway (its ledger holds the receipt); checked at another whose
    ledger does not: Daraja's Transaction Status says it is real, for how much."""
    tx = paid(gateway, "254712345615", amount=37)
    other, _ = second_gateway(GATEWAY_DB=str(tmp_path / "elsewhere.db"),
                              GATEWAY_SPOOL_DIR=str(tmp_path / "elsewhere-spool"))
    assert other.post(f"/receipts/{tx['receipt']}/verify", headers=auth(),
                      status=202).json["verified"]["status"] == "checking"
    found = wait_for(lambda: (v := other.get(f"/receipts/{tx['receipt']}", headers=auth())
                              .json["verified"])["status"] == "found" and v,
                     timeout=DEADLINE_S, interval=0.1)
    assert found["amount"] == 37 and found["transaction_status"] == "Completed"
    assert "payer" not in found  # not a receipt this gateway holds for the caller
    assert other.post_json(f"/receipts/{tx['receipt']}/claim", {"reference": "ORDER-7"},
                           headers=auth(), status=201)
    assert sim_count(sim, "transaction_status") == 1


def test_a_refund_daraja_cannot_take_frees_its_key(gateway, sim, second_gateway):
    tx = paid(gateway, "254712345616")
    away, services = second_gateway(MPESA_BASE_URL="http://127.0.0.1:9")  # nothing listens
    res = away.post(f"/transactions/{tx['id']}/refund", headers=auth(API_KEY, "free-me"),
                    status=503)
    assert "nothing was done" in res.json["error"]["message"]
    failed = gateway.get(tx["id"]).json["refund"]
    assert (failed["status"], failed["reason"]) == ("failed", "upstream_unavailable")
    # Nothing was sent: the same key may try again, and now it goes.
    assert refund(gateway, tx["id"], "free-me").json["refund"]["status"] == "pending"
    assert refund_of(gateway, tx["id"], "refunded")
    assert sim_count(sim, "reversals") == 1
    types = [json.loads(e["body"])["type"] for e in events_of(gateway.services.ledger, tx["id"])]
    assert types.count("payment.refund_failed") == 1 and types.count("payment.refunded") == 1


def test_a_retry_that_cannot_be_sent_leaves_the_refund_unknown_not_failed(
        gateway, sim, second_gateway):
    tx = paid(gateway, "254712345617")
    sim.sim.set_initiator(mode="silent")  # done, but nobody is told
    refund(gateway, tx["id"], "u-1")
    gateway.clock.advance(initiator.RESULT_WAIT_S + 1)
    gateway.services.new_reconciler().run_once()
    away, _ = second_gateway(MPESA_BASE_URL="http://127.0.0.1:9")
    res = away.post_json(f"/transactions/{tx['id']}/refund", {"retry": True},
                         headers=auth(API_KEY, "u-2"), status=503)
    assert "still not known" in res.json["error"]["message"]
    still = gateway.get(tx["id"]).json["refund"]
    assert (still["status"], still["reason"]) == ("unknown", "retry_not_sent")
    assert refund(gateway, tx["id"], "u-3", status=409).json["error"]["code"] == "refund_exists"


def test_a_receipt_daraja_does_not_know_is_not_reversed(gateway, sim):
    """A Paybill receipt Safaricom told the gateway of, unknown to this Daraja: R000002."""
    body = json.dumps({"TransactionType": "Pay Bill", "TransID": "RKZ0000099",
                       "TransTime": "20261207101500", "TransAmount": "40.00",
                       "BusinessShortCode": PAYBILL, "BillRefNumber": "INV-Z",
                       "MSISDN": "2547 ***** 126",
                       "FirstName": "A"}).encode()
    gateway.testapp.post("/" + gateway.services.signer.c2b_url("confirmation").split("/", 3)[3],
                         body, content_type="application/json", status=200)
    gateway.testapp.post("/receipts/RKZ0000099/refund", headers=auth(OTHER_KEY, "x"),
                         status=404)  # another owner's receipt does not exist for them
    gateway.testapp.post("/receipts/RKZ0000099/refund", headers=auth(API_KEY, "z-1"),
                         status=202)
    failed = wait_for(lambda: (r := gateway.testapp.get(
        "/receipts/RKZ0000099", headers=auth()).json["refund"])["status"] == "failed" and r,
        timeout=DEADLINE_S, interval=0.1)
    assert failed["reason"] == "invalid_receipt" and failed["completed_at"]
    [event] = [json.loads(e["body"]) for e in events_of(gateway.services.ledger, "RKZ0000099")
               if e["type"] == "payment.refund_failed"]
    assert event["data"]["receipt"] == "RKZ0000099" and event["data"]["transaction_id"] is None
    # A definite failure: another refund may be asked (and is refused the same way).
    assert gateway.testapp.post("/receipts/RKZ0000099/refund", headers=auth(API_KEY, "z-2"),
                                status=202)


def test_a_rush_of_refunds_of_one_payment_sends_one(gateway, sim):
    tx = paid(gateway, "254712345618")
    answers = at_once(8, lambda n: gateway.testapp.post(
        f"/transactions/{tx['id']}/refund", headers=auth(API_KEY, f"rush-{n % 2}"),
        expect_errors=True))
    codes = sorted(a.status_int for a in answers.values())
    assert codes.count(202) >= 1 and set(codes) <= {202, 409}, codes
    refund_of(gateway, tx["id"], "refunded")
    assert sim_count(sim, "reversals") == 1


@pytest.mark.parametrize("sim_settings", [{"result_delay_s": 0.2}], indirect=True)
def test_a_locked_initiator_stops_every_call(gateway, sim):
    """Five wrong credentials elsewhere (the shared sandbox operator): Daraja answers 8006;
    the gateway stops at once, and says what to do."""
    api = SimulatorApi(sim.url)
    for _ in range(5):
        assert api.call("/mpesa/accountbalance/v1/query", {
            "Initiator": "testapi", "SecurityCredential": "bm90IGEgY3JlZGVudGlhbA==",
            "CommandID": "AccountBalance", "PartyA": "174379", "IdentifierType": "4",
            "Remarks": "ok", "QueueTimeOutURL": "http://127.0.0.1:9/t",
            "ResultURL": "http://127.0.0.1:9/r"}).status == 200
    wait_for(lambda: sim.sim.initiator()["locked"], timeout=DEADLINE_S, interval=0.1)
    gateway.testapp.post("/receipts/QKX1A2B3C5/verify", headers=auth(), status=202)
    failed = wait_for(lambda: (v := gateway.testapp.get(
        "/receipts/QKX1A2B3C5", headers=auth()).json["verified"])["status"] == "failed" and v,
        timeout=DEADLINE_S, interval=0.1)
    assert failed["reason"] == "initiator_locked" and "unlock" in failed["message"]
    res = gateway.testapp.post("/receipts/QKX1A2B3C6/verify", headers=auth(), status=503)
    assert res.json["error"]["code"] == "initiator_stopped" and "8006" in res.json[
        "error"]["message"]


def test_a_timeout_whatever_its_body_is_unknown_and_an_interim_result_decides_nothing(
        gateway):
    ledger = gateway.services.ledger
    first = ledger.begin_request(store.NewRequest(
        kind="verify", owner="default", fingerprint=gateway.services.initiator.fingerprint,
        receipt="QKX0000012")).row
    gateway.testapp.post(result_path(gateway, first["id"], "timeout"), b"<html>gateway"
                         b" timeout</html>", content_type="text/html", status=200)
    row = ledger.request(first["id"])
    assert (row["status"], row["reason"]) == ("unknown", "queue_timeout")
    second = ledger.begin_request(store.NewRequest(
        kind="verify", owner="default", fingerprint=gateway.services.initiator.fingerprint,
        receipt="QKX0000013")).row
    interim = json.loads(result_body(0, Amount=5))
    interim["Result"]["ResultType"] = 1
    gateway.testapp.post(result_path(gateway, second["id"]), json.dumps(interim),
                         content_type="application/json", status=200)
    assert ledger.request(second["id"])["status"] == "submitting"


def test_a_key_whose_first_answer_was_never_stored_gets_the_refund_as_it_is(gateway, sim):
    """The process died after the row and before the answer was stored: the same key later
    gets the refund's state (unknown), not 'in progress' forever."""
    tx = paid(gateway, "254712345619")
    begun = gateway.services.ledger.begin_request(store.NewRequest(
        kind="refund", owner="default", fingerprint=gateway.services.initiator.fingerprint,
        receipt=tx["receipt"], tx_id=tx["id"], amount=10,
        idempotency=__import__("mpesa_gateway.refunds", fromlist=["x"]).refund_key(
            "died", "default", tx["receipt"], False)))
    assert refund(gateway, tx["id"], "died", status=409).json["error"]["code"] == \
        "idempotency_key_in_use"  # still being sent, as far as anyone knows
    gateway.clock.advance(gateway.services.daraja.longest_initiator_s + 1)
    gateway.services.new_reconciler().run_once()
    res = refund(gateway, tx["id"], "died")
    assert res.json["refund"]["status"] == "unknown" and res.json["refund"]["id"] == \
        begun.row["id"]
    assert res.headers["Idempotent-Replayed"] == "true"
    assert sim_count(sim, "reversals") == 0


def test_a_code_safaricom_says_was_reversed_pays_for_no_order(gateway):
    begun = gateway.services.ledger.begin_request(store.NewRequest(
        kind="verify", owner="default", fingerprint=gateway.services.initiator.fingerprint,
        receipt="QKX0000014"))
    gateway.testapp.post(result_path(gateway, begun.row["id"]), result_body(
        0, Amount=50, TransactionStatus="Reversed"), content_type="application/json")
    res = gateway.testapp.post_json("/receipts/QKX0000014/claim", {"reference": "ORDER-5"},
                                    headers=auth(), status=409)
    assert res.json["error"]["code"] == "receipt_not_verified"
    assert "Reversed" in res.json["error"]["message"]


def test_one_request_at_a_time_until_a_result_proves_the_credential(gateway, sim):
    """A wrong credential sent in a burst locks the operator: until a first result says
    the credential works, the gateway sends one initiator request at a time."""
    sim.sim.set_initiator(mode="silent")  # the first request's result never comes
    assert gateway.testapp.post("/receipts/QKX1A2B3C7/verify", headers=auth(), status=202)
    res = gateway.testapp.post("/receipts/QKX1A2B3C8/verify", headers=auth(), status=503)
    assert res.json["error"]["code"] == "initiator_unproven" and res.headers["Retry-After"]
    assert sim_count(sim, "transaction_status") == 1


def test_a_refund_s_own_receipt_is_no_payment(gateway, sim):
    """The reversal SMS shown at a counter as if it were a payment: found, as a reversal,
    and no order may be claimed with it."""
    tx = paid(gateway, "254712345620")
    refund(gateway, tx["id"], "own-1")
    reversal = refund_of(gateway, tx["id"], "refunded")["receipt"]
    said = gateway.testapp.post(f"/receipts/{reversal}/verify", headers=auth(),
                                status=200).json["verified"]
    assert said["reversal_of"] == tx["receipt"] and said["source"] == "ledger"
    res = gateway.testapp.post_json(f"/receipts/{reversal}/claim", {"reference": "STEAL"},
                                    headers=auth(), status=409)
    assert res.json["error"]["code"] == "receipt_not_a_payment"


@pytest.mark.parametrize("body, code", [("null", "invalid_body"), ("[]", "invalid_body"),
                                        ('"x"', "invalid_body")])
def test_a_refund_body_that_is_not_an_object_is_refused(gateway, sim, body, code):
    tx = paid(gateway, "254712345621")
    res = gateway.testapp.post(f"/transactions/{tx['id']}/refund", body,
                               headers=auth(API_KEY, "b-1"), content_type="application/json",
                               status=400)
    assert res.json["error"]["code"] == code
    assert sim_count(sim, "reversals") == 0


@pytest.mark.parametrize("code", ["QKX1A2B%DF", "QKX1A2B%C3%9F"])  # ß is not an M-Pesa letter
def test_a_code_with_a_letter_from_another_alphabet_is_a_400(gateway, sim, code):
    assert gateway.testapp.post(f"/receipts/{code}/verify", headers=auth(), status=400)
    assert sim_count(sim, "transaction_status") == 0


def test_a_phone_sent_as_a_number_is_masked_and_the_result_still_applies(gateway):
    begun = gateway.services.ledger.begin_request(store.NewRequest(
        kind="verify", owner="default", fingerprint=gateway.services.initiator.fingerprint,
        receipt="QKX0000015"))
    body = json.loads(result_body(0, Amount=5, TransactionStatus="Completed"))
    body["Result"]["ResultParameters"]["ResultParameter"].append(
        {"Key": "ReceiverMsisdn", "Value": 254712345678})
    gateway.testapp.post(result_path(gateway, begun.row["id"]), json.dumps(body),
                         content_type="application/json", status=200)
    [stored] = gateway.services.ledger._read("SELECT outcome, body FROM initiator_results")
    assert stored["outcome"] == "verified" and b"254712345678" not in bytes(stored["body"])
    assert json.loads(bytes(stored["body"]))  # still JSON
