"""The shipped nginx site, for real: nginx and a waitress gateway on 127.0.0.1.

The site in deploy/nginx is rendered for loopback ports over plain HTTP (TLS and
the port-80 redirect removed, log paths moved into the test's folder). Locally the
tests skip when nginx is missing; under CI (CI=true) they fail instead.
"""

import gzip
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from helpers import (
    API_KEY,
    ROOT_DIR,
    SECRET,
    at_once,
    base_env,
    free_port,
    new_row,
    self_signed_cert,
)
from helpers import wait_for as _wait_for
from mpesa_devtools import simulator
from mpesa_gateway.auth import CallbackSigner
from mpesa_ledger import SqliteLedger



def wait_for(predicate, timeout=30.0, interval=0.05):
    """Log lines of two other processes (nginx, the gateway) on a loaded machine: a
    generous deadline."""
    return _wait_for(predicate, timeout=timeout, interval=interval)


SITE = os.path.join(ROOT_DIR, "deploy", "nginx", "mpesa-wsgi.conf")
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None)

if NGINX is None:
    if os.environ.get("CI"):
        pytest.fail("nginx is required in CI (.ci/run installs it)", pytrace=False)
    pytestmark = pytest.mark.skip(reason="nginx is not installed (apt-get install nginx-light)")


def main_conf(tmp, site_path):
    """A minimal nginx.conf around the site, with every path inside `tmp`; its MIME types
    are those of a packaged nginx.conf that matter here (`include mime.types`, and
    `default_type application/octet-stream`)."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "".join(f"    {kind}_temp_path {tmp}/{kind};\n"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\n"
            f"error_log {tmp}/error.log warn;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n    access_log {tmp}/access.log;\n{temps}"
            "    types { text/html html; application/json json; }\n"
            "    default_type application/octet-stream;\n"
            f"    include {site_path};\n}}\n")


def render(site, tmp, listen_port=None, gateway_port=None, cert=None, key=None, tweaks=()):
    """The site for this test: log paths in `tmp`, the given certificate, or plain HTTP on
    loopback ports; `tweaks`: (text, replacement) pairs, each text present in the site."""
    for text, replacement in tweaks:
        assert text in site, f"the site no longer says {text!r}"
        site = site.replace(text, replacement)
    site = site.replace("/var/log/nginx/", f"{tmp}/")
    if cert:
        site = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", site)
        site = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", site)
    if listen_port:  # plain HTTP on loopback: no TLS, no redirect server
        site = re.sub(r"server \{\s*listen 80;.*?\n\}\n", "", site, flags=re.S)
        site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{listen_port};")
        site = re.sub(r"^\s*ssl_\w+ .*\n", "", site, flags=re.M)
        site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{gateway_port};")
    return site


def nginx_test(conf_path, tmp):
    return subprocess.run([NGINX, "-t", "-c", conf_path, "-p", str(tmp)], capture_output=True,
                          text=True, timeout=30)


def test_nginx_accepts_the_shipped_config(tmp_path):
    cert, key = self_signed_cert(tmp_path, "pay.example.com")
    with open(SITE) as f:
        site = render(f.read(), tmp_path, cert=cert, key=key)
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(main_conf(tmp_path, tmp_path / "site.conf"))
    proc = nginx_test(str(tmp_path / "nginx.conf"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "syntax is ok" in proc.stderr and "test is successful" in proc.stderr


@pytest.fixture
def sim_settings():
    return simulator.SimSettings(callback_delay_s=0.3)


def start_nginx(tmp_path, nginx_port, gateway_port, tweaks=()):
    """nginx with the site rendered for loopback, in the foreground (the caller stops it)."""
    with open(SITE) as f:
        (tmp_path / "site.conf").write_text(render(f.read(), tmp_path, nginx_port, gateway_port,
                                                   tweaks=tweaks))
    (tmp_path / "nginx.conf").write_text(main_conf(tmp_path, tmp_path / "site.conf"))
    return subprocess.Popen([NGINX, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture
def stack(sim, tmp_path, request):
    """Gateway (waitress subprocess) behind nginx, both on loopback; callbacks via nginx.
    Indirect parameters: site tweaks, (text, replacement) pairs (see `render`)."""
    tweaks = getattr(request, "param", ())
    nginx_port, gateway_port = free_port(), free_port()
    nginx_url = f"http://127.0.0.1:{nginx_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
    env.update(base_env(sim.url, tmp_path / "nginx.db", callback_base=nginx_url),
               GATEWAY_PORT=str(gateway_port), GATEWAY_TRUSTED_PROXY="127.0.0.1",
               MPESA_CALLBACK_IP_POLICY="enforce", MPESA_CALLBACK_IPS="127.0.0.1")
    log_path = tmp_path / "gateway.log"
    log_file = open(log_path, "w")
    gateway = subprocess.Popen([sys.executable, "mpesa_wsgi.py"], cwd=ROOT_DIR, env=env,
                               stdout=log_file, stderr=subprocess.STDOUT)
    proxy = start_nginx(tmp_path, nginx_port, gateway_port, tweaks)
    try:
        wait_for(lambda: healthy(nginx_port), timeout=20, interval=0.1)
        yield nginx_port, log_path, gateway
    finally:
        proxy.terminate()
        gateway.terminate()
        proxy.wait(10)
        gateway.wait(20)
        log_file.close()


def healthy(port):
    return request("GET", port, "/health")[0] == 200


def request(method, port, path, body=None, headers=None, source="127.0.0.1"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data[:1] in (b"{", b"[") else data)
    except (OSError, http.client.HTTPException):
        return None, None
    finally:
        conn.close()


def fetch(method, port, path, body=None, headers=None, timeout=10, source="127.0.0.1"):
    """(status, headers, raw body) of one request; the headers are case-insensitive."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def assert_error_shape(status, headers, body, expected_status, code):
    """One of nginx's own answers in the gateway's error shape: JSON, the code, a message."""
    assert status == expected_status, (status, body[:300])
    assert headers["Content-Type"] == "application/json", body[:300]
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"], error
    assert set(error) == {"code", "message"}


AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def test_a_payment_succeeds_end_to_end_through_nginx(stack):
    port, *_ = stack
    status, tx = request("POST", port, "/stkpush",
                         json.dumps({"phone": "0712345678", "amount": 10}), AUTH)
    assert (status, tx["status"]) == (202, "pending")
    final = wait_for(lambda: (r := request("GET", port, f"/transactions/{tx['id']}",
                                           headers=AUTH)[1])["status"] == "succeeded" and r)
    assert final["receipt"]


def test_the_callback_policy_sees_the_address_nginx_forwarded(stack):
    port, log_path, _ = stack
    _, tx = request("POST", port, "/stkpush", json.dumps({"phone": "0712345679", "amount": 10}),
                    AUTH)
    sig = CallbackSigner(SECRET, "").signature(tx["id"])
    # A caller at 127.0.0.5 claims to be the allowed 127.0.0.1; nginx appends the truth.
    status, body = request("POST", port, f"/callback/{tx['id']}/{sig}", b"{}",
                           {"Content-Type": "application/json", "X-Forwarded-For": "127.0.0.1"},
                           source="127.0.0.5")
    assert status == 403 and body["error"]["code"] == "forbidden_source"
    wait_for(lambda: any("source_not_allowed" in line and "ip=127.0.0.5" in line
                         for line in log_path.read_text().splitlines()))
    # The simulator's own callback (from 127.0.0.1, through nginx) is accepted.
    wait_for(lambda: request("GET", port, f"/transactions/{tx['id']}",
                             headers=AUTH)[1]["status"] == "succeeded")


def test_an_oversized_body_is_413_from_nginx_in_the_error_shape(stack):
    port, log_path, _ = stack
    status, body = request("POST", port, "/stkpush", b"x" * 20_000, AUTH)
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"
    assert "route=/stkpush" not in log_path.read_text()  # it never reached the gateway


