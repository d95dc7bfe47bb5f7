"""Payment links: what a merchant sends a customer who has no checkout of their own.

Owns the API of links (`POST /payment_links`, `GET /payment_links`, `GET /payment_links/
<id>`, `POST /payment_links/<id>/revoke`: an owner's key makes, reads and revokes its own;
admin keys read every owner's and change nothing), a link's id (22 random URL-safe
characters: its URL is its only key), its public URL (under MPESA_CALLBACK_BASE_URL), and
its state (active, expired, revoked, used_up: `uses` counts its succeeded payments). The
customer's pay page a link opens is `paypage`'s.
"""

import re
import secrets

import mpesa_ledger as store
import validation
from mpesa_gateway.auth import authenticate
from mpesa_gateway.payments import checked, ledger_read, ledger_unavailable
from mpesa_gateway.wire import Forbidden, NotFound, Reply

LIST_LIMIT = 200


def new_link_id():
    return "pl_" + secrets.token_urlsafe(16)


_LINK_ID = re.compile(r"pl_[A-Za-z0-9_-]{22}")


def link_ok(value):
    return bool(_LINK_ID.fullmatch(value))


def state_of(row, now):
    if row["revoked_at"] is not None:
        return "revoked"
    if row["uses"] >= row["max_uses"]:
        return "used_up"
    if row["expires_at"] <= now:
        return "expired"
    return "active"


def link_resource(row, base_url, now):
    """A link as its owner sees it (`uses`: the row's, which the ledger's reads fill)."""
    return {"id": row["id"], "url": f"{base_url}/pay/{row['id']}", "amount": row["amount"],
            "reference": row["reference"], "description": row["description"],
            "max_uses": row["max_uses"], "uses": row["uses"],
            # A late success (after a failure was reported) may pay a link past its uses:
            # said, since it cannot be prevented.
            "overpaid": row["uses"] > row["max_uses"],
            "status": state_of(row, now), "expires_at": store.iso_utc(row["expires_at"]),
            "revoked_at": store.iso_utc(row["revoked_at"]) if row["revoked_at"] else None,
            "created_at": store.iso_utc(row["created_at"]), "owner": row["owner"]}


def create_link(services, authorization, load_body):
    """POST /payment_links: a link for the caller's owner; 201 {id, url, …}."""
    cfg = services.config
    caller = authenticate(authorization, cfg)
    if caller.admin:
        raise Forbidden("admin keys read links; a merchant's key makes one", code="admin_key")
    asked = checked(validation.validate_link, load_body(), cfg.max_amount,
                    cfg.default_reference, cfg.default_description)
    now = services.clock.wall()
    try:
        row = services.ledger.create_link(
            new_link_id(), owner=caller.owner, amount=asked.amount, reference=asked.reference,
            description=asked.description, max_uses=asked.max_uses,
            expires_at=now + asked.expires_in_s)
    except services.ledger.Error as exc:
        services.ledger_watch.failed("links", exc)
        raise ledger_unavailable("the ledger cannot be written; no link was made") from None
    return Reply(201, link_resource(row, cfg.callback_base_url, now))


@ledger_read
def list_links(services, authorization):
    """GET /payment_links: the caller's links, newest first (admin keys: everyone's)."""
    caller = authenticate(authorization, services.config)
    rows = services.ledger.links_page(owner=None if caller.admin else caller.owner,
                                      limit=LIST_LIMIT)
    now = services.clock.wall()
    return Reply(200, {"data": [link_resource(r, services.config.callback_base_url, now)
                                for r in rows]})


@ledger_read
def read_link(services, authorization, link_id):
    caller = authenticate(authorization, services.config)
    row = services.ledger.link(link_id) if link_ok(link_id) else None
    if row is None or not caller.sees(row):  # another owner's link does not exist here
        raise NotFound("no payment link with that id")
    return Reply(200, link_resource(row, services.config.callback_base_url,
                                    services.clock.wall()))


@ledger_read
def revoke_link(services, authorization, link_id):
    """POST /payment_links/<id>/revoke: the link pays no more (payments made stand)."""
    caller = authenticate(authorization, services.config)
    if caller.admin:
        raise Forbidden("admin keys read links; the owner's key revokes one", code="admin_key")
    row = services.ledger.revoke_link(link_id, caller.owner) if link_ok(link_id) else None
    if row is None:
        raise NotFound("no payment link with that id")
    return Reply(200, link_resource(row, services.config.callback_base_url,
                                    services.clock.wall()))
