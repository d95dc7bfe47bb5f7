"""Two hosts, one ledger: two gateway processes on different ports sharing one PostgreSQL,
behind a real nginx `upstream` (deploy/nginx/upstream-two-hosts.conf), one of them
SIGKILLed mid-run and restarted.

300 payments, each with an Idempotency-Key, sent to one process (or through nginx) and
retried on the other. At the end: no customer prompted twice, no 202 without its row,
one payment per key, every payment final after reconciliation, exactly one OAuth call
for the whole fleet, every webhook event delivered. Everything on 127.0.0.1.
"""

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from standardwebhooks import Webhook
from test_nginx import NGINX, SITE, main_conf, render, request

import mpesa_ledger as store
from helpers import API_KEY, ROOT_DIR, base_env, events_of, free_port, serve, wait_for
from mpesa_devtools import simulator
from mpesa_devtools.receiver import request_headers

pytestmark = [pytest.mark.slow, pytest.mark.crash]
if NGINX is None:
    pytestmark.append(pytest.mark.skip(reason="nginx is not installed"))

UPSTREAM = os.path.join(ROOT_DIR, "deploy", "nginx", "upstream-two-hosts.conf")
SECRET = "whsec_" + "ZmxlZXQtd2ViaG9vay1zaWduaW5nLXNlY3JldC0wMTIz"
PAYMENTS = 300
LOST_CALLBACK = "254711009999"  # the simulator never sends this one's callback
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


@pytest.fixture
def sim_settings():
    return simulator.SimSettings(callback_delay_s=0.2, lock_subscriber=False)


