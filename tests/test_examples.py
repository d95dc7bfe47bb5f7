"""The examples under examples/, each run against the gateway's real API and webhook
sender: one gateway process (`python mpesa_wsgi.py`) in front of the Daraja simulator,
both on 127.0.0.1, shared by the module. The Python client takes one payment however
often it is retried; the Django, PHP and Node receivers (each a real server process,
its own API key name and endpoint) verify each event, record it once, acknowledge a
redelivery without processing it again, and refuse a bad signature. And .env.example
names every setting the gateway reads, with the defaults config.py applies.

Locally a missing tool (Django, php, node/npm or the npm registry) skips its test with
the reason; under CI it fails.
"""

import base64
import itertools
import json
import os
import pathlib
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from importlib.util import find_spec

import pytest
from standardwebhooks.webhooks import Webhook

import config
from helpers import ROOT_DIR, base_env, read_only, serve, wait_for
from mpesa_devtools import simulator

ROOT = pathlib.Path(ROOT_DIR)
EXAMPLES = ROOT / "examples"
DEADLINE_S = 60  # for anything that waits on a process: CI is a loaded 2-core box
RECEIVERS = ("django", "php", "node")
KEYS = {name: f"{name}-example-key-{secrets.token_hex(8)}" for name in ("shop", *RECEIVERS)}
WEBHOOK_SECRETS = {name: "whsec_" + base64.b64encode(os.urandom(32)).decode()
                   for name in RECEIVERS}
PATH = "/mpesa/events"  # each receiver's endpoint
_PHONES = itertools.count(random.randrange(10**5, 9 * 10**5))


def next_phone():
    """A phone no other payment of the run uses (no phone lock, no scenario)."""
    return f"0712{next(_PHONES):06d}"


def require(available, reason):
    """Skip without the tool, locally; under CI a missing tool is a failure."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required under CI)", pytrace=False)
    pytest.skip(reason)


def clean_environ(**extra):
    """This environment without the gateway's settings or proxies, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MPESA_", "GATEWAY_", "DJANGO_", "WEBHOOK_", "PAYMENTS_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method, url, body=None, headers=None):
    """(status, raw body) of one request."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def reserve_port():
    """A socket bound to a free loopback port, not listening: while it is open the port
    is given to no other socket (Linux also skips bound ports when it picks the local end
    of an outgoing connection). Closed just before the server meant for it starts; the
    port is below the kernel's range for the local ends of outgoing connections, so none
    of those (the other test worker's PostgreSQL reconnects, say) takes it meanwhile."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 0
    for _ in range(200 if first_ephemeral > 20000 else 0):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", random.randrange(10000, first_ephemeral)))
            return sock
        except OSError:
            sock.close()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


class Process:
    """A server process on the `reserved` port, whose output goes to a file;
    `wait_listening` until the port accepts connections (or it died: the test fails with
    its output)."""

    def __init__(self, name, argv, cwd, env, folder, reserved):
        self.name, self.port = name, reserved.getsockname()[1]
        self.log = folder / f"{name}.log"
        reserved.close()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)

    def wait_listening(self):
        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}):\n"
                            f"{self.output()[-3000:]}", pytrace=False)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                return True
            except OSError:
                return False

        wait_for(up, timeout=DEADLINE_S, interval=0.1)

    def output(self):
        return self.log.read_text(errors="replace")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)


# --- the gateway and the simulator, shared by the module ---------------------------------


