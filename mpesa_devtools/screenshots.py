"""`make screenshots`: PNGs of the operator console for the docs (docs/screenshots/).

Starts the Daraja simulator and the demo's webhook receiver in this process and a gateway
(`python mpesa_wsgi.py`) beside it, all on 127.0.0.1, with a temporary ledger and a
person's console key; makes a handful of payments through the API as a shop would
(successes, a failure, a cancellation, one left `unknown`, Paybill receipts); then signs
in with headless Chromium (selenium, tests/browser.py) and writes each page at 1280 px
and the payments page and a customer's pay page at 360 px. Needs the test requirements (selenium) and Debian's
chromium and chromium-driver; never part of `make test`.

    python -m mpesa_devtools.screenshots [--out docs/screenshots]
"""

import argparse
import base64
import io
import json
import os
import pathlib
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from mpesa_devtools import simulator
from mpesa_devtools.receiver import DemoReceiver
from mpesa_gateway.auth import CallbackSigner

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "screenshots"
DEADLINE_S = 60  # a loaded 2-core box
PAYBILL = "600984"  # the sandbox's C2B test shortcode
PERSON = "amina"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"screenshots-webhook-secret-0123").decode()
# (phone, amount, reference, the status it ends in): the simulator decides by the phone
PAYMENTS = (
    ("254712345601", 1500, "INV-1001", "succeeded"),
    ("254712345602", 250, "INV-1002", "succeeded"),
    ("254712345603", 4200, "ORDER-77", "succeeded"),
    ("254712345604", 100, "TOPUP-9", "succeeded"),
    ("254711000001", 800, "INV-1003", "failed"),  # insufficient funds
    ("254711001032", 300, "INV-1004", "failed"),  # the customer cancelled
    ("254711009999", 1200, "INV-1005", "unknown"),  # Daraja's answer lost, no callback
)
RECEIPTS = ((2500, "INV-2041"), (640, "ACC-5531"))  # Paybill: (amount, account number)
SHOTS = (  # (file, path, window width)
    ("console-payments.png", "/console/payments", 1280),
    ("console-payment.png", "{payment}", 1280),
    ("console-receipts.png", "/console/receipts", 1280),
    ("console-attention.png", "/console/attention", 1280),
    ("console-summary.png", "/console/summary", 1280),
    ("console-payments-360.png", "/console/payments", 360),
    ("pay-page-360.png", "{link}", 360),  # the customer's pay page, on a phone
)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method, url, body=None, headers=None):
    """(status, decoded JSON or raw bytes) of one request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers={
        **({"Content-Type": "application/json"} if isinstance(body, dict) else {}),
        **(headers or {})})
    try:
        with _OPENER.open(req, timeout=DEADLINE_S) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def until(what, check, timeout=DEADLINE_S, interval=0.2):
    """check()'s first truthy value, polled; RuntimeError naming `what` past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"screenshots: {what} not within {timeout} s")
        time.sleep(interval)


def serve_here(app):
    """`app` served by waitress on 127.0.0.1 in a daemon thread: (server, url)."""
    import waitress

    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=8)
    threading.Thread(target=server.run, daemon=True).start()
    return server, f"http://127.0.0.1:{server.effective_port}"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_browser():
    """The headless Chromium of mpesa_devtools.browser, or exit saying why not."""
    from mpesa_devtools import browser

    reason = browser.missing()
    if reason:
        raise SystemExit(f"screenshots: {reason}")
    return browser


