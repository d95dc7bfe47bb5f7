"""The operator console in a real browser: headless Chromium (Debian's, through selenium and
chromedriver) against the gateway's WSGI app served by waitress on 127.0.0.1, in front of
the Daraja simulator. One gateway and one browser for the module: the payments are made
once (through the API, as a shop would), then a person signs in, filters, opens a payment,
exports CSV and reads it back, sees a hostile account number as text, uses a 360 px
screen, and signs out.

Locally these tests skip with the reason when Chromium, chromedriver or selenium is
missing; under CI they fail (`.ci/run` installs them).
"""

import csv
import io
import json
import re
import urllib.error
import urllib.parse
import urllib.request

import pytest
from browser import browser_session, cookie_header, element, require_browser, wait

from helpers import OTHER_KEY, PAYBILL, OffsetClock, base_env, served_gateway, served_simulator
from mpesa_devtools import simulator

DEADLINE_S = 30  # anything that waits: CI is a loaded 2-core box
ALL_KEY = "console-amina-0123456789abcdef"  # amina@*: every owner's payments
OTIENO_KEY = "console-otieno-0123456789abcdef"  # otieno@other: the owner `other` only
COOKIE = "mpesa_console"
XSS = "<script>alert(1)</script>"
XSS_RECEIPT = "RKX0SCRIPT1"
C2B_PHONE = "254712345126"  # in clear, as Daraja once sent it: the console masks it
NAV = {"Payments": "/console/payments", "Receipts": "/console/receipts",
       "Needs attention": "/console/attention", "Summary": "/console/summary"}
COLUMNS = ["Created", "Status", "Amount", "Reference", "Receipt", "Phone"]
CSV_HEADER = ["receipt", "reference", "amount", "status", "created_at", "updated_at", "phone"]
OTHER_REFERENCE = "OTHER-1"  # a payment of the owner `other`
MASKED = re.compile(r"2547\*{6}[0-9]{3}")
# (phone, reference, amount, the status it ends in)
PAYMENTS = {
    "paid1": ("254712345601", "SHOP-1", 10, "succeeded"),
    "paid2": ("254712345602", "SHOP-2", 25, "succeeded"),
    "formula": ("254712345603", "-ATTACK", 5, "succeeded"),  # a CSV cell that starts with -
    "failed": ("254711000001", "SHOP-3", 15, "failed"),  # the simulator: insufficient funds
    "unknown": ("254711009999", "SHOP-4", 20, "unknown"),  # Daraja's answer lost, no callback
}


# --- plain HTTP beside the browser (status codes and headers selenium does not show) -------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def http(method, url, body=None, headers=None):
    """(status, headers, raw body) of one request; redirects are not followed."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=DEADLINE_S) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def sign_in_http(base, key):
    """(status, headers) of a form sign-in with `key`."""
    status, headers, _ = http("POST", base + "/console/sign-in",
                              urllib.parse.urlencode({"key": key}).encode(),
                              {"Content-Type": "application/x-www-form-urlencoded"})
    return status, headers


def session_cookie(headers):
    """`name=value` of the console cookie a response sets (None: it sets none)."""
    for line in headers.get_all("Set-Cookie") or ():
        if line.startswith(COOKIE + "="):
            return line.split(";", 1)[0]
    return None


# --- the gateway, its payments, and the browser: once for the module ----------------------


class Console:
    """The module's gateway (`url`, `handle`: its API in-process) and its payments."""

    def __init__(self, handle, sim):
        self.handle, self.sim, self.url = handle, sim, handle.url
        self.tx = {}  # name in PAYMENTS: the payment as the API shows it

    def page(self, driver, path):
        driver.get(self.url + path)