class Stack:
    def __init__(self, gateway, sim, db, receiver_sockets):
        self.gateway, self.sim, self.db = gateway, sim, db
        self.url = f"http://127.0.0.1:{gateway.port}"
        self.receiver_sockets = receiver_sockets  # kind: its reserved port's socket

    def call(self, method, path, owner, body=None):
        """(status, JSON) of one API call with `owner`'s key."""
        status, raw = http(method, self.url + path,
                           None if body is None else json.dumps(body).encode(),
                           {"Authorization": f"Bearer {KEYS[owner]}",
                            "Content-Type": "application/json"})
        return status, json.loads(raw)

    def pay(self, owner):
        """A payment that succeeds (any non-scenario phone), once it has."""
        status, tx = self.call("POST", "/stkpush", owner, {"phone": next_phone(), "amount": 10})
        assert status == 202 and tx["status"] == "pending", tx
        return wait_for(lambda: (t := self.call("GET", f"/transactions/{tx['id']}", owner)[1])
                        ["status"] == "succeeded" and t, timeout=DEADLINE_S, interval=0.2)

    def event_of(self, owner, tx_id):
        """The webhook event of `tx_id`, once the gateway has one."""
        def find():
            status, page = self.call("GET", "/events?limit=200", owner)
            assert status == 200, page
            return next((e for e in page["data"] if e["transaction_id"] == tx_id), None)

        return wait_for(find, timeout=DEADLINE_S, interval=0.2)

    def delivered(self, owner, event_id, attempts):
        """The event with its attempts log, once `attempts` attempts made it delivered."""
        return wait_for(lambda: (e := self.call("GET", f"/events/{event_id}", owner)[1])
                        ["status"] == "delivered" and len(e["attempts_log"]) == attempts and e,
                        timeout=DEADLINE_S, interval=0.2)

    def rows(self, reference):
        """The ledger's transactions with this reference (what is on disk)."""
        with read_only(self.db) as conn:
            return conn.execute("SELECT id FROM transactions WHERE reference = ?",
                                (reference,)).fetchall()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("examples-gateway")
    sim = simulator.Simulator(simulator.SimSettings(callback_delay_s=0.3))
    sim_server, sim_url = serve(sim, threads=16)
    reserved = reserve_port()
    port = reserved.getsockname()[1]
    receiver_sockets = {kind: reserve_port() for kind in RECEIVERS}
    env = clean_environ(**base_env(sim_url, folder / "ledger.db",
                                   callback_base=f"http://127.0.0.1:{port}"))
    env.update(
        GATEWAY_PORT=str(port),
        MPESA_READ_TIMEOUT="10",  # the simulator answers at once; a slow box is not a lost answer
        GATEWAY_API_KEYS=",".join(f"{name}:{key}" for name, key in KEYS.items()),
        GATEWAY_WEBHOOK_URLS=",".join(f"{name}:http://127.0.0.1:{s.getsockname()[1]}{PATH}"
                                      for name, s in receiver_sockets.items()),
        GATEWAY_WEBHOOK_SECRETS=",".join(f"{n}:{s}" for n, s in WEBHOOK_SECRETS.items()),
        GATEWAY_WEBHOOK_ALLOW_PRIVATE="on",
    )
    gateway = Process("gateway", [sys.executable, "mpesa_wsgi.py"], ROOT, env, folder,
                      reserved)
    try:
        gateway.wait_listening()
        wait_for(lambda: http("GET", f"http://127.0.0.1:{port}/health")[0] == 200,
                 timeout=DEADLINE_S, interval=0.1)
        yield Stack(gateway, sim, folder / "ledger.db", receiver_sockets)
    finally:
        gateway.stop()
        sim_server.shutdown()
        sim.stop()
        for sock in receiver_sockets.values():
            sock.close()  # (a receiver's is closed already, when it started)
    log = gateway.output()
    for secret in (*KEYS.values(), *WEBHOOK_SECRETS.values()):
        assert secret not in log, "a secret reached the gateway's log"


# --- the Python client ---------------------------------------------------------------------


def run_client(stack, order, phone, reference, url=None):
    argv = [sys.executable, str(EXAMPLES / "python_client" / "pay.py"), "--order", order,
            "--phone", phone, "--amount", "10", "--reference", reference,
            "--url", url or stack.url, "--wait", str(DEADLINE_S)]
    done = subprocess.run(argv, env=clean_environ(PAYMENTS_API_KEY=KEYS["shop"]),
                          capture_output=True, text=True, timeout=DEADLINE_S + 60)
    assert KEYS["shop"] not in done.stdout + done.stderr, "the client printed its API key"
    return done


CLIENT_PAID = re.compile(r"succeeded (tx_[0-9a-f]+) amount=10 phone=2547\*+[0-9]{3} "
                         r"receipt=([A-Z0-9]+)\n")


