"""The PostgreSQL ledger's own promises: what SQLite gets from one file's write lock,
two hosts get from advisory locks and row locks; a server restart is a 503 while it is
down and nothing after; the schema is versioned; the driver is optional. A throwaway
cluster on 127.0.0.1 (tests/postgres_server.py)."""

import json
import os
import re
import subprocess
import sys
import threading

import pytest
from webtest import TestApp

import config
import mpesa_ledger as store
import mpesa_wsgi
from helpers import API_KEY, ROOT_DIR, at_once, base_env, callbacks_of, events_of, new_row, wait_for
from mpesa_ledger import postgres

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def race(ledgers, action, per_ledger=8):
    """Run `action(ledger)` from `per_ledger` threads on each ledger (each its own pool,
    like two hosts), all released at once; the results."""
    results = list(at_once(per_ledger * len(ledgers),
                           lambda n: action(ledgers[n % len(ledgers)])).values())
    assert not [r for r in results if isinstance(r, Exception)]
    return results


@pytest.fixture
def two_hosts(pg_url):
    hosts = [store.open_ledger(pg_url, pool_size=8) for _ in range(2)]
    yield hosts
    for lg in hosts:
        lg.close()


def test_one_idempotency_key_starts_one_payment_across_hosts(two_hosts):
    idem = store.Idempotency("shop", "order-1", "hash-1")
    kinds = race(two_hosts, lambda lg: lg.begin_push(
        phone="254712000001", amount=10, reference="R", description="D", idempotency=idem,
        phone_lock_s=60).kind)
    assert sorted(kinds) == ["in_flight"] * 15 + ["new"]
    assert two_hosts[0].count_by_status() == {"pending": 1}


def test_one_phone_gets_one_prompt_across_hosts(two_hosts):
    keys = iter(range(1000))
    lock = threading.Lock()

    def push(lg):
        with lock:
            n = next(keys)
        return lg.begin_push(phone="254712000002", amount=10, reference="R", description="D",
                             idempotency=store.Idempotency("shop", f"k{n}", f"h{n}"),
                             phone_lock_s=60).kind

    kinds = race(two_hosts, push)
    assert sorted(kinds) == ["new"] + ["phone_busy"] * 15


def test_claims_across_hosts_take_each_row_once(two_hosts):
    for n in range(40):
        row = new_row(two_hosts[0], phone=f"2547120100{n:02d}", amount=10, reference="R",
                                  description="D")
        two_hosts[0].mark_accepted(row["id"], f"ws_CO_{n}", "m")

    def claim_all(lg):
        got = []
        while (row := lg.claim_next(older_than_s=0, lease_s=60, unknown_window_s=0)):
            got.append(row["id"])
        return got

    claimed = [i for got in race(two_hosts, claim_all, per_ledger=4) for i in got]
    assert len(claimed) == len(set(claimed)) == 40


