"""The Daraja simulator on a real loopback socket, driven the way a client drives Daraja.

Each test talks HTTP to 127.0.0.1 only: a token with Basic auth, a push with a Password
built as Daraja wants it, a query, and the /_sim/ control endpoints a person would curl.
Callbacks land on a tiny recording WSGI app served the same way.
"""

import base64
import json
import logging
import threading
import time
from datetime import datetime

import pytest
import urllib3

from helpers import serve, wait_for
from mpesa_devtools import simulator

PHONE = "254712345678"  # no scenario: succeeds
# urllib3 never reads proxy variables; no retries, so every request the test makes is one request.
HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2.0, read=15.0))

# weather → (HTTP status, errorCode, errorMessage) of the refusals in Daraja's envelope
ENVELOPES = {
    "maintenance": (500, "500.002.1001",
                    "Service is currently under maintenance. Please try again later"),
    "spike": (500, "500.003.02", "Error Occurred: Spike Arrest Violation"),
    "quota": (500, "500.003.03", "Quota Violation"),
    "internal": (500, "500.003.1001", "Internal Server Error"),
}
REFUSALS = ("maintenance", "spike", "quota", "html", "retry_after")  # nothing processed
NEW_FAILURES = [
    ("254711001025", 1025),
    ("254711019999", 9999),
    ("254711000017", 17),
    ("254711000026", 26),
    ("254711001031", 1031),
    ("254711002028", 2028),
    ("254711000003", "SFC_IC0003"),
]


class Daraja:
    """A minimal Daraja client plus the simulator's control endpoints."""

    def __init__(self, url):
        self.url = url

    def call(self, method, path, body=None, headers=None):
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        return HTTP.request(method, self.url + path, body=body, headers=headers or {})

    def token_response(self):
        basic = f"{simulator.DEMO_CONSUMER_KEY}:{simulator.DEMO_CONSUMER_SECRET}"
        return self.call("GET", "/oauth/v1/generate?grant_type=client_credentials",
                         headers={"Authorization": "Basic " + base64.b64encode(
                             basic.encode()).decode()})

    def token(self):
        res = self.token_response()
        assert res.status == 200
        return res.json()["access_token"]

    def _signed(self, token, fields):
        """Shortcode, Timestamp and Password = base64(shortcode + passkey + timestamp)."""
        timestamp = datetime.now(simulator.EAT).strftime("%Y%m%d%H%M%S")
        raw = simulator.SANDBOX_SHORTCODE + simulator.SANDBOX_PASSKEY + timestamp
        body = {"BusinessShortCode": simulator.SANDBOX_SHORTCODE, "Timestamp": timestamp,
                "Password": base64.b64encode(raw.encode()).decode(), **fields}
        return body, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def push(self, phone, callback_url, token=None, **fields):
        body, headers = self._signed(token or self.token(), dict({
            "TransactionType": "CustomerPayBillOnline", "Amount": 10, "PartyA": phone,
            "PartyB": simulator.SANDBOX_SHORTCODE, "PhoneNumber": phone,
            "CallBackURL": callback_url, "AccountReference": "INV001",
            "TransactionDesc": "Payment"}, **fields))
        return self.call("POST", "/mpesa/stkpush/v1/processrequest", body, headers)

    def accepted_push(self, phone, callback_url, token=None, **fields):
        res = self.push(phone, callback_url, token, **fields)
        assert res.status == 200, res.data
        return res.json()["CheckoutRequestID"]

    def query(self, checkout_id, token=None):
        body, headers = self._signed(token or self.token(), {"CheckoutRequestID": checkout_id})
        return self.call("POST", "/mpesa/stkpushquery/v1/query", body, headers)

    def stats(self):
        return self.call("GET", "/_sim/stats").json()

    def set_weather(self, **changes):
        res = self.call("POST", "/_sim/weather", changes)
        assert res.status == 200, res.data
        return res.json()

    def resend(self, checkout_id):
        return self.call("POST", f"/_sim/callbacks/{checkout_id}/resend")