def confirmation(receipt, account):
    """A Paybill confirmation as Safaricom POSTs it (see test_c2b.py)."""
    return json.dumps({
        "TransactionType": "Pay Bill", "TransID": receipt, "TransTime": "20261121121325",
        "TransAmount": "30.00", "BusinessShortCode": simulator.SANDBOX_SHORTCODE,
        "BillRefNumber": account, "InvoiceNumber": "", "OrgAccountBalance": "130.00",
        "ThirdPartyTransID": "", "MSISDN": C2B_PHONE, "FirstName": "WANJIKU",
        "MiddleName": "", "LastName": ""}).encode()


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    require_browser()  # (the module is the browser's: no gateway without one)
    folder = tmp_path_factory.mktemp("console")
    with served_simulator(callback_delay_s=0.3, slow_answer_s=1.0) as (sim_app, sim_url):
        env = dict(base_env(sim_url, folder / "ledger.db", spool_dir=folder / "spool"),
                   # the simulator answers at once: a slow box is not a lost answer
                   MPESA_READ_TIMEOUT="10",
                   MPESA_C2B_SHORTCODE=PAYBILL,
                   GATEWAY_CONSOLE_KEYS=f"amina@*:{ALL_KEY},otieno@other:{OTIENO_KEY}",
                   # events are written (the timeline shows them), never sent: no sender
                   GATEWAY_WEBHOOK_URLS="default:http://127.0.0.1:9/events",
                   GATEWAY_WEBHOOK_SECRETS="default:whsec_" + "A" * 32,
                   GATEWAY_WEBHOOK_ALLOW_PRIVATE="on", GATEWAY_WEBHOOK_SENDER="off")
        with served_gateway(env, clock=OffsetClock()) as handle:
            yield _filled(Console(handle, sim_app))


def _filled(stack):
    """The console's payments, a payment of another owner, and a Paybill receipt whose
    payer's name is a script."""
    handle, sim_app = stack.handle, stack.sim
    for name, (phone, reference, amount, _) in PAYMENTS.items():
        if name == "unknown":
            sim_app.set_weather(push="internal")  # processed, but the answer is a 500
        res = handle.push({"phone": phone, "amount": amount, "reference": reference})
        sim_app.set_weather(push="ok")
        stack.tx[name] = res.json
    for name, (*_, status) in PAYMENTS.items():
        stack.tx[name] = handle.wait_status(stack.tx[name]["id"], status,
                                            timeout=DEADLINE_S)
    other = handle.testapp.post_json(
        "/stkpush", {"phone": "254712345604", "amount": 40, "reference": OTHER_REFERENCE},
        headers={"Authorization": f"Bearer {OTHER_KEY}"}, status=202).json
    assert other["status"] == "pending", other
    c2b = "/" + handle.services.signer.c2b_url("confirmation").split("/", 3)[3]
    res = handle.testapp.post(c2b, confirmation(XSS_RECEIPT, XSS),
                              content_type="application/json")
    assert res.json["ResultCode"] == 0, res.json
    return stack


@pytest.fixture(scope="module")
def driver():
    yield from browser_session(1280, 900)


def sign_in(console, driver, key=ALL_KEY):
    """Sign in through the form. (Sign-ins are rate-limited per address, a burst of 5:
    the module makes 5, counting the refused ones.)"""
    console.page(driver, "/console")
    field = element(driver, "#sign-in input#key")
    field.clear()
    field.send_keys(key)
    element(driver, "#sign-in button[type=submit]").click()


def signed_in(console, driver):
    """The payments page, signed in (through the form when the browser is not)."""
    console.page(driver, "/console/payments")
    if not driver.find_elements("css selector", "table#payments"):
        sign_in(console, driver)
    element(driver, "table#payments")


def rows(driver, table="payments"):
    """The rows of `table` as {column header: cell text}."""
    heads = [th.text.strip() for th in driver.find_elements(
        "css selector", f"table#{table} thead th")]
    return [dict(zip(heads, (td.text.strip() for td in tr.find_elements(
        "css selector", "th, td"))))
        for tr in driver.find_elements("css selector", f"table#{table} tbody tr")]


def submit_filters(driver, **fields):
    """Fill the filter form (status: a list of values) and press Filter."""
    from selenium.webdriver.support.ui import Select

    form = element(driver, "form#filters")
    for name, value in fields.items():
        if name == "status":
            select = Select(form.find_element("css selector", "select#status"))
            select.deselect_all()
            for v in value:
                select.select_by_value(v)
        else:
            box = form.find_element("css selector", f"#{name}")
            box.clear()
            box.send_keys(value)
    old = driver.current_url
    [button] = [b for b in form.find_elements("css selector", "button, input[type=submit]")
                if (b.text or b.get_attribute("value") or "").strip() == "Filter"]
    button.click()
    wait(driver).until(lambda d: d.current_url != old)
    return element(driver, "table#payments")


