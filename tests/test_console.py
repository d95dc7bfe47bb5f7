"""The operator console, over the gateway's own WSGI app (WebTest) and the simulator: who
may sign in and for how long, what each page shows and never shows, the CSV exports (the
console's and the API's), and the listing's new filters. Both engines. The same pages in a
real browser: test_console_browser.py."""

import csv
import io
import json
import re

import pytest
from webtest import TestApp

import config
import mpesa_wsgi
from helpers import API_KEY, BOTH_ENGINES, OTHER_KEY, PAYBILL, events_of, wait_for
from mpesa_devtools import simulator

ENGINES = BOTH_ENGINES
AMINA = "console-amina-0123456789"  # reads default's payments
OPS = "console-ops-0123456789ab"  # reads every owner's
BOB = "console-bob-0123456789abc"  # reads other's
DEADLINE_S = 30
FULL_PHONE = re.compile(r"(?<![0-9])2547[0-9]{8}(?![0-9])")
XSS = "<script>alert(1)</script>"


@pytest.fixture
def gateway_env(gateway_env, sim, tmp_path, request):
    """Three people; the simulator's initiator (refunds and checks from the console)."""
    cert = tmp_path / "simulator-cert.pem"
    cert.write_bytes(sim.sim.initiator_certificate_pem())
    return {**gateway_env, "MPESA_C2B_SHORTCODE": PAYBILL,
            "GATEWAY_CONSOLE_KEYS": f"amina@default:{AMINA},ops@*:{OPS},bob@other:{BOB}",
            "MPESA_INITIATOR_NAME": simulator.SANDBOX_INITIATOR_NAME,
            "MPESA_INITIATOR_PASSWORD": simulator.SANDBOX_INITIATOR_PASSWORD,
            "MPESA_CERT_FILE": str(cert), **getattr(request, "param", {})}


def signed_in(gateway, key=AMINA, **environ):
    """A WebTest client of the gateway's app, signed in with `key`."""
    client = TestApp(gateway.app, extra_environ=environ)
    res = client.post("/console/sign-in", {"key": key}, status=303)
    assert res.headers["Location"] == "/console/payments"
    return client


def pay(gateway, phone, key=API_KEY, **body):
    res = gateway.testapp.post_json("/stkpush", {"phone": phone, "amount": 10, **body},
                                    headers={"Authorization": f"Bearer {key}"}, status=202)
    return res.json


def settled(gateway, tx_id, key=API_KEY):
    return wait_for(lambda: (r := gateway.testapp.get(
        f"/transactions/{tx_id}", headers={"Authorization": f"Bearer {key}"}).json)[
        "status"] not in ("pending",) and r, timeout=DEADLINE_S, interval=0.1)


def confirm(gateway, receipt, account, amount="5.00"):
    body = json.dumps({"TransactionType": "Pay Bill", "TransID": receipt,
                       "TransTime": "20261207101500", "TransAmount": amount,
                       "BusinessShortCode": PAYBILL, "BillRefNumber": account,
                       "MSISDN": "2547 ***** 126", "FirstName": "=cmd|' /C calc'!A0"})
    gateway.testapp.post("/" + gateway.services.signer.c2b_url("confirmation").split("/", 3)[3],
                         body, content_type="application/json", status=200)


# --- signing in and out -------------------------------------------------------------------


def test_the_sign_in_form_and_a_wrong_key(gateway):
    page = TestApp(gateway.app).get("/console", status=200)
    assert '<form id="sign-in" method="post" action="/console/sign-in">' in page.text
    assert '<label for="key">Console key</label>' in page.text
    wrong = TestApp(gateway.app).post("/console/sign-in", {"key": "nope-0123456789abcdef"},
                                      status=401)
    assert 'role="alert"' in wrong.text and "not a console key" in wrong.text
    assert "Set-Cookie" not in wrong.headers
    # A merchant's API key never opens the console.
    TestApp(gateway.app).post("/console/sign-in", {"key": API_KEY}, status=401)