def test_no_log_holds_a_callback_signature_after_a_413_or_a_502(stack, tmp_path):
    port, log_path, gateway = stack
    _, tx = request("POST", port, "/stkpush", json.dumps({"phone": "0712345680", "amount": 10}),
                    AUTH)
    sig = CallbackSigner(SECRET, "").signature(tx["id"])
    path = f"/callback/{tx['id']}/{sig}"
    # Read by CheckoutRequestID: it ends with the customer's phone digits.
    assert request("GET", port, f"/transactions/{tx['checkout_request_id']}",
                   headers=AUTH)[0] == 200
    status, body = request("POST", port, path, b"x" * 20_000,
                           {"Content-Type": "application/json"})
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    c2b_path = "/" + CallbackSigner(SECRET, "x").c2b_url("confirmation").split("/", 1)[1]
    c2b_sig = c2b_path.rsplit("/", 1)[1]
    assert request("POST", port, c2b_path, b"{}", {"Content-Type": "application/json"})[0] == 200
    result_path = "/" + CallbackSigner(SECRET, "x").result_url("result", "rq_1").split("/", 1)[1]
    result_sig = result_path.rsplit("/", 1)[1]
    assert request("POST", port, result_path, b"{}", {"Content-Type": "application/json"})[
        0] == 400  # (not a Daraja result: stored, and said so)
    # A listing filtered by the whole national number: its query stays out of the log.
    assert request("GET", port, "/transactions?phone=712345678", headers=AUTH)[0] == 200
    gateway.terminate()  # nginx now answers 502 for the gateway
    gateway.wait(20)
    status, body = request("POST", port, path, b"{}", {"Content-Type": "application/json"})
    assert (status, body["error"]["code"]) == (502, "gateway_unreachable")
    assert request("POST", port, c2b_path, b"{}", {"Content-Type": "application/json"})[0] == 502
    access = tmp_path / "mpesa-access.log"
    # Both are logged (nginx writes the line just after answering), without the signature.
    wait_for(lambda: '"POST /callback/{tx_id}/{sig} HTTP/1.1" 502' in access.read_text())
    assert '"POST /callback/{tx_id}/{sig} HTTP/1.1" 413' in access.read_text()
    logs = [p for p in tmp_path.iterdir() if p.suffix == ".log"]
    assert {p.name for p in logs} >= {"error.log", "mpesa-access.log"}
    for log in logs:
        text = log.read_text(errors="replace")
        assert sig not in text, f"{log.name} holds the signature"
        assert c2b_sig not in text, f"{log.name} holds the Paybill/Till path's signature"
        assert result_sig not in text, f"{log.name} holds a result path's signature"
        assert "712345678" not in text, f"{log.name} holds a phone filter"
        assert tx["checkout_request_id"] not in text, f"{log.name} holds a CheckoutRequestID"
    assert '"GET /transactions/{checkout_request_id} HTTP/1.1" 200' in access.read_text()


def test_listing_pages_arrive_gzipped_and_decode_to_the_same_json(stack, tmp_path):
    port, *_ = stack
    ledger = SqliteLedger(str(tmp_path / "nginx.db"))
    for n in range(200):  # rows from before owners: the default key's
        new_row(ledger, phone=f"2547{n:08d}", amount=10, reference="INV", description="Payment")
    ledger.close()
    plain = raw_get(port, "/transactions?limit=200", AUTH)
    packed = raw_get(port, "/transactions?limit=200", dict(AUTH, **{"Accept-Encoding": "gzip"}))
    assert packed[0] == plain[0] == 200
    assert packed[1].get("Content-Encoding") == "gzip" and "Content-Encoding" not in plain[1]
    assert len(packed[2]) < len(plain[2]) / 4
    assert json.loads(gzip.decompress(packed[2])) == json.loads(plain[2])
    assert len(json.loads(plain[2])["data"]) == 200


