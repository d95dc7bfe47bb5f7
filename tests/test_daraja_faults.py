"""Upstream faults (RELIABILITY.md §10 rows 1–17) against a scripted fake Daraja.

One behaviour per test; each asserts the HTTP answer, the ledger row and the
exact number of upstream calls.
"""

import ssl
import time

import pytest

from fake_daraja import (
    accepted,
    drip,
    error,
    oversized,
    reply,
    reset,
    sleep,
    token,
    truncated,
)
from helpers import self_signed_cert


def test_oauth_connection_refused_is_503_and_no_push(harness):
    h = harness()
    h.fake.close()
    res = h.push(503)
    assert res.json["error"]["code"] == "upstream_unavailable"
    assert h.row(res)["status"] == "rejected"
    assert h.calls() == (0, 0)


def test_oauth_500_then_200_is_retried_and_the_push_proceeds(harness):
    h = harness(oauth=[reply(500, b"oops", content_type="text/plain"), token()],
                push=[accepted()])
    res = h.push(202)
    assert res.json["status"] == "pending"
    assert h.calls() == (2, 1)


@pytest.mark.parametrize("bad", [
    reply(200, b"<html>Apigee</html>", content_type="text/html"),
    reply(200, {"expires_in": "3599"}),
    reply(200, {"access_token": "t", "expires_in": "soon"}),
])
def test_malformed_oauth_answer_is_503_nothing_cached_no_push(harness, bad):
    h = harness(oauth=[bad])
    res = h.push(503)
    assert h.row(res)["status"] == "rejected"
    assert h.calls() == (1, 0)
    assert h.app.services.daraja.tokens.age() is None


def test_oauth_refusal_is_502(harness):
    h = harness(oauth=[error(400, "400.008.01", "Invalid Authentication passed")])
    res = h.push(502)
    assert "400.008.01" in res.json["error"]["message"]
    assert h.calls() == (1, 0)


def test_slow_oauth_is_bounded_then_503(harness):
    h = harness(oauth=[sleep(1.0), sleep(1.0), sleep(1.0)])
    started = time.monotonic()
    res = h.push(503)
    assert time.monotonic() - started < 3.0  # three bounded tries, not a hung worker
    assert h.calls() == (3, 0)
    assert h.row(res)["status"] == "rejected"


def test_push_connect_refused_is_503_rejected_and_nothing_sent(harness):
    h = harness(oauth=[token()])
    h.app.services.daraja.tokens.get()
    h.fake.close()
    res = h.push(503)
    assert (h.row(res)["status"], h.row(res)["reason"]) == ("rejected", "upstream_unavailable")
    assert h.calls() == (1, 0)


def test_push_read_timeout_is_unknown_and_never_resent(harness):
    h = harness(oauth=[token()], push=[sleep(1.0, then=accepted())])
    res = h.push(202)
    assert (res.json["status"], res.json["reason"]) == ("unknown", "read_timeout")
    assert h.fake.wait_done("push", 1)  # the held answer is over: a resend would be in by now
    assert h.calls() == (1, 1)
    assert h.row(res)["status"] == "unknown"


@pytest.mark.parametrize("step", [reset(), truncated()], ids=["reset", "truncated"])
def test_connection_dropped_mid_response_is_unknown_and_never_resent(harness, step):
    h = harness(oauth=[token()], push=[step])
    res = h.push(202)
    assert (res.json["status"], res.json["reason"]) == ("unknown", "connection_dropped")
    assert h.calls() == (1, 1)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_push_5xx_is_unknown_and_never_resent(harness, status):
    h = harness(oauth=[token()], push=[reply(status, b"Internal Server Error",
                                             content_type="text/plain")])
    res = h.push(202)
    assert (res.json["status"], res.json["reason"]) == ("unknown", "upstream_error")
    assert h.calls() == (1, 1)


def test_unparsable_200_is_unknown(harness):
    h = harness(oauth=[token()], push=[reply(200, b'{"MerchantRequestID": "m", "Resp',
                                             content_type="application/json")])
    res = h.push(202)
    assert (res.json["status"], res.json["reason"]) == ("unknown", "unparsable_response")
    assert h.calls() == (1, 1)


