"""One merchant, one view: an API key's name owns the payments it makes; other names
cannot read them; admin keys read everything; the phone lock still spans every owner."""

import hashlib
import os
import subprocess
import sys

import pytest
from webtest import TestApp

import config
import mpesa_ledger as store
import mpesa_wsgi
from helpers import BOTH_ENGINES, ROOT_DIR, base_env, new_row

ENGINES = BOTH_ENGINES  # on each ledger engine

SHOP, SHOP_NEW, POS = ("shop-key-0123456789abcdef", "shop-key-rotated-0123456789",
                       "pos-key-0123456789abcdef")
LEGACY, ADMIN = "legacy-key-0123456789abcdef", "admin-key-0123456789abcdef"


def auth(key, **headers):
    return {"Authorization": f"Bearer {key}", **headers}


@pytest.fixture
def app(gateway_env):
    env = dict(gateway_env, GATEWAY_API_KEYS=f"shop:{SHOP},shop:{SHOP_NEW},pos:{POS},{LEGACY}",
               GATEWAY_ADMIN_KEYS=ADMIN, GATEWAY_PHONE_LOCK_S="60")
    gateway = mpesa_wsgi.create_app(config.load_config(env))
    yield gateway
    gateway.services.close()


def push(testapp, key, phone, status=202, **headers):
    return testapp.post_json("/stkpush", {"phone": phone, "amount": 10},
                             headers=auth(key, **headers), status=status)


def test_another_name_cannot_read_a_payment_by_id_or_checkout_id(app):
    t = TestApp(app, lint=True)
    tx = push(t, SHOP, "0712000001").json
    assert t.get(f"/transactions/{tx['id']}", headers=auth(SHOP)).json["id"] == tx["id"]
    assert t.get(f"/transactions/{tx['id']}", headers=auth(SHOP_NEW)).json["id"] == tx["id"]
    for ref in (tx["id"], tx["checkout_request_id"]):
        res = t.get(f"/transactions/{ref}", headers=auth(POS), status=404)
        assert res.json["error"]["code"] == "not_found"
    assert t.get(f"/transactions/{tx['id']}", headers=auth(ADMIN)).json["id"] == tx["id"]


def test_the_listing_shows_only_the_callers_payments(app):
    t = TestApp(app, lint=True)
    mine = {push(t, SHOP, f"071200001{n}").json["id"] for n in range(3)}
    theirs = {push(t, POS, f"071200002{n}").json["id"] for n in range(2)}

    def listed(key):
        return {r["id"] for r in t.get("/transactions", headers=auth(key)).json["data"]}

    assert listed(SHOP) == listed(SHOP_NEW) == mine
    assert listed(POS) == theirs
    assert listed(ADMIN) == mine | theirs


def test_the_phone_lock_spans_owners_without_naming_a_foreign_payment(app):
    t = TestApp(app, lint=True)
    tx = push(t, SHOP, "0712000031").json
    foreign = push(t, POS, "0712000031", status=409).json["error"]
    assert foreign["code"] == "payment_in_progress" and "tx_" not in foreign["message"]
    own = push(t, SHOP_NEW, "0712000031", status=409).json["error"]
    assert tx["id"] in own["message"]


def test_admin_keys_read_but_never_start_a_payment(app):
    res = push(TestApp(app, lint=True), ADMIN, "0712000041", status=403)
    assert res.json["error"]["code"] == "admin_key"
    assert app.services.ledger.count_by_status() == {}


def test_rows_from_before_owners_belong_to_default_and_admins(app):
    t = TestApp(app, lint=True)
    old = new_row(app.services.ledger, phone="254712000051")
    assert old["owner"] is None
    assert t.get(f"/transactions/{old['id']}", headers=auth(LEGACY)).status_int == 200
    assert t.get(f"/transactions/{old['id']}", headers=auth(ADMIN)).status_int == 200
    t.get(f"/transactions/{old['id']}", headers=auth(SHOP), status=404)
    listed = {r["id"] for r in t.get("/transactions", headers=auth(LEGACY)).json["data"]}
    assert old["id"] in listed


