"""Callbacks are untrusted input: source checks, signatures, malformed bodies, orderings.

Addresses here are loopback ones standing in for Safaricom's: 127.0.0.2 is
"Safaricom", 127.0.0.1 the trusted proxy, anything else an outsider.
"""

import json
import sqlite3
import threading

import pytest
from webtest import TestApp

import config
import mpesa_wsgi
from helpers import API_KEY, callbacks_of, wait_for
from mpesa_devtools import simulator
from mpesa_gateway import sources


@pytest.fixture
def sim_settings():
    """The simulator's own callback comes much later than these tests run."""
    return simulator.SimSettings(callback_delay_s=60)


SAFARICOM, PROXY, OUTSIDER = "127.0.0.2", "127.0.0.1", "127.0.0.9"


@pytest.fixture
def make(gateway_env):
    apps = []

    def build(policy="enforce", **env):
        app = mpesa_wsgi.create_app(config.load_config(dict(
            gateway_env, MPESA_CALLBACK_IP_POLICY=policy, MPESA_CALLBACK_IPS=SAFARICOM,
            GATEWAY_TRUSTED_PROXY=PROXY, **env)))
        apps.append(app)
        testapp = TestApp(app, lint=True)
        tx = testapp.post_json("/stkpush", {"phone": "0712345678", "amount": 10}, headers={
            "Authorization": f"Bearer {API_KEY}"}, status=202).json
        path = "/" + app.services.signer.url(tx["id"]).split("/", 3)[3]
        return app, testapp, tx, path

    yield build
    for app in apps:
        app.services.close()


def result(tx, code=0, amount=10.0, receipt="UKQ1234567"):
    stk = {"MerchantRequestID": tx["merchant_request_id"],
           "CheckoutRequestID": tx["checkout_request_id"], "ResultCode": code,
           "ResultDesc": "x"}
    if code == 0:
        stk["CallbackMetadata"] = {"Item": [
            {"Name": "Amount", "Value": amount}, {"Name": "MpesaReceiptNumber", "Value": receipt},
            {"Name": "Balance"}]}
    return json.dumps({"Body": {"stkCallback": stk}}).encode()


def send(testapp, path, body, remote=SAFARICOM, status=200, **headers):
    return testapp.post(path, body, content_type="application/json;charset=UTF-8",
                        extra_environ={"REMOTE_ADDR": remote}, headers=headers, status=status)


def test_source_outside_the_list_is_403_under_enforce_and_nothing_stored(make, caplog):
    app, testapp, tx, path = make("enforce")
    res = send(testapp, path, result(tx), remote=OUTSIDER, status=403)
    assert res.json["error"]["code"] == "forbidden_source"
    assert callbacks_of(app.services.ledger, tx["id"]) == []
    assert app.services.ledger.get(tx["id"])["status"] == "pending"
    assert any(OUTSIDER in r.getMessage() for r in caplog.records)


def test_listed_source_is_accepted_under_enforce(make):
    app, testapp, tx, path = make("enforce")
    send(testapp, path, result(tx))
    assert app.services.ledger.get(tx["id"])["status"] == "succeeded"
    assert callbacks_of(app.services.ledger, tx["id"])[0]["remote_addr"] == SAFARICOM


def test_log_policy_accepts_but_logs_an_outsider(make, caplog):
    app, testapp, tx, path = make("log")
    send(testapp, path, result(tx), remote=OUTSIDER)
    assert app.services.ledger.get(tx["id"])["status"] == "succeeded"
    assert any("source_not_allowed" in r.getMessage() and OUTSIDER in r.getMessage()
               for r in caplog.records)


def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(make):
    app, testapp, tx, path = make("enforce")
    send(testapp, path, result(tx), remote=OUTSIDER, status=403, **{"X-Forwarded-For": SAFARICOM})
    assert callbacks_of(app.services.ledger, tx["id"]) == []


def test_trusted_proxy_hop_is_believed_and_earlier_hops_are_not(make):
    app, testapp, tx, path = make("enforce")
    # The caller wrote "Safaricom" first; the proxy appended the real peer, an outsider.
    send(testapp, path, result(tx), remote=PROXY, status=403,
         **{"X-Forwarded-For": f"{SAFARICOM}, {OUTSIDER}"})
    send(testapp, path, result(tx), remote=PROXY, **{"X-Forwarded-For": f"{OUTSIDER}, {SAFARICOM}"})
    assert app.services.ledger.get(tx["id"])["status"] == "succeeded"


def test_client_address_rules():
    nets = config.address_list("127.0.0.1")
    env = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "127.0.0.5, 127.0.0.6"}
    assert sources.client_address(env, nets) == "127.0.0.6"
    assert sources.client_address(env, ()) == "127.0.0.1"
    assert sources.client_address(dict(env, HTTP_X_FORWARDED_FOR="nonsense"), nets) == "127.0.0.1"
    assert sources.within("::ffff:127.0.0.1", nets)
    assert not sources.within("", nets) and not sources.within("garbage", nets)