def test_python_client_pays_once_however_often_the_order_is_run(stack):
    order, phone, reference = f"order-{secrets.token_hex(6)}", next_phone(), secrets.token_hex(5)
    pushes = stack.sim.stats()["pushes"]
    first = run_client(stack, order, phone, reference)
    assert first.returncode == 0, first.stdout + first.stderr
    paid = CLIENT_PAID.fullmatch(first.stdout)
    assert paid, first.stdout
    status, tx = stack.call("GET", f"/transactions/{paid[1]}", "shop")
    assert (status, tx["status"], tx["receipt"]) == (200, "succeeded", paid[2])
    # The same order again (a rerun after a crash): the same payment, no second prompt.
    again = run_client(stack, order, phone, reference)
    assert again.returncode == 0 and again.stdout == first.stdout, again.stdout + again.stderr
    assert f"already has payment {paid[1]}" in again.stderr
    assert stack.sim.stats()["pushes"] == pushes + 1
    assert stack.rows(reference) == [(paid[1],)]


def test_python_client_reports_a_cancelled_payment_as_not_paid(stack):
    done = run_client(stack, f"order-{secrets.token_hex(6)}", "254711001032",  # cancels
                      secrets.token_hex(5))
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.fullmatch(r"failed tx_[0-9a-f]+ amount=10 phone=2547\*+032 reason=cancelled\n",
                        done.stdout), done.stdout


class DropFirstAnswer:
    """A loopback relay to the gateway that passes every request on, but hangs up on the
    client instead of giving it the gateway's answer to the first POST: the payment was
    started, and the client never heard."""

    def __init__(self, port):
        self.port, self.dropped = port, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client):
        with client, socket.create_connection(("127.0.0.1", self.port), timeout=30) as up:
            client.settimeout(30)
            request = b""
            while b"\r\n\r\n" not in request:
                request += client.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
            while length and len(body) < int(length[1]):
                body += client.recv(65536)
            up.sendall(head + b"\r\n\r\n" + body)  # urllib asks for Connection: close
            answer = b""
            while chunk := up.recv(65536):
                answer += chunk
            if head.startswith(b"POST ") and not self.dropped:
                self.dropped += 1
                return  # hang up: the answer is lost
            client.sendall(answer)

    def close(self):
        self.listener.close()


def test_python_client_retries_a_lost_answer_with_the_same_key(stack):
    order, phone, reference = f"order-{secrets.token_hex(6)}", next_phone(), secrets.token_hex(5)
    pushes = stack.sim.stats()["pushes"]
    relay = DropFirstAnswer(stack.gateway.port)
    try:
        done = run_client(stack, order, phone, reference, url=relay.url)
    finally:
        relay.close()
    assert done.returncode == 0, done.stdout + done.stderr
    paid = CLIENT_PAID.fullmatch(done.stdout)
    assert paid and relay.dropped == 1, done.stdout + done.stderr
    assert "retrying with the same Idempotency-Key" in done.stderr
    assert f"already has payment {paid[1]}" in done.stderr  # the retry found the payment
    assert stack.sim.stats()["pushes"] == pushes + 1  # one prompt on the customer's phone
    assert stack.rows(reference) == [(paid[1],)]


# --- the webhook receivers -----------------------------------------------------------------


class Receiver:
    """A running receiver: its process, what it recorded, the work it did."""

    def __init__(self, kind, process, records):
        self.kind, self.process, self._records = kind, process, records
        self.url = f"http://127.0.0.1:{process.port}{PATH}"

    def recorded(self):
        """Every event it recorded: dicts of webhook_id, type, transaction_id, status,
        receipt."""
        return self._records()

    def work_output(self):
        """Where its "processed …" lines are (the work it did for each new event)."""
        return self.process.output()

    def processed(self, tx_id, receipt):
        line = f"processed payment.succeeded {tx_id} status=succeeded receipt={receipt}"
        return self.work_output().count(line)


class DjangoReceiver(Receiver):
    """Django records in the view and works from `manage.py process_events` (a cron
    job's pass), whose output is kept here."""

    def __init__(self, process, records, run_command):
        super().__init__("django", process, records)
        self._run, self._work = run_command, ""

    def work_output(self):
        self._work += self._run("process_events")
        return self._work


def jsonl_records(path):
    def read():
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    return read