def test_the_session_cookie_is_http_only_strict_and_expiring(gateway):
    res = TestApp(gateway.app).post("/console/sign-in", {"key": AMINA}, status=303)
    cookie = res.headers["Set-Cookie"]
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age=43200"):
        assert flag in cookie
    assert "Secure" not in cookie  # plain http on loopback: a Secure cookie would be lost
    assert AMINA not in cookie  # the key itself never goes back to the browser


@pytest.mark.parametrize("gateway_env", [{"GATEWAY_TRUSTED_PROXY": "127.0.0.1"}],
                         indirect=True)
def test_the_cookie_is_secure_over_https_directly_or_through_a_trusted_proxy(gateway):
    direct = TestApp(gateway.app, extra_environ={"wsgi.url_scheme": "https"}).post(
        "/console/sign-in", {"key": AMINA}, status=303)
    assert "; Secure" in direct.headers["Set-Cookie"]
    proxied = TestApp(gateway.app, extra_environ={
        "REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_PROTO": "https"}).post(
        "/console/sign-in", {"key": AMINA}, status=303)
    assert "; Secure" in proxied.headers["Set-Cookie"]
    untrusted = TestApp(gateway.app, extra_environ={
        "REMOTE_ADDR": "10.0.0.9", "HTTP_X_FORWARDED_PROTO": "https"}).post(
        "/console/sign-in", {"key": AMINA}, status=303)
    assert "Secure" not in untrusted.headers["Set-Cookie"]


def test_sign_in_is_rate_limited_per_client_address(gateway):
    one = TestApp(gateway.app, extra_environ={"REMOTE_ADDR": "10.1.1.1"})
    for _ in range(5):
        one.post("/console/sign-in", {"key": "guess-0123456789abcdef"}, status=401)
    slow = one.post("/console/sign-in", {"key": AMINA}, status=429)
    assert int(slow.headers["Retry-After"]) >= 1
    # Another address is not held back by it.
    TestApp(gateway.app, extra_environ={"REMOTE_ADDR": "10.1.1.2"}).post(
        "/console/sign-in", {"key": AMINA}, status=303)


def test_sign_out_ends_the_session_on_every_host(gateway, gateway_env):
    client = signed_in(gateway)
    cookie = client.cookies["mpesa_console"]
    other = mpesa_wsgi.create_app(config.load_config(gateway_env))  # the same ledger
    try:
        elsewhere = TestApp(other)
        elsewhere.set_cookie("mpesa_console", cookie)
        elsewhere.get("/console/payments", status=200)
        signed_out = client.post("/console/sign-out", status=303)
        assert signed_out.headers["Location"] == "/console"
        assert "Max-Age=0" in signed_out.headers["Set-Cookie"]
        # The old cookie, kept by someone: refused here and on the other host.
        elsewhere.get("/console/payments", status=303)
        stale = TestApp(gateway.app)
        stale.set_cookie("mpesa_console", cookie)
        assert stale.get("/console/payments", status=303).headers["Location"] == "/console"
    finally:
        other.services.close()


def test_a_session_expires_and_a_removed_key_ends_its_sessions(gateway, gateway_env):
    client = signed_in(gateway)
    cookie = client.cookies["mpesa_console"]
    without_amina = dict(gateway_env, GATEWAY_CONSOLE_KEYS=f"ops@*:{OPS}")
    other = mpesa_wsgi.create_app(config.load_config(without_amina))
    try:
        elsewhere = TestApp(other)
        elsewhere.set_cookie("mpesa_console", cookie)
        elsewhere.get("/console/payments", status=303)  # her key is gone: so is she
    finally:
        other.services.close()
    client.get("/console/payments", status=200)
    gateway.clock.advance(12 * 3600 + 1)
    client.get("/console/payments", status=303)


