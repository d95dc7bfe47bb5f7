"""Running it as a service: metrics, request ids and JSON logs, health checks, listing."""

import io
import json
import os
import re
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families
from webtest import TestApp

import config
import mpesa_wsgi
from helpers import API_KEY, ROOT_DIR, base_env, wait_for
from mpesa_devtools import simulator
from mpesa_gateway import logs, monitoring

AUTH = {"Authorization": f"Bearer {API_KEY}"}
METRICS_TOKEN = "metrics-token-0123456789"


@pytest.fixture
def sim_settings():
    return simulator.SimSettings(callback_delay_s=0.2, lock_subscriber=False)


@pytest.fixture
def gateway_env(sim, tmp_path):
    """Many payments in a row, some to one phone: no phone lock, a generous rate."""
    return dict(base_env(sim.url, tmp_path / "ops.db"), GATEWAY_PHONE_LOCK_S="0",
                GATEWAY_RATE="1000", GATEWAY_BURST="1000")


def samples(testapp, headers=None):
    """{(sample name, frozenset(labels)): value} from GET /metrics."""
    text = testapp.get("/metrics", headers=headers or {}, status=200).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(snapshot, name, **labels):
    return snapshot.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_by_exactly_what_happened(gateway):
    t = gateway.testapp
    before = samples(t)
    ok = gateway.push({"phone": "0712300001", "amount": 10})
    gateway.push({"phone": "254711005002", "amount": 10}, status=503)  # spike arrest
    gateway.push({"phone": "bad", "amount": 10}, status=400)
    t.get("/health", status=200)
    t.get("/health", status=200)
    t.get("/nope", status=404)
    gateway.wait_status(ok.json["id"], "succeeded", timeout=30)
    p = "mpesa_gateway_"
    callback_route = dict(route="/callback/{tx_id}/{sig}", method="POST", status="200")
    # The callback came on a real socket, and a request is accounted after its answer is
    # sent: poll until its accounting shows. (Scrapes count only /metrics, never asserted.)
    after = wait_for(lambda: value(s := samples(t), p + "http_requests_total",
                                   **callback_route) > value(before, p + "http_requests_total",
                                                             **callback_route) and s,
                     timeout=30)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(p + "http_requests_total", route="/stkpush", method="POST", status="202") == 1
    assert delta(p + "http_requests_total", route="/stkpush", method="POST", status="503") == 1
    assert delta(p + "http_requests_total", route="/stkpush", method="POST", status="400") == 1
    assert delta(p + "http_requests_total", route="/health", method="GET", status="200") == 2
    assert delta(p + "http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert delta(p + "http_requests_total", **callback_route) == 1
    assert delta(p + "http_request_duration_seconds_count", route="/stkpush") == 3
    assert delta(p + "daraja_calls_total", api="stk_push", outcome="accepted") == 1
    assert delta(p + "daraja_calls_total", api="stk_push", outcome="unavailable") == 1
    assert delta(p + "daraja_calls_total", api="oauth", outcome="accepted") == 1
    assert delta(p + "oauth_token_fetches_total", outcome="accepted") == 1
    assert delta(p + "daraja_call_duration_seconds_count", api="stk_push") == 2
    assert delta(p + "callbacks_total", outcome="applied") == 1
    assert value(after, p + "transactions", status="succeeded") == 1
    assert value(after, p + "transactions", status="rejected") == 1
    assert value(after, p + "build_info", version=config.VERSION) == 1
    text = t.get("/metrics").text
    assert "254711005002" not in text  # no phones or transaction ids as labels
    assert not re.search(r"tx_[0-9a-f]{24}", text)


def test_reconcile_queries_are_counted(gateway_env, sim):
    app = mpesa_wsgi.create_app(config.load_config(dict(gateway_env, MPESA_RECONCILE_AFTER_S="0")))
    try:
        TestApp(app).post_json("/stkpush", {"phone": "254711009999", "amount": 10}, headers=AUTH,
                               status=202)
        from mpesa_gateway import reconciler
        rec = reconciler.Reconciler(app.services.ledger, app.services.daraja, app.services.config,
                                    observer=app.services.metrics.reconcile.inc)
        # "not_yet" or, on a slow machine past the simulator's 0.2 s, "succeeded": either
        # way the one query is counted under the result the pass reports.
        results = rec.run_once()
        assert sum(results.values()) == 1, results
        for result, n in results.items():
            assert app.services.metrics.reconcile.value(result) == n
    finally:
        app.services.close()


def test_metrics_token_is_required_when_set(gateway_env, sim):
    app = mpesa_wsgi.create_app(config.load_config(dict(gateway_env,
                                                        GATEWAY_METRICS_TOKEN=METRICS_TOKEN)))
    try:
        t = TestApp(app)
        assert t.get("/metrics", status=401).json["error"]["code"] == "unauthorized"
        t.get("/metrics", headers={"Authorization": "Bearer wrong-token-0123456"}, status=401)
        res = t.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, status=200)
        assert res.content_type == "text/plain"
        assert res.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    finally:
        app.services.close()


