"""Merchant webhooks: events written with the status change, signed as Standard Webhooks
(verified here with the `standardwebhooks` library, as a merchant would), delivered at
least once with backoff, never to a private address unless allowed. Receivers are real
WSGI servers on 127.0.0.1."""

import base64
import contextlib
import dataclasses
import json
import threading
import time

import pytest
from standardwebhooks import Webhook
from webtest import TestApp

import cli
from helpers import (
    API_KEY,
    BOTH_ENGINES,
    FakeClock,
    OffsetClock,
    events_of,
    free_port,
    new_row,
    serve,
    served_gateway,
    wait_for,
)
from mpesa_devtools.receiver import request_headers
from mpesa_gateway import webhooks

ENGINES = BOTH_ENGINES  # on each ledger engine

SECRET = "whsec_" + base64.b64encode(b"merchant-signing-secret-0123456789").decode()
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Receiver:
    """A merchant endpoint: records what it gets; answers with `status` (or a script)."""

    def __init__(self):
        self.status = 204
        self.script = None  # a WSGI app to answer with instead
        self.got = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        headers = request_headers(environ)
        with self.lock:
            self.got.append((headers, body))
        if self.script is not None:
            return self.script(environ, start_response)
        status = self.status
        start_response(f"{status} X", [("Content-Length", "0")] + (
            [("Location", "http://127.0.0.1:9/elsewhere")] if 300 <= status < 400 else []))
        return [b""]


@pytest.fixture
def receiver():
    r = Receiver()
    server, url = serve(r, threads=4)
    r.url = url
    yield r
    server.shutdown()


@pytest.fixture
def hooked(gateway_env, receiver):
    """The gateway with a webhook endpoint for `default`; the sender run by hand."""
    with contextlib.ExitStack() as made:
        def make(clock=None, **env):
            # served: the simulator's callbacks reach the app there
            handle = made.enter_context(served_gateway(
                {**gateway_env, "GATEWAY_WEBHOOK_URLS": f"default:{receiver.url}/events",
                 "GATEWAY_WEBHOOK_SECRETS": f"default:{SECRET}",
                 "GATEWAY_WEBHOOK_ALLOW_PRIVATE": "on", "GATEWAY_WEBHOOK_SENDER": "off",
                 **env}, clock=clock))
            return handle.app, handle.services.config

        yield make


def verified(receiver):
    """Every delivered request, checked with the Standard Webhooks library."""
    hook = Webhook(SECRET)
    return [(headers["webhook-id"], hook.verify(body, headers)) for headers, body in receiver.got]


@pytest.mark.parametrize("phone, event_type, status", [
    ("0712345678", "payment.succeeded", "succeeded"),
    ("254711001032", "payment.failed", "failed"),
])
def test_a_settled_payment_sends_one_signed_event(hooked, receiver, phone, event_type, status):
    app, cfg = hooked()
    tx = TestApp(app).post_json("/stkpush", {"phone": phone, "amount": 10}, headers=AUTH).json
    wait_for(lambda: app.services.ledger.get(tx["id"])["status"] == status, timeout=30)
    # Written with the status change, not yet sent.
    [event] = events_of(app.services.ledger, tx["id"])
    assert (event["type"], event["status"]) == (event_type, "pending")
    assert webhooks.Sender(app.services.ledger, cfg).run_once() == {"delivered": 1}
    [(msg_id, payload)] = verified(receiver)
    assert msg_id == event["id"]
    assert payload["type"] == event_type and payload["data"]["id"] == tx["id"]
    assert payload["data"]["status"] == status and "******" in payload["data"]["phone"]
    assert webhooks.Sender(app.services.ledger, cfg).run_once() == {}  # delivered once


def test_a_push_that_ends_unknown_sends_payment_unknown_then_its_outcome(hooked, receiver,
                                                                         sim):
    app, cfg = hooked()
    sim.sim.set_weather(push="internal")  # processed, but answered 500.003.1001
    tx = TestApp(app).post_json("/stkpush", {"phone": "0712345670", "amount": 10},
                                headers=AUTH).json
    assert tx["status"] == "unknown"
    wait_for(lambda: app.services.ledger.get(tx["id"])["status"] == "succeeded", timeout=30)
    assert webhooks.Sender(app.services.ledger, cfg).run_once() == {"delivered": 2}
    payloads = [p for _, p in verified(receiver)]
    assert [(p["type"], p["data"]["status"]) for p in payloads] == [
        ("payment.unknown", "unknown"), ("payment.succeeded", "succeeded")]
    assert payloads[0]["data"]["reason"] == "upstream_error"