# --- the browser itself --------------------------------------------------------------------


def test_the_browser_starts_and_reads_a_page(driver):
    driver.get("data:text/html,<p id=x>hi</p>")
    assert element(driver, "#x").text == "hi"


# --- signing in ----------------------------------------------------------------------------


def test_a_wrong_key_is_refused_with_the_form_again_and_an_alert(console, driver):
    status, headers = sign_in_http(console.url, "not-a-console-key-at-all")
    assert status == 401 and session_cookie(headers) is None
    driver.delete_all_cookies()
    console.page(driver, "/console")
    label = element(driver, "#sign-in label[for=key]")
    assert label.text.strip() == "Console key"
    form = element(driver, "form#sign-in")
    assert (form.get_attribute("method"), urllib.parse.urlsplit(
        form.get_attribute("action")).path) == ("post", "/console/sign-in")
    assert element(driver, "input#key").get_attribute("type") == "password"
    sign_in(console, driver, key="not-a-console-key-either")
    alert = element(driver, "#error[role=alert]")
    assert alert.text.strip()
    assert element(driver, "form#sign-in")  # the form again
    assert driver.get_cookie(COOKIE) is None
    # An API key is no console key.
    assert sign_in_http(console.url, "test-key-0123456789abcdef")[0] == 401


def test_signing_in_sets_a_cookie_no_script_can_read(console, driver):
    driver.delete_all_cookies()
    sign_in(console, driver)
    # 303 to the payments page (the browser follows it)
    wait(driver).until(lambda d: urllib.parse.urlsplit(d.current_url).path
                       == "/console/payments")
    cookie = driver.get_cookie(COOKIE)
    assert cookie is not None and cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert "expiry" in cookie and cookie["secure"] is False  # plain http here
    assert COOKIE not in driver.execute_script("return document.cookie")
    assert "amina" in element(driver, "#who").text
    # Signed in, /console itself goes to the payments.
    console.page(driver, "/console")
    wait(driver).until(lambda d: urllib.parse.urlsplit(d.current_url).path
                       == "/console/payments")


# --- every page ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(NAV.values()) + ["/console/payments/{paid1}"])
def test_every_page_has_the_navigation_and_a_strict_policy(console, driver, path):
    signed_in(console, driver)
    path = path.format(**{k: v["id"] for k, v in console.tx.items()})
    console.page(driver, path)
    nav = element(driver, 'nav[aria-label="Console"]')
    links = {a.text.strip(): urllib.parse.urlsplit(a.get_attribute("href")).path
             for a in nav.find_elements("css selector", "a")}
    assert {k: links.get(k) for k in NAV} == NAV
    form = element(driver, "form#sign-out")
    assert (form.get_attribute("method"), urllib.parse.urlsplit(
        form.get_attribute("action")).path) == ("post", "/console/sign-out")
    assert form.find_element("css selector", "button[type=submit]").text.strip() == "Sign out"
    assert "amina" in element(driver, "#who").text
    assert driver.execute_script(
        "return document.querySelectorAll('script:not([src])').length") == 0
    # The headers, fetched with the browser's own cookie.
    status, headers, body = http("GET", console.url + path,
                                 headers={"Cookie": cookie_header(driver)})
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    policy = headers["Content-Security-Policy"] or ""
    assert "frame-ancestors 'none'" in policy
    assert "'unsafe-inline'" not in policy.split("script-src", 1)[-1].split(";", 1)[0]
    for phone, *_ in PAYMENTS.values():
        assert phone.encode() not in body and phone[3:].encode() not in body


# --- payments: filters, one payment, export ------------------------------------------------