def test_a_forged_or_altered_cookie_is_nobody(gateway):
    client = signed_in(gateway)
    value = client.cookies["mpesa_console"]
    for forged in (value[:-1] + ("0" if value[-1] != "0" else "1"), "x.y", "", value + "x"):
        stranger = TestApp(gateway.app)
        stranger.set_cookie("mpesa_console", forged)
        stranger.get("/console/payments", status=303)


# --- what the pages show, and never show ---------------------------------------------------


def test_pages_are_safe_escaped_and_never_show_a_full_phone(gateway, sim):
    tx = pay(gateway, "254712345671")
    settled(gateway, tx["id"])
    confirm(gateway, "RKX0000001", XSS)
    client = signed_in(gateway, OPS)
    for path in ("/console/payments", f"/console/payments/{tx['id']}", "/console/receipts",
                 "/console/attention", "/console/summary"):
        page = client.get(path, status=200)
        csp = page.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src" not in csp, path
        assert "default-src 'none'" in csp and page.headers["X-Frame-Options"] == "DENY"
        assert "<script" not in page.text, path  # no script at all, nor injected one
        assert not FULL_PHONE.search(page.text), path
        assert gateway.services.signer.signature(tx["id"]) not in page.text
        assert page.headers["Cache-Control"] == "no-store"
    receipts = client.get("/console/receipts").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in receipts


def test_a_person_reads_only_their_owner_s_payments(gateway, sim):
    mine = pay(gateway, "254712345672")
    theirs = pay(gateway, "254712345673", key=OTHER_KEY, reference="THEIRS-1")
    amina, bob, ops = signed_in(gateway), signed_in(gateway, BOB), signed_in(gateway, OPS)
    assert mine["id"] in amina.get("/console/payments").text
    assert theirs["id"] not in amina.get("/console/payments").text
    amina.get(f"/console/payments/{theirs['id']}", status=404)
    bob.get(f"/console/payments/{theirs['id']}", status=200)
    assert mine["id"] in ops.get("/console/payments").text
    assert theirs["id"] in ops.get("/console/payments").text
    exported = amina.get("/console/payments.csv").text
    assert "THEIRS-1" not in exported and "2547******673" not in exported
    assert "THEIRS-1" in ops.get("/console/payments.csv").text


def test_filters_select_by_status_phone_reference_and_date_and_pages_follow(gateway, sim):
    paid = pay(gateway, "254712345674", reference="INV-A")
    failed = pay(gateway, "254711000001", reference="INV-B")
    settled(gateway, paid["id"])
    settled(gateway, failed["id"])
    client = signed_in(gateway)
    only_failed = client.get("/console/payments?status=failed").text
    assert failed["id"] in only_failed and paid["id"] not in only_failed
    both = client.get("/console/payments?status=failed&status=succeeded").text
    assert failed["id"] in both and paid["id"] in both
    by_phone = client.get("/console/payments?phone=674").text
    assert paid["id"] in by_phone and failed["id"] not in by_phone
    assert failed["id"] in client.get("/console/payments?reference=inv-b").text
    today = paid["created_at"][:10]
    assert paid["id"] in client.get(f"/console/payments?since={today}&until={today}").text
    assert paid["id"] not in client.get("/console/payments?until=2020-01-01").text
    # Blank fields (a submitted form) are no filter; a bad one is said, as text.
    assert paid["id"] in client.get("/console/payments?reference=&phone=&receipt=").text
    bad = client.get("/console/payments?phone=<b>", status=400)
    assert 'role="alert"' in bad.text and "<b>" not in bad.text
    # One row a page: the next page's link carries the filter and a cursor.
    first = client.get("/console/payments?status=failed&status=succeeded&limit=1")
    next_link = re.search(r'<a href="([^"]+)" rel="next" id="next">', first.text).group(1)
    second = client.get(next_link.replace("&amp;", "&"))
    assert (paid["id"] in first.text) != (paid["id"] in second.text)
    # The page's export link is its filter, every row: not its page.
    export = re.search(r'<a href="([^"]+)" id="export">', first.text).group(1)
    assert "limit" not in export
    rows = rows_of(client.get(export.replace("&amp;", "&")).text)
    assert {r["reference"] for r in rows} >= {"INV-A", "INV-B"}


