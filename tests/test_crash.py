"""Crash safety: a real gateway process under load, killed with SIGKILL and restarted.

After every kill: the database passes `PRAGMA integrity_check`; every payment the
client saw accepted has its row; every callback, confirmation and refund result that got
a 2xx is stored. At the end: no row was pushed twice, no refund was sent twice, and every
row caught mid-push is `unknown` (or was settled by its callback later). Skip locally
with `--skip-crash`; CI runs it.

SOAK_CRASH_CYCLES sets the number of kill-restart cycles (`make soak`: 100). The
figures (cycles, payments accepted, lost, re-sent) are printed at the end of the run.
"""

import http.client
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

import config
from helpers import API_KEY, PAYBILL, ROOT_DIR, SECRET, SimulatorApi, base_env, free_port, wait_for
from mpesa_devtools import simulator
from mpesa_gateway import daraja
from mpesa_gateway.auth import CallbackSigner

CYCLES = int(os.environ.get("SOAK_CRASH_CYCLES", "").strip() or 20)
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

pytestmark = [pytest.mark.slow, pytest.mark.crash]


@pytest.fixture
def sim_settings():
    return simulator.SimSettings(callback_delay_s=0.2, record_deliveries=True,
                                 lock_subscriber=False)


def _request(url, body=None, timeout=2.0, method=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if body else "GET"),
                                 headers={"Authorization": f"Bearer {API_KEY}",
                                          "Content-Type": "application/json", **(headers or {})})
    try:
        with OPENER.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, None
    except (OSError, ValueError, http.client.HTTPException):  # killed mid-answer
        return None, None


class Load:
    """Client threads pushing payments with distinct phones; remembers what was accepted."""

    def __init__(self, base, threads=3):
        self.base, self.accepted, self._stop = base, {}, threading.Event()
        self._numbers = iter(range(10_000_000))
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        while not self._stop.is_set():
            with self._lock:
                n = next(self._numbers)
            status, body = _request(f"{self.base}/stkpush",
                                    {"phone": f"0712{n:06d}", "amount": 10 + n % 50})
            if status == 202:
                with self._lock:
                    self.accepted[body["id"]] = body
            elif status is None:
                time.sleep(0.02)  # the gateway is down: try again shortly

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(5)


class MenuPayments:
    """A thread paying the Paybill from the M-Pesa menu through the simulator: each
    confirmation it delivers goes to the gateway's registered URL, killed or not."""

    def __init__(self, sim_url):
        self._api, self._stop = SimulatorApi(sim_url), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        n = 0
        while not self._stop.wait(0.05):
            n += 1
            self._api.simulate(shortcode=PAYBILL, amount=10 + n % 50, bill_ref=f"MENU{n}",
                               version="v2")

    def stop(self):
        self._stop.set()
        self._thread.join(10)


class Refunds:
    """A thread refunding payments that succeeded, one Idempotency-Key each, asking again
    with the same key after a kill until the gateway answers: a refund sent twice would be
    money paid back twice."""

    def __init__(self, base, load):
        self.base, self.load, self.answered = base, load, {}  # tx → status answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.1):
            with self.load._lock:
                candidates = [tx for tx in self.load.accepted if tx not in self.answered][:20]
            for tx in candidates:
                status, row = _request(f"{self.base}/transactions/{tx}", timeout=1.0)
                if status != 200 or row["status"] not in ("succeeded", "failed"):
                    continue
                if row["status"] == "failed":
                    self.answered[tx] = None
                    continue
                status, _ = _request(f"{self.base}/transactions/{tx}/refund", method="POST",
                                     headers={"Idempotency-Key": f"refund-{tx}"})
                if status == 202:  # (409 in progress: asked again, with the same key)
                    self.answered[tx] = status
                break  # one refund at a time, among the pushes

    def stop(self):
        self._stop.set()
        self._thread.join(10)