def test_the_payments_page_lists_every_payment_with_masked_phones(console, driver):
    signed_in(console, driver)
    for name in ("status", "since", "until", "reference", "receipt", "phone"):
        assert driver.find_elements("css selector", f"form#filters label[for={name}]"), name
    assert element(driver, "select#status").get_attribute("multiple") is not None
    options = [o.get_attribute("value") for o in driver.find_elements(
        "css selector", "select#status option")]
    assert options == ["pending", "succeeded", "failed", "rejected", "unknown"]
    assert [element(driver, f"input#{n}").get_attribute("type") for n in ("since", "until")] \
        == ["date", "date"]
    heads = driver.find_elements("css selector", "table#payments thead th")
    assert [th.text.strip() for th in heads] == COLUMNS
    assert all(th.get_attribute("scope") == "col" for th in heads)
    shown = {r["Reference"]: r for r in rows(driver)}
    assert {reference for _, reference, *_ in PAYMENTS.values()} <= set(shown)
    for name, (phone, reference, amount, status) in PAYMENTS.items():
        assert shown[reference]["Status"] == status
        assert MASKED.fullmatch(shown[reference]["Phone"]), shown[reference]
        assert shown[reference]["Phone"].endswith(phone[-3:])
    # Each row's first cell links to the payment.
    link = driver.find_element("css selector", "table#payments tbody tr td:first-child a, "
                               "table#payments tbody tr th:first-child a")
    assert re.fullmatch(r"/console/payments/tx_[0-9a-f]+",
                        urllib.parse.urlsplit(link.get_attribute("href")).path)
    assert not driver.find_elements("css selector", "a#next")  # six rows: one page


def test_filtering_by_status_shows_only_those_rows(console, driver):
    signed_in(console, driver)
    submit_filters(driver, status=["failed"])
    assert "status=failed" in driver.current_url
    assert [r["Reference"] for r in rows(driver)] == ["SHOP-3"]
    assert {r["Status"] for r in rows(driver)} == {"failed"}
    submit_filters(driver, status=["failed", "unknown"])
    assert sorted(r["Reference"] for r in rows(driver)) == ["SHOP-3", "SHOP-4"]
    # The export link carries the same filters.
    href = element(driver, "a#export").get_attribute("href")
    assert urllib.parse.urlsplit(href).path == "/console/payments.csv"
    assert sorted(urllib.parse.parse_qs(urllib.parse.urlsplit(href).query)["status"]) == \
        ["failed", "unknown"]
    assert element(driver, "a#export").text.strip() == "Export CSV"


def test_filtering_by_the_phones_last_digits_and_by_receipt(console, driver):
    signed_in(console, driver)
    submit_filters(driver, status=[], phone="602")
    assert [r["Reference"] for r in rows(driver)] == ["SHOP-2"]
    receipt = console.tx["paid1"]["receipt"]
    console.page(driver, "/console/payments")
    submit_filters(driver, status=[], receipt=receipt)
    assert [(r["Reference"], r["Receipt"]) for r in rows(driver)] == [("SHOP-1", receipt)]


def test_a_payment_opens_on_its_timeline(console, driver):
    signed_in(console, driver)
    tx = console.tx["paid1"]
    submit_filters(driver, status=[], reference="SHOP-1")
    link = element(driver, "table#payments tbody tr a")
    assert urllib.parse.urlsplit(link.get_attribute("href")).path == \
        f"/console/payments/{tx['id']}"
    link.click()
    wait(driver).until(lambda d: tx["id"] in d.find_element("css selector", "h1").text)
    events = driver.find_elements("css selector", "ol#timeline > li")
    # the request, Daraja's answer, the callback, the webhook event at least
    assert len(events) >= 4, [e.text for e in events]
    assert tx["receipt"] in element(driver, "body").text
    assert "254712345601" not in driver.page_source