def test_a_push_cut_off_by_a_crash_sends_payment_unknown_from_recovery(hooked, receiver):
    clock = OffsetClock()
    app, cfg = hooked(clock=clock)
    row = new_row(app.services.ledger, phone="254712345671")
    clock.advance(app.services.daraja.longest_push_s + 1)
    hooked(clock=clock)  # a restart: recovery finds the row left `submitting`
    assert app.services.ledger.get(row["id"])["status"] == "unknown"
    sender = webhooks.Sender(app.services.ledger, cfg, clock=clock.wall)
    assert sender.run_once() == {"delivered": 1}
    [(_, payload)] = verified(receiver)
    assert (payload["type"], payload["data"]["id"], payload["data"]["reason"]) == (
        "payment.unknown", row["id"], "interrupted")


def test_a_late_success_after_a_failure_says_what_it_overrides(hooked, receiver):
    app, cfg = hooked()
    t = TestApp(app)
    tx = t.post_json("/stkpush", {"phone": "254711001032", "amount": 10}, headers=AUTH).json
    wait_for(lambda: app.services.ledger.get(tx["id"])["status"] == "failed", timeout=30)
    success = {"Body": {"stkCallback": {
        "MerchantRequestID": "m", "CheckoutRequestID": tx["checkout_request_id"],
        "ResultCode": 0, "ResultDesc": "ok", "CallbackMetadata": {"Item": [
            {"Name": "Amount", "Value": 10}, {"Name": "MpesaReceiptNumber",
                                              "Value": "UKQ7777777"}]}}}}
    path = "/" + app.services.signer.url(tx["id"]).split("/", 3)[3]
    t.post(path, json.dumps(success), content_type="application/json", status=200)
    assert webhooks.Sender(app.services.ledger, cfg).run_once() == {"delivered": 2}
    payloads = [p for _, p in verified(receiver)]
    assert [p["type"] for p in payloads] == ["payment.failed", "payment.succeeded"]  # in order
    assert payloads[1]["data"]["previous_status"] == "failed"
    assert payloads[1]["data"]["receipt"] == "UKQ7777777"


def test_a_receiver_down_then_up_gets_the_event_once_on_the_backoff_schedule(hooked,
                                                                            receiver):
    clock = OffsetClock()
    app, cfg = hooked(clock=clock)
    tx = TestApp(app).post_json("/stkpush", {"phone": "0712345679", "amount": 10},
                                headers=AUTH).json
    wait_for(lambda: app.services.ledger.get(tx["id"])["status"] == "succeeded", timeout=30)
    sender = webhooks.Sender(app.services.ledger, cfg, clock=clock.wall,
                             rng=lambda: 0.5)  # no jitter
    receiver.status = 503
    waits = []
    for _ in range(3):
        assert sender.run_once() == {"pending": 1}
        event = events_of(app.services.ledger, tx["id"])[0]
        waits.append(round(event["next_attempt_at"] - clock.wall()))
        assert sender.run_once() == {}  # not due yet
        clock.advance(waits[-1])
    assert waits == [5, 30, 120]
    receiver.status = 200
    assert sender.run_once() == {"delivered": 1}
    event = events_of(app.services.ledger, tx["id"])[0]
    assert (event["status"], event["attempts"]) == ("delivered", 4)
    assert [a["status_code"] for a in event["attempts_log"]] == [503, 503, 503, 200]
    assert len({h["webhook-id"] for h, _ in receiver.got}) == 1  # one event, four tries


@pytest.mark.parametrize("answer", [500, 302])
def test_a_non_2xx_answer_or_a_redirect_is_not_delivery(hooked, receiver, answer):
    app, cfg = hooked()
    tx = TestApp(app).post_json("/stkpush", {"phone": "0712345670", "amount": 10},
                                headers=AUTH).json
    wait_for(lambda: app.services.ledger.get(tx["id"])["status"] == "succeeded", timeout=30)
    receiver.status = answer
    assert webhooks.Sender(app.services.ledger, cfg).run_once() == {"pending": 1}
    assert len(receiver.got) == 1  # the redirect was not followed
    assert events_of(app.services.ledger, tx["id"])[0]["attempts_log"][0]["status_code"] == answer


