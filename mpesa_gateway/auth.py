"""Who is calling, and which URLs this gateway made: API keys, owners, signed callback paths.

Owns the caller of a request (an owner's API key, or an operator's admin key, compared
in constant time), the owner a row belongs to, the idempotency key bound to its owner
and its request's content, and the HMACs that sign each transaction's callback URL, the
Paybill/Till URLs and each initiator request's result and timeout URLs.
"""

import hashlib
import hmac
import json
from dataclasses import dataclass

import config as settings
import mpesa_ledger as store
from mpesa_gateway.wire import BadRequest, Unauthorized

SIGNATURE_HEX_CHARS = 32
MAX_IDEMPOTENCY_KEY = 255


@dataclass(frozen=True)
class Caller:
    """Who is calling: the owner name of their API key, or an operator (admin) key."""

    owner: str | None  # None for an admin key
    admin: bool = False

    def sees(self, row):
        """A row is the caller's if their name made it; rows from before owners existed
        belong to `default`. Admin keys see every row."""
        if self.admin:
            return True
        return (row.get("owner") or settings.DEFAULT_OWNER) == self.owner


def legacy_scope(api_key):
    """How idempotency keys were scoped before owner names: a hash of the API key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def bearer_token(authorization):
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    scheme, _, presented = (authorization or "").partition(" ")
    return presented.strip() if scheme.lower() == "bearer" else None


def authenticate(authorization, config):
    """Return the Caller of an Authorization header value; 401 unless a key matches,
    compared in constant time."""
    token = bearer_token(authorization)
    presented = (token or "").encode()
    matched = None
    for name, key in config.api_keys:
        # Compare against every key, so timing does not tell which one nearly matched.
        if hmac.compare_digest(presented, key.encode()):
            matched = Caller(name)
    for key in config.admin_keys:
        if hmac.compare_digest(presented, key.encode()):
            matched = Caller(None, admin=True)
    if matched is None or token is None:
        raise Unauthorized(headers=[("WWW-Authenticate", 'Bearer realm="mpesa-wsgi"')])
    return matched


def token_matches(authorization, expected):
    """Does the Authorization header carry exactly `expected` as its bearer token?"""
    presented = bearer_token(authorization)
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def idempotency_for(key, scope, push):
    """The request's Idempotency-Key (None if absent), bound to its owner and content."""
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII"
                         " characters", code="invalid_idempotency_key")
    canonical = json.dumps([push.phone, push.amount, push.reference, push.description])
    return store.Idempotency(scope, key, hashlib.sha256(canonical.encode()).hexdigest())


class CallbackSigner:
    """The path secret that proves a callback URL was made by this gateway."""

    def __init__(self, secret, base_url):
        self._secret, self._base_url = secret, base_url

    def signature(self, tx_id):
        digest = hmac.new(self._secret.encode(), tx_id.encode(), hashlib.sha256).hexdigest()
        return digest[:SIGNATURE_HEX_CHARS]

    def url(self, tx_id):
        return f"{self._base_url}/callback/{tx_id}/{self.signature(tx_id)}"

    def verify(self, tx_id, sig):
        return hmac.compare_digest(sig.encode(), self.signature(tx_id).encode())

    # Paybill/Till URLs are registered once with Safaricom: one per kind (confirmation,
    # validation), signed from GATEWAY_SECRET, so rotating it means registering again. Their
    # key is derived apart, so no callback path's signature is ever one of theirs.
    def c2b_signature(self, kind):
        key = hmac.new(self._secret.encode(), b"mpesa-wsgi c2b urls", hashlib.sha256).digest()
        return hmac.new(key, kind.encode(), hashlib.sha256).hexdigest()[:SIGNATURE_HEX_CHARS]

    def c2b_url(self, kind):
        return f"{self._base_url}/c2b/{kind}/{self.c2b_signature(kind)}"

    def verify_c2b(self, kind, sig):
        return hmac.compare_digest(sig.encode(), self.c2b_signature(kind).encode())


    # Initiator results (a refund's, a code check's, a balance's): one URL per request and
    # kind (result, timeout), from a key derived apart, like the Paybill/Till URLs; no
    # Daraja keyword in them.
    def result_signature(self, kind, request_id):
        key = hmac.new(self._secret.encode(), b"mpesa-wsgi initiator results",
                       hashlib.sha256).digest()
        return hmac.new(key, f"{kind}/{request_id}".encode(),
                        hashlib.sha256).hexdigest()[:SIGNATURE_HEX_CHARS]

    def result_url(self, kind, request_id):
        sig = self.result_signature(kind, request_id)
        return f"{self._base_url}/results/{kind}/{request_id}/{sig}"

    def verify_result(self, kind, request_id, sig):
        expected = self.result_signature(kind, request_id)
        return hmac.compare_digest(sig.encode(), expected.encode())