def test_a_payment_s_timeline(gateway, sim):
    tx = pay(gateway, "254712345675")
    done = settled(gateway, tx["id"])
    page = signed_in(gateway).get(f"/console/payments/{tx['id']}").text
    timeline = page.split('<ol id="timeline">', 1)[1].split("</ol>", 1)[0]
    for said in ("Requested: KES 10", "Daraja accepted the prompt", "Callback received",
                 f"receipt {done['receipt']}", "Now succeeded"):
        assert said in timeline, said
    assert "ws_CO_" in timeline and tx["checkout_request_id"] not in timeline  # masked


def test_needs_attention_lists_unknown_payments_with_what_to_do(gateway, sim):
    from mpesa_ledger import UNKNOWN

    tx = pay(gateway, "254712345676")
    settled(gateway, tx["id"])
    with gateway.services.ledger._write() as conn:  # as the reconciler's deadline would
        conn.execute("UPDATE transactions SET status = ?, reason = 'no_final_result'"
                     " WHERE id = ?", (UNKNOWN, tx["id"]))
    page = signed_in(gateway).get("/console/attention").text
    assert "Payments whose result is unknown (1)" in page and tx["id"] in page
    assert "check the M-Pesa statement" in page
    assert "0 entries in the spool of this process, waiting for the ledger" in page


def test_the_summary_counts_today_by_status(gateway, sim):
    for phone in ("254712345677", "254712345678"):
        settled(gateway, pay(gateway, phone)["id"])
    page = signed_in(gateway).get("/console/summary").text
    today = page.split('<table id="today"', 1)[1].split("</table>", 1)[0]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", today)
    assert cells[:3] == ["succeeded", "2", "KES 20"], cells
    assert '<svg xmlns="http://www.w3.org/2000/svg" role="img"' in page


def test_the_console_is_off_without_console_keys(gateway_env, sim):
    env = {k: v for k, v in gateway_env.items() if k != "GATEWAY_CONSOLE_KEYS"}
    app = mpesa_wsgi.create_app(config.load_config(env))
    try:
        page = TestApp(app).get("/console", status=404)
        assert "GATEWAY_CONSOLE_KEYS" in page.text
        TestApp(app).post("/console/sign-in", {"key": AMINA}, status=404)
    finally:
        app.services.close()


# --- CSV exports: the console's and the API's -------------------------------------------------


