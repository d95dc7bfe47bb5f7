"""Nothing twice: Idempotency-Key, one open prompt per phone, rate limit per API key."""

import json
import subprocess
import sys
import threading
import time

import pytest
from webtest import TestApp

import config
import mpesa_ledger as store
import mpesa_wsgi
from fake_daraja import FakeDaraja, accepted, sleep, token
from helpers import API_KEY, BOTH_ENGINES, OTHER_KEY, ROOT_DIR, FakeClock, base_env
from mpesa_gateway.admission import RateLimiter

BODY = {"phone": "0712345678", "amount": 10, "reference": "INV001"}
ENGINES = BOTH_ENGINES  # the gateway's promises on each ledger engine


def keyed(gateway, key, body=BODY, status=202, api_key=API_KEY):
    return gateway.testapp.post_json("/stkpush", body, status=status, headers={
        "Authorization": f"Bearer {api_key}", "Idempotency-Key": key})


def test_same_key_same_request_replays_the_answer_without_a_second_prompt(gateway, sim):
    first = keyed(gateway, "order-1")
    gateway.wait_status(first.json["id"], "succeeded")
    again = keyed(gateway, "order-1")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json == first.json  # the stored answer, byte for byte
    assert "Idempotent-Replayed" not in first.headers
    assert sim.stats()["pushes"] == 1


def test_equivalent_phone_forms_are_the_same_request(gateway, sim):
    keyed(gateway, "order-2")
    again = keyed(gateway, "order-2", body=dict(BODY, phone="+254 712 345 678"))
    assert again.headers["Idempotent-Replayed"] == "true"
    assert sim.stats()["pushes"] == 1


def test_same_key_different_request_is_422(gateway, sim):
    keyed(gateway, "order-3")
    res = keyed(gateway, "order-3", body=dict(BODY, amount=11), status=422)
    assert res.json["error"]["code"] == "idempotency_key_reused"
    assert sim.stats()["pushes"] == 1


def test_keys_are_scoped_per_api_key(gateway, sim):
    keyed(gateway, "shared-key")
    res = keyed(gateway, "shared-key", body=dict(BODY, phone="0712000999"), api_key=OTHER_KEY)
    assert "Idempotent-Replayed" not in res.headers
    assert sim.stats()["pushes"] == 2


def test_validation_failures_are_not_stored_against_the_key(gateway, sim):
    keyed(gateway, "order-4", body=dict(BODY, amount=0), status=400)
    res = keyed(gateway, "order-4")
    assert "Idempotent-Replayed" not in res.headers
    assert sim.stats()["pushes"] == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "naïve", "tab\there"])
def test_bad_idempotency_key_is_400(gateway, key):
    res = keyed(gateway, key, status=400)
    assert res.json["error"]["code"] == "invalid_idempotency_key"


def test_refusal_before_anything_was_sent_frees_the_key(gateway, sim):
    busy = dict(BODY, phone="254711005001")  # Daraja: unable to lock subscriber
    keyed(gateway, "order-5", body=busy, status=409)
    keyed(gateway, "order-5", body=busy, status=409)  # ran again, not replayed
    assert sim.stats()["pushes"] == 2


def test_concurrent_requests_with_one_key_make_one_push(gateway, sim):
    entered, release = threading.Event(), threading.Event()

    def hold(payload):
        entered.set()
        release.wait(60)

    sim.sim.on_push = hold
    results = {}
    first = threading.Thread(target=lambda: results.update(first=keyed(gateway, "race")))
    first.start()
    assert entered.wait(60)
    second = keyed(gateway, "race", status=409)
    assert second.json["error"]["code"] == "idempotency_key_in_use"
    assert second.headers["Retry-After"]
    release.set()
    first.join(60)
    assert results["first"].status_int == 202
    assert sim.stats()["pushes"] == 1
    assert keyed(gateway, "race").json == results["first"].json


def test_replay_after_unknown_returns_unknown_and_does_not_resend(tmp_path):
    fake = FakeDaraja(oauth=[token()], push=[sleep(1.0, then=accepted())])
    env = dict(base_env(fake.url, tmp_path / "u.db"), MPESA_READ_TIMEOUT="0.3")
    app = mpesa_wsgi.create_app(config.load_config(env))
    try:
        testapp = TestApp(app)
        headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "order-u"}
        first = testapp.post_json("/stkpush", BODY, headers=headers, status=202)
        assert first.json["status"] == "unknown"
        again = testapp.post_json("/stkpush", BODY, headers=headers, status=202)
        assert again.json == first.json and again.headers["Idempotent-Replayed"] == "true"
        assert fake.count("push") == 1
    finally:
        app.services.close()
        fake.close()