def test_a_server_restart_is_503_while_down_and_heals_without_a_gateway_restart(
        pg_cluster, pg_url, sim):
    app = mpesa_wsgi.create_app(config.load_config(dict(
        base_env(sim.url, pg_url), GATEWAY_PHONE_LOCK_S="0", GATEWAY_DB_WAIT_S="1")))
    t = TestApp(app)
    try:
        tx = t.post_json("/stkpush", {"phone": "0712000003", "amount": 10}, headers=AUTH,
                         status=202).json
        pushes = sim.stats()["pushes"]
        callback = "/" + app.services.signer.url(tx["id"]).split("/", 3)[3]
        pg_cluster.stop()
        try:
            res = t.post_json("/stkpush", {"phone": "0712000004", "amount": 10}, headers=AUTH,
                              status=503)
            assert res.json["error"]["code"] == "ledger_unavailable"
            assert sim.stats()["pushes"] == pushes  # nothing sent to Daraja
            for path in (f"/transactions/{tx['id']}", "/transactions", "/events"):
                res = t.get(path, headers=AUTH, status=503)  # reads too: never a 500
                assert res.json["error"]["code"] == "ledger_unavailable"
                assert res.headers["Retry-After"]
            res = t.post(callback, b'{"Body": {}}', content_type="application/json",
                         status=400)  # stored in the spool, as malformed as it came
            assert res.json["error"]["code"] == "invalid_callback"
            assert app.services.spool.depth() == 1
            assert t.get("/health", status=503).json["checks"]["ledger_writable"] is False
            assert "mpesa_gateway_http_requests_total" in t.get("/metrics", status=200).text
        finally:
            pg_cluster.start()
        wait_for(lambda: t.get("/health", expect_errors=True).status_int == 200, timeout=60,
                 interval=0.5)
        t.post_json("/stkpush", {"phone": "0712000005", "amount": 10}, headers=AUTH,
                    status=202)
        wait_for(lambda: app.services.spool.depth() == 0, timeout=30)  # the replayer's
        assert [c["outcome"] for c in callbacks_of(app.services.ledger, tx["id"])] == [
            "malformed"]
    finally:
        app.services.close()


