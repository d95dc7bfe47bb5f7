"""The framework versions in bench/ serve the same API as the raw WSGI gateway.

The core end-to-end cases run against all three apps, each served on a real loopback
socket (so the simulator's callbacks reach it) and driven through WebTest.
"""

import pytest
from webtest import TestApp

import config
import mpesa_wsgi
from bench import falcon_app, flask_app
from helpers import API_KEY, LateApp, callbacks_of, serve, wait_for

FACTORIES = {"raw": mpesa_wsgi.create_app, "flask": flask_app.create_app,
             "falcon": falcon_app.create_app}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def core_of(app):
    """The services under a variant: the raw app's, Falcon's attribute, Flask's extension."""
    return getattr(app, "services", None) or getattr(app, "mpesa_gateway", None) or getattr(
        app, "extensions", {}).get("mpesa_gateway")


def served(name, env):
    """One variant on a real loopback socket: (WebTest app, its services, shut down)."""
    late = LateApp()
    server, url = serve(late)
    late.app = FACTORIES[name](config.load_config(dict(env, MPESA_CALLBACK_BASE_URL=url)))

    def stop():
        server.shutdown()
        core_of(late.app).close()
    return TestApp(late.app), core_of(late.app), stop


@pytest.fixture(params=sorted(FACTORIES))
def variant(request, gateway_env):
    t, core, stop = served(request.param, gateway_env)
    yield t, core
    stop()


@pytest.fixture(params=sorted(FACTORIES))
def hooked_variant(request, gateway_env):
    """A variant that writes webhook events (for an endpoint never called: no sender)."""
    t, core, stop = served(request.param, dict(
        gateway_env, GATEWAY_WEBHOOK_URLS="default:http://127.0.0.1:9/events",
        GATEWAY_WEBHOOK_SECRETS="default:whsec_" + "A" * 32,
        GATEWAY_WEBHOOK_ALLOW_PRIVATE="on", GATEWAY_WEBHOOK_SENDER="off"))
    yield t
    stop()


def final(t, tx_id):
    return wait_for(lambda: (r := t.get(f"/transactions/{tx_id}", headers=AUTH).json)["status"]
                    not in ("pending",) and r)


def test_payment_succeeds_and_is_found_by_either_id(variant):
    t, _ = variant
    res = t.post_json("/stkpush", {"phone": "0712345678", "amount": 10, "reference": "INV1"},
                      headers=AUTH, status=202)
    assert res.content_type == "application/json"
    done = final(t, res.json["id"])
    assert (done["status"], done["amount"], done["phone"]) == ("succeeded", 10, "2547******678")
    assert t.get(f"/transactions/{done['checkout_request_id']}", headers=AUTH).json == done
    assert res.headers["X-Request-Id"]


def test_cancelled_payment_fails_with_its_reason(variant):
    t, _ = variant
    res = t.post_json("/stkpush", {"phone": "254711001032", "amount": 10}, headers=AUTH,
                      status=202)
    done = final(t, res.json["id"])
    assert (done["status"], done["reason"], done["result_code"]) == ("failed", "cancelled", "1032")


@pytest.mark.parametrize("body, status, code, field", [
    ({"phone": "0812345678", "amount": 10}, 400, "invalid_phone", "phone"),
    ({"phone": "0712345678", "amount": 10.5}, 400, "invalid_amount", "amount"),
    ({"phone": "0712345678", "amount": 10, "x": 1}, 400, "unknown_field", "x"),
    ({"phone": "254711005001", "amount": 10}, 409, "subscriber_busy", None),
    ({"phone": "254711005002", "amount": 10}, 503, "upstream_unavailable", None),
])
def test_refusals_have_the_same_status_and_error(variant, body, status, code, field):
    t, _ = variant
    res = t.post_json("/stkpush", body, headers=AUTH, status=status)
    assert res.json["error"]["code"] == code and res.json["error"].get("field") == field


def test_http_edges(variant):
    t, _ = variant
    assert t.post_json("/stkpush", {"phone": "0712345678", "amount": 10},
                       status=401).json["error"]["code"] == "unauthorized"
    assert t.get("/transactions/tx_nope", headers=AUTH, status=404).json["error"]["code"] == \
        "not_found"
    assert t.get("/nope", status=404).json["error"]["code"] == "not_found"
    assert t.post("/stkpush", "x", headers=AUTH, content_type="text/plain",
                  status=415).json["error"]["code"] == "unsupported_media_type"
    assert t.post("/stkpush", "{", headers=AUTH, content_type="application/json",
                  status=400).json["error"]["code"] == "invalid_json"
    big = '{"pad":"' + "x" * 20_000 + '"}'
    assert t.post("/stkpush", big, headers=AUTH, content_type="application/json",
                  status=413).json["error"]["code"] == "payload_too_large"
    res = t.get("/stkpush", status=405)
    assert "POST" in res.headers["Allow"] and res.json["error"]["code"] == "method_not_allowed"