class Receiver:
    """A CallBackURL that records every body POSTed to it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.bodies, self.times = [], []
        self.url = None

    def __call__(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if environ["REQUEST_METHOD"] == "POST":
            with self._lock:
                self.bodies.append(body)
                self.times.append(time.monotonic())
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"ResultCode": 0, "ResultDesc": "Accepted"}']

    def wait(self, n, timeout=6.0):
        """The first n callbacks as JSON, once that many have arrived."""
        wait_for(lambda: len(self.bodies) >= n, timeout=timeout)
        return [json.loads(b) for b in self.bodies[:n]]


@pytest.fixture(autouse=True)
def quiet_client_urls():
    """This test client's urllib3 logs every URL at DEBUG, and resend URLs carry a
    CheckoutRequestID (which ends in phone digits): keep the client's own log above it."""
    client = logging.getLogger("urllib3.connectionpool")
    level = client.level
    client.setLevel(logging.INFO)
    yield
    client.setLevel(level)


@pytest.fixture
def daraja(sim):
    return Daraja(sim.url)


@pytest.fixture
def receiver():
    app = Receiver()
    server, url = serve(app)
    app.url = url + "/callback/stk"
    yield app
    server.shutdown()


def items(stk):
    return {i["Name"]: i.get("Value") for i in stk["CallbackMetadata"]["Item"]}


def assert_weather_answer(res, weather):
    """The answer `weather` gives: Daraja's envelope, Apigee's HTML page or a bare 503."""
    if weather == "html":
        assert res.status == 200
        assert res.headers["Content-Type"].startswith("text/html")
        assert b"<title>SPA Proxy</title>" in res.data
    elif weather == "retry_after":
        assert res.status == 503
        assert res.headers["Retry-After"] == "3600"
    else:
        status, code, message = ENVELOPES[weather]
        assert res.status == status
        assert res.headers["Content-Type"].startswith("application/json")
        body = res.json()
        assert (body["errorCode"], body["errorMessage"]) == (code, message)
        assert body["requestId"]


# --- scenario phones ----------------------------------------------------------------

@pytest.mark.parametrize("phone, code", NEW_FAILURES)
def test_new_scenario_phone_fails_with_its_code_in_callback_and_query(daraja, receiver,
                                                                       phone, code):
    checkout = daraja.accepted_push(phone, receiver.url)
    (callback,) = receiver.wait(1)
    stk = callback["Body"]["stkCallback"]
    assert stk["CheckoutRequestID"] == checkout
    assert stk["ResultCode"] == code and type(stk["ResultCode"]) is type(code)  # SFC_: a string
    assert stk["ResultDesc"] == simulator.RESULT_DESCS[code]
    assert "CallbackMetadata" not in stk
    answer = daraja.query(checkout)
    assert answer.status == 200
    assert answer.json()["ResultCode"] == str(code)


def test_masked_phone_scenario_sends_a_masked_phone_number_string(daraja, receiver):
    checkout = daraja.accepted_push("254711000111", receiver.url)
    (callback,) = receiver.wait(1)
    stk = callback["Body"]["stkCallback"]
    assert stk["ResultCode"] == 0
    found = items(stk)
    assert found["PhoneNumber"] == "2547******111"
    assert len(found["MpesaReceiptNumber"]) == 10
    assert daraja.query(checkout).json()["ResultCode"] == "0"


def test_no_phone_scenario_sends_no_phone_number_item(daraja, receiver):
    checkout = daraja.accepted_push("254711000112", receiver.url)
    (callback,) = receiver.wait(1)
    stk = callback["Body"]["stkCallback"]
    assert stk["ResultCode"] == 0
    found = items(stk)
    assert "PhoneNumber" not in found
    assert {"Amount", "MpesaReceiptNumber", "TransactionDate"} <= set(found)
    assert daraja.query(checkout).json()["ResultCode"] == "0"