def rows_of(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_the_console_exports_its_filter(gateway, sim):
    tx = pay(gateway, "254712345679", reference="INV-C")
    settled(gateway, tx["id"])
    res = signed_in(gateway).get("/console/payments.csv?reference=INV-C")
    assert res.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert 'filename="payments.csv"' in res.headers["Content-Disposition"]
    [row] = rows_of(res.text)
    assert row["reference"] == "INV-C" and row["phone"] == "2547******679"
    assert row["status"] == "succeeded" and row["amount"] == "10" and row["receipt"]


def test_the_api_exports_and_neutralises_formulas(gateway, sim):
    confirm(gateway, "RKX0000002", "=HYPERLINK(\"http://x\")")
    confirm(gateway, "RKX0000003", "@SUM(A1)")
    res = gateway.testapp.get("/receipts.csv?channel=c2b",
                              headers={"Authorization": f"Bearer {API_KEY}"})
    rows = {r["receipt"]: r for r in rows_of(res.text)}
    assert rows["RKX0000002"]["reference"] == "'=HYPERLINK(\"http://x\")"
    assert rows["RKX0000003"]["reference"] == "'@SUM(A1)"
    assert rows["RKX0000002"]["payer_name"].startswith("'=cmd")
    # Another owner's key exports none of them.
    other = gateway.testapp.get("/receipts.csv", headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert rows_of(other.text) == []
    for bad in ("status=nope", "limit=5", "cursor=x"):  # an export is every row: no pages
        gateway.testapp.get(f"/transactions.csv?{bad}", status=400,
                            headers={"Authorization": f"Bearer {API_KEY}"})
    gateway.testapp.get("/transactions.csv", status=401)


def test_the_json_listing_takes_several_statuses_until_and_reference(gateway, sim):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    paid = pay(gateway, "254712345680", reference="INV-D")
    failed = pay(gateway, "254711000001", reference="INV-E")
    settled(gateway, paid["id"])
    settled(gateway, failed["id"])

    def ids(query):
        return {r["id"] for r in gateway.testapp.get(f"/transactions?{query}",
                                                     headers=auth).json["data"]}

    assert ids("status=succeeded&status=failed") >= {paid["id"], failed["id"]}
    assert ids("status=succeeded,failed") >= {paid["id"], failed["id"]}
    assert failed["id"] not in ids("status=succeeded")
    assert ids("reference=inv-d") == {paid["id"]}
    assert ids("until=2020-01-01") == set()
    assert ids("phone=680") == {paid["id"]}
    for bad in ("status=nope", "status=", "phone=12ab", "until=yesterday", "limit=1&limit=2"):
        res = gateway.testapp.get(f"/transactions?{bad}", headers=auth, status=400)
        assert res.json["error"]["code"] == "invalid_parameter", bad


# --- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("value, problem", [
    ("amina:KEY-0123456789abcdef", "person@owner:KEY"),
    ("amina@nobody:KEY-0123456789abcdef", "no key of GATEWAY_API_KEYS is named nobody"),
    ("amina@default:short", "at least 16 characters"),
    (f"amina@default:{API_KEY}", "must not repeat an API or admin key"),
    ("a@default:KEY-0123456789abcdef,a@default:KEY-0123456789abcdeX", "same person@owner"),
])
def test_console_keys_are_checked(gateway_env, value, problem):
    with pytest.raises(config.ConfigError, match=re.escape(problem)):
        config.load_config(dict(gateway_env, GATEWAY_CONSOLE_KEYS=value))


def test_console_keys_are_masked(gateway_env):
    cfg = config.load_config(gateway_env)
    shown = cfg.by_variable()["GATEWAY_CONSOLE_KEYS"]
    assert "amina@default:" in shown and AMINA not in shown
    assert AMINA in cfg.secret_values() and AMINA not in repr(cfg)


def test_events_are_untouched_by_reading_the_console(gateway, sim):
    tx = pay(gateway, "254712345681")
    settled(gateway, tx["id"])
    before = events_of(gateway.services.ledger)
    client = signed_in(gateway, OPS)
    for path in ("/console/payments", f"/console/payments/{tx['id']}", "/console/attention"):
        client.get(path)
    assert events_of(gateway.services.ledger) == before


# --- what the review and the outside attack found ------------------------------------------


def test_the_phone_filter_takes_what_the_mask_shows_or_the_whole_number(gateway, sim):
    tx = pay(gateway, "254712345682")
    client = signed_in(gateway)
    assert tx["id"] in client.get("/console/payments?phone=682").text
    assert tx["id"] in client.get("/console/payments?phone=0712+345+682").text
    assert tx["id"] not in client.get("/console/payments?phone=0712345683").text
    # More digits than the mask shows would tell the hidden ones, one by one.
    client.get("/console/payments?phone=5682", status=400)
    gateway.testapp.get("/transactions?phone=45682", status=400,
                        headers={"Authorization": f"Bearer {API_KEY}"})


@pytest.mark.parametrize("query", ["until=9999-12-31", "until=20261231", "reference=%00",
                                   "receipt=%00", "since=0000-00-00"])