def test_idempotent_replay_and_phone_lock(variant):
    t, _ = variant
    headers = dict(AUTH, **{"Idempotency-Key": "order-9"})
    first = t.post_json("/stkpush", {"phone": "0712000009", "amount": 10}, headers=headers,
                        status=202)
    again = t.post_json("/stkpush", {"phone": "0712000009", "amount": 10}, headers=headers,
                        status=202)
    assert again.json == first.json and again.headers["Idempotent-Replayed"] == "true"
    busy = t.post_json("/stkpush", {"phone": "0712000009", "amount": 11}, headers=AUTH,
                       status=409)
    assert busy.json["error"]["code"] == "payment_in_progress"


def test_callbacks_signature_and_duplicates(variant):
    t, core = variant
    res = t.post_json("/stkpush", {"phone": "0712000010", "amount": 10}, headers=AUTH,
                      status=202)
    done = final(t, res.json["id"])
    stored = callbacks_of(core.ledger, res.json["id"])[0]["body"]
    path = "/" + core.signer.url(res.json["id"]).split("/", 3)[3]
    assert t.post(path, stored, content_type="application/json", status=200).json == {
        "ResultCode": 0, "ResultDesc": "Accepted"}
    assert t.get(f"/transactions/{res.json['id']}", headers=AUTH).json == done
    bad = path[:-1] + ("0" if path[-1] != "0" else "1")
    t.post(bad, stored, content_type="application/json", status=404)


def test_health_listing_metrics_and_openapi(variant):
    t, _ = variant
    assert t.get("/health", status=200).json["status"] == "ok"
    t.post_json("/stkpush", {"phone": "0712000011", "amount": 10}, headers=AUTH, status=202)
    page = t.get("/transactions?limit=1", headers=AUTH, status=200).json
    assert len(page["data"]) == 1 and "next_cursor" in page
    assert t.get("/transactions?limit=0", headers=AUTH, status=400).json["error"]["field"] == \
        "limit"
    assert "mpesa_gateway_http_requests_total" in t.get("/metrics", status=200).text
    assert t.get("/openapi.json", status=200).json["openapi"].startswith("3.1")


def test_owners_admin_keys_and_busy_answers_are_the_same_in_every_variant(variant):
    from helpers import OTHER_KEY

    t, core = variant
    tx = t.post_json("/stkpush", {"phone": "0712345688", "amount": 10}, headers=AUTH,
                     status=202).json
    other = {"Authorization": f"Bearer {OTHER_KEY}"}  # another key name
    assert t.get(f"/transactions/{tx['id']}", headers=other, status=404).json["error"][
        "code"] == "not_found"
    assert tx["id"] not in {r["id"] for r in t.get("/transactions", headers=other).json["data"]}
    slots = getattr(core, "services", core).slots
    held = [slots.try_acquire() for _ in range(slots.total)]  # a rush holds every slot
    try:
        busy = t.post_json("/stkpush", {"phone": "0712345689", "amount": 10}, headers=AUTH,
                           status=503)
        assert (busy.json["error"]["code"], busy.headers["Retry-After"]) == ("gateway_busy", "1")
    finally:
        for _ in held:
            slots.release()


def test_the_operator_api_for_events_is_the_same_in_every_variant(hooked_variant):
    from helpers import OTHER_KEY

    t = hooked_variant
    tx = t.post_json("/stkpush", {"phone": "0712345690", "amount": 10}, headers=AUTH).json
    final(t, tx["id"])
    [event] = t.get("/events?status=pending", headers=AUTH, status=200).json["data"]
    assert (event["type"], event["transaction_id"]) == ("payment.succeeded", tx["id"])
    assert t.get(f"/events/{event['id']}", headers=AUTH, status=200).json["attempts_log"] == []
    assert t.post(f"/events/{event['id']}/redeliver", headers=AUTH, status=202).json[
        "id"] == event["id"]
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert t.get(f"/events/{event['id']}", headers=other, status=404).json["error"][
        "code"] == "not_found"
    assert t.get("/events", headers=other, status=200).json["data"] == []
    assert t.get("/events?status=lost", headers=AUTH, status=400).json["error"]["field"] == \
        "status"
