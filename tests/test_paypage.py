"""The customer's pay page (issue 23, item 3), over the gateway's own WSGI app (WebTest),
the simulator answering the prompts and POSTing callbacks to the gateway's real socket:
a link opened, a phone given, one prompt, the signed status page until `succeeded` with
the receipt or a failure with a plain next step; the link's limits; nothing of another
payment. Both engines. The same in Chromium: test_paypage_browser.py."""

import re

import pytest
from webtest import TestApp

from helpers import API_KEY, BOTH_ENGINES, wait_for

ENGINES = BOTH_ENGINES
DEADLINE_S = 30


@pytest.fixture
def gateway_env(gateway_env):
    return dict(gateway_env, GATEWAY_OWNER_NAMES="default:Mama Mboga Shop")


def make_link(gateway, **body):
    return gateway.testapp.post_json(
        "/payment_links", {"amount": 120, "reference": "INV-77", **body},
        headers={"Authorization": f"Bearer {API_KEY}"}, status=201).json


def customer(gateway):
    return TestApp(gateway.app)


def pay(client, link, phone, status=303):
    return client.post(f"/pay/{link['id']}", {"phone": phone}, status=status)


def settled_page(client, location):
    return wait_for(lambda: (p := client.get(location)) and 'data-status="pending"'
                    not in p.text and p, timeout=DEADLINE_S, interval=0.2)


def test_a_customer_pays_a_link_and_sees_the_receipt(gateway, sim):
    link = make_link(gateway)
    client = customer(gateway)
    page = client.get(f"/pay/{link['id']}")
    assert "Mama Mboga Shop" in page.text and "Pay KES 120" in page.text
    assert "INV-77" in page.text
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    res = pay(client, link, "0712 345 792")
    location = res.headers["Location"]
    assert re.fullmatch(rf"/pay/{link['id']}/tx_[0-9a-f]{{24}}/[0-9a-f]{{32}}", location)
    pending = client.get(location)
    assert 'http-equiv="refresh"' in pending.text and 'aria-live="polite"' in pending.text
    assert "2547******792" in pending.text and "254712345792" not in pending.text
    done = settled_page(client, location)
    assert 'data-status="succeeded"' in done.text and 'id="receipt"' in done.text
    assert 'http-equiv="refresh"' not in done.text
    tx_id = location.split("/")[3]
    row = gateway.services.ledger.get(tx_id)
    assert (row["link_id"], row["owner"], row["amount"]) == (link["id"], "default", 120)
    # A single-use link, paid: it takes no more.
    assert gateway.testapp.get(f"/payment_links/{link['id']}", headers={
        "Authorization": f"Bearer {API_KEY}"}).json["status"] == "used_up"
    assert "has been paid" in client.get(f"/pay/{link['id']}", status=410).text


def test_a_cancelled_prompt_says_so_and_the_customer_tries_again(gateway, sim):
    link = make_link(gateway)
    client = customer(gateway)
    location = pay(client, link, "254711001032").headers["Location"]  # 1032: cancelled
    done = settled_page(client, location)
    assert "You cancelled the prompt" in done.text and 'id="again"' in done.text
    assert 'id="paybill"' in done.text and "INV-77" in done.text  # the menu route, now
    again = pay(client, link, "254712345793").headers["Location"]
    assert 'data-status="succeeded"' in settled_page(client, again).text


def test_a_fourth_prompt_to_one_phone_is_refused(gateway, sim):
    link = make_link(gateway, max_uses=5)
    client = customer(gateway)
    for _ in range(3):  # each cancelled, so the phone lock is free again
        settled_page(client, pay(client, link, "254711001032").headers["Location"])
    refused = pay(client, link, "254711001032", status=409)
    assert "had its prompts from this link" in refused.text
    assert sim.stats()["pushes"] == 3