class Stack:
    """The simulator, the receiver and a gateway process, on loopback."""

    def __init__(self, folder):
        self.sim = simulator.Simulator(simulator.SimSettings(callback_delay_s=0.5))
        self.sim_server, self.sim_url = serve_here(self.sim)
        self.receiver_server, receiver_url = serve_here(DemoReceiver(WEBHOOK_SECRET,
                                                                     io.StringIO()))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = "shop-" + secrets.token_hex(12)
        self.console_key = "console-" + secrets.token_hex(12)
        self.secret = secrets.token_hex(24)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MPESA_", "GATEWAY_"))
               and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "MPESA_CONSUMER_KEY": simulator.DEMO_CONSUMER_KEY,
            "MPESA_CONSUMER_SECRET": simulator.DEMO_CONSUMER_SECRET,
            "MPESA_SHORTCODE": simulator.SANDBOX_SHORTCODE,
            "MPESA_PASSKEY": simulator.SANDBOX_PASSKEY,
            "MPESA_BASE_URL": self.sim_url,
            "MPESA_CALLBACK_BASE_URL": self.url,
            "MPESA_CALLBACK_IPS": "127.0.0.1,::1",
            "MPESA_C2B_SHORTCODE": PAYBILL,
            "MPESA_READ_TIMEOUT": "10",
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_DB": str(folder / "ledger.db"),
            "GATEWAY_API_KEYS": self.api_key,
            "GATEWAY_SECRET": self.secret,
            "GATEWAY_CONSOLE_KEYS": f"{PERSON}@*:{self.console_key}",
            "GATEWAY_RECONCILE": "off",  # the unknown payment stays unknown for its picture
            "GATEWAY_WEBHOOK_URLS": f"default:{receiver_url}/events",
            "GATEWAY_WEBHOOK_SECRETS": f"default:{WEBHOOK_SECRET}",
            "GATEWAY_WEBHOOK_ALLOW_PRIVATE": "on",
        })
        self.log = open(folder / "gateway.log", "wb")  # noqa: SIM115 - closed in stop()
        self.gateway = subprocess.Popen([sys.executable, str(ROOT / "mpesa_wsgi.py")],
                                        cwd=ROOT, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self.folder = folder

    def wait_up(self):
        def up():
            if self.gateway.poll() is not None:
                raise RuntimeError("screenshots: the gateway exited:\n" + (
                    self.folder / "gateway.log").read_text(errors="replace")[-3000:])
            try:
                return http("GET", self.url + "/health")[0] == 200
            except OSError:
                return False

        until("the gateway's /health", up, interval=0.1)

    def api(self, method, path, body=None):
        return http(method, self.url + path, body,
                    {"Authorization": f"Bearer {self.api_key}"})

    def pay(self):
        """Each of PAYMENTS, once it has its final status: their ids."""
        ids = []
        for phone, amount, reference, _ in PAYMENTS:
            if reference == "INV-1005":
                self.sim.set_weather(push="internal")  # processed, answered 500
            try:
                status, tx = self.api("POST", "/stkpush", {"phone": phone, "amount": amount,
                                                          "reference": reference})
            finally:
                self.sim.set_weather(push="ok")
            if status != 202:
                raise RuntimeError(f"screenshots: POST /stkpush answered {status}: {tx}")
            ids.append(tx["id"])
        for tx_id, (*_, final) in zip(ids, PAYMENTS):
            until(f"{tx_id} {final}",
                  lambda: self.api("GET", f"/transactions/{tx_id}")[1]["status"] == final)
        return ids

    def paybill(self):
        """RECEIPTS paid from the M-Pesa menu through the simulator's C2B API."""
        signer = CallbackSigner(self.secret, self.url)
        basic = base64.b64encode(f"{simulator.DEMO_CONSUMER_KEY}:"
                                 f"{simulator.DEMO_CONSUMER_SECRET}".encode()).decode()
        status, said = http("GET", self.sim_url + "/oauth/v1/generate?grant_type="
                            "client_credentials", headers={"Authorization": f"Basic {basic}"})
        bearer = {"Authorization": f"Bearer {said['access_token']}"}
        status, said = http("POST", self.sim_url + "/mpesa/c2b/v1/registerurl", {
            "ShortCode": PAYBILL, "ResponseType": "Completed",
            "ConfirmationURL": signer.c2b_url("confirmation"),
            "ValidationURL": signer.c2b_url("validation")}, bearer)
        if status != 200:
            raise RuntimeError(f"screenshots: registerurl answered {status}: {said}")
        for amount, account in RECEIPTS:
            status, said = http("POST", self.sim_url + "/mpesa/c2b/v1/simulate", {
                "ShortCode": PAYBILL, "CommandID": "CustomerPayBillOnline", "Amount": amount,
                "Msisdn": "254708374149", "BillRefNumber": account}, bearer)
            if status != 200:
                raise RuntimeError(f"screenshots: simulate answered {status}: {said}")
        until("the Paybill receipts", lambda: len(
            self.api("GET", "/receipts")[1].get("data", [])) >= len(RECEIPTS))

    def stop(self):
        self.gateway.terminate()
        try:
            self.gateway.wait(15)
        except subprocess.TimeoutExpired:
            self.gateway.kill()
            self.gateway.wait(15)
        self.log.close()
        for server in (self.sim_server, self.receiver_server):
            server.close()
        self.sim.stop()


def shoot(browser, driver, url, path, width):
    """A PNG of the whole page at `width` px (the window as tall as the page)."""
    driver.set_window_size(width, 900)
    driver.get(url + path)
    browser.element(driver, "main, body")
    chrome = driver.execute_script("return window.outerHeight - window.innerHeight")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(height + chrome, 4000))
    browser.wait(driver).until(lambda d: d.execute_script(
        "return document.readyState") == "complete")
    return driver.get_screenshot_as_png()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mpesa_devtools.screenshots",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args(argv)
    browser = load_browser()
    with tempfile.TemporaryDirectory(prefix="mpesa-screenshots-") as tmp:
        stack = Stack(pathlib.Path(tmp))
        try:
            stack.wait_up()
            if http("GET", stack.url + "/console")[0] != 200:
                raise SystemExit("screenshots: GET /console does not answer 200")
            ids = stack.pay()
            stack.paybill()
            _, link = http("POST", stack.url + "/payment_links",
                           {"amount": 450, "reference": "ORDER-88", "description": "Sukuma"},
                           {"Authorization": f"Bearer {stack.api_key}"})
            driver = browser.start_browser(1280, 900)
            try:
                driver.get(stack.url + "/console")
                browser.element(driver, "#sign-in input#key").send_keys(stack.console_key)
                browser.element(driver, "#sign-in button[type=submit]").click()
                browser.element(driver, "table#payments")
                args.out.mkdir(parents=True, exist_ok=True)
                for name, path, width in SHOTS:
                    png = shoot(browser, driver, stack.url,
                                path.format(payment=f"/console/payments/{ids[0]}",
                                            link=f"/pay/{link['id']}"), width)
                    (args.out / name).write_bytes(png)
                    print(f"{args.out / name}: {len(png)} bytes", flush=True)
            finally:
                driver.quit()
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
