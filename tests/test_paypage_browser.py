"""The customer's pay page in a real browser (Debian's headless Chromium, 360 px wide, with
JavaScript off: the page has none, and refreshes itself): a payment link opened, a
scenario phone paying it until `succeeded` with the receipt; a cancelled prompt and its
retry; a fourth prompt to one phone refused. Skips without Chromium locally; fails
without it under CI (tests/browser.py)."""

import pytest
from browser import browser_session, element, require_browser, wait

from helpers import API_KEY, base_env, served_gateway, served_simulator

DEADLINE_S = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_browser()
    folder = tmp_path_factory.mktemp("pay")
    with served_simulator(callback_delay_s=0.3) as (sim_app, sim_url):
        env = dict(base_env(sim_url, folder / "ledger.db", spool_dir=folder / "spool"),
                   MPESA_READ_TIMEOUT="10", GATEWAY_OWNER_NAMES="default:Mama Mboga Shop")
        with served_gateway(env) as handle:
            yield handle, sim_app


@pytest.fixture(scope="module")
def phone_browser(stack):
    yield from browser_session(360, 800, javascript=False)


def new_link(handle, **body):
    return handle.testapp.post_json("/payment_links", {"amount": 90, "reference": "SHOP-1",
                                                       **body},
                                    headers={"Authorization": f"Bearer {API_KEY}"}).json


def pay_with(driver, link, phone):
    driver.get(link["url"])
    element(driver, "form#pay input#phone").send_keys(phone)
    element(driver, "form#pay button[type=submit]").click()


def settled(driver):
    """The status the page shows once it stops refreshing (it refreshes itself: no
    script)."""
    return wait(driver, DEADLINE_S).until(
        lambda d: (s := d.find_elements("css selector", "#status")) and s[0].get_attribute(
            "data-status") != "pending" and s[0])


def test_a_customer_pays_at_360_px_with_javascript_off_and_sees_the_receipt(
        stack, phone_browser):
    handle, _ = stack
    link = new_link(handle)
    pay_with(phone_browser, link, "0712 345 801")
    status = settled(phone_browser)
    assert status.get_attribute("data-status") == "succeeded"
    assert element(phone_browser, "#receipt").text
    assert "Mama Mboga Shop" in phone_browser.page_source
    assert phone_browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1")


def test_a_cancelled_prompt_and_its_retry(stack, phone_browser):
    handle, _ = stack
    link = new_link(handle)
    pay_with(phone_browser, link, "254711001032")  # the customer cancels
    assert settled(phone_browser).get_attribute("data-status") == "failed"
    assert "You cancelled the prompt" in element(phone_browser, "#status").text
    element(phone_browser, "#again").click()
    element(phone_browser, "form#pay input#phone").send_keys("254712345802")
    element(phone_browser, "form#pay button[type=submit]").click()
    assert settled(phone_browser).get_attribute("data-status") == "succeeded"


def test_a_fourth_prompt_to_one_phone_is_refused(stack, phone_browser):
    handle, sim_app = stack
    link = new_link(handle, max_uses=5)
    before = sim_app.stats()["pushes"]
    for _ in range(3):
        pay_with(phone_browser, link, "254711001032")
        settled(phone_browser)
    pay_with(phone_browser, link, "254711001032")
    assert "had its prompts from this link" in element(phone_browser, "#error").text
    assert sim_app.stats()["pushes"] == before + 3


def test_with_javascript_the_status_changes_in_place_and_is_announced(stack):
    """The status page's own script updates its aria-live region without reloading the
    page (a reload would not be announced as a change)."""
    handle, _ = stack
    link = new_link(handle)
    for driver in browser_session(360, 800):
        pay_with(driver, link, "0712 345 803")
        element(driver, "#status")
        driver.execute_script("window.stillThisPage = true")
        status = settled(driver)
        assert status.get_attribute("data-status") == "succeeded"
        assert status.get_attribute("aria-live") == "polite"
        assert driver.execute_script("return window.stillThisPage === true")
        assert element(driver, "#receipt").text