def test_the_status_page_is_signed_and_shows_only_its_payment(gateway, sim):
    link = make_link(gateway, max_uses=2)
    client = customer(gateway)
    location = pay(client, link, "254712345794").headers["Location"]
    other = make_link(gateway)
    _, _, link_id, tx_id, sig = location.split("/")
    for bad in (f"/pay/{link_id}/{tx_id}/{'0' * 32}", f"/pay/{other['id']}/{tx_id}/{sig}",
                f"/pay/{link_id}/tx_{'0' * 24}/{sig}"):
        client.get(bad, status=404)


@pytest.mark.parametrize("phone", ["123", "0812345678", "<script>", ""])
def test_a_phone_that_is_not_safaricom_s_is_said_plainly(gateway, sim, phone):
    link = make_link(gateway)
    res = pay(customer(gateway), link, phone, status=400)
    assert "not a Safaricom number" in res.text and "<script>" not in res.text
    assert sim.stats()["pushes"] == 0


def test_a_revoked_expired_or_unknown_link_takes_nothing(gateway, sim):
    link = make_link(gateway, expires_in_s=300)
    gateway.testapp.post(f"/payment_links/{link['id']}/revoke",
                         headers={"Authorization": f"Bearer {API_KEY}"})
    assert "withdrawn" in customer(gateway).get(f"/pay/{link['id']}", status=410).text
    pay(customer(gateway), link, "254712345795", status=410)
    old = make_link(gateway, expires_in_s=300)
    gateway.clock.advance(301)
    assert "expired" in customer(gateway).get(f"/pay/{old['id']}", status=410).text
    customer(gateway).get("/pay/pl_" + "x" * 22, status=404)
    assert sim.stats()["pushes"] == 0


def test_one_client_cannot_shut_a_link_for_everyone(gateway, sim):
    link = make_link(gateway)
    junk = TestApp(gateway.app, extra_environ={"REMOTE_ADDR": "10.9.9.9"})
    for _ in range(8):
        pay(junk, link, "123", status=400)  # refused before any limit is spent
    real = TestApp(gateway.app, extra_environ={"REMOTE_ADDR": "10.1.1.1"})
    assert pay(real, link, "254712345796").status_int == 303


def test_a_second_tap_leads_to_the_first_prompt_s_page(gateway, sim):
    link = make_link(gateway, max_uses=3)
    client = customer(gateway)
    first = pay(client, link, "254712345797").headers["Location"]
    second = pay(client, link, "254712345797")
    assert second.headers["Location"] == first
    assert sim.stats()["pushes"] == 1


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 60}], indirect=True)
def test_an_unknown_payment_keeps_checking_and_offers_no_retry(gateway, sim):
    from mpesa_ledger import UNKNOWN

    link = make_link(gateway)
    client = customer(gateway)
    location = pay(client, link, "254712345798").headers["Location"]
    with gateway.services.ledger._write() as conn:
        conn.execute("UPDATE transactions SET status = ? WHERE id = ?",
                     (UNKNOWN, location.split("/")[3]))
    page = client.get(location).text
    assert 'content="10"' in page and 'id="again"' not in page
    assert "Check your M-Pesa messages" in page


def test_a_link_revoked_while_a_customer_presses_pay_sends_nothing(gateway, sim):
    link = make_link(gateway)
    client = customer(gateway)
    page = client.get(f"/pay/{link['id']}")
    gateway.testapp.post(f"/payment_links/{link['id']}/revoke",
                         headers={"Authorization": f"Bearer {API_KEY}"})
    pay(client, link, "254712345799", status=410)
    assert "Pay KES 120" in page.text and sim.stats()["pushes"] == 0


def test_presses_past_the_limit_from_one_address_are_told_when_to_retry(gateway, sim):
    link = make_link(gateway, max_uses=10)
    client = TestApp(gateway.app, extra_environ={"REMOTE_ADDR": "10.2.2.2"})
    for n in range(5):
        pay(client, link, f"25471234581{n}")
    slow = pay(client, link, "254712345819", status=429)
    assert int(slow.headers["Retry-After"]) >= 1 and "Too many tries" in slow.text
    assert sim.stats()["pushes"] == 5