def test_odd_filters_are_answered_not_a_500(gateway, query):
    client = signed_in(gateway)
    assert client.get(f"/console/payments?{query}", expect_errors=True).status_int in (200, 400)
    assert client.get(f"/console/payments.csv?{query}",
                      expect_errors=True).status_int in (200, 400)
    assert gateway.testapp.get(f"/transactions?{query}", expect_errors=True,
                               headers={"Authorization": f"Bearer {API_KEY}"}).status_int in (
        200, 400)


def test_a_nul_in_a_path_or_filter_is_no_ledger_outage(gateway):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    gateway.testapp.get("/transactions/%00", headers=auth, status=404)
    gateway.testapp.get("/transactions?reference=%00", headers=auth, status=400)
    assert gateway.services.metrics.ledger_failures.value("read_transaction") == 0


def test_sign_in_and_out_come_from_the_console_s_own_pages(gateway):
    """A form on another site can neither sign a browser in nor sign it out."""
    for headers in ({"HTTP_SEC_FETCH_SITE": "cross-site"},
                    {"HTTP_ORIGIN": "https://evil.example", "HTTP_HOST": "127.0.0.1"}):
        res = TestApp(gateway.app, extra_environ=headers).post(
            "/console/sign-in", {"key": AMINA}, status=403)
        assert "Set-Cookie" not in res.headers
    # The console's own form (pages send no referrer: Chromium says Origin: null).
    TestApp(gateway.app, extra_environ={"HTTP_SEC_FETCH_SITE": "same-origin",
                                        "HTTP_ORIGIN": "null"}).post(
        "/console/sign-in", {"key": AMINA}, status=303)
    client = signed_in(gateway)
    cookie = client.cookies["mpesa_console"]
    evil = TestApp(gateway.app, extra_environ={"HTTP_SEC_FETCH_SITE": "cross-site"})
    evil.set_cookie("mpesa_console", cookie)
    res = evil.post("/console/sign-out", status=303)
    assert "Set-Cookie" not in res.headers
    client.get("/console/payments", status=200)  # still signed in


def test_a_form_with_too_many_fields_is_a_400_page(gateway):
    body = "&".join(["a=1"] * 6 + ["key=x"])
    res = TestApp(gateway.app).post("/console/sign-in", body,
                                    content_type="application/x-www-form-urlencoded",
                                    status=400)
    assert 'role="alert"' in res.text


def test_signing_in_again_ends_the_session_it_replaces(gateway):
    client = signed_in(gateway)
    first = client.cookies["mpesa_console"]
    client.post("/console/sign-in", {"key": AMINA}, status=303)
    assert client.cookies["mpesa_console"] != first
    stale = TestApp(gateway.app)
    stale.set_cookie("mpesa_console", first)
    stale.get("/console/payments", status=303)


def test_another_site_s_odd_cookie_beside_ours_changes_nothing(gateway):
    client = signed_in(gateway)
    cookie = client.cookies["mpesa_console"]
    page = TestApp(gateway.app, extra_environ={
        "HTTP_COOKIE": f'prefs=dark mode; x={{"a":1}}; mpesa_console={cookie}; y'}).get(
        "/console/payments", status=200)
    assert 'id="who"' in page.text


def test_a_payment_page_is_by_its_id_not_by_a_checkout_request_id(gateway, sim):
    tx = settled(gateway, pay(gateway, "254712345683")["id"])
    client = signed_in(gateway)
    client.get(f"/console/payments/{tx['id']}", status=200)
    client.get(f"/console/payments/{tx['checkout_request_id']}", status=404)


def test_a_phone_typed_as_an_account_number_is_masked_on_pages_and_in_csv(gateway, sim):
    confirm(gateway, "RKX0000004", "0712 345 684")
    client = signed_in(gateway, OPS)
    page = client.get("/console/receipts").text
    assert "2547******684" in page and "345 684" not in page
    exported = gateway.testapp.get("/receipts.csv", headers={
        "Authorization": f"Bearer {API_KEY}"}).text
    assert "2547******684" in exported and "345 684" not in exported