def _refunds(db):
    """(tx → refund rows), and the request ids whose results the ledger stored."""
    with sqlite3.connect(db) as conn:
        rows = {}
        for tx, status in conn.execute("SELECT tx_id, status FROM initiator_requests"
                                       " WHERE kind = 'refund'"):
            rows.setdefault(tx, []).append(status)
        stored = {r for (r,) in conn.execute("SELECT request_id FROM initiator_results")}
    return rows, stored


def _results_acknowledged(sim):
    return {urlsplit(url).path.split("/")[3] for url, _ in list(sim.initiator_results)}


def _rows(db):
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT id, status, reason, checkout_request_id FROM transactions")}
        stored = {(r[0], bytes(r[1])) for r in conn.execute("SELECT tx_id, body FROM callbacks")}
    return rows, stored


def _confirmations(db):
    """(receipt → how many bodies the ledger holds for it), and the receipts it kept."""
    with sqlite3.connect(db) as conn:
        bodies = {}
        for (receipt,) in conn.execute("SELECT receipt FROM c2b_bodies"):
            bodies[receipt] = bodies.get(receipt, 0) + 1
        kept = {r for (r,) in conn.execute("SELECT receipt FROM c2b_receipts")}
    return bodies, kept


def _acknowledged(sim):
    """The TransIDs of the confirmations the gateway answered 2xx."""
    return {json.loads(body)["TransID"] for _, body in list(sim.c2b_confirmations)}


def _callbacks_delivered(sim):
    """(tx, body) of each STK callback the gateway answered 2xx."""
    return {(urlsplit(u).path.split("/")[2], b) for u, b in list(sim.delivered)
            if urlsplit(u).path.startswith("/callback/")}


def _all_callbacks_out(sim):
    """Every callback the simulator scheduled was delivered or failed."""
    stats = sim.stats()
    return stats["callbacks_sent"] + stats["callbacks_failed"] >= stats["callbacks_scheduled"]