# --- the query while the prompt is open ---------------------------------------------

@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 5}], indirect=True)
def test_query_while_prompt_open_answers_4999_by_default(daraja):
    answer = daraja.query(daraja.accepted_push(PHONE, "http://127.0.0.1:9/cb"))
    assert answer.status == 200
    assert answer.json()["ResultCode"] == "4999"


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 1.5,
                                           "query_pending": "processing"}], indirect=True)
def test_query_pending_processing_is_http_500_being_processed_then_final(daraja):
    checkout = daraja.accepted_push(PHONE, "http://127.0.0.1:9/cb")
    answer = daraja.query(checkout)
    assert answer.status == 500
    assert answer.json()["errorCode"] == "500.001.1001"
    assert answer.json()["errorMessage"] == "The transaction is being processed"
    assert answer.json()["requestId"]
    final = wait_for(lambda: (r := daraja.query(checkout)).status == 200 and r, interval=0.1)
    assert final.json()["ResultCode"] == "0"


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 5, "query_pending": "empty"}],
                         indirect=True)
def test_query_pending_empty_is_http_500_with_an_empty_message(daraja):
    answer = daraja.query(daraja.accepted_push(PHONE, "http://127.0.0.1:9/cb"))
    assert answer.status == 500
    assert answer.json()["errorCode"] == "500.001.1001"
    assert answer.json()["errorMessage"] == ""


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 0.3, "query_not_found_s": 1.5}],
                         indirect=True)
def test_young_push_is_unknown_to_query_until_query_not_found_s(daraja):
    token = daraja.token()
    started = time.monotonic()
    checkout = daraja.accepted_push(PHONE, "http://127.0.0.1:9/cb", token=token)
    answer = daraja.query(checkout, token=token)
    assert answer.status == 500
    assert answer.json()["errorCode"] == "500.001.1001"
    assert answer.json()["errorMessage"] == "The transaction does not Exist"
    final = wait_for(lambda: (r := daraja.query(checkout, token=token)).status == 200 and r,
                     timeout=8, interval=0.1)
    assert time.monotonic() - started >= 1.5
    assert final.json()["ResultCode"] == "0"


# --- weather --------------------------------------------------------------------------

@pytest.mark.parametrize("weather", REFUSALS)
def test_push_weather_refusal_processes_nothing(daraja, receiver, weather):
    token = daraja.token()
    daraja.set_weather(push=weather)
    assert_weather_answer(daraja.push(PHONE, receiver.url, token=token), weather)
    stats = daraja.stats()
    assert (stats["pushes"], stats["pushes_accepted"], stats["callbacks_scheduled"]) == (1, 0, 0)
    assert stats["weather_answers"] == 1
    # No prompt was opened: once the weather clears, the same phone is accepted at once.
    daraja.set_weather(push="ok")
    daraja.accepted_push(PHONE, receiver.url, token=token)
    assert len(receiver.wait(1)) == 1


@pytest.mark.parametrize("weather", (*REFUSALS, "internal"))
def test_query_weather_answers_without_querying(daraja, weather):
    token = daraja.token()
    checkout = daraja.accepted_push(PHONE, "http://127.0.0.1:9/cb", token=token)
    daraja.set_weather(query=weather)
    assert_weather_answer(daraja.query(checkout, token=token), weather)
    stats = daraja.stats()
    assert (stats["queries"], stats["weather_answers"]) == (1, 1)


@pytest.mark.parametrize("weather", (*REFUSALS, "internal"))
def test_oauth_weather_answers_without_a_token(daraja, weather):
    daraja.set_weather(oauth=weather)
    res = daraja.token_response()
    assert_weather_answer(res, weather)
    assert b"access_token" not in res.data
    stats = daraja.stats()
    assert (stats["token_requests"], stats["tokens_issued"], stats["weather_answers"]) == (1, 0, 1)