def tools(kind):
    """The programs a receiver needs, by name: skip (or fail, under CI) without them."""
    if kind == "django":
        require(find_spec("django") is not None,
                "Django is not installed (pip install -r requirements-examples.txt)")
        return {}
    if kind == "php":
        require(shutil.which("php"), "php is not installed (apt-get install php-cli)")
        return {"php": shutil.which("php")}
    require(shutil.which("node") and shutil.which("npm"),
            "node and npm are not installed (apt-get install nodejs npm)")
    return {"node": shutil.which("node"), "npm": shutil.which("npm")}


def start_django(folder, reserved, _tools):
    cwd, db = EXAMPLES / "django_receiver", folder / "events.sqlite3"
    env = clean_environ(WEBHOOK_SECRET=WEBHOOK_SECRETS["django"], DJANGO_DB=str(db),
                        DJANGO_SECRET_KEY=secrets.token_urlsafe(32))

    def manage(*args):
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=DEADLINE_S * 2)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    manage("migrate", "--noinput")

    def records():
        with read_only(db) as conn:
            conn.row_factory = lambda cur, row: dict(
                zip([c[0] for c in cur.description], row, strict=True))
            return conn.execute("SELECT webhook_id, type, transaction_id, status, receipt"
                                " FROM payment_events ORDER BY received_at").fetchall()

    port = reserved.getsockname()[1]
    process = Process("django", [sys.executable, "manage.py", "runserver",
                                 f"127.0.0.1:{port}", "--noreload"], cwd, env, folder, reserved)
    return DjangoReceiver(process, records, manage)


def start_php(folder, reserved, tools):
    inbox = folder / "inbox.jsonl"
    env = clean_environ(WEBHOOK_SECRET=WEBHOOK_SECRETS["php"], INBOX_FILE=str(inbox))
    process = Process("php", [tools["php"], "-S", f"127.0.0.1:{reserved.getsockname()[1]}",
                              "receiver.php"], EXAMPLES / "php_receiver", env, folder, reserved)
    return Receiver("php", process, jsonl_records(inbox))