def test_idempotency_and_the_rate_limit_belong_to_the_name(gateway_env):
    env = dict(gateway_env, GATEWAY_API_KEYS=f"shop:{SHOP},shop:{SHOP_NEW},pos:{POS}",
               GATEWAY_BURST="2", GATEWAY_RATE="0.01", GATEWAY_PHONE_LOCK_S="0")
    app = mpesa_wsgi.create_app(config.load_config(env))
    try:
        t = TestApp(app, lint=True)
        first = push(t, SHOP, "0712000061", **{"Idempotency-Key": "order-1"}).json
        # The rotated key of the same name replays; another name's same key is its own.
        again = push(t, SHOP_NEW, "0712000061", **{"Idempotency-Key": "order-1"})
        assert again.json["id"] == first["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        assert push(t, POS, "0712000062", **{"Idempotency-Key": "order-1"}).json["id"] != (
            first["id"])
        # Burst 2 per name: shop spent one push and one replay, so its next is 429 for
        # both of its keys; pos still has one.
        push(t, SHOP, "0712000063", status=429)
        push(t, SHOP_NEW, "0712000063", status=429)
        push(t, POS, "0712000064")
    finally:
        app.services.close()


def test_keys_stored_before_names_are_found_after_the_upgrade(gateway_env, sim):
    path = gateway_env["GATEWAY_DB"]
    legacy_scope = hashlib.sha256(SHOP.encode()).hexdigest()[:16]  # how keys were scoped
    ledger = store.open_ledger(path)
    request_hash = hashlib.sha256(b'["254712000071", 10, "Payment", "Payment"]').hexdigest()
    begun = ledger.begin_push(phone="254712000071", amount=10, reference="Payment",
                              description="Payment",
                              idempotency=store.Idempotency(legacy_scope, "order-9", request_hash))
    ledger.mark_accepted(begun.row["id"], "ws_CO_legacy", "m", pin=store.PinnedAnswer(
        store.Idempotency(legacy_scope, "order-9", request_hash), begun.row["id"], 202,
        b'{"id":"%s","status":"pending"}' % begun.row["id"].encode()))
    ledger.close()
    app = mpesa_wsgi.create_app(config.load_config(dict(
        gateway_env, GATEWAY_API_KEYS=f"shop:{SHOP}")))
    try:
        res = push(TestApp(app), SHOP, "0712000071", **{"Idempotency-Key": "order-9"})
        assert res.json["id"] == begun.row["id"] and res.headers["Idempotent-Replayed"] == "true"
        assert sim.stats()["pushes"] == 0  # no second prompt across the upgrade
    finally:
        app.services.close()


@pytest.mark.parametrize("raw, message", [
    ("Shop:" + SHOP, "names must be"),
    ("shop:short", "at least 16"),
    (f"shop:{SHOP},pos:{SHOP}", "same key twice"),
])
def test_bad_key_lists_are_refused(raw, message):
    env = dict(base_env("http://127.0.0.1:9", "x.db"), GATEWAY_API_KEYS=raw)
    with pytest.raises(config.ConfigError, match=message):
        config.load_config(env)


def test_check_config_shows_names_never_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
    env.update(base_env("http://127.0.0.1:9", tmp_path / "c.db"),
               GATEWAY_API_KEYS=f"shop:{SHOP},{LEGACY}", GATEWAY_ADMIN_KEYS=ADMIN)
    proc = subprocess.run([sys.executable, "mpesa_wsgi.py", "--check-config"], cwd=ROOT_DIR,
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "GATEWAY_API_KEYS = shop:********,default:********" in proc.stdout
    assert SHOP not in proc.stdout and LEGACY not in proc.stdout and ADMIN not in proc.stdout
