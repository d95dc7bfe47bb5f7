"""HTTP edges through the WSGI app (WebTest, lint on): auth, routing, bodies, error shape."""

import json

import pytest
from webtest import TestApp

import config
import mpesa_wsgi
from helpers import API_KEY, OTHER_KEY, new_row
from mpesa_gateway import daraja, metrics
from mpesa_gateway.services import Services
from mpesa_ledger import SqliteLedger

VALID = {"phone": "0712345678", "amount": 10}


def assert_error_shape(res, code, field=None):
    assert res.content_type == "application/json"
    error = res.json["error"]
    assert set(res.json) == {"error"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert error.get("field") == field
    assert set(error) <= {"code", "message", "field"}
    text = res.text.lower()
    for internal in ("traceback", "sqlite", "urllib3", "exception", "errorcode", ".py"):
        assert internal not in text


def test_health_needs_no_key(gateway):
    res = gateway.testapp.get("/health", status=200)
    assert res.json["status"] == "ok" and res.json["version"]
    assert res.json["timestamp"].endswith("Z")
    assert res.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": API_KEY},
    {"Authorization": f"Basic {API_KEY}"}, {"Authorization": "Bearer "},
])
def test_merchant_routes_need_a_valid_bearer_key(gateway, sim, headers):
    res = gateway.testapp.post_json("/stkpush", VALID, headers=headers, status=401)
    assert_error_shape(res, "unauthorized")
    assert res.headers["WWW-Authenticate"].startswith("Bearer")
    gateway.testapp.get("/transactions/tx_x", headers=headers, status=401)
    assert sim.stats()["pushes"] == 0


def test_every_configured_key_is_accepted(gateway):
    gateway.testapp.get("/transactions/tx_none", headers={"Authorization": f"Bearer {OTHER_KEY}"},
                        status=404)


def test_unknown_path_is_json_404(gateway):
    assert_error_shape(gateway.testapp.get("/nope", status=404), "not_found")
    assert_error_shape(gateway.testapp.get("/transactions/", status=404), "not_found")
    assert_error_shape(gateway.testapp.get("/transactions/a/b/c", status=404), "not_found")


def test_unknown_transaction_is_404(gateway):
    assert_error_shape(gateway.get("tx_does_not_exist", status=404), "not_found")


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/stkpush", "POST"), ("DELETE", "/health", "GET"),
    ("POST", "/transactions/tx_1", "GET"), ("GET", "/callback/tx_1/abc", "POST"),
])
def test_wrong_method_is_405_with_allow(gateway, method, path, allow):
    res = gateway.testapp.request(path, method=method, status=405)
    assert res.headers["Allow"] == allow
    assert_error_shape(res, "method_not_allowed")


def test_body_over_the_limit_is_413_and_nothing_is_sent(gateway, sim):
    body = json.dumps({"phone": "0712345678", "amount": 10, "pad": "x" * 20_000})
    res = gateway.testapp.post("/stkpush", body, headers=gateway.auth,
                               content_type="application/json", status=413)
    assert_error_shape(res, "payload_too_large")
    assert sim.stats()["pushes"] == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/jsonx"])
def test_non_json_is_415(gateway, content_type):
    res = gateway.testapp.post("/stkpush", json.dumps(VALID), headers=gateway.auth,
                               content_type=content_type, status=415)
    assert_error_shape(res, "unsupported_media_type")


def test_json_with_charset_parameter_is_fine(gateway):
    gateway.testapp.post("/stkpush", json.dumps(VALID), headers=gateway.auth,
                         content_type="application/json; charset=utf-8", status=202)


@pytest.mark.parametrize("raw", [
    b"{", b"", b"\xff\xfe{}", b'{"phone": "\xc3\x28"}', b'{"amount": NaN}',
    b'{"amount": Infinity}',
])
def test_bad_json_or_bad_utf8_is_400_invalid_json(gateway, raw):
    res = gateway.testapp.post("/stkpush", raw, headers=gateway.auth,
                               content_type="application/json", status=400)
    assert_error_shape(res, "invalid_json")


def test_deeply_nested_json_within_the_limit_is_400(gateway):
    raw = b"[" * 8000 + b"]" * 8000
    res = gateway.testapp.post("/stkpush", raw, headers=gateway.auth,
                               content_type="application/json", status=400)
    assert_error_shape(res, "invalid_json")


@pytest.mark.parametrize("body, code, field", [
    ({"phone": "0812345678", "amount": 10}, "invalid_phone", "phone"),
    ({"phone": "0712345678", "amount": 10.5}, "invalid_amount", "amount"),
    ({"phone": "0712345678", "amount": "1e3"}, "invalid_amount", "amount"),
    ({"phone": "0712345678", "amount": True}, "invalid_amount", "amount"),
    ({"phone": "0712345678", "amount": 10, "reference": "THIRTEEN-CHAR"}, "invalid_reference",
     "reference"),
    ({"phone": "0712345678", "amount": 10, "description": "fourteen-chars"},
     "invalid_description", "description"),
    ({"phone": "0712345678", "amount": 10, "callback": "x"}, "unknown_field", "callback"),
    ({"amount": 10}, "missing_field", "phone"),
    ([1, 2], "invalid_body", None),
])
def test_validation_errors_name_code_and_field_and_send_nothing(gateway, sim, body, code, field):
    res = gateway.push(body, status=400)
    assert_error_shape(res, code, field)
    assert sim.stats()["pushes"] == 0


class StoreBroke(Exception):
    """Not an sqlite3.Error, not an ApiError: nothing in the app expects it."""


def _broken_rows(cursor, row):
    raise StoreBroke("/srv/ledger.db: row 7 is garbage")  # internals that must not leak


def test_unhandled_errors_are_a_plain_500(gateway_env):
    cfg = config.load_config(gateway_env)
    connections = []  # every connection the ledger opens (its constructor's is this thread's)
    ledger = SqliteLedger(cfg.db_path, on_connect=connections.append)
    services = Services(cfg, ledger, daraja.DarajaClient(cfg, daraja.build_pool(cfg)),
                        metrics.GatewayMetrics(config.VERSION, lambda: {}))
    app = TestApp(mpesa_wsgi.Gateway(services), lint=True)
    try:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        tx_id = new_row(ledger, phone="254712345678", amount=10, reference="R",
                              description="D")["id"]
        app.get(f"/transactions/{tx_id}", headers=auth, status=200)  # the store works...
        for conn in connections:
            conn.row_factory = _broken_rows  # ...then breaks in a way nobody planned for
        res = app.get(f"/transactions/{tx_id}", headers=auth, status=500)
        assert_error_shape(res, "internal_error")
        assert "garbage" not in res.text and "ledger.db" not in res.text
        assert res.headers["X-Request-Id"]
    finally:
        services.close()
