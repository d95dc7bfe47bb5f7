"""Console actions in a real browser (Debian's headless Chromium): a refund through its
confirm step with the session's form token, shown in the payment's timeline with the
person's name; the same form without its token is refused and nothing is sent. Skips
without Chromium locally; fails without it under CI (tests/browser.py)."""

import pytest
from browser import browser_session, element, require_browser, wait

from helpers import base_env, served_gateway, served_simulator
from mpesa_devtools import simulator

KEY = "console-wanjiru-0123456789"  # wanjiru@default: acts for the default owner
DEADLINE_S = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_browser()
    folder = tmp_path_factory.mktemp("actions")
    with served_simulator(callback_delay_s=0.3, result_delay_s=0.2) as (sim_app, sim_url):
        cert = folder / "simulator-cert.pem"
        cert.write_bytes(sim_app.initiator_certificate_pem())
        env = dict(base_env(sim_url, folder / "ledger.db", spool_dir=folder / "spool"),
                   MPESA_READ_TIMEOUT="10", GATEWAY_CONSOLE_KEYS=f"wanjiru@default:{KEY}",
                   MPESA_INITIATOR_NAME=simulator.SANDBOX_INITIATOR_NAME,
                   MPESA_INITIATOR_PASSWORD=simulator.SANDBOX_INITIATOR_PASSWORD,
                   MPESA_CERT_FILE=str(cert))
        with served_gateway(env) as handle:
            paid = [handle.wait_status(handle.push({"phone": phone, "amount": 30}).json["id"],
                                       "succeeded", timeout=DEADLINE_S)
                    for phone in ("254712345701", "254712345702")]
            yield handle, sim_app, paid


@pytest.fixture(scope="module")
def driver(stack):
    handle, _, _ = stack
    for d in browser_session(1280, 900):
        d.get(handle.url + "/console")
        element(d, "#sign-in input#key").send_keys(KEY)
        element(d, "#sign-in button[type=submit]").click()
        element(d, "table#payments")
        yield d


def test_a_refund_through_its_confirm_step_is_sent_once_and_named_in_the_timeline(
        stack, driver):
    handle, sim_app, (tx, _) = stack
    driver.get(f"{handle.url}/console/payments/{tx['id']}")
    element(driver, "#refund-link").click()
    button = element(driver, "form#refund button[type=submit]")
    assert button.text == "Refund KES 30 to 2547******701"  # the confirm step says what
    button.click()
    assert "The refund is pending" in element(driver, "#outcome").text
    wait(driver, DEADLINE_S).until(lambda d: handle.get(tx["id"]).json["refund"][
        "status"] == "refunded")
    assert sim_app.stats()["reversals"] == 1
    driver.get(f"{handle.url}/console/payments/{tx['id']}")
    timeline = element(driver, "ol#timeline").text
    assert "wanjiru@default (console) asked for a refund: pending" in timeline


def test_the_same_form_without_its_token_is_refused_and_nothing_is_sent(stack, driver):
    handle, sim_app, (_, tx) = stack
    before = sim_app.stats().get("reversals", 0)
    driver.get(f"{handle.url}/console/payments/{tx['id']}/refund")
    element(driver, "form#refund")
    driver.execute_script("document.querySelector('form#refund input[name=csrf]').remove()")
    element(driver, "form#refund button[type=submit]").click()
    assert "stale" in element(driver, "#outcome").text
    assert handle.get(tx["id"]).json["refund"] is None
    assert sim_app.stats().get("reversals", 0) == before