def test_the_csv_export_reads_back_masked_and_neutralised(console, driver):
    signed_in(console, driver)
    href = element(driver, "a#export").get_attribute("href")
    status, headers, body = http("GET", href, headers={"Cookie": cookie_header(driver)})
    assert status == 200, body[:300]
    assert headers["Content-Type"] == "text/csv; charset=utf-8"
    assert headers["Content-Disposition"] == 'attachment; filename="payments.csv"'
    table = list(csv.reader(io.StringIO(body.decode("utf-8-sig"))))
    assert table[0][:len(CSV_HEADER)] == CSV_HEADER
    by_reference = {row[1]: dict(zip(CSV_HEADER, row)) for row in table[1:]}
    assert set(by_reference) == {"SHOP-1", "SHOP-2", "SHOP-3", "SHOP-4", "'-ATTACK",
                                 OTHER_REFERENCE}
    for name, (phone, reference, amount, status) in PAYMENTS.items():
        row = by_reference["'" + reference if reference[0] in "=+-@" else reference]
        assert (float(row["amount"]), row["status"]) == (amount, status)
        assert MASKED.fullmatch(row["phone"]) and row["phone"].endswith(phone[-3:])
        assert row["receipt"] == (console.tx[name]["receipt"] or "")
    for phone, *_ in PAYMENTS.values():
        assert phone[3:].encode() not in body
    # Without the session cookie: no export.
    assert http("GET", href)[0] in (302, 303, 401, 403)
    assert table[0] == CSV_HEADER  # exactly these columns, in this order


# --- receipts, attention, summary ---------------------------------------------------------


def test_a_hostile_account_number_is_shown_as_text(console, driver):
    from selenium.common.exceptions import NoAlertPresentException

    signed_in(console, driver)
    console.page(driver, "/console/receipts")
    table = element(driver, "table#receipts")
    assert XSS in table.text and XSS_RECEIPT in table.text
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018 - reading it is the check
    assert driver.execute_script("return document.querySelectorAll('table#receipts script')"
                                 ".length") == 0
    assert C2B_PHONE[3:] not in driver.page_source


def test_needs_attention_names_the_unknown_payment(console, driver):
    signed_in(console, driver)
    console.page(driver, "/console/attention")
    unknown = console.tx["unknown"]["id"]
    hrefs = [urllib.parse.urlsplit(a.get_attribute("href")).path
             for a in driver.find_elements("css selector", "main a, body a")]
    assert f"/console/payments/{unknown}" in hrefs or unknown in element(driver, "body").text


def test_the_summary_draws_a_chart_beside_its_numbers(console, driver):
    signed_in(console, driver)
    console.page(driver, "/console/summary")
    chart = element(driver, "svg[role=img]")
    assert chart.size["width"] > 0 and chart.size["height"] > 0
    assert "succeeded" in element(driver, "table#summary").text


def test_a_person_of_one_owner_sees_only_that_owners_payments(console, driver):
    status, headers = sign_in_http(console.url, OTIENO_KEY)
    assert status == 303
    cookie = {"Cookie": session_cookie(headers)}
    status, _, body = http("GET", console.url + "/console/payments", headers=cookie)
    assert status == 200 and b"otieno" in body
    assert OTHER_REFERENCE.encode() in body and b"SHOP-1" not in body
    mine = console.tx["paid1"]["id"]
    assert http("GET", console.url + f"/console/payments/{mine}", headers=cookie)[0] in (403, 404)
    # amina@* reads every owner's
    signed_in(console, driver)
    assert OTHER_REFERENCE in {r["Reference"] for r in rows(driver)}


# --- a small screen -----------------------------------------------------------------------


def test_at_360_px_the_table_and_filters_fit_the_window(console, driver):
    signed_in(console, driver)
    driver.set_window_size(360, 800)
    try:
        console.page(driver, "/console/payments")
        assert element(driver, "form#filters").is_displayed()
        assert element(driver, "table#payments").is_displayed()
        assert element(driver, "select#status").is_displayed()
        width, inner = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert inner <= 360 and width <= inner + 1, (width, inner)
    finally:
        driver.set_window_size(1280, 900)


# --- signing out (last: the module's browser is signed out after it) -----------------------


def test_signing_out_ends_the_session(console, driver):
    signed_in(console, driver)
    old = cookie_header(driver)
    element(driver, "form#sign-out button[type=submit]").click()
    wait(driver).until(lambda d: urllib.parse.urlsplit(d.current_url).path == "/console")
    element(driver, "form#sign-in")
    assert driver.get_cookie(COOKIE) is None
    console.page(driver, "/console/payments")
    element(driver, "form#sign-in")
    assert not driver.find_elements("css selector", "table#payments")
    # The old cookie, kept by someone, no longer signs anyone in.
    status, _, body = http("GET", console.url + "/console/payments", headers={"Cookie": old})
    assert b'id="payments"' not in body, status
