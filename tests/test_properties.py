"""Property-based tests: no input breaks a rule, and no input yields a 5xx.

SOAK_EXAMPLES sets the examples per test (`make soak`: 10,000).
"""

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webtest import TestApp

import config
import mpesa_wsgi
from helpers import API_KEY, soak_examples
from mpesa_devtools import simulator
from validation import (
    ValidationError,
    normalize_phone,
    parse_amount,
    parse_stk_callback,
    validate_push,
)

CANONICAL = re.compile(r"254[17][0-9]{8}")
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=20), inner, max_size=5), max_leaves=30)
# No deadline: on a loaded machine one slow example is not a bug.
PURE_SETTINGS = settings(max_examples=soak_examples(100), deadline=None)
APP_SETTINGS = settings(max_examples=soak_examples(150), deadline=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture])


@PURE_SETTINGS
@given(st.one_of(st.text(max_size=40), json_values))
def test_normalize_phone_returns_canonical_or_raises(value):
    try:
        assert CANONICAL.fullmatch(normalize_phone(value))
    except ValidationError as exc:
        assert exc.code == "invalid_phone"


@PURE_SETTINGS
@given(st.sampled_from(["0", "", "254", "+254"]), st.sampled_from(["7", "1"]),
       st.text("0123456789", min_size=8, max_size=8), st.sampled_from(["", " ", "-"]))
def test_every_valid_form_normalises_to_the_same_number(prefix, first, rest, sep):
    raw = prefix + sep + first + rest[:2] + sep + rest[2:5] + sep + rest[5:]
    assert normalize_phone(raw) == "254" + first + rest


@PURE_SETTINGS
@given(json_values)
def test_parse_amount_is_whole_and_in_range_or_raises(value):
    try:
        amount = parse_amount(value, 250_000)
    except ValidationError as exc:
        assert exc.code == "invalid_amount"
    else:
        assert type(amount) is int and 1 <= amount <= 250_000


@PURE_SETTINGS
@given(json_values)
def test_validate_push_never_fails_other_than_by_validation_error(body):
    try:
        validate_push(body, 250_000, "Ref", "Desc")
    except ValidationError:
        pass


stk_like = st.fixed_dictionaries({"Body": st.fixed_dictionaries({"stkCallback": st.dictionaries(
    st.sampled_from(["MerchantRequestID", "CheckoutRequestID", "ResultCode", "ResultDesc",
                     "CallbackMetadata"]),
    json_values | st.fixed_dictionaries({"Item": st.lists(st.fixed_dictionaries(
        {"Name": st.sampled_from(["Amount", "MpesaReceiptNumber", "Balance"])},
        optional={"Value": json_scalars}), max_size=5)}))})})


@PURE_SETTINGS
@given(st.one_of(json_values, stk_like))
def test_callback_parser_returns_a_result_or_a_validation_error(body):
    try:
        result = parse_stk_callback(body)
    except ValidationError as exc:
        assert exc.code == "invalid_callback"
    else:
        assert isinstance(result.result_code, str) and result.checkout_request_id


@pytest.fixture
def sim_settings():
    return simulator.SimSettings(callback_delay_s=60, lock_subscriber=False)


@pytest.fixture
def app(gateway_env):
    app = mpesa_wsgi.create_app(config.load_config(dict(
        gateway_env, GATEWAY_RATE="100000", GATEWAY_BURST="100000", GATEWAY_PHONE_LOCK_S="0")))
    yield app
    app.services.close()


push_bodies = st.one_of(json_values, st.dictionaries(
    st.sampled_from(["phone", "amount", "reference", "description", "extra"]),
    json_scalars | st.sampled_from(["0712345678", "+254 112 345 678", "10", "INV-1"]),
    max_size=5))


@APP_SETTINGS
@given(body=push_bodies, idem=st.none() | st.text(max_size=8).filter(str.isprintable))
def test_no_push_body_yields_a_5xx(app, body, idem):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if idem:
        headers["Idempotency-Key"] = idem.encode("ascii", "replace").decode()
    res = TestApp(app).post("/stkpush", json.dumps(body), headers=headers,
                            content_type="application/json", status="*")
    assert res.status_int < 500, res.text  # a 502 would mean Daraja refuses what we accept
    assert res.json is not None


@APP_SETTINGS
@given(raw=st.binary(max_size=300))
def test_no_raw_bytes_yield_a_5xx(app, raw):
    res = TestApp(app).post("/stkpush", raw, headers={"Authorization": f"Bearer {API_KEY}"},
                            content_type="application/json", status="*")
    assert res.status_int == 400 or res.status_int < 300


@APP_SETTINGS
@given(body=st.one_of(json_values, stk_like))
def test_no_callback_body_yields_a_5xx(app, body):
    testapp = TestApp(app)
    tx = testapp.post_json("/stkpush", {"phone": "0712345678", "amount": 10},
                           headers={"Authorization": f"Bearer {API_KEY}"}, status=202).json
    path = "/" + app.services.signer.url(tx["id"]).split("/", 3)[3]
    res = testapp.post(path, json.dumps(body), content_type="application/json",
                       status="*")
    assert res.status_int in (200, 400)