def test_three_days_of_failures_make_the_event_dead(hooked, receiver):
    clock = OffsetClock()
    app, cfg = hooked(clock=clock, GATEWAY_WEBHOOK_URLS="default:http://127.0.0.1:9/refused")
    tx = TestApp(app).post_json("/stkpush", {"phone": "0712345671", "amount": 10},
                                headers=AUTH).json
    wait_for(lambda: app.services.ledger.get(tx["id"])["status"] == "succeeded", timeout=30)
    clock.advance(webhooks.GIVE_UP_AFTER_S)
    assert webhooks.Sender(app.services.ledger, cfg, clock=clock.wall).run_once() == {"dead": 1}
    event = events_of(app.services.ledger, tx["id"])[0]
    assert event["attempts_log"][0]["error"]  # connection refused, recorded


def unknown_events(app, owner, count):
    """`count` payments of `owner` ended `unknown`, each leaving one event in the outbox."""
    for _ in range(count):
        row = new_row(app.services.ledger, phone="254712000000", owner=owner)
        app.services.ledger.mark_not_accepted(row["id"], "unknown", "read_timeout")


def test_a_dead_endpoint_costs_the_other_merchants_one_attempt_per_pass(hooked, receiver):
    clock = OffsetClock()
    dead = f"http://127.0.0.1:{free_port()}/refused"
    app, cfg = hooked(clock=clock, GATEWAY_API_KEYS=f"dead:{'d' * 32},live:{'l' * 32}",
                      GATEWAY_WEBHOOK_URLS=f"dead:{dead},live:{receiver.url}/events",
                      GATEWAY_WEBHOOK_SECRETS=f"dead:{SECRET},live:{SECRET}")
    unknown_events(app, "dead", 5)
    unknown_events(app, "live", 5)
    sender = webhooks.Sender(app.services.ledger, cfg, clock=clock.wall, rng=lambda: 0.5)
    assert sender.run_once() == {"pending": 1, "delivered": 5}
    assert sum(e["attempts"] for e in events_of(app.services.ledger) if e["owner"] == "dead") == 1
    assert sender.run_once() == {}  # the dead endpoint rests; nothing else is due
    clock.advance(webhooks.REST_S)
    assert sender.run_once() == {"pending": 1}  # one more try, not four
    clock.advance(webhooks.REST_S)
    assert sender.run_once() == {}  # two failures in a row: the rest doubled
    clock.advance(webhooks.REST_S)
    assert sender.run_once() == {"pending": 1}
    assert len(verified(receiver)) == 5


def test_delivered_and_dead_events_are_forgotten_after_30_days(hooked, receiver):
    clock = OffsetClock()
    app, cfg = hooked(clock=clock)
    unknown_events(app, "default", 2)
    sender = webhooks.Sender(app.services.ledger, cfg, clock=clock.wall)
    assert sender.run_once() == {"delivered": 2}
    clock.advance(webhooks.KEEP_S - 60)
    unknown_events(app, "default", 1)  # a newer one, still pending
    receiver.status = 503
    assert sender.run_once() == {"pending": 1}
    assert len(events_of(app.services.ledger)) == 3  # nothing is 30 days old yet
    newer = events_of(app.services.ledger)[-1]["id"]
    clock.advance(120)
    sender.run_once()  # the newer one fails again; the two delivered ones are gone
    assert [(e["id"], e["status"]) for e in events_of(app.services.ledger)] == [(newer, "pending")]


def test_the_cron_reconciler_writes_the_event_with_the_status(hooked, receiver):
    app, cfg = hooked(MPESA_RECONCILE_AFTER_S="0")
    tx = TestApp(app).post_json("/stkpush", {"phone": "254711009999", "amount": 10},
                                headers=AUTH).json  # its callback never comes
    wait_for(lambda: not app.services.daraja.stk_query(tx["checkout_request_id"]).pending,
             timeout=30)
    assert cli.reconcile_once(cfg) == 0  # `python mpesa_wsgi.py reconcile`, from cron
    assert app.services.ledger.get(tx["id"])["status"] == "succeeded"
    [event] = events_of(app.services.ledger, tx["id"])
    assert event["type"] == "payment.succeeded"