@pytest.mark.parametrize("content_type", ["text/html", "application/json"])
def test_a_200_html_page_is_502_the_base_url_looks_wrong_and_the_key_is_freed(harness,
                                                                              content_type):
    # The API proxy's answer to a wrong host or path: the STK service never saw the push.
    h = harness(oauth=[token()], push=[reply(200, b"\n<!DOCTYPE html><html><title>Apigee SPA"
                                             b" Proxy</title></html>", content_type=content_type),
                                       accepted()])
    res = h.push(502, **{"Idempotency-Key": "html-1"})
    assert res.json["error"]["code"] == "daraja_rejected"
    assert "base URL" in res.json["error"]["message"]
    assert (h.row(res)["status"], h.row(res)["reason"]) == ("rejected", "daraja_rejected")
    assert h.push(202, **{"Idempotency-Key": "html-1"}).json["status"] == "pending"
    assert h.calls() == (1, 2)


def test_200_without_checkout_id_is_unknown_and_nonzero_response_code_is_rejected(harness):
    h = harness(oauth=[token()], push=[reply(200, {"ResponseCode": "0"}),
                                       reply(200, {"ResponseCode": "1", "ResponseDescription":
                                                   "Rejected"})])
    assert h.push(202).json["status"] == "unknown"
    res = h.push(502, body={"phone": "0712345679", "amount": 10})
    assert h.row(res)["status"] == "rejected"
    assert h.calls() == (1, 2)


def test_invalid_field_400_is_502_rejected_with_the_code(harness):
    h = harness(oauth=[token()],
                push=[error(400, "400.002.02", "Bad Request - Invalid PhoneNumber")])
    res = h.push(502)
    assert "400.002.02" in res.json["error"]["message"]
    row = h.row(res)
    assert (row["status"], row["result_code"]) == ("rejected", "400.002.02")
    assert h.calls() == (1, 1)


def test_invalid_token_is_refreshed_and_resent_once(harness):
    h = harness(oauth=[token("t1"), token("t2")],
                push=[error(404, "404.001.03", "Invalid Access Token"), accepted()])
    assert h.push(202).json["status"] == "pending"
    assert h.calls() == (2, 2)
    auths = [r[3]["authorization"] for r in h.fake.requests if r[0] == "push"]
    assert auths == ["Bearer t1", "Bearer t2"]


def test_a_second_invalid_token_is_502_without_a_third_push(harness):
    h = harness(oauth=[token("t1"), token("t2")],
                push=[error(404, "404.001.03", "Invalid Access Token"),
                      error(401, "401.002.01", "Error Occurred - Invalid Access Token - ")])
    res = h.push(502)
    assert h.row(res)["status"] == "rejected"
    assert h.calls() == (2, 2)


@pytest.mark.parametrize("code, message", [
    ("500.003.02", "Error Occurred: Spike Arrest Violation"), ("500.003.03", "Quota Violation")])
def test_spike_arrest_and_quota_are_503_with_retry_after(harness, code, message):
    h = harness(oauth=[token()], push=[error(500, code, message)])
    res = h.push(503)
    assert int(res.headers["Retry-After"]) > 0
    assert h.row(res)["status"] == "rejected"
    assert h.calls() == (1, 1)


def test_slow_drip_answer_is_cut_by_the_deadline_and_unknown(harness):
    h = harness(oauth=[token()], push=[drip(0.2, chunks=60)])  # 12 s if read to the end
    started = time.monotonic()
    res = h.push(202)
    # The push policy's deadline (2 × (connect + read) + backoff + read = 3.7 s), not 12 s.
    assert time.monotonic() - started < h.app.services.daraja.policies["stk_push"].longest_s + 2
    assert res.json["status"] == "unknown"
    assert h.calls() == (1, 1)


def test_oversized_answer_is_read_bounded_and_unknown(harness):
    h = harness(oauth=[token()], push=[oversized()])
    res = h.push(202)
    assert (res.json["status"], res.json["reason"]) == ("unknown", "unparsable_response")
    assert h.calls() == (1, 1)


def test_redirect_is_not_followed(harness):
    h = harness(oauth=[token()], push=[reply(302, b"", extra=("Location: http://127.0.0.1:9/x",))])
    res = h.push(202)
    assert (res.json["status"], res.json["reason"]) == ("unknown", "redirect")
    assert h.calls() == (1, 1)
    assert [r[0] for r in h.fake.requests] == ["oauth", "push"]


def test_tls_verification_failure_is_503_not_retried_and_nothing_sent(harness, tmp_path):
    cert, key = self_signed_cert(tmp_path, "127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    h = harness(tls=context, oauth=[token()], push=[accepted()])
    res = h.push(503)
    assert h.row(res)["status"] == "rejected"
    assert h.fake.requests == []  # the handshake failed: no request was ever sent