class Receiver:
    """The merchant's endpoint: verifies every event and counts each webhook-id."""

    def __init__(self):
        self.seen, self.lock = Counter(), threading.Lock()

    def __call__(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        headers = request_headers(environ)
        Webhook(SECRET).verify(body, headers)
        with self.lock:
            self.seen[headers["webhook-id"]] += 1
        start_response("204 No Content", [])
        return [b""]


def two_host_site(tmp_path, nginx_port, ports):
    """The shipped site with the shipped two-host upstream, on loopback ports."""
    with open(UPSTREAM) as f:
        upstream = f.read()
    for address, port in zip(("10.0.0.11:8000", "10.0.0.12:8000"), ports, strict=True):
        upstream = upstream.replace(address, f"127.0.0.1:{port}")
    with open(SITE) as f:
        site = render(f.read(), tmp_path, nginx_port, ports[0])
    block = re.search(r"upstream mpesa_wsgi \{.*?\n\}\n", upstream, re.S).group(0)
    site = re.sub(r"upstream mpesa_wsgi \{.*?\n\}\n", lambda _: block, site, flags=re.S)
    # One test client stands for many merchants: lift the per-address limits.
    site = re.sub(r"^(\s*limit_(req|conn) )", r"# \1", site, flags=re.M)
    return site


def post(port, body, key):
    return request("POST", port, "/stkpush", json.dumps(body), dict(AUTH, **{
        "Idempotency-Key": key}))


def test_two_hosts_behind_nginx_share_one_ledger_through_a_sigkill(sim, pg_url, tmp_path,
                                                                   report_figures):
    receiver = Receiver()
    hook_server, hook_url = serve(receiver, threads=4)
    ports, nginx_port = (free_port(), free_port()), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
    env.update(base_env(sim.url, pg_url, callback_base=f"http://127.0.0.1:{nginx_port}"),
               MPESA_CONNECT_TIMEOUT="0.2", MPESA_READ_TIMEOUT="0.5", GATEWAY_RATE="100000",
               GATEWAY_BURST="100000", GATEWAY_PHONE_LOCK_S="0", GATEWAY_RECONCILE="on",
               MPESA_RECONCILE_AFTER_S="2", MPESA_RECONCILE_BACKOFF_S="1",
               MPESA_RECONCILE_QPS="20", MPESA_CALLBACK_IP_POLICY="off",
               GATEWAY_TRUSTED_PROXY="127.0.0.1", LOG_LEVEL="WARNING",
               GATEWAY_WEBHOOK_URLS=f"default:{hook_url}/events",
               GATEWAY_WEBHOOK_SECRETS=f"default:{SECRET}", GATEWAY_WEBHOOK_ALLOW_PRIVATE="on")
    pushed = Counter()  # AccountReference → pushes the simulator received
    sim.sim.on_push = lambda payload: pushed.update([payload["AccountReference"]])
    procs = {}

    def start(port):
        procs[port] = subprocess.Popen(
            [sys.executable, "mpesa_wsgi.py"], cwd=ROOT_DIR, env=dict(env, GATEWAY_PORT=str(port)),
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"gw-{port}.log", "a"))
        wait_for(lambda: request("GET", port, "/health")[0] == 200, timeout=60, interval=0.1)

    for port in ports:
        start(port)
    (tmp_path / "site.conf").write_text(two_host_site(tmp_path, nginx_port, ports))
    (tmp_path / "nginx.conf").write_text(main_conf(tmp_path, tmp_path / "site.conf"))
    proxy = subprocess.Popen([NGINX, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    answers = {}  # key → ids of every 202 it got
    lock = threading.Lock()
    keys = iter(range(PAYMENTS))
    rng = random.Random(11)

    def pay(n):
        key = f"order-{n:05d}"
        body = {"phone": LOST_CALLBACK if n % 10 == 0 else f"0712{n:06d}",
                "amount": 10 + n % 50, "reference": f"K{n:05d}"}
        with lock:
            first = rng.choice((*ports, nginx_port))
        order = [first, ports[1] if first == ports[0] else ports[0]]
        got = []
        deadline = time.monotonic() + 120
        while len(got) < 2 and time.monotonic() < deadline:  # once, then on the other
            port = order[len(got)]
            status, answer = post(port, body, key)
            if status == 202:
                got.append(answer["id"])
            elif status == 409 and answer["error"]["code"] == "idempotency_key_in_use":
                time.sleep(0.2)  # the first request is still at Daraja
            else:
                assert status is None or status >= 500, (status, answer)
                order.reverse()  # that process is down (killed): the other one
                time.sleep(0.1)
        with lock:
            answers[key] = got

    def client():
        while True:
            with lock:
                n = next(keys, None)
            if n is None:
                return
            pay(n)

    clients = [threading.Thread(target=client) for _ in range(8)]
    ledger = store.open_ledger(pg_url)
    try:
        for t in clients:
            t.start()
        wait_for(lambda: len(answers) >= PAYMENTS // 3, timeout=120, interval=0.05)
        procs[ports[0]].kill()  # SIGKILL, mid-run
        procs[ports[0]].wait(10)
        time.sleep(1)
        start(ports[0])
        for t in clients:
            t.join(300)

        ids = {key: set(got) for key, got in answers.items()}

        def never_sent(row):  # cut off by the kill before its push left: nothing can settle it
            return row["reason"] == "interrupted" and not pushed[row["reference"]]

        def settled():  # rows caught mid-push wait for recovery (the longest push) first
            now = ledger.list_page(limit=1000)[0]
            return ledger.outbox_backlog()[0] == 0 and all(
                r["status"] in store.FINAL or never_sent(r) for r in now)

        wait_for(settled, timeout=240, interval=0.5)
        rows = {r["id"]: r for r in ledger.list_page(limit=1000)[0]}
        events = events_of(ledger)
    finally:
        ledger.close()
        proxy.terminate()
        for proc in procs.values():
            proc.terminate()
        proxy.wait(10)
        for proc in procs.values():
            proc.wait(30)
        hook_server.shutdown()

    assert len(answers) == PAYMENTS and all(len(got) == 2 for got in answers.values())
    assert all(len(found) == 1 for found in ids.values())  # one payment per key, both times
    assert {i for found in ids.values() for i in found} <= set(rows)  # no 202 without its row
    assert len(rows) == PAYMENTS
    doubled = [ref for ref, n in pushed.items() if n > 1]
    assert doubled == []  # no customer prompted twice
    unsettled = [r for r in rows.values() if r["status"] not in store.FINAL]
    assert all(never_sent(r) for r in unsettled)
    interrupted = [r for r in rows.values() if r["reason"] == "interrupted"
                   or (r["status"] in store.FINAL and r["checkout_request_id"] is None)]
    assert sim.stats()["tokens_issued"] == 1  # one OAuth call for both hosts, kill included
    delivered = {e["id"] for e in events if e["status"] == "delivered"}
    assert delivered == {e["id"] for e in events} == set(receiver.seen)
    repeats = sum(n - 1 for n in receiver.seen.values())
    assert repeats <= 1  # at least once: only an attempt cut by the SIGKILL may repeat
    final = Counter(r["status"] for r in rows.values())
    report_figures(f"two hosts: payments={PAYMENTS} retried_on_other={PAYMENTS} "
                   f"statuses={dict(final)} interrupted={len(interrupted)} "
                   f"interrupted_never_sent={len(unsettled)} "
                   f"double_prompts={len(doubled)} oauth_calls={sim.stats()['tokens_issued']} "
                   f"events={len(events)} event_repeats={repeats}")