def test_sigkill_at_random_moments_loses_nothing_and_pushes_nothing_twice(sim, tmp_path,
                                                                          report_figures):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = str(tmp_path / "crash.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
    env.update(base_env(sim.url, db, callback_base=base), GATEWAY_PORT=str(port),
               MPESA_CONNECT_TIMEOUT="0.2", MPESA_READ_TIMEOUT="0.5", GATEWAY_RATE="100000",
               GATEWAY_BURST="100000", MPESA_CALLBACK_IP_POLICY="off", LOG_LEVEL="WARNING",
               MPESA_C2B_SHORTCODE=PAYBILL)
    signer = CallbackSigner(SECRET, base)
    assert SimulatorApi(sim.url).register(
        shortcode=PAYBILL, version="v2", confirmation=signer.c2b_url("confirmation"),
        validation=signer.c2b_url("validation")).status == 200
    pushed = []
    sim.sim.on_push = lambda payload: pushed.append(urlsplit(payload["CallBackURL"]).path)
    cert = tmp_path / "simulator-initiator.pem"
    cert.write_bytes(sim.sim.initiator_certificate_pem())
    env.update(MPESA_INITIATOR_NAME=simulator.SANDBOX_INITIATOR_NAME,
               MPESA_INITIATOR_PASSWORD=simulator.SANDBOX_INITIATOR_PASSWORD,
               MPESA_CERT_FILE=str(cert))

    def start():
        proc = subprocess.Popen([sys.executable, "mpesa_wsgi.py"], cwd=ROOT_DIR, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: _request(f"{base}/health", timeout=0.5)[0] == 200, timeout=60,
                 interval=0.05)
        return proc

    caught = set()  # rows in `submitting` at the moment of a kill
    refunds_caught = set()  # refunds in `submitting` (row written, Daraja not answered)
    load, menu = Load(base), MenuPayments(sim.url)
    refunds = Refunds(base, load)
    rng = random.Random(20261126)
    try:
        for _ in range(CYCLES):
            proc = start()
            time.sleep(rng.uniform(0.1, 0.6))
            proc.kill()
            proc.wait(10)
            proc.stderr.close()
            rows, stored = _rows(db)
            caught |= {tx for tx, (status, _, _) in rows.items() if status == "submitting"}
            refund_rows, _ = _refunds(db)
            refunds_caught |= {tx for tx, statuses in refund_rows.items()
                               if "submitting" in statuses}
            missing = set(load.accepted) - set(rows)
            assert not missing, f"accepted payments without a row: {missing}"
            lost = _callbacks_delivered(sim.sim) - stored
            assert not lost, "a callback answered 2xx is not in the ledger"
            _, kept = _confirmations(db)
            assert not _acknowledged(sim.sim) - kept, "a confirmation answered 2xx is not kept"
            _, results = _refunds(db)
            assert not _results_acknowledged(sim.sim) - results, \
                "a refund's result answered 2xx is not in the ledger"
    finally:
        load.stop()
        menu.stop()
        refunds.stop()
    # Real time must pass the recovery cutoff: the subprocess runs on the real clock.
    time.sleep(daraja.DarajaClient(config.load_config(env), None).longest_push_s + 1)
    stop_proc = start()  # a clean start recovers interrupted rows before it answers /health
    wait_for(lambda: _all_callbacks_out(sim), timeout=60)  # the last callbacks have landed
    stop_proc.kill()
    stop_proc.wait(10)
    stop_proc.stderr.close()
    rows, stored = _rows(db)
    bodies, kept = _confirmations(db)
    twice = {receipt for receipt, n in bodies.items() if n > 1}
    lost_confirmations = _acknowledged(sim.sim) - kept
    tx_pushed = [path.split("/")[2] for path in pushed]
    resent = len(tx_pushed) - len(set(tx_pushed))
    lost_rows = set(load.accepted) - set(rows)
    lost_callbacks = _callbacks_delivered(sim.sim) - stored
    refund_rows, results = _refunds(db)
    reversed_ = [tx_id for api, tx_id in list(sim.sim.initiator_requests) if api == "reversal"]
    refunds_twice = len(reversed_) - len(set(reversed_))
    lost_results = _results_acknowledged(sim.sim) - results
    missing_refunds = {tx for tx, status in refunds.answered.items()
                       if status == 202 and tx not in refund_rows}
    report_figures(f"crash-restart: cycles={CYCLES} accepted={len(load.accepted)} "
                   f"lost={len(lost_rows) + len(lost_callbacks)} resent={resent} "
                   f"caught_mid_push={len(caught)} pushes={len(tx_pushed)} "
                   f"callbacks_stored={len(stored)} confirmations_kept={len(kept)}"
                   f" confirmations_lost={len(lost_confirmations)} twice={len(twice)}"
                   f" refunds_answered={sum(1 for v in refunds.answered.values() if v)}"
                   f" reversals={len(reversed_)} refunds_sent_twice={refunds_twice}"
                   f" refunds_caught_mid_send={len(refunds_caught)}"
                   f" refund_results_lost={len(lost_results)}")
    assert resent == 0, "a payment was pushed twice"
    assert refunds_twice == 0, "a refund was sent twice"
    assert not missing_refunds and not lost_results, (missing_refunds, lost_results)
    assert reversed_, "no refund reached Daraja; the test proved less than it claims"
    # A refund caught between its row and Daraja's answer is settled or unknown: never
    # sent again by itself.
    final_refunds, _ = _refunds(db)
    assert not [tx for tx, statuses in final_refunds.items() if "submitting" in statuses]
    # At most one refund of a payment that is not a definite failure (nothing sent).
    assert all(sum(s != "failed" for s in statuses) <= 1 for statuses in refund_rows.values())
    assert not lost_rows and not lost_callbacks
    assert not lost_confirmations and not twice, "a confirmation lost, or kept twice"
    assert kept, "no confirmation reached the gateway; the test proved less than it claims"
    assert not [tx for tx, (status, *_) in rows.items() if status == "submitting"]
    settled_by_callback = {tx for tx, _ in stored}
    for tx in caught:
        status, reason, _ = rows[tx]
        assert status == "unknown" or tx in settled_by_callback, (tx, status, reason)
    assert len(load.accepted) > CYCLES  # the load really ran
    assert caught, "no kill landed mid-push; the test proved less than it claims"