def test_push_internal_weather_answers_500_but_the_prompt_opens_and_calls_back(daraja, sim,
                                                                               receiver):
    token = daraja.token()
    daraja.set_weather(push="internal")
    assert_weather_answer(daraja.push(PHONE, receiver.url, token=token), "internal")
    stats = daraja.stats()
    assert (stats["pushes_accepted"], stats["callbacks_scheduled"]) == (1, 1)
    assert stats["weather_answers"] == 1
    (callback,) = receiver.wait(1)
    stk = callback["Body"]["stkCallback"]
    assert stk["ResultCode"] == 0
    # The answer was lost, the push was not: its callback can be sent again.
    assert daraja.resend(stk["CheckoutRequestID"]).status == 200
    receiver.wait(2)
    assert receiver.bodies[0] == receiver.bodies[1]


@pytest.mark.parametrize("api", ["push", "query", "oauth"])
def test_slow_weather_holds_the_answer_then_answers_normally(daraja, receiver, api):
    token = daraja.token()
    checkout = daraja.accepted_push(PHONE, receiver.url, token=token) if api == "query" else None
    daraja.set_weather(**{api: "slow", "slow_s": 0.6})
    started = time.monotonic()
    if api == "push":
        res = daraja.push("254712345679", receiver.url, token=token)
    elif api == "query":
        res = daraja.query(checkout, token=token)
    else:
        res = daraja.token_response()
    assert time.monotonic() - started >= 0.6
    assert res.status == 200
    assert daraja.stats()["weather_answers"] == 1
    if api == "push":
        assert receiver.wait(1)[0]["Body"]["stkCallback"]["ResultCode"] == 0
    elif api == "query":
        assert res.json()["ResultCode"] in ("4999", "0")
    else:
        assert res.json()["access_token"]


def test_weather_control_updates_partially_and_resets(daraja):
    assert daraja.call("GET", "/_sim/weather").json() == {
        "push": "ok", "query": "ok", "oauth": "ok", "slow_s": 5.0}
    daraja.set_weather(push="maintenance", query="ok", oauth="retry_after", slow_s=3)
    assert daraja.set_weather(query="spike") == {
        "push": "maintenance", "query": "spike", "oauth": "retry_after", "slow_s": 3.0}
    daraja.set_weather(push="ok", query="ok", oauth="ok")
    assert daraja.call("GET", "/_sim/weather").json() == {
        "push": "ok", "query": "ok", "oauth": "ok", "slow_s": 3.0}
    daraja.token()  # clear skies again


@pytest.mark.parametrize("body", [
    {"sms": "ok"},
    {"push": "rainy"},
    {"push": 5},
    {"slow_s": -1},
    {"slow_s": "3"},
    {"slow_s": True},
    {"push": "spike", "query": "rainy"},  # all or nothing: push must stay ok
    [{"push": "ok"}],
    b"not json",
])
def test_weather_control_refuses_unknown_apis_and_values(daraja, body):
    res = daraja.call("POST", "/_sim/weather", body)
    assert res.status == 400
    assert res.json()["error"]["message"]
    assert daraja.call("GET", "/_sim/weather").json()["push"] == "ok"


def test_weather_python_api_is_the_same_weather(daraja, sim):
    assert sim.sim.set_weather(oauth="quota", slow_s=1)["oauth"] == "quota"
    assert daraja.call("GET", "/_sim/weather").json()["oauth"] == "quota"
    assert_weather_answer(daraja.token_response(), "quota")
    with pytest.raises(ValueError, match="hail"):
        sim.sim.set_weather(push="hail")
    sim.sim.set_weather(oauth="ok")
    assert sim.sim.weather() == {"push": "ok", "query": "ok", "oauth": "ok", "slow_s": 1.0}


# --- resend ---------------------------------------------------------------------------