def test_a_person_of_one_owner_sees_nothing_of_another_s_anywhere(gateway, sim):
    theirs = settled(gateway, pay(gateway, "254712345685", key=OTHER_KEY, reference="BOB-1")[
        "id"], key=OTHER_KEY)
    confirm(gateway, "RKX0000005", "INV-AMINA")  # default's (no prefix rule)
    amina = signed_in(gateway)
    for path in ("/console/payments", "/console/receipts", "/console/attention",
                 "/console/summary", "/console/payments.csv", "/console/receipts.csv"):
        text = amina.get(path).text
        assert "BOB-1" not in text and theirs["id"] not in text, path
        assert theirs["receipt"] not in text, path
    bob = signed_in(gateway, BOB)
    for path in ("/console/receipts", "/console/receipts.csv"):
        assert "RKX0000005" not in bob.get(path).text, path
    summary = bob.get("/console/summary").text.split('<table id="today"', 1)[1]
    assert re.findall(r"<td[^>]*>([^<]*)</td>", summary)[:3] == ["succeeded", "1", "KES 10"]


# --- actions (part 2): a person bound to one owner, with the session's form token ------------


def csrf_of(page):
    return re.search(r'name="csrf" value="([0-9a-f]{32})"', page.text).group(1)


def test_a_refund_from_the_console_has_a_confirm_step_and_is_shown_with_who(gateway, sim):
    tx = settled(gateway, pay(gateway, "254712345686", amount=25)["id"])
    client = signed_in(gateway)
    page = client.get(f"/console/payments/{tx['id']}")
    assert 'id="refund-link"' in page.text
    confirm_page = client.get(f"/console/payments/{tx['id']}/refund")
    assert "Refund KES 25 to 2547******686" in confirm_page.text
    token = csrf_of(confirm_page)
    done = client.post(f"/console/payments/{tx['id']}/refund", {"csrf": token}, status=200)
    assert "The refund is pending" in done.text
    again = client.post(f"/console/payments/{tx['id']}/refund", {"csrf": token}, status=200)
    assert "The refund is pending" in again.text  # the same session twice: sent once
    outcomes = [a["outcome"] for a in gateway.services.ledger.actions_of(tx["id"])]
    assert outcomes == ["pending", "pending (the same request again: nothing more sent)"]
    wait_for(lambda: sim.stats()["initiator_results_sent"] >= 1, timeout=DEADLINE_S)
    assert sim.stats()["reversals"] == 1
    timeline = client.get(f"/console/payments/{tx['id']}").text
    assert "amina@default (console) asked for a refund: pending" in timeline


def test_an_action_without_the_session_s_token_is_refused(gateway, sim):
    tx = settled(gateway, pay(gateway, "254712345687")["id"])
    client = signed_in(gateway)
    for form in ({}, {"csrf": "0" * 32}):
        res = client.post(f"/console/payments/{tx['id']}/refund", form, status=403)
        assert "stale" in res.text
    # Another session's token is not this one's.
    other = signed_in(gateway)
    stale = csrf_of(other.get(f"/console/payments/{tx['id']}/refund"))
    client.post(f"/console/payments/{tx['id']}/refund", {"csrf": stale}, status=403)
    assert sim.stats().get("reversals", 0) == 0
    assert gateway.services.ledger.actions_of(tx["id"]) == []


