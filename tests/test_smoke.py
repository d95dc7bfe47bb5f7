"""The commands a user runs: the demo, waitress-serve, a bare import. Real processes."""

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import config
from helpers import API_KEY, ROOT_DIR, SimulatorApi, base_env, free_port, wait_for

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Stay(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None  # a redirect is an answer to look at (an HTTPError), not followed


NO_REDIRECTS = urllib.request.build_opener(urllib.request.ProxyHandler({}), _Stay())


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_", "LOG_"))}
    env.update(extra)
    return env


def http(method, url, body=None, key=None, extra=None):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    headers.update(extra or {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with OPENER.open(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")
    except OSError:
        return None, None


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("process ignored SIGTERM")


def test_import_needs_no_environment():
    proc = subprocess.run([sys.executable, "-c", "import mpesa_wsgi, mpesa_devtools.simulator"],
                          cwd=ROOT_DIR, env=clean_env(), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_running_the_module_loads_it_once():
    """`python mpesa_wsgi.py …` hands create_app to the command line, which never imports
    mpesa_wsgi back: the module runs once, as __main__, with no second copy beside it."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "mpesa_wsgi.py", "--check-config"],
                          cwd=ROOT_DIR, env=clean_env(), capture_output=True, text=True,
                          timeout=60)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"cli", "mpesa_gateway.services", "mpesa_ledger"} <= imported  # the trace works
    assert "mpesa_wsgi" not in imported


@pytest.mark.parametrize("command", ["checkout", "installed"])
def test_demo_takes_a_payment_to_succeeded_and_stops_on_sigterm(tmp_path, command, request):
    """`make demo` from the checkout, and `mpesa-wsgi --demo` from the installed wheel (run
    outside the checkout: the simulator and the receiver ship in it)."""
    port = free_port(span=3)  # the gateway, the simulator, the demo's webhook receiver
    env = clean_env(GATEWAY_PORT=str(port), GATEWAY_DB=str(tmp_path / "demo.db"),
                    MPESA_SIM_CALLBACK_DELAY_S="0.5")
    if command == "installed":
        argv, cwd = [request.getfixturevalue("installed")["command"]], tmp_path
        env.pop("PYTHONPATH", None)
    else:
        argv, cwd = [sys.executable, "mpesa_wsgi.py"], ROOT_DIR
    proc = subprocess.Popen([*argv, "--demo"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http("GET", f"{base}/health")[0] == 200, timeout=15, interval=0.1)
        banner = ""
        while "Ctrl-C" not in banner:
            line = proc.stdout.readline()
            assert line, "the demo ended before printing its banner"
            banner += line
        key = re.search(r"API key: (\S+)", banner).group(1)
        console_key = re.search(r"/console, console key: (\S+)", banner).group(1)
        pay_link = re.search(r"Payment link .*: (http://127\.0\.0\.1:\d+/pay/pl_\S+)",
                             banner).group(1)
        page = urllib.request.urlopen(pay_link, timeout=5).read().decode()  # the pay page
        assert "Pay KES 10" in page and "DEMO-LINK" in page
        signed = urllib.request.Request(f"{base}/console/sign-in", method="POST",
                                        data=f"key={console_key}".encode())
        with pytest.raises(urllib.error.HTTPError) as answer:  # (a redirect is not followed)
            NO_REDIRECTS.open(signed, timeout=5)
        # The demo's person signs in: 303 to the payments page, with the session cookie.
        assert answer.value.code == 303, answer.value.code
        assert "mpesa_console=" in answer.value.headers["Set-Cookie"]
        assert f"curl -s -X POST {base}/stkpush" in banner
        assert f"Webhook receiver: http://127.0.0.1:{port + 2}/events" in banner
        started = time.monotonic()
        status, tx = http("POST", f"{base}/stkpush", {"phone": "0712345678", "amount": 10}, key)
        assert (status, tx["status"]) == (202, "pending")
        final = wait_for(lambda: (r := http("GET", f"{base}/transactions/{tx['id']}", key=key)[1])
                         ["status"] == "succeeded" and r, timeout=10)
        elapsed = time.monotonic() - started
        assert final["receipt"] and elapsed < 5
        assert http("GET", f"{base}/openapi.json")[0] == 200  # its data file shipped too
        if command == "installed":  # no `initiator` extra there: no refunds, the rest works
            assert "/refund" not in banner
        else:  # the banner's refund, against the simulator's initiator
            assert f"curl -s -X POST {base}/transactions/<id>/refund" in banner
            status, body = http("POST", f"{base}/transactions/{tx['id']}/refund", key=key,
                                extra={"Idempotency-Key": f"refund-{tx['id']}"})
            assert (status, body["refund"]["status"]) == (202, "pending"), body
            wait_for(lambda: http("GET", f"{base}/transactions/{tx['id']}", key=key)[1][
                "refund"]["status"] == "refunded", timeout=20, interval=0.2)
        # The demo's receiver verified the signed event and printed it.
        printed = []
        reader = threading.Thread(target=lambda: printed.extend(
            iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        wait_for(lambda: any(f"webhook payment.succeeded {tx['id']}" in line
                             and "signature verified" in line for line in printed), timeout=20)
        # The banner's menu payment: its own lines (with bash and curl where they exist),
        # then the receipt in the demo's ledger.
        lines = [line.strip() for line in banner.splitlines()]
        pay = [lines[n + 1:n + 3] for n, line in enumerate(lines)
               if line.startswith("Pay INV001 from the M-Pesa menu")][0]
        if shutil.which("curl") and shutil.which("bash"):
            ran = subprocess.run(["bash", "-c", "\n".join(pay)], capture_output=True, text=True,
                                 timeout=60)
            assert json.loads(ran.stdout)["ResponseCode"] == "0", ran.stdout + ran.stderr
        else:
            url = re.search(r"curl -s -X POST (\S+)", pay[1]).group(1)
            body = json.loads(re.search(r"-d '(.*)'$", pay[1]).group(1))
            sim = SimulatorApi(url.split("/mpesa/", 1)[0])
            assert sim.call(url.split(sim.url, 1)[1], body).status == 200

        def menu_receipt():
            with sqlite3.connect(f"file:{tmp_path / 'demo.db'}?mode=ro", uri=True) as conn:
                return conn.execute("SELECT amount, account FROM c2b_receipts").fetchall()

        if command != "installed":  # the refund above, told to the demo's receiver
            wait_for(lambda: any(line.startswith(f"webhook payment.refunded {tx['id']}")
                                 and "refund=refunded" in line for line in printed),
                     timeout=30)
        assert wait_for(menu_receipt, timeout=30, interval=0.2) == [(10, "INV001")]
        # ...and the demo's merchant endpoint is told, verified.
        wait_for(lambda: any(line.startswith("webhook receipt.received ") and
                             "account=INV001" in line and "signature verified" in line
                             for line in printed), timeout=30)
    finally:
        code = stop(proc)
        _, err = proc.communicate(timeout=5)
    assert code == 0, err
    assert "Traceback" not in err
    assert "254712345678" not in err  # the phone is masked in every log line
    # Its own simulator's callbacks are from an allowed source: nothing to warn about.
    assert "source_not_allowed" not in err and " WARNING " not in err, err


def windows_waitress_command():
    """docs/deploying.md's Windows `waitress-serve` command line, as its words."""
    with open(os.path.join(ROOT_DIR, "docs", "deploying.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bat\n(.*?)```", f.read(), re.S)
    command = next(b for b in blocks if "waitress-serve" in b)
    return command.replace("^\n", " ").split()


def test_waitress_serve_call_factory_serves(tmp_path, sim):
    """The Windows page's command line, flags and all (only the port is the test's), with
    the gateway's own numbers: within Windows' connection limit and equal to its threads."""
    words = windows_waitress_command()
    flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
    assert int(flags["connection-limit"]) <= config.WINDOWS_MAX_CONNECTIONS
    port = free_port()
    env = clean_env(**dict(base_env(sim.url, tmp_path / "ws.db"),
                           GATEWAY_THREADS=flags["threads"]))
    waitress_serve = os.path.join(os.path.dirname(sys.executable), "waitress-serve")
    argv = [waitress_serve] + [f"--listen=127.0.0.1:{port}" if w.startswith("--listen=") else w
                               for w in words[1:]]
    proc = subprocess.Popen(argv, cwd=ROOT_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http("GET", f"{base}/health")[0] == 200, timeout=15, interval=0.1)
        status, tx = http("POST", f"{base}/stkpush", {"phone": "0712345678", "amount": 10},
                          API_KEY)
        assert (status, tx["status"]) == (202, "pending")
    finally:
        stop(proc)
        proc.communicate(timeout=5)


@pytest.mark.parametrize("then", [None, signal.SIGINT], ids=["sigterm", "sigterm-then-ctrl-c"])
def test_sigterm_lets_the_in_flight_push_finish_then_closes(tmp_path, sim, then):
    entered, release = threading.Event(), threading.Event()

    def hold(payload):
        entered.set()
        release.wait(30)  # Daraja is slow: the push is in flight until the test lets it go

    sim.sim.on_push = hold
    port = free_port()
    db = tmp_path / "graceful.db"
    env = clean_env(**dict(base_env(sim.url, db), GATEWAY_PORT=str(port),
                           MPESA_READ_TIMEOUT="5", GATEWAY_RECONCILE="on"))
    proc = subprocess.Popen([sys.executable, "mpesa_wsgi.py"], cwd=ROOT_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http("GET", f"{base}/health")[0] == 200, timeout=15, interval=0.1)
        answer = {}
        client = threading.Thread(target=lambda: answer.update(r=http(
            "POST", f"{base}/stkpush", {"phone": "0712345678", "amount": 10}, API_KEY)))
        client.start()
        assert entered.wait(5)
        proc.send_signal(signal.SIGTERM)
        if then is not None:
            time.sleep(0.2)
            proc.send_signal(then)  # an impatient second Ctrl-C must not abandon the push
        # No new connections once the signal has landed, while the push is still in flight.
        wait_for(lambda: http("GET", f"{base}/health")[0] is None, timeout=10, interval=0.05)
        assert client.is_alive()
        release.set()
        client.join(10)
    finally:
        release.set()
        code = stop(proc)
        _, err = proc.communicate(timeout=5)
    status, body = answer["r"]
    assert (status, body["status"]) == (202, "pending")  # the in-flight push finished
    assert code == 0, err
    assert "shutdown complete" in err
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM transactions").fetchall() == [("pending",)]