@pytest.fixture
def json_log():
    stream = io.StringIO()
    handler = logs.configure("INFO", "json", (API_KEY,), stream=stream)
    yield stream
    import logging
    logging.getLogger().removeHandler(handler)


def lines(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_the_callers_request_id_which_is_echoed(gateway, json_log):
    res = gateway.testapp.post_json("/stkpush", {"phone": "0712300002", "amount": 10},
                                    headers=dict(AUTH, **{"X-Request-Id": "order-77.try-1"}),
                                    status=202)
    assert res.headers["X-Request-Id"] == "order-77.try-1"
    entries = [e for e in lines(json_log) if e["request_id"] == "order-77.try-1"]
    access = [e for e in entries if e["logger"] == "mpesa_wsgi.access"]
    assert len(access) == 1
    assert access[0]["route"] == "/stkpush" and access[0]["status"] == 202
    assert access[0]["tx"] == res.json["id"] and access[0]["phone"] == "2547******002"
    assert isinstance(access[0]["ms"], float)
    assert any(e["logger"] == "mpesa_gateway.daraja" and "stk_push" in e["msg"] for e in entries)


@pytest.mark.parametrize("sent", [None, "", "x" * 65, "bad id", "ok;rm", "ü"])
def test_a_missing_or_insane_request_id_is_replaced(gateway, json_log, sent):
    headers = {"X-Request-Id": sent} if sent is not None else {}
    res = gateway.testapp.get("/health", headers=headers, status=200)
    generated = res.headers["X-Request-Id"]
    assert generated != sent and len(generated) == 16
    assert [e["request_id"] for e in lines(json_log)] == [generated]


@pytest.mark.parametrize("sent", ["tel254712345678", "0712-345-678", "2547_1234_5678",
                                  "order.0712.345.678", "id:0712345678"])
def test_a_request_id_hiding_a_phone_number_is_kept_out_of_the_log(gateway, json_log, sent):
    res = gateway.testapp.get("/health", headers={"X-Request-Id": sent}, status=200)
    assert res.headers["X-Request-Id"] == sent  # the caller's own, echoed to the caller
    digits = re.sub(r"[^0-9]", "", sent)
    assert digits[-9:-3] not in json_log.getvalue()  # no line holds the middle digits
    assert [e["request_id"] for e in lines(json_log)] == ["[REDACTED]"]


def test_callback_log_lines_have_the_route_template_not_the_signature(gateway, json_log):
    res = gateway.push({"phone": "0712300003", "amount": 10})
    gateway.wait_status(res.json["id"], "succeeded", timeout=30)
    sig = gateway.services.signer.url(res.json["id"]).rsplit("/", 1)[1]
    # The access line is written after the answer went out on the real socket: wait for it.
    wait_for(lambda: "/callback/{tx_id}/{sig}" in json_log.getvalue(), timeout=30)
    assert sig not in json_log.getvalue()


def test_redaction_filter_scrubs_what_slips_through():
    f = logs.RedactFilter(["supersecretvalue"])
    assert f.scrub("key=supersecretvalue phone=254712345678 alt=0712345678") == (
        "key=[REDACTED] phone=2547******678 alt=07******678")
    assert f.scrub("POST /callback/tx_1/abcdef0123") == "POST /callback/tx_1/[REDACTED]"


def test_health_reports_checks(gateway):
    gateway.push({"phone": "0712300004", "amount": 10})
    gateway.clock.advance(monitoring.HEALTH_CHECK_EVERY_S)  # past the 1 s cache
    body = gateway.testapp.get("/health", status=200).json
    assert body["status"] == "ok"
    checks = body["checks"]
    assert checks["ledger_writable"] is True
    assert checks["pending"] == 1 and checks["unknown"] == 0
    # In seconds, on the app's clock (moved 1 s above), and the token itself never shown.
    assert checks["token_age_s"] is not None and 1 <= checks["token_age_s"] < 60
    assert "token" not in json.dumps(body).replace("token_age_s", "")


def _make_read_only(paths):
    """chmod for ordinary users; root ignores file modes, so root uses the immutable bit."""
    if os.geteuid() != 0:
        for p in paths:
            os.chmod(p, 0o444)
        return lambda: [os.chmod(p, 0o644) for p in paths]
    proc = subprocess.run(["chattr", "+i", *paths], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot make the ledger read-only as root here: {proc.stderr.strip()}")
    return lambda: subprocess.run(["chattr", "-i", *paths], check=True)


def test_health_is_503_degraded_when_the_ledger_cannot_be_written(gateway):
    db = gateway.services.config.db_path
    gateway.testapp.get("/health", status=200)
    undo = _make_read_only([db, db + "-wal"])  # not -shm: it is memory-mapped
    try:
        gateway.clock.advance(monitoring.HEALTH_CHECK_EVERY_S)  # past the 1 s cache
        body = gateway.testapp.get("/health", status=503).json
        assert body["status"] == "degraded" and body["checks"]["ledger_writable"] is False
    finally:
        undo()
    gateway.clock.advance(monitoring.HEALTH_CHECK_EVERY_S)
    assert gateway.testapp.get("/health", status=200).json["status"] == "ok"


# --- operator listing ------------------------------------------------------------------


@pytest.fixture
def listing(gateway):
    """35 payments: 30 succeeded, 5 cancelled (the scenario phone, reused)."""
    ids = []
    for n in range(35):
        phone = "254711001032" if n % 7 == 0 else f"07123{n:05d}"
        ids.append(gateway.push({"phone": phone, "amount": 10 + n}).json["id"])
    wait_for(lambda: gateway.services.ledger.count_by_status().get("pending", 0) == 0, timeout=60)
    return ids


def page_through(testapp, query, limit):
    seen, cursor, pages = [], None, 0
    while True:
        q = f"{query}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        body = testapp.get(f"/transactions?{q}", headers=AUTH, status=200).json
        seen += body["data"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, pages


def test_listing_pages_newest_first_without_duplicates_or_gaps(gateway, listing):
    seen, pages = page_through(gateway.testapp, "since=2000-01-01", limit=8)
    assert pages == 5
    assert [r["id"] for r in seen] == list(reversed(listing))  # newest first, all, once
    keys = [(r["created_at"], r["id"]) for r in seen]
    assert keys == sorted(keys, reverse=True)


def test_listing_filters_by_status_and_since(gateway, listing):
    failed, _ = page_through(gateway.testapp, "status=failed", limit=3)
    assert len(failed) == 5 and {r["reason"] for r in failed} == {"cancelled"}
    succeeded, _ = page_through(gateway.testapp, "status=succeeded", limit=200)
    assert len(succeeded) == 30
    future = gateway.testapp.get("/transactions?since=2999-01-01T00:00:00Z", headers=AUTH).json
    assert future == {"data": [], "next_cursor": None}


def test_listing_default_limit_and_masked_phones(gateway, listing):
    body = gateway.testapp.get("/transactions", headers=AUTH, status=200).json
    assert body["data"] == body["data"][:50] and len(body["data"]) == 35
    assert all("*" in r["phone"] for r in body["data"])


@pytest.mark.parametrize("query, field, code", [
    ("status=paid", "status", "invalid_parameter"),
    ("limit=0", "limit", "invalid_parameter"),
    ("limit=201", "limit", "invalid_parameter"),
    ("limit=ten", "limit", "invalid_parameter"),
    ("since=yesterday", "since", "invalid_parameter"),
    ("since=2026-13-01", "since", "invalid_parameter"),
    ("cursor=garbage", "cursor", "invalid_parameter"),
    ("limit=5&limit=6", "limit", "invalid_parameter"),
    ("sort=asc", "sort", "unknown_parameter"),
])
def test_bad_listing_parameters_are_400_naming_the_parameter(gateway, query, field, code):
    res = gateway.testapp.get(f"/transactions?{query}", headers=AUTH, status=400)
    assert (res.json["error"]["code"], res.json["error"]["field"]) == (code, field)


def test_listing_needs_an_api_key(gateway):
    gateway.testapp.get("/transactions", status=401)


def test_openapi_document_is_served_and_lists_every_route(gateway):
    doc = gateway.testapp.get("/openapi.json", status=200).json
    assert doc["openapi"].startswith("3.1")
    served = set(mpesa_wsgi.ROUTES) | {template for _, template, *_ in mpesa_wsgi.PREFIX_ROUTES}
    # The console's and the pay page's are for people (HTML), not the API it describes.
    assert set(doc["paths"]) == {path for path in served
                                 if not path.startswith(("/console", "/pay/"))}
    assert doc["info"]["version"] == config.VERSION  # one version source, as /health's
    assert gateway.testapp.get("/health").json["version"] == config.VERSION


FAST_AND_SLOW = """
import logging, sys
from mpesa_gateway import logs
logs.configure("INFO", sys.argv[1], ())
token = logs.REQUEST_ID.set("caller-0712345678")  # a caller's id holding a phone number
fields = {"method": "GET", "route": "/health", "status": 200, "ms": 0.4, "tx": None,
          "phone": "-"}
message = "request method=GET route=/health status=200 ms=0.4 tx=- phone=-"
logs.access(message, fields)  # the fast path: our handler is the only one
logging.getLogger().addHandler(logging.NullHandler())  # now it is not: through logging
logs.access(message, fields)
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_fast_access_line_is_the_line_logging_would_write(fmt):
    proc = subprocess.run([sys.executable, "-c", FAST_AND_SLOW, fmt], cwd=ROOT_DIR,
                          capture_output=True, text=True, timeout=60)
    fast, slow = proc.stderr.splitlines()
    if fmt == "json":
        fast, slow = json.loads(fast), json.loads(slow)
        fast.pop("ts"), slow.pop("ts")  # the times differ by a tick
        assert fast == slow and fast["request_id"] == "[REDACTED]"
    else:
        assert fast.split(" ", 2)[2] == slow.split(" ", 2)[2]  # all but the date and time
        assert "request_id=[REDACTED] request method=GET" in fast