def test_a_person_of_every_owner_reads_and_changes_nothing(gateway, sim):
    tx = settled(gateway, pay(gateway, "254712345688")["id"])
    ops = signed_in(gateway, OPS)
    page = ops.get(f"/console/payments/{tx['id']}").text
    assert 'id="actions"' not in page and 'name="csrf"' not in page
    token = gateway.services.sessions.csrf_token(
        gateway.services.sessions.current({"HTTP_COOKIE": "mpesa_console="
                                           + ops.cookies["mpesa_console"]}))
    res = ops.post(f"/console/payments/{tx['id']}/refund", {"csrf": token}, status=403)
    assert "changes none" in res.text
    assert sim.stats().get("reversals", 0) == 0


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 60}], indirect=True)
def test_ask_daraja_again(gateway, sim, sim_settings):
    tx = pay(gateway, "254712345689")
    client = signed_in(gateway)
    page = client.get(f"/console/payments/{tx['id']}")
    res = client.post(f"/console/payments/{tx['id']}/requery", {"csrf": csrf_of(page)})
    assert "answer: " in res.text and "The payment is now" in res.text
    assert sim.stats()["queries"] >= 1
    [action] = gateway.services.ledger.actions_of(tx["id"])
    assert (action["person"], action["action"]) == ("amina@default", "requery")


def test_check_a_code_from_the_console(gateway, sim):
    tx = settled(gateway, pay(gateway, "254712345690")["id"])
    client = signed_in(gateway)
    page = client.get("/console/receipts")
    res = client.post("/console/verify", {"csrf": csrf_of(page), "code": tx["receipt"].lower()})
    assert "Real: KES 10" in res.text
    timeline = client.get(f"/console/payments/{tx['id']}").text
    assert f"amina@default (console) checked the code: {tx['receipt']} found" in timeline
    bad = client.post("/console/verify", {"csrf": csrf_of(page), "code": "<b>"}, status=400)
    assert "<b>" not in bad.text


@pytest.mark.parametrize("gateway_env", [{
    "GATEWAY_WEBHOOK_URLS": "default:http://127.0.0.1:9/events",
    "GATEWAY_WEBHOOK_SECRETS": "default:whsec_" + "A" * 32,
    "GATEWAY_WEBHOOK_ALLOW_PRIVATE": "on", "GATEWAY_WEBHOOK_SENDER": "off"}], indirect=True)
def test_send_an_event_again(gateway, sim):
    tx = settled(gateway, pay(gateway, "254712345691")["id"])
    [event] = events_of(gateway.services.ledger, tx["id"])
    client = signed_in(gateway)
    page = client.get(f"/console/payments/{tx['id']}")
    assert "Send the payment.succeeded event again" in page.text
    res = client.post(f"/console/events/{event['id']}/redeliver", {"csrf": csrf_of(page)})
    assert "goes out again" in res.text
    bob = signed_in(gateway, BOB)  # another owner's event does not exist for bob
    bob_token = csrf_of(bob.get("/console/receipts"))
    bob.post(f"/console/events/{event['id']}/redeliver", {"csrf": bob_token}, status=404)


def test_payment_links_are_listed_and_revoked_from_the_console(gateway):
    def make(key):
        return gateway.testapp.post_json("/payment_links", {"amount": 75, "reference": "L-1"},
                                         headers={"Authorization": f"Bearer {key}"},
                                         status=201).json

    mine, theirs = make(API_KEY), make(OTHER_KEY)
    client = signed_in(gateway)
    page = client.get("/console/links")
    assert mine["url"] in page.text and theirs["url"] not in page.text
    res = client.post(f"/console/links/{mine['id']}/revoke", {"csrf": csrf_of(page)})
    assert "takes no more payments" in res.text
    assert gateway.services.ledger.link(mine["id"])["revoked_at"] is not None
    client.post(f"/console/links/{theirs['id']}/revoke", {"csrf": csrf_of(page)}, status=404)
    client.post(f"/console/links/{theirs['id']}/revoke", {}, status=403)  # no token
    assert gateway.services.ledger.link(theirs["id"])["revoked_at"] is None
    ops = signed_in(gateway, OPS)
    listed = ops.get("/console/links").text
    assert mine["url"] in listed and theirs["url"] in listed and "Revoke</button>" not in listed
