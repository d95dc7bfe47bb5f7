"""The ledger's vocabulary: payment statuses, ids, times, and the values its calls trade.

Owns what both engines and the gateway agree a ledger row means: the statuses a
payment passes through (`submitting` is internal, shown to merchants as `pending`),
how ids and timestamps are made, and the small frozen values the ledger's calls
take and return (`Idempotency`, `Begun`, `NewEvent`, `PinnedAnswer`, `NewRequest`), and
the states of an initiator request (`REQUEST_*`).
"""

import calendar
import enum
import secrets
import time
from dataclasses import dataclass

SUBMITTING = "submitting"  # written, Daraja not answered yet (shown to merchants as pending)
PENDING, SUCCEEDED, FAILED, REJECTED, UNKNOWN = (
    "pending", "succeeded", "failed", "rejected", "unknown")
FINAL = frozenset({SUCCEEDED, FAILED, REJECTED})  # unknown is not final: a result may still come
# An initiator request (a refund, a code check, a balance): `submitting` before Daraja is
# called, `pending` once Daraja acknowledged it, `unknown` when its fate cannot be known
# (cut off, timed out in Daraja's queue, no result in time: never re-sent by itself),
# `succeeded` or `failed` by its result.
REQUEST_ACTIVE = (SUBMITTING, PENDING, UNKNOWN)
IDEMPOTENCY_TTL_S = 24 * 3600  # keys are kept at least this long (Stripe's window)


def iso_utc(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def epoch(iso):
    return calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))


def new_tx_id(epoch_s, prefix="tx_"):
    """tx_ + 12 hex digits of creation milliseconds + 12 random: ids sort by creation."""
    return f"{prefix}{int(epoch_s * 1000):012x}{secrets.token_hex(6)}"


@dataclass(frozen=True)
class NewEvent:
    """A webhook event to write in the same commit as the status change it reports."""

    tx_id: str
    owner: str
    type: str
    body: bytes


@dataclass(frozen=True)
class ReceiptRules:
    """How a Paybill/Till receipt finds its payment and its owner, and what it tells: a
    Paybill account number equal (any case) to the reference of exactly one payment made in
    the last `recent_s` seconds, never `default_reference`, is that payment's; else
    `owner_for(account)` names the owner (None: `default`). `event(receipt)`: its NewEvent,
    or None (None: no events)."""

    recent_s: float = 30 * 24 * 3600
    default_reference: str = ""
    owner_for: object = None  # account number -> owner name
    event: object = None  # receipt row (dict) -> NewEvent | None


@dataclass(frozen=True)
class Idempotency:
    scope: str
    key: str
    request_hash: str


class Start(str, enum.Enum):
    """What begin_push decided about a push."""

    NEW = "new"  # a new `submitting` row: call Daraja
    REPLAY = "replay"  # the key's first request was answered: replay that answer
    IN_FLIGHT = "in_flight"  # the key's first request has no pinned answer (yet)
    REUSED = "reused"  # the key was used with a different request
    PHONE_BUSY = "phone_busy"  # the phone may still have a prompt open
    RATE_LIMITED = "rate_limited"  # the fleet's token bucket had no token (Begun.wait_s)
    LINK_USED_UP = "link_used_up"  # a payment link's uses are taken
    LINK_PHONE_DONE = "link_phone_done"  # this phone had its prompts from the link
    # (initiator requests)
    EXISTS = "exists"  # a request that answers this one is under way or recent: no new one
    STOPPED = "stopped"  # the initiator was refused: no call until its configuration changes
    PROVING = "proving"  # the initiator's first request is out: one at a time until a result


@dataclass(frozen=True)
class Begun:
    """What begin_push decided (`kind`), with the row it concerns and, for a replay, the
    stored answer."""

    kind: Start
    row: dict | None = None
    status_code: int | None = None
    body: bytes | None = None
    wait_s: float | None = None  # RATE_LIMITED: seconds until the bucket has a token


@dataclass(frozen=True)
class PinnedAnswer:
    """The answer a keyed request got (status and the body's bytes, made by the payment
    flow) about payment `tx_id`, stored with the outcome it reports so a retry with the
    key replays it. Stored only while the key still names that payment."""

    idempotency: Idempotency
    tx_id: str
    status_code: int
    body: bytes


@dataclass(frozen=True)
class NewRequest:
    """An initiator request to write before Daraja is called: `kind` refund | verify |
    balance; `idempotency` (refunds) binds the caller's key to it; `fingerprint`: the
    initiator configuration sending it; `min_interval_s` (balance): no new one if one was
    made this recently; `retry`: an operator's explicit retry of an `unknown` refund."""

    kind: str
    owner: str
    fingerprint: str
    receipt: str | None = None
    tx_id: str | None = None
    amount: int | None = None
    idempotency: Idempotency | None = None
    min_interval_s: float = 0.0
    retry: bool = False


@dataclass(frozen=True)
class LinkLimits:
    """A payment link's push: its id and what it allows (checked in the push's commit)."""

    link_id: str
    max_uses: int
    prompts_per_phone: int = 3