def raw_get(port, path, headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# --- nginx's own answers, and the request id ----------------------------------------------

RUSH = 30
# At the shipped 5 a second a slow machine's rush could be let through; at one a minute
# only the burst (10) and one more pass, unless the rush takes minutes.
ONE_A_MINUTE = (("rate=5r/s;", "rate=1r/m;"),)


@pytest.mark.parametrize("stack", [ONE_A_MINUTE], indirect=True)
def test_a_rush_beyond_limit_req_is_refused_in_the_error_shape_with_retry_after(stack):
    port, log_path, _ = stack
    # Without a key: one that nginx lets through is the gateway's 401 (no payment, and no
    # rate limit of the gateway's own, which is per key), so every 429 here is nginx's.
    results = at_once(RUSH, lambda n: fetch(
        "POST", port, "/stkpush", b"{}",
        {"Content-Type": "application/json", "X-Request-Id": f"rush-{n}"}))
    errors = [r for r in results.values() if isinstance(r, Exception)]
    assert not errors, errors
    refused = [n for n, (status, _, _) in results.items() if status == 429]
    passed = [n for n, (status, _, _) in results.items() if status == 401]
    assert len(refused) + len(passed) == RUSH, {n: r[0] for n, r in results.items()}
    assert refused and passed  # the burst (10) and one more pass; the rest is refused
    for n in refused:
        status, headers, body = results[n]
        assert_error_shape(status, headers, body, 429, "rate_limited")
        assert headers["Retry-After"] == "1"
        assert headers["X-Request-Id"] == f"rush-{n}"
    for n in passed:  # the gateway got the caller's id, and echoed it
        assert results[n][1]["X-Request-Id"] == f"rush-{n}"
    wait_for(lambda: all(f"request_id=rush-{n} request method=POST route=/stkpush status=401"
                         in log_path.read_text() for n in passed))
    gateway_lines = [line for line in log_path.read_text().splitlines()
                     if "route=/stkpush" in line]
    assert len(gateway_lines) == len(passed)  # the refused never reached the gateway


# One request in flight per address: a held one makes the next one too many.
ONE_CONNECTION = (("limit_conn mpesa_conn 32;", "limit_conn mpesa_conn 1;"),
                  ("client_body_timeout 10s;", "client_body_timeout 60s;"))


@pytest.mark.parametrize("stack", [ONE_CONNECTION], indirect=True)
def test_a_request_beyond_limit_conn_is_refused_like_a_rush(stack):
    port, *_ = stack
    with socket.create_connection(("127.0.0.1", port), timeout=60) as held:
        # Headers sent, the body never: nginx holds the request, and it counts.
        held.sendall(b"POST /transactions HTTP/1.1\r\nHost: pay.example.com\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        answers = []

        def refused():
            answers.append(fetch("GET", port, "/health", headers={"X-Request-Id": "second"}))
            return answers[-1][0] == 429

        wait_for(refused, timeout=30, interval=0.05)
    status, headers, body = answers[-1]
    assert_error_shape(status, headers, body, 429, "rate_limited")
    assert headers["Retry-After"] == "1" and headers["X-Request-Id"] == "second"


def test_a_sane_request_id_reaches_the_gateway_and_comes_back(stack, tmp_path):
    port, log_path, _ = stack
    status, headers, _ = fetch("GET", port, "/health", headers={"X-Request-Id": "abc-123"})
    assert (status, headers["X-Request-Id"]) == (200, "abc-123")
    wait_for(lambda: "request_id=abc-123 request method=GET route=/health status=200"
             in log_path.read_text())
    access = tmp_path / "mpesa-access.log"
    wait_for(lambda: any(line.startswith("127.0.0.1 ") and '"GET /health HTTP/1.1" 200' in line
                         and line.endswith(" abc-123")
                         for line in access.read_text().splitlines()))
    # The longest sane id (64 characters of the gateway's alphabet) passes whole.
    longest = "A-z.0:9_" * 8
    assert fetch("GET", port, "/health", headers={"X-Request-Id": longest})[1][
        "X-Request-Id"] == longest


def test_an_insane_request_id_is_replaced_by_nginx_s_own(stack, tmp_path):
    port, log_path, _ = stack
    access = tmp_path / "mpesa-access.log"
    for insane in ("a" * 300, "a" * 65, 'x" status=200 injected="1', "two words", "tab\there",
                   "", "caf\u00e9".encode().decode("latin-1")):
        status, headers, _ = fetch("GET", port, "/health", headers={"X-Request-Id": insane})
        rid = headers["X-Request-Id"]
        assert status == 200 and rid != insane
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid  # nginx's $request_id
        wait_for(lambda: f"request_id={rid} request method=GET route=/health status=200"
                 in log_path.read_text())
        wait_for(lambda: any(line.endswith(f" {rid}") for line in access.read_text().splitlines()))
        if insane:
            assert insane not in log_path.read_text()
            assert insane not in access.read_text()


def test_a_request_id_holding_a_phone_number_stays_out_of_nginx_s_log(stack, tmp_path):
    port, log_path, _ = stack
    rid = "order-254712345678"
    status, headers, _ = fetch("GET", port, "/health", headers={"X-Request-Id": rid})
    assert (status, headers["X-Request-Id"]) == (200, rid)  # the caller's own, echoed
    # The gateway scrubs it from its log; nginx writes its own id for the request.
    wait_for(lambda: "request_id=[REDACTED] request method=GET route=/health"
             in log_path.read_text())
    access = tmp_path / "mpesa-access.log"
    wait_for(lambda: '"GET /health HTTP/1.1" 200' in access.read_text())
    assert "254712345678" not in access.read_text()
    assert re.search(r'"GET /health HTTP/1.1" 200 .* [0-9a-f]{32}$', access.read_text(), re.M)


def test_nginx_s_own_errors_are_json_whatever_the_path_says(stack):
    port, *_ = stack
    # The http block's MIME types map .html to text/html; nginx's answer stays JSON.
    status, headers, body = fetch("POST", port, "/stkpush.html", b"x" * 20_000,
                                  dict(AUTH, **{"X-Request-Id": "big-1"}))
    assert_error_shape(status, headers, body, 413, "payload_too_large")
    assert headers["X-Request-Id"] == "big-1"
    # /metrics from an address other than 127.0.0.1: nginx's own 403.
    status, headers, body = fetch("GET", port, "/metrics", source="127.0.0.5")
    assert_error_shape(status, headers, body, 403, "forbidden")
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-Id"])


def test_a_request_nginx_cannot_read_is_json_too(stack):
    port, *_ = stack
    status, headers, body = fetch("GET", port, "/health", headers={"X-Big": "x" * 20_000})
    assert_error_shape(status, headers, body, 400, "bad_request")
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-Id"])


def test_an_upstream_that_never_answers_is_504_and_one_that_is_gone_502(tmp_path):
    """nginx alone, in front of a socket that accepts and never answers (then closes)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes the handshake; nobody reads
    nginx_port = free_port()
    proxy = start_nginx(tmp_path, nginx_port, silent.getsockname()[1],
                        (("proxy_read_timeout 300s;", "proxy_read_timeout 1s;"),))
    try:
        wait_for(lambda: port_open(nginx_port), timeout=20, interval=0.1)
        status, headers, body = fetch("POST", nginx_port, "/stkpush", b"{}",
                                      dict(AUTH, **{"X-Request-Id": "slow-1"}), timeout=30)
        assert_error_shape(status, headers, body, 504, "gateway_timeout")
        assert headers["X-Request-Id"] == "slow-1"
        silent.close()
        status, headers, body = fetch("GET", nginx_port, "/health.html", timeout=30)
        assert_error_shape(status, headers, body, 502, "gateway_unreachable")
        # The gateway away: a CheckoutRequestID (its phone digits) stays out of nginx's
        # error log, as a callback's signature does.
        checkout = "ws_CO_07122026104700466712345678"
        status, _, _ = fetch("GET", nginx_port, f"/transactions/{checkout}", timeout=30)
        assert status == 502
        errors = "".join(p.read_text() for p in tmp_path.glob("*error*.log"))
        assert "connect() failed" in errors  # the other 502 was logged
        assert "712345678" not in errors
    finally:
        silent.close()
        proxy.terminate()
        proxy.wait(10)


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), 5).close()
        return True
    except OSError:
        return False