def start_node(folder, reserved, tools):
    app = folder / "app"  # a copy: npm ci writes node_modules beside package.json
    app.mkdir()
    for name in ("receiver.js", "package.json", "package-lock.json"):
        shutil.copy(EXAMPLES / "node_receiver" / name, app / name)
    # npm keeps this environment: its proxy settings, if any, are how it reaches the registry.
    installed = subprocess.run([tools["npm"], "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
                               cwd=app, capture_output=True, text=True, timeout=300)
    require(installed.returncode == 0, "npm ci failed (is the npm registry reachable?):"
            f" {installed.stderr.strip()[-500:]}")
    inbox = folder / "inbox.jsonl"
    env = clean_environ(WEBHOOK_SECRET=WEBHOOK_SECRETS["node"], INBOX_FILE=str(inbox),
                        HOST="127.0.0.1", PORT=str(reserved.getsockname()[1]))
    process = Process("node", [tools["node"], "receiver.js"], app, env, folder, reserved)
    return Receiver("node", process, jsonl_records(inbox))


@pytest.fixture(scope="module", params=RECEIVERS)
def receiver(request, tmp_path_factory):
    kind = request.param
    needs = tools(kind)  # before the gateway starts: a missing tool costs nothing
    stack = request.getfixturevalue("stack")
    folder = tmp_path_factory.mktemp(f"examples-{kind}")
    start = {"django": start_django, "php": start_php, "node": start_node}[kind]
    made = start(folder, stack.receiver_sockets[kind], needs)
    try:
        made.process.wait_listening()
        yield made
    finally:
        made.process.stop()
    assert WEBHOOK_SECRETS[kind] not in made.process.output(), "the receiver printed its secret"


def test_receiver_takes_a_payment_event_once_and_acknowledges_its_redelivery(stack, receiver):
    owner = receiver.kind
    tx = stack.pay(owner)
    event = stack.event_of(owner, tx["id"])
    first = stack.delivered(owner, event["id"], attempts=1)
    assert first["type"] == "payment.succeeded"
    assert first["attempts_log"][0]["status_code"] in (200, 204)
    # Recorded before it answered 2xx: verified, and exactly once.
    mine = [r for r in receiver.recorded() if r["transaction_id"] == tx["id"]]
    assert [(r["webhook_id"], r["type"], r["status"], r["receipt"]) for r in mine] == [
        (event["id"], "payment.succeeded", "succeeded", tx["receipt"])]
    wait_for(lambda: receiver.processed(tx["id"], tx["receipt"]) == 1, timeout=DEADLINE_S,
             interval=0.2)
    # The gateway sends it again, with the same webhook-id: answered 2xx, not taken twice.
    status, body = stack.call("POST", f"/events/{event['id']}/redeliver", owner)
    assert status == 202, body
    again = stack.delivered(owner, event["id"], attempts=2)
    assert [a["status_code"] for a in again["attempts_log"]] == [
        first["attempts_log"][0]["status_code"]] * 2
    wait_for(lambda: f"{event['id']} already recorded" in receiver.process.output(),
             timeout=DEADLINE_S, interval=0.2)
    assert [r["webhook_id"] for r in receiver.recorded()
            if r["transaction_id"] == tx["id"]] == [event["id"]]
    assert receiver.processed(tx["id"], tx["receipt"]) == 1


def signed(secret, msg_id, body, at=None, signature=None):
    """Standard Webhooks headers for `body`, signed with `secret` at `at` (now)."""
    at = at or datetime.now(timezone.utc)
    return {"Content-Type": "application/json", "webhook-id": msg_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signature or Webhook(secret).sign(msg_id, at, body.decode())}


def test_receiver_refuses_a_bad_signature_and_records_nothing(receiver):
    secret = WEBHOOK_SECRETS[receiver.kind]
    msg_id, tx_id = f"msg_{secrets.token_hex(12)}", f"tx_{secrets.token_hex(12)}"
    body = json.dumps({"type": "payment.succeeded", "timestamp": "2026-11-26T11:00:00Z",
                       "data": {"id": tx_id, "status": "succeeded", "amount": 10,
                                "receipt": "UKQ0000001"}}, separators=(",", ":")).encode()
    now = datetime.now(timezone.utc)
    good = signed(secret, msg_id, body, at=now)["webhook-signature"]
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    refused = {
        "signed with another secret": (body, signed(other, msg_id, body)),
        "body changed after signing": (body.replace(b"UKQ0000001", b"UKQ0000002"),
                                       signed(secret, msg_id, body)),
        "another webhook-id": (body, dict(signed(secret, msg_id, body),
                                          **{"webhook-id": msg_id + "0"})),
        "timestamp 6 minutes old": (body, signed(secret, msg_id, body,
                                                 at=now - timedelta(minutes=6))),
        "timestamp 6 minutes ahead": (body, signed(secret, msg_id, body,
                                                   at=now + timedelta(minutes=6))),
        "no signature": (body, {k: v for k, v in signed(secret, msg_id, body).items()
                                if k != "webhook-signature"}),
        "not a v1 signature": (body, signed(secret, msg_id, body,
                                            signature="v2," + good.split(",", 1)[1])),
        "a malformed signature": (body, signed(secret, msg_id, body, signature="v1,%%%")),
    }
    for case, (data, headers) in refused.items():
        status, _ = http("POST", receiver.url, data, headers)
        assert 400 <= status < 500, f"{case}: {status}"
    status, _ = http("GET", receiver.url)
    assert status == 405
    assert [r for r in receiver.recorded()
            if r["webhook_id"].startswith(msg_id) or r["transaction_id"] == tx_id] == []
    # Signed, but not a payment event (a future shape, a mistake): refused, not recorded,
    # and the receiver still serves.
    for odd in (b"[]", b'{"type":"x"}', b"not json", b'{"type":"payment.succeeded","data":[]}',
                b'{"type":"payment.succeeded","data":{"status":"succeeded"}}'):
        odd_id = f"msg_{secrets.token_hex(12)}"
        status, _ = http("POST", receiver.url, odd, signed(secret, odd_id, odd))
        assert 400 <= status < 500, (odd, status)
        assert [r for r in receiver.recorded() if r["webhook_id"] == odd_id] == []
    # The same id signed right (next to a stale signature, as during a secret rotation):
    # taken once; the identical request again is acknowledged and not recorded twice.
    # (Signed at `now`, like `good`: a test slower than a second must not date it apart.)
    headers = signed(secret, msg_id, body, at=now, signature=f"v1,{'A' * 44} {good}")
    assert http("POST", receiver.url, body, headers)[0] in (200, 204)
    assert http("POST", receiver.url, body, headers)[0] in (200, 204)
    assert [r["webhook_id"] for r in receiver.recorded() if r["transaction_id"] == tx_id] == [
        msg_id]
    wait_for(lambda: receiver.processed(tx_id, "UKQ0000001") == 1, timeout=DEADLINE_S,
             interval=0.2)


def test_receiver_takes_a_receipt_event_too(receiver):
    """receipt.received (a Paybill/Till payment) carries a receipt, not a payment id."""
    secret = WEBHOOK_SECRETS[receiver.kind]
    msg_id, receipt = f"msg_{secrets.token_hex(12)}", "RKR" + secrets.token_hex(4).upper()
    body = json.dumps({"type": "receipt.received", "timestamp": "2026-11-26T11:00:00Z",
                       "data": {"receipt": receipt, "channel": "c2b", "amount": 10,
                                "reference": "INV001", "transaction_id": None}},
                      separators=(",", ":")).encode()
    assert http("POST", receiver.url, body, signed(secret, msg_id, body))[0] in (200, 204)
    assert [(r["type"], r["receipt"]) for r in receiver.recorded()
            if r["webhook_id"] == msg_id] == [("receipt.received", receipt)]


# --- .env.example ----------------------------------------------------------------------------

ENV_LINE = re.compile(r"(#?)([A-Z][A-Z0-9_]*)=(.*)")


def env_example():
    """{name: (active, value, the comment line above it)} of .env.example."""
    lines = (ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
    entries = {}
    for n, line in enumerate(lines):
        match = ENV_LINE.fullmatch(line)
        if match:
            assert match[2] not in entries, f"{match[2]} is named twice"
            entries[match[2]] = (match[1] == "", match[3], lines[n - 1] if n else "")
        else:
            assert re.fullmatch(r"(#( .*)?)?", line), f"not a comment or KEY=value: {line!r}"
            assert not re.match(r"#\s+[A-Z][A-Z0-9_]*=", line), \
                f"write a commented setting as #NAME=value: {line!r}"
    return entries


def test_env_example_names_every_setting_and_nothing_else():
    names = set(env_example())
    settings = {name for name, *_ in config.SETTINGS}
    assert settings - names == set(), "settings missing from .env.example"
    assert names - settings - set(simulator.SIM_ENV) == set(), "names config.py does not read"
    assert set(simulator.SIM_ENV) <= names, "simulator settings missing from .env.example"


def test_env_example_is_an_environment_file_with_the_required_settings_to_fill_in():
    entries = env_example()
    required = {n for n, _, _, default, _ in config.SETTINGS if default is config.REQUIRED}
    active = {name: value for name, (on, value, _) in entries.items() if on}
    assert set(active) == required  # everything else is commented at its default
    secret = {n for n, *_, is_secret in config.SETTINGS if is_secret}
    assert [n for n in active if n in secret and active[n]] == []  # secrets left empty
    for name, value in active.items():  # systemd keeps quotes, and has no `export`
        assert re.fullmatch(r"[^\s\"'\\#$`]*", value), f"{name}={value}"
    with pytest.raises(config.ConfigError) as refused:
        config.load_config(active)
    assert sorted(refused.value.problems) == sorted(
        f"{n} is required" for n in required if not active[n])


def test_env_example_shows_each_default_as_config_and_the_simulator_read_it():
    entries = env_example()
    rows = [(name, convert, default) for name, _, convert, default, _ in config.SETTINGS]
    rows += [(env, convert, default) for _, env, convert, default, _ in simulator.SETTINGS
             if env in simulator.SIM_ENV]
    for name, convert, default in rows:
        active, value, comment = entries[name]
        assert re.fullmatch(r"# .*\b(Default: .+|Required)\b.*", comment), \
            f"{name}: the line above it should say what it is and its default"
        if default is config.REQUIRED:
            continue
        assert not active, f"{name} overrides its default: comment it out"
        if default is None or default == ():
            assert value == "", f"{name} has no default value to show"
        else:
            assert convert(value) == default, f"#{name}={value} is not its default"
