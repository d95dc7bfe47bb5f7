"""The Daraja client against the simulator over a real loopback socket."""

import base64
import socket
from datetime import datetime, timezone

import pytest

import config
from helpers import base_env, wait_for
from mpesa_devtools import simulator
from mpesa_gateway import daraja, settlement

CALLBACK = "http://127.0.0.1:9/callback/tx_1/abc"


def make_client(env, **kwargs):
    cfg = config.load_config(env)
    return daraja.DarajaClient(cfg, daraja.build_pool(cfg), **kwargs)


@pytest.fixture
def env(sim, tmp_path):
    return base_env(sim.url, tmp_path / "l.db")


@pytest.fixture
def client(env):
    c = make_client(env)
    yield c
    c.close()


def push(client, phone="254712345678", amount=10):
    return client.stk_push(phone=phone, amount=amount, reference="INV001",
                           description="Payment", callback_url=CALLBACK)


def test_password_matches_the_documented_test_vector(env):
    fixed = datetime(2021, 6, 28, 6, 24, 8, tzinfo=timezone.utc)  # 09:24:08 EAT
    c = make_client(env, now=lambda: fixed)
    timestamp = c.timestamp()
    assert timestamp == "20210628092408"
    assert c.password(timestamp) == (
        "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEw"
        "Zjc4ZTZiNzJhZGExZWQyYzkxOTIwMjEwNjI4MDkyNDA4")
    assert base64.b64decode(c.password(timestamp)).decode().endswith(timestamp)


def test_accepted_push_returns_daraja_ids(client, sim):
    accepted = push(client)
    assert accepted.checkout_request_id.startswith("ws_CO_")
    assert accepted.checkout_request_id.endswith("712345678")
    assert sim.stats()["pushes_accepted"] == 1
    assert sim.stats()["token_requests"] == 1


def test_invalid_field_is_rejected_with_daraja_error_code(client, sim):
    with pytest.raises(daraja.DarajaError) as exc:
        push(client, phone="255712345678")
    e = exc.value
    assert (e.outcome, e.http_status, e.error_code) == (daraja.REJECTED, 400, "400.002.02")
    assert e.error_message == "Bad Request - Invalid PartyA"


def test_wrong_passkey_is_rejected_as_wrong_credentials(env, sim):
    c = make_client(dict(env, MPESA_PASSKEY="not-the-passkey"))
    with pytest.raises(daraja.DarajaError) as exc:
        push(c)
    assert (exc.value.outcome, exc.value.error_code) == (daraja.REJECTED, "500.001.1001")
    assert exc.value.error_message == "Wrong credentials"
    assert not exc.value.subscriber_locked


def test_subscriber_lock_is_a_rejection_that_says_so(client):
    with pytest.raises(daraja.DarajaError) as exc:
        push(client, phone="254711005001")
    assert exc.value.outcome == daraja.REJECTED and exc.value.subscriber_locked


def test_spike_arrest_is_unavailable(client):
    with pytest.raises(daraja.DarajaError) as exc:
        push(client, phone="254711005002")
    assert (exc.value.outcome, exc.value.error_code) == (daraja.UNAVAILABLE, "500.003.02")


def test_read_timeout_is_unknown_and_the_push_is_not_resent(client, sim):
    with pytest.raises(daraja.DarajaError) as exc:
        push(client, phone="254711000408")
    assert (exc.value.outcome, exc.value.reason) == (daraja.UNKNOWN, "read_timeout")
    assert sim.stats()["pushes"] == 1


def test_invalid_access_token_is_refreshed_and_resent_once(client, sim):
    client.tokens.get()
    sim.sim.revoke_tokens()  # the cached token is now unknown to "Daraja"
    accepted = push(client)
    assert accepted.checkout_request_id
    stats = sim.stats()
    assert (stats["pushes"], stats["pushes_accepted"], stats["token_requests"]) == (2, 1, 2)


def test_wrong_consumer_secret_is_an_oauth_rejection_and_no_push(env, sim):
    c = make_client(dict(env, MPESA_CONSUMER_SECRET="wrong"))
    with pytest.raises(daraja.DarajaError) as exc:
        push(c)
    assert (exc.value.api, exc.value.outcome) == ("oauth", daraja.REJECTED)
    assert sim.stats()["pushes"] == 0


def test_connection_refused_is_unavailable(env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    c = make_client(dict(env, MPESA_BASE_URL=f"http://127.0.0.1:{closed_port}"))
    with pytest.raises(daraja.DarajaError) as exc:
        push(c)
    assert exc.value.outcome == daraja.UNAVAILABLE


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 3}], indirect=True)
def test_query_is_pending_then_terminal(client, sim):
    accepted = push(client, phone="254711001032")
    answer = client.stk_query(accepted.checkout_request_id)  # the customer has 3 s to answer
    assert answer.pending and answer.result_code is None
    answer = wait_for(lambda: (a := client.stk_query(accepted.checkout_request_id)).pending
                      is False and a, timeout=30, interval=0.1)
    assert (answer.pending, answer.result_code) == (False, "1032")
    assert settlement.result_status(answer.result_code) == ("failed", "cancelled")


def test_query_for_an_unknown_id_means_not_yet(client):
    answer = client.stk_query("ws_CO_000000000000000000000000")
    assert answer.pending


@pytest.mark.parametrize("code, expected", [
    (0, ("succeeded", None)), ("0", ("succeeded", None)), (1, ("failed", "insufficient_funds")),
    ("1032", ("failed", "cancelled")), (1037, ("failed", "unreachable")),
    (1019, ("failed", "expired")), (2001, ("failed", "wrong_pin")),
    (1001, ("failed", "subscriber_busy")), (2, ("failed", "limit_exceeded")),
    (8, ("failed", "limit_exceeded")), (1025, ("failed", "push_failed")),
    (9999, ("failed", "push_failed")), ("SFC_IC0003", ("failed", "misconfigured")),
    (2028, ("failed", "misconfigured")), (17, ("failed", "duplicate_request")),
    (26, ("failed", "system_busy")), (1031, ("failed", "cancelled")), (8006, ("failed", "other")),
])
def test_result_codes_map_to_status_and_reason(code, expected):
    assert settlement.result_status(code) == expected


def test_simulator_receipts_look_like_mpesa_receipts():
    receipt = simulator._receipt(datetime(2026, 11, 26, tzinfo=timezone.utc))
    assert len(receipt) == 10 and receipt.startswith("UKQ") and receipt.isupper()