def test_resend_sends_the_same_callback_again(daraja, receiver):
    checkout = daraja.accepted_push(PHONE, receiver.url)
    receiver.wait(1)
    res = daraja.resend(checkout)
    assert (res.status, res.json()) == (200, {"scheduled": True})
    receiver.wait(2)
    assert receiver.bodies[0] == receiver.bodies[1]
    assert daraja.stats()["callbacks_scheduled"] == 2


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 1.0}], indirect=True)
def test_resend_before_the_result_waits_for_it(daraja, sim, receiver):
    started = time.monotonic()
    checkout = daraja.accepted_push(PHONE, receiver.url)
    sim.sim.resend_callback(checkout)
    receiver.wait(2)
    assert min(receiver.times) - started >= 1.0
    assert receiver.bodies[0] == receiver.bodies[1]
    assert sim.stats()["callbacks_scheduled"] == 2


def test_resend_of_an_unknown_id_is_404(daraja, sim):
    res = daraja.resend("ws_CO_unknown")
    assert res.status == 404
    assert res.json()["error"]["code"] == "unknown_checkout_request_id"
    with pytest.raises(KeyError):
        sim.sim.resend_callback("ws_CO_unknown")
    assert daraja.stats()["callbacks_scheduled"] == 0


# --- field lengths (simulator policy) -------------------------------------------------

@pytest.mark.parametrize("field_name, value", [
    ("AccountReference", "A" * 13),
    ("TransactionDesc", "D" * 14),
])
def test_strict_lengths_refuse_long_fields_by_default(daraja, field_name, value):
    res = daraja.push(PHONE, "http://127.0.0.1:9/cb", **{field_name: value})
    assert res.status == 400
    assert res.json()["errorCode"] == "400.002.02"
    assert res.json()["errorMessage"] == f"Bad Request - Invalid {field_name}"


@pytest.mark.parametrize("sim_settings", [{"strict_lengths": False}], indirect=True)
def test_strict_lengths_off_accepts_long_fields(daraja):
    res = daraja.push(PHONE, "http://127.0.0.1:9/cb", AccountReference="INVOICE-2026-000017",
                      TransactionDesc="Monthly fee 15")
    assert res.status == 200
    assert res.json()["ResponseCode"] == "0"


# --- settings from the environment ----------------------------------------------------

def test_from_env_defaults_keep_todays_behaviour():
    s = simulator.SimSettings.from_env({})
    assert (s.query_pending, s.query_not_found_s, s.strict_lengths) == ("4999", 0.0, True)


def test_from_env_reads_the_new_settings():
    s = simulator.SimSettings.from_env({"MPESA_SIM_QUERY_PENDING": "processing",
                                        "MPESA_SIM_QUERY_NOT_FOUND_S": "30",
                                        "MPESA_SIM_STRICT_LENGTHS": "OFF"})
    assert (s.query_pending, s.query_not_found_s, s.strict_lengths) == ("processing", 30.0, False)
    assert simulator.SimSettings.from_env({"MPESA_SIM_QUERY_PENDING": "empty"}).query_pending \
        == "empty"


@pytest.mark.parametrize("name, value", [
    ("MPESA_SIM_QUERY_PENDING", "pending"),
    ("MPESA_SIM_QUERY_NOT_FOUND_S", "soon"),
    ("MPESA_SIM_QUERY_NOT_FOUND_S", "-1"),
    ("MPESA_SIM_STRICT_LENGTHS", "yes"),
    ("MPESA_SIM_CALLBACK_DELAY_S", "fast"),
    ("MPESA_SIM_TOKEN_TTL_S", "1.5"),
])
def test_from_env_rejects_bad_values_naming_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        simulator.SimSettings.from_env({name: value})


def test_settings_reject_an_unknown_query_pending_mode():
    with pytest.raises(ValueError, match="query_pending"):
        simulator.SimSettings(query_pending="pending")