def test_a_cron_pass_starts_no_background_thread(hooked, receiver):
    """`reconcile` and `deliver` from cron do their one pass on the calling thread: no
    reconciler thread and no webhook sender, whatever the serving settings say."""
    app, cfg = hooked()
    serving = dataclasses.replace(cfg, reconcile=True, webhook_sender=True)
    started = set()  # the name of every thread that starts meanwhile
    threading.setprofile(lambda *_: started.add(threading.current_thread().name))
    try:
        assert cli.reconcile_once(serving) == 0
        assert cli.deliver_once(serving) == 0
    finally:
        threading.setprofile(None)
    assert not {"reconciler", "webhooks"} & started


def test_a_redelivery_asked_for_during_an_attempt_still_happens(hooked, receiver):
    clock = OffsetClock()
    app, cfg = hooked(clock=clock)
    unknown_events(app, "default", 1)
    [event] = events_of(app.services.ledger)
    asked = threading.Event()

    def redeliver_mid_attempt(environ, start_response):
        app.services.ledger.redeliver(event["id"])  # the operator clicks while the POST is out
        asked.set()
        start_response("503 X", [("Content-Length", "0")])
        return [b""]

    receiver.status = None
    receiver.script = redeliver_mid_attempt
    sender = webhooks.Sender(app.services.ledger, cfg, clock=clock.wall)
    assert sender.run_once() == {"pending": 1} and asked.is_set()
    after = app.services.ledger.event(event["id"])
    assert after["next_attempt_at"] <= clock.wall()  # due now, not in 5 s of backoff
    assert after["attempts"] == 1  # the backoff starts again from its first step
    receiver.script = None
    receiver.status = 204
    clock.advance(webhooks.REST_S)  # the owner's rest after the failure
    assert sender.run_once() == {"delivered": 1}


def test_the_sender_connects_to_the_addresses_it_checked_with_the_endpoints_host(hooked,
                                                                               receiver):
    from webtest.http import StopableWSGIServer

    v6 = StopableWSGIServer.create(receiver, host="::1", port=0)  # only on ::1
    port = v6.effective_port
    try:
        app, cfg = hooked(GATEWAY_WEBHOOK_URLS=f"default:http://merchant.example:{port}/x")
        unknown_events(app, "default", 1)
        looked_up = []

        def resolve(host):  # the name has both; nothing answers on 127.0.0.1 at that port
            looked_up.append(host)
            return ["::1", "127.0.0.1"]

        assert webhooks.Sender(app.services.ledger, cfg, resolve=resolve).run_once() == {
            "delivered": 1}  # 127.0.0.1 refused, so the other checked address
        assert looked_up == ["merchant.example"]  # one lookup: no second one to be fooled by
        [(headers, _)] = receiver.got
        assert headers["host"] == f"merchant.example:{port}"
    finally:
        v6.shutdown()


def test_an_endpoint_with_user_and_password_gets_basic_auth(hooked, receiver):
    user_url = receiver.url.replace("http://", "http://shop:p%40ss@") + "/events"
    app, cfg = hooked(GATEWAY_WEBHOOK_URLS=f"default:{user_url}")
    unknown_events(app, "default", 1)
    assert webhooks.Sender(app.services.ledger, cfg).run_once() == {"delivered": 1}
    [(headers, _)] = receiver.got
    assert base64.b64decode(headers["authorization"].split()[1]) == b"shop:p@ss"


def test_the_whole_backoff_schedule_with_its_jitter():
    steps = [webhooks.next_attempt_in(n, rng=lambda: 0.5) for n in range(1, 9)]
    assert steps == [5, 30, 120, 600, 3600, 21600, 21600, 21600]
    for n, base in ((1, 5), (6, 21600)):
        low, high = (webhooks.next_attempt_in(n, rng=lambda r=r: r) for r in (0.0, 1.0))
        assert (low, high) == pytest.approx((base * 0.9, base * 1.1))


def test_an_event_is_retried_until_three_days_then_dead(hooked, receiver):
    clock = OffsetClock()
    app, cfg = hooked(clock=clock)
    unknown_events(app, "default", 2)
    receiver.status = 503
    sender = webhooks.Sender(app.services.ledger, cfg, clock=clock.wall)
    clock.advance(3 * 24 * 3600 - 60)
    assert sender.run_once() == {"pending": 1}  # a minute short of three days: once more
    clock.advance(120)
    assert sender.run_once() == {"dead": 1}  # the other one, past three days


