"""Payment links, the API (issue 23, item 2): an owner's key makes, lists, reads and revokes
its own links; admin keys read every owner's and change nothing; what a link says of itself
(active, expired, revoked, used up). Both engines, the gateway's own WSGI app."""

import re

import pytest

from helpers import API_KEY, BOTH_ENGINES, OTHER_KEY

ENGINES = BOTH_ENGINES
ADMIN = "admin-key-0123456789abcdef"


@pytest.fixture
def gateway_env(gateway_env):
    return dict(gateway_env, GATEWAY_ADMIN_KEYS=ADMIN)


def auth(key=API_KEY):
    return {"Authorization": f"Bearer {key}"}


def make(gateway, status=201, key=API_KEY, **body):
    return gateway.testapp.post_json("/payment_links", {"amount": 150, **body},
                                     headers=auth(key), status=status).json


def test_a_link_is_made_with_an_unguessable_id_and_its_url(gateway):
    link = make(gateway, reference="INV-9", description="Sukuma")
    assert re.fullmatch(r"pl_[A-Za-z0-9_-]{22}", link["id"])
    assert link["url"] == f"{gateway.url}/pay/{link['id']}"
    assert (link["amount"], link["reference"], link["description"]) == (150, "INV-9", "Sukuma")
    assert (link["status"], link["max_uses"], link["uses"]) == ("active", 1, 0)
    created = gateway.services.clock.wall()
    assert abs(__import__("mpesa_ledger").epoch(link["expires_at"]) - created - 86_400) <= 2
    assert make(gateway)["id"] != link["id"]


def test_links_are_their_owner_s(gateway):
    mine, theirs = make(gateway), make(gateway, key=OTHER_KEY)
    listed = {l["id"] for l in gateway.testapp.get("/payment_links",
                                                   headers=auth()).json["data"]}
    assert mine["id"] in listed and theirs["id"] not in listed
    gateway.testapp.get(f"/payment_links/{theirs['id']}", headers=auth(), status=404)
    gateway.testapp.post(f"/payment_links/{theirs['id']}/revoke", headers=auth(), status=404)
    every = {l["id"] for l in gateway.testapp.get("/payment_links",
                                                  headers=auth(ADMIN)).json["data"]}
    assert {mine["id"], theirs["id"]} <= every
    assert gateway.testapp.post(f"/payment_links/{mine['id']}/revoke", headers=auth(ADMIN),
                                status=403).json["error"]["code"] == "admin_key"
    make(gateway, status=403, key=ADMIN)


def test_a_revoked_link_says_so_and_an_old_one_has_expired(gateway):
    link = make(gateway, expires_in_s=300, max_uses=5)
    revoked = gateway.testapp.post(f"/payment_links/{link['id']}/revoke", headers=auth()).json
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    again = gateway.testapp.post(f"/payment_links/{link['id']}/revoke", headers=auth()).json
    assert again["revoked_at"] == revoked["revoked_at"]  # once
    other = make(gateway, expires_in_s=300)
    gateway.clock.advance(301)
    assert gateway.testapp.get(f"/payment_links/{other['id']}",
                               headers=auth()).json["status"] == "expired"


@pytest.mark.parametrize("body, field", [
    ({}, "amount"), ({"amount": 0}, "amount"), ({"amount": 10, "reference": "<b>"}, "reference"),
    ({"amount": 10, "expires_in_s": 10}, "expires_in_s"),
    ({"amount": 10, "max_uses": 0}, "max_uses"), ({"amount": 10, "max_uses": True}, "max_uses"),
    ({"amount": 10, "colour": "red"}, "colour")])
def test_a_bad_link_is_a_400_naming_the_field(gateway, body, field):
    res = gateway.testapp.post_json("/payment_links", body, headers=auth(), status=400)
    assert res.json["error"]["field"] == field


@pytest.mark.parametrize("link_id", ["nope", "pl_short", "pl_" + "x" * 40, "pl_%00" + "a" * 20])
def test_an_odd_link_id_is_a_404(gateway, link_id):
    gateway.testapp.get(f"/payment_links/{link_id}", headers=auth(), status=404)