def _cli(env, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
    return subprocess.run([sys.executable, "mpesa_wsgi.py", *args], cwd=ROOT_DIR,
                          env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_migrate_creates_the_schema_once_and_never_shows_the_password(pg_url):
    secret_url = pg_url.replace("gateway@", "gateway:pw-do-not-print@")  # trust auth: unused
    env = dict(base_env("http://127.0.0.1:9", secret_url))
    for _ in range(2):  # the second run finds nothing to do
        proc = _cli(env, "migrate")
        assert proc.returncode == 0, proc.stderr
        assert f"schema_version={postgres.MIGRATIONS[-1][0]}" in proc.stdout
        assert "pw-do-not-print" not in proc.stdout + proc.stderr
    proc = _cli(env, "--check-config")
    assert "pw-do-not-print" not in proc.stdout and "gateway:********@" in proc.stdout


def test_migrate_needs_only_the_database_not_the_daraja_credentials(pg_url):
    proc = _cli({"GATEWAY_DB": pg_url}, "migrate")
    assert proc.returncode == 0, proc.stderr
    assert f"schema_version={postgres.MIGRATIONS[-1][0]}" in proc.stdout


def _run_sql(url, script):
    """Each statement of `script` (comments dropped), as the role `url` names."""
    import psycopg

    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in filter(str.strip, "\n".join(lines).split(";")):
            conn.execute(statement)


def test_a_serving_role_with_the_documented_grants_runs_and_without_them_is_one_line(
        pg_cluster, sim):
    """deploy/postgresql/grants.sql: an owner role makes the tables, the serving role
    may only touch rows; before the grants, `migrate` as the serving role is one line."""
    name = "grants_test"  # the steps of grants.sql's comments, as a superuser
    _run_sql(pg_cluster.url(), "CREATE ROLE gateway_owner LOGIN; CREATE ROLE gw_serving LOGIN")
    _run_sql(pg_cluster.url(), f"CREATE DATABASE {name} OWNER gateway_owner")
    owner = pg_cluster.url(name).replace("gateway@", "gateway_owner@")
    serving = pg_cluster.url(name).replace("gateway@", "gw_serving@")
    assert _cli({"GATEWAY_DB": owner}, "migrate").returncode == 0

    refused = _cli({"GATEWAY_DB": serving}, "migrate")
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert "permission denied" in refused.stderr and "grants.sql" in refused.stderr
    stranger = _cli({"GATEWAY_DB": serving.replace("gw_serving@", "nobody@"),
                     "GATEWAY_DB_WAIT_S": "1"}, "migrate")  # the server's reason, one line
    assert stranger.returncode == 2 and len(stranger.stderr.strip().splitlines()) == 1
    assert 'role "nobody" does not exist' in stranger.stderr

    with open(os.path.join(ROOT_DIR, "deploy", "postgresql", "grants.sql")) as f:
        script = f.read()  # its role and database names, as this cluster has them
    script = re.sub(r"\bgateway\b", "gw_serving", script).replace(" mpesa ", f" {name} ")
    _run_sql(owner, script)
    again = _cli({"GATEWAY_DB": serving}, "migrate")
    assert again.returncode == 0, again.stderr
    app = mpesa_wsgi.create_app(config.load_config(dict(
        base_env(sim.url, serving), GATEWAY_RECONCILE="off", GATEWAY_WEBHOOK_SENDER="off")))
    try:
        tx = TestApp(app).post_json("/stkpush", {"phone": "0712000031", "amount": 10},
                                    headers=dict(AUTH, **{"Idempotency-Key": "k1"}),
                                    status=202).json
        assert app.services.ledger.get(tx["id"])["status"] == "pending"
        assert app.services.ledger.writable()
    finally:
        app.services.close()
    # A grant taken back later is found at the next start, named, not at the next callback.
    _run_sql(owner, "REVOKE INSERT ON callbacks FROM gw_serving")
    revoked = _cli({"GATEWAY_DB": serving}, "migrate")
    assert revoked.returncode == 2 and len(revoked.stderr.strip().splitlines()) == 1
    assert "rows of callbacks (run grants.sql" in revoked.stderr


def test_asking_for_postgresql_without_the_driver_is_one_message(tmp_path):
    env = dict(base_env("http://127.0.0.1:9", "postgresql://gateway@127.0.0.1:9/none"))
    blocker = tmp_path / "sitecustomize.py"  # this interpreter cannot import psycopg
    blocker.write_text("import sys\nsys.modules['psycopg'] = None\n")
    proc = _cli(dict(env, PYTHONPATH=str(tmp_path)), "migrate")
    assert proc.returncode == 2
    assert "psycopg is not installed" in proc.stderr and "Traceback" not in proc.stderr


def test_migrate_ledger_copies_a_ledger_made_by_the_gateway_and_verifies_it(
        tmp_path, pg_url, sim):
    source = str(tmp_path / "old.db")
    app = mpesa_wsgi.create_app(config.load_config(dict(
        base_env(sim.url, source), GATEWAY_WEBHOOK_URLS="default:http://127.0.0.1:9/e",
        GATEWAY_WEBHOOK_SECRETS="default:whsec_" + "A" * 32,
        GATEWAY_WEBHOOK_ALLOW_PRIVATE="on", GATEWAY_WEBHOOK_SENDER="off")))
    t = TestApp(app)
    ids = []
    for n, phone in enumerate(("0712000021", "0712000022", "0712000023")):
        if n == 2:
            sim.sim.set_weather(push="internal")  # ends unknown: a payment.unknown event
        ids.append(t.post_json("/stkpush", {"phone": phone, "amount": 10 + n}, headers=dict(
            AUTH, **{"Idempotency-Key": f"order-{n}"})).json["id"])
    path = "/" + app.services.signer.url(ids[0]).split("/", 3)[3]
    t.post(path, b'{"Body": "nope"}', content_type="application/json", status=400)  # stored
    paid = app.services.ledger.get(ids[1])
    t.post("/" + app.services.signer.url(ids[1]).split("/", 3)[3], json.dumps({"Body": {
        "stkCallback": {"MerchantRequestID": paid["merchant_request_id"],
                        "CheckoutRequestID": paid["checkout_request_id"], "ResultCode": 0,
                        "ResultDesc": "ok", "CallbackMetadata": {"Item": [
                            {"Name": "Amount", "Value": 11},
                            {"Name": "MpesaReceiptNumber", "Value": "UKQ0000011"}]}}}}),
           content_type="application/json", status=200)
    before = {i: app.services.ledger.get(i) for i in ids}
    events_before = events_of(app.services.ledger)
    receipts = "SELECT receipt, tx_id FROM receipts ORDER BY receipt"
    receipts_before = app.services.ledger._read(receipts)
    assert receipts_before  # a receipt pays once, in the new ledger too
    app.services.close()
    proc = _cli({}, "migrate-ledger", "--from", source, "--to", pg_url)
    assert proc.returncode == 0, proc.stderr
    assert len(events_before) == 2  # the unknown push's event, the paid one's
    for part in ("transactions=3", "idempotency_keys=3", "callbacks=2", "events=2", "receipts=1",
                 "amount_total=33"):
        assert part in proc.stdout
    moved = store.open_ledger(pg_url)
    try:
        assert {i: moved.get(i) for i in ids} == before
        assert [(e["id"], e["type"], e["body"]) for e in events_of(moved)] == [
            (e["id"], e["type"], e["body"]) for e in events_before]
        assert len(callbacks_of(moved, ids[0])) == 1
        assert moved._read(receipts) == receipts_before
    finally:
        moved.close()
    again = _cli({}, "migrate-ledger", "--from", source, "--to", pg_url)
    assert again.returncode == 2 and "not empty" in again.stderr
    typo = _cli({}, "migrate-ledger", "--from", source + "x", "--to", pg_url)
    assert typo.returncode == 2 and "no gateway ledger there" in typo.stderr
    assert not os.path.exists(source + "x")  # a mistyped path is not created


@pytest.fixture
def two_gateways(pg_url, sim):
    """Two gateways (two pools: as two hosts would) on one PostgreSQL ledger."""
    def make(**env):
        return mpesa_wsgi.create_app(config.load_config(dict(
            base_env(sim.url, pg_url), GATEWAY_PHONE_LOCK_S="0", **env)))

    made = []

    def both(**env):
        made.extend([make(**env), make(**env)])
        return made[-2:]

    yield both
    for app in made:
        app.services.close()


def test_the_fleet_makes_one_oauth_call_for_a_cold_rush_on_two_hosts(two_gateways, sim):
    apps = two_gateways(GATEWAY_RATE="1000", GATEWAY_BURST="1000", GATEWAY_THREADS="16")
    phones = iter(f"07120003{n:02d}" for n in range(100))
    lock = threading.Lock()

    def push(app):
        with lock:
            phone = next(phones)
        return TestApp(app).post_json("/stkpush", {"phone": phone, "amount": 10},
                                      headers=AUTH).status_int

    assert race(apps, push) == [202] * 16
    assert sim.stats()["tokens_issued"] == 1  # one token for 16 pushes on two "hosts"


def test_a_token_daraja_called_invalid_is_dropped_for_the_whole_fleet(two_gateways, sim):
    first, second = two_gateways()
    TestApp(first).post_json("/stkpush", {"phone": "0712000401", "amount": 10},
                             headers=AUTH, status=202)
    token = first.services.daraja.tokens.get()
    first.services.ledger.drop_token(token)  # as after Daraja's "Invalid Access Token"
    TestApp(second).post_json("/stkpush", {"phone": "0712000402", "amount": 10},
                              headers=AUTH, status=202)
    assert sim.stats()["tokens_issued"] == 2  # the second host fetched a new one
    assert second.services.daraja.tokens.get() != token


def test_two_hosts_together_allow_the_configured_rate_not_twice_it(two_gateways):
    apps = two_gateways(GATEWAY_RATE="0.5", GATEWAY_BURST="4")
    answers = [TestApp(apps[n % 2]).post_json(
        "/stkpush", {"phone": f"07120005{n:02d}", "amount": 10}, headers=AUTH,
        expect_errors=True) for n in range(12)]
    # 4 from the burst, and at most one more refilled while the 12 were sent (0.5/s);
    # two per-process buckets would have allowed 8.
    statuses = [a.status_int for a in answers]
    assert statuses.count(202) in (4, 5) and statuses.count(429) == 12 - statuses.count(202)
    refused = next(a for a in answers if a.status_int == 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 2  # a token every 2 s, partly refilled