def test_default_list_is_safaricoms_published_union():
    defaults = config.address_list(",".join(config.SAFARICOM_CALLBACK_IPS))
    assert len(defaults) == 15
    assert sources.within("196.201.212.69", defaults)  # where callbacks were observed from


@pytest.mark.parametrize("body", [
    b"{not json", b'{"Body": "nope"}', b"[" * 5000 + b"]" * 5000,
    json.dumps({"Body": {"stkCallback": {"CheckoutRequestID": ["x"], "ResultCode": 0}}}).encode(),
])
def test_malformed_callbacks_are_stored_answered_400_and_applied_never(make, body):
    app, testapp, tx, path = make("off")
    res = send(testapp, path, body, status=400)
    assert res.json["error"]["code"] == "invalid_callback"
    stored = callbacks_of(app.services.ledger, tx["id"])
    assert [(c["outcome"], c["body"]) for c in stored] == [("malformed", body)]
    assert app.services.ledger.get(tx["id"])["status"] == "pending"


def test_oversized_callback_is_413_and_not_stored(make):
    app, testapp, tx, path = make("off")
    send(testapp, path, b'{"pad":"' + b"x" * 20_000 + b'"}', status=413)
    assert callbacks_of(app.services.ledger, tx["id"]) == []


def test_wrong_signature_is_404_and_stores_nothing(make):
    app, testapp, tx, path = make("enforce")
    bad = path[:-1] + ("0" if path[-1] != "0" else "1")
    res = send(testapp, bad, result(tx), status=404)
    assert res.json["error"]["code"] == "not_found"
    assert callbacks_of(app.services.ledger, tx["id"]) == []


def test_failure_then_success_ends_succeeded(make):
    app, testapp, tx, path = make("off")
    send(testapp, path, result(tx, code=1032))
    assert app.services.ledger.get(tx["id"])["status"] == "failed"
    send(testapp, path, result(tx))
    row = app.services.ledger.get(tx["id"])
    assert (row["status"], row["receipt"]) == ("succeeded", "UKQ1234567")
    assert [c["outcome"] for c in callbacks_of(app.services.ledger, tx["id"])] == [
        "applied", "override"]


def test_success_then_failure_stays_succeeded(make):
    app, testapp, tx, path = make("off")
    send(testapp, path, result(tx))
    send(testapp, path, result(tx, code=1037))
    assert app.services.ledger.get(tx["id"])["status"] == "succeeded"
    assert [c["outcome"] for c in callbacks_of(app.services.ledger, tx["id"])] == [
        "applied", "ignored"]


@pytest.mark.parametrize("bad", [{"amount": 11.0}, {"receipt": None}])
def test_success_that_does_not_verify_is_an_anomaly_not_a_payment(make, bad):
    app, testapp, tx, path = make("off")
    send(testapp, path, result(tx, **bad))
    assert app.services.ledger.get(tx["id"])["status"] == "pending"
    assert callbacks_of(app.services.ledger, tx["id"])[0]["outcome"] == "anomaly"


def test_concurrent_duplicate_callbacks_apply_once(make):
    app, testapp, tx, path = make("off")
    barrier = threading.Barrier(8)

    def deliver():
        barrier.wait()
        send(testapp, path, result(tx))

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    outcomes = sorted(c["outcome"] for c in callbacks_of(app.services.ledger, tx["id"]))
    assert outcomes == ["applied"] + ["duplicate"] * 7


def test_a_callback_while_the_ledger_is_locked_is_spooled_acknowledged_then_applied(make):
    app, testapp, tx, path = make("off", GATEWAY_DB_WAIT_S="0.2")  # a short busy wait
    holder = sqlite3.connect(app.services.config.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        res = send(testapp, path, result(tx))  # stored (in the spool): acknowledged
        assert res.json == {"ResultCode": 0, "ResultDesc": "Accepted"}
        assert app.services.spool.depth() == 1
        assert callbacks_of(app.services.ledger, tx["id"]) == []  # not in the ledger yet
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_for(lambda: app.services.ledger.get(tx["id"])["status"] == "succeeded", timeout=30)
    assert [c["outcome"] for c in callbacks_of(app.services.ledger, tx["id"])] == ["applied"]
    assert app.services.spool.depth() == 0


def test_a_callback_neither_the_ledger_nor_the_spool_can_take_is_503(make, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    app, testapp, tx, path = make("off", GATEWAY_DB_WAIT_S="0.2",
                                  GATEWAY_SPOOL_DIR=str(tmp_path / "a-file" / "spool"))
    holder = sqlite3.connect(app.services.config.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        res = send(testapp, path, result(tx), status=503)  # not stored: not acknowledged
        assert res.json["error"]["code"] == "ledger_unavailable"
        assert int(res.headers["Retry-After"]) > 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # Kept in this process's memory meanwhile (said loudly): applied once the file is free.
    wait_for(lambda: app.services.ledger.get(tx["id"])["status"] == "succeeded", timeout=30)
    assert [c["outcome"] for c in callbacks_of(app.services.ledger, tx["id"])] == ["applied"]