PROCESS_SCRIPT = """
import json, os, sys, time
from webtest import TestApp
import config, mpesa_wsgi
env, out = json.loads(sys.argv[1]), sys.argv[2]
app = mpesa_wsgi.create_app(config.load_config(env))
started = time.monotonic()
res = TestApp(app).post_json("/stkpush", {"phone": "0712345678", "amount": 10},
    headers={"Authorization": "Bearer " + env["GATEWAY_API_KEYS"].split(",")[0],
             "Idempotency-Key": "cross-process"}, expect_errors=True)
ended = time.monotonic()
with open(out + ".tmp", "w") as f:
    json.dump({"status": res.status_int, "body": res.json, "started": started,
               "ended": ended}, f)
os.replace(out + ".tmp", out)  # the answer appears whole
app.services.close()
"""


def test_two_processes_sharing_one_ledger_make_one_push(gateway_env, sim, tmp_path):
    outs = [tmp_path / f"answer{n}.json" for n in range(2)]

    def hold_until_the_other_answered(payload):
        # The push that got through is held until the other process has its answer, so the
        # two requests provably overlap: the other one ran while this one was at Daraja.
        deadline = time.monotonic() + 60
        while not any(out.exists() for out in outs) and time.monotonic() < deadline:
            time.sleep(0.02)

    sim.sim.on_push = hold_until_the_other_answered
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS_SCRIPT, json.dumps(gateway_env),
                               str(out)], cwd=ROOT_DIR, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    answers = [json.loads(out.read_text()) for out in outs]
    first, second = sorted(answers, key=lambda a: a["ended"])
    # CLOCK_MONOTONIC is one clock for every process on the machine.
    assert first["started"] < second["ended"] and second["started"] < first["ended"], (
        "the two requests did not overlap")
    assert (first["status"], second["status"]) == (409, 202), answers
    assert first["body"]["error"]["code"] == "idempotency_key_in_use"
    assert second["body"]["status"] == "pending"
    assert sim.stats()["pushes"] == 1


def test_second_payment_to_a_phone_with_a_pending_one_is_409(gateway, sim):
    first = gateway.push(BODY)
    res = gateway.push(dict(BODY, amount=20), status=409)
    assert res.json["error"]["code"] == "payment_in_progress"
    assert first.json["id"] in res.json["error"]["message"]
    assert sim.stats()["pushes"] == 1
    gateway.wait_status(first.json["id"], "succeeded")
    gateway.push(dict(BODY, amount=20))  # settled: the phone is free again
    assert sim.stats()["pushes"] == 2


BURST = 3


@pytest.fixture
def limited_gateway(gateway_env):
    """Rate 1/s, burst BURST, on a clock the test moves: no request refills a bucket by
    merely being slow."""
    clock = FakeClock(time.time())
    app = mpesa_wsgi.create_app(config.load_config(dict(
        gateway_env, GATEWAY_RATE="1", GATEWAY_BURST=str(BURST))), clock=clock)
    yield app, clock
    app.services.close()


# The per-process bucket on an injected clock; the fleet's bucket (PostgreSQL, the server's
# clock) is tested across two hosts in test_postgres.py.
@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_rate_limit_per_api_key_is_429_with_retry_after(limited_gateway, sim):
    app, clock = limited_gateway
    testapp = TestApp(app)
    numbers = iter(range(100))

    def post(key=API_KEY):
        return testapp.post_json("/stkpush", {"phone": f"07120000{next(numbers):02d}",
                                              "amount": 10},
                                 headers={"Authorization": f"Bearer {key}"}, status="*")

    burst = [post() for _ in range(2 * BURST)]
    assert [r.status_int for r in burst] == [202] * BURST + [429] * BURST
    for res in burst[BURST:]:
        assert res.json["error"]["code"] == "rate_limited"
        assert res.headers["Retry-After"] == "1"
    assert post(key=OTHER_KEY).status_int == 202  # another merchant has its own bucket
    assert sim.stats()["pushes"] == BURST + 1  # a 429 never reaches Daraja
    clock.advance(1)  # one token back at 1/s
    assert [post().status_int for _ in range(2)] == [202, 429]
    assert sim.stats()["pushes"] == BURST + 2


def test_token_bucket_refills_at_the_rate():
    now = [0.0]
    limiter = RateLimiter(rate=2, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.acquire("k") == 0.0
    now[0] += 100
    assert [limiter.acquire("k") for _ in range(4)][:3] == [0.0, 0.0, 0.0]


def test_stored_keys_expire_after_the_retention_window(gateway, sim):
    first = keyed(gateway, "old-key")
    gateway.wait_status(first.json["id"], "succeeded")
    assert keyed(gateway, "old-key").headers["Idempotent-Replayed"] == "true"
    gateway.clock.advance(store.IDEMPOTENCY_TTL_S + 1)  # a day later, for the whole app
    assert gateway.services.ledger.prune_idempotency() == 1
    assert "Idempotent-Replayed" not in keyed(gateway, "old-key").headers
    assert sim.stats()["pushes"] == 2