@pytest.mark.parametrize("address", [
    "127.0.0.1", "::1", "169.254.169.254", "10.0.0.1", "192.168.1.1", "172.16.0.5",
    "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1", "192.0.0.192", "224.0.0.1", "ff02::1",
    "fec0::1", "fe80::1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "::127.0.0.1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe"])  # the last: Teredo around 127.0.0.1
def test_the_guard_refuses_local_and_private_addresses_unless_allowed(address):
    assert not webhooks.address_allowed(address)
    assert webhooks.address_allowed(address, allow_private=True)


def test_the_guard_allows_a_public_address_without_connecting():
    assert webhooks.address_allowed("196.201.214.200")
    assert webhooks.address_allowed("2001:4860:4860::8888")


def test_an_endpoint_that_resolves_to_a_private_address_is_never_called(hooked, receiver):
    app, cfg = hooked(GATEWAY_WEBHOOK_ALLOW_PRIVATE="off")
    tx = TestApp(app).post_json("/stkpush", {"phone": "0712345672", "amount": 10},
                                headers=AUTH).json
    wait_for(lambda: app.services.ledger.get(tx["id"])["status"] == "succeeded", timeout=30)
    assert webhooks.Sender(app.services.ledger, cfg).run_once() == {"pending": 1}
    assert receiver.got == []
    assert "private" in events_of(app.services.ledger, tx["id"])[0]["attempts_log"][0]["error"]


def test_no_endpoint_no_events(gateway):
    tx = gateway.push({"phone": "0712345673", "amount": 10}).json
    gateway.wait_status(tx["id"], "succeeded", timeout=30)
    assert events_of(gateway.services.ledger, tx["id"]) == []  # nothing written nobody would read


def test_operators_list_read_and_redeliver_their_own_events(hooked, receiver):
    from helpers import OTHER_KEY

    app, cfg = hooked()
    t = TestApp(app, lint=True)
    tx = t.post_json("/stkpush", {"phone": "0712345674", "amount": 10}, headers=AUTH).json
    wait_for(lambda: app.services.ledger.get(tx["id"])["status"] == "succeeded", timeout=30)
    receiver.status = 500
    webhooks.Sender(app.services.ledger, cfg).run_once()
    page = t.get("/events?status=pending", headers=AUTH).json
    [event] = page["data"]
    assert (event["type"], event["transaction_id"], event["attempts"]) == (
        "payment.succeeded", tx["id"], 1)
    assert page["next_cursor"] is None
    detail = t.get(f"/events/{event['id']}", headers=AUTH).json
    assert detail["attempts_log"][0]["status_code"] == 500
    assert "body" not in json.dumps(detail["attempts_log"])  # never the merchant's answer
    other = {"Authorization": f"Bearer {OTHER_KEY}"}  # another key name sees nothing
    assert t.get("/events", headers=other).json["data"] == []
    t.get(f"/events/{event['id']}", headers=other, status=404)
    t.post(f"/events/{event['id']}/redeliver", headers=other, status=404)
    receiver.status = 204
    assert t.post(f"/events/{event['id']}/redeliver", headers=AUTH,
                  status=202).json["status"] == "pending"
    assert webhooks.Sender(app.services.ledger, cfg).run_once() == {"delivered": 1}
    assert t.get(f"/events/{event['id']}", headers=AUTH).json["status"] == "delivered"
    t.post(f"/events/{event['id']}/redeliver", headers=AUTH, status=202)  # delivered: again
    assert webhooks.Sender(app.services.ledger, cfg).run_once() == {"delivered": 1}
    assert len({h["webhook-id"] for h, _ in receiver.got}) == 1  # the same webhook-id
    t.get("/events?status=sent", headers=AUTH, status=400)
    t.get("/events/msg_nope", headers=AUTH, status=404)
    t.post(f"/events/{event['id']}/again", headers=AUTH, status=404)


def test_the_backlog_shows_in_health_and_metrics(hooked, receiver):
    clock = OffsetClock()
    app, cfg = hooked(clock=clock)
    t = TestApp(app)
    tx = t.post_json("/stkpush", {"phone": "0712345675", "amount": 10}, headers=AUTH).json
    wait_for(lambda: app.services.ledger.get(tx["id"])["status"] == "succeeded", timeout=30)
    clock.advance(90)  # the event has waited a minute and a half (also past /health's cache)
    checks = t.get("/health").json["checks"]
    assert checks["webhook_backlog"] == 1 and checks["webhook_oldest_s"] >= 90
    text = t.get("/metrics").text
    oldest = float(next(line.split()[1] for line in text.splitlines()
                        if line.startswith("mpesa_gateway_webhook_oldest_undelivered_seconds ")))
    assert oldest >= 90
    webhooks.Sender(app.services.ledger, cfg, clock=clock.wall,
                    observer=app.services.metrics.webhook_deliveries.inc).run_once()
    assert 'mpesa_gateway_webhook_deliveries_total{outcome="delivered"} 1.0' in t.get(
        "/metrics").text
    clock.advance(2)
    assert t.get("/health").json["checks"]["webhook_backlog"] == 0


def test_the_demo_receivers_check_agrees_with_the_library():
    body = b'{"type":"payment.succeeded","timestamp":"2026-11-26T11:00:00Z","data":{}}'
    stamp = str(int(time.time()))
    headers = {"webhook-id": "msg_0123456789abcdef01234567", "webhook-timestamp": stamp,
               "webhook-signature": webhooks.sign(SECRET, "msg_0123456789abcdef01234567",
                                                  stamp, body)}
    now = int(stamp) + 10
    assert webhooks.verify(SECRET, headers, body, now=now) == headers["webhook-id"]
    with pytest.raises(ValueError):
        webhooks.verify(SECRET, headers, body + b" ", now=now)  # tampered
    with pytest.raises(ValueError):
        webhooks.verify(SECRET, headers, body, now=now + 3600)  # replayed an hour later
    assert Webhook(SECRET).verify(body, headers)["type"] == "payment.succeeded"


def test_admin_keys_cannot_redeliver_and_owners_redeliver_a_few_a_second(hooked, receiver):
    admin = "admin-key-0123456789abcdef"
    app, cfg = hooked(clock=FakeClock(time.time()), GATEWAY_ADMIN_KEYS=admin)  # time stands
    unknown_events(app, "default", 1)
    t = TestApp(app, lint=True)
    [event] = t.get("/events", headers={"Authorization": f"Bearer {admin}"}).json["data"]
    res = t.post(f"/events/{event['id']}/redeliver", status=403,
                 headers={"Authorization": f"Bearer {admin}"})  # reads everything, changes nothing
    assert res.json["error"]["code"] == "admin_key"
    answers = [t.post(f"/events/{event['id']}/redeliver", headers=AUTH, status="*").status_int
               for _ in range(12)]
    assert answers[:10] == [202] * 10 and 429 in answers[10:]


def test_one_owners_slow_endpoint_does_not_delay_another_owners_events(hooked, receiver):
    slow, release = Receiver(), threading.Event()
    slow_server, slow_url = serve(slow, threads=4)

    def held(environ, start_response):  # the slow merchant: holds each attempt
        release.wait(60)
        start_response("204 No Content", [("Content-Length", "0")])
        return [b""]

    slow.script = held
    try:
        app, cfg = hooked(GATEWAY_WEBHOOK_URLS=f"default:{slow_url}/events,"
                                               f"other:{receiver.url}/events",
                          GATEWAY_WEBHOOK_SECRETS=f"default:{SECRET},other:{SECRET}")
        unknown_events(app, "default", 11)  # the first attempt held, ten queued behind it
        sender = webhooks.Sender(app.services.ledger, cfg)
        passes = threading.Thread(target=sender.run_once, daemon=True)
        passes.start()
        wait_for(lambda: len(slow.got) == 1, timeout=30)  # the pass is under way, held
        unknown_events(app, "other", 1)  # another merchant's event, made during the pass
        wait_for(lambda: len(receiver.got) == 1, timeout=30)  # delivered meanwhile
        assert len(slow.got) == 1 and not release.is_set()  # one attempt per owner at once
        release.set()
        passes.join(60)
        assert len(slow.got) == 11
    finally:
        release.set()
        slow_server.shutdown()
