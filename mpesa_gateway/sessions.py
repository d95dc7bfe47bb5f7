"""Who is looking at the console: people's keys, their sign-in, and the session cookie.

Owns a person's console key (GATEWAY_CONSOLE_KEYS `person@owner:KEY`, compared in
constant time like API keys; `person@*` reads every owner), the session a sign-in starts
(kept in the ledger, so a sign-out ends it on every host, and a key removed from the
settings ends its sessions), and the cookie that names it: a random id and its HMAC under
a key derived from GATEWAY_SECRET, `HttpOnly`, `SameSite=Strict`, `Path=/console`,
expiring, and `Secure` when the request came over https (directly, or through a trusted
proxy's `X-Forwarded-Proto`).
"""

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from mpesa_gateway import sources

COOKIE = "mpesa_console"
PATH = "/console"
SIGN_IN_PER_S, SIGN_IN_BURST = 0.2, 5  # per client address: a key is not guessed this way


@dataclass(frozen=True)
class Person:
    """A signed-in person: their name, the owner whose payments they read (None: every
    owner's), and their session's id."""

    name: str
    owner: str | None
    session_id: str = ""

    @property
    def label(self):
        return f"{self.name}@{self.owner or '*'}"

    @property
    def admin(self):  # reads like an admin key: every owner
        return self.owner is None

    @property
    def can_act(self):
        """Only a person bound to one owner acts (person@* reads, like an admin key)."""
        return self.owner is not None

    def sees(self, row):
        return self.owner is None or (row.get("owner") or "default") == self.owner


class Sessions:
    """Console sign-ins over the ledger, signed with a key derived from GATEWAY_SECRET."""

    def __init__(self, config, ledger):
        self._keys = config.console_keys  # ((person@owner, key), ...)
        self._lifetime_s = config.console_session_hours * 3600
        self._trusted = config.trusted_proxies
        self._ledger = ledger
        self._mac_key = hmac.new(config.secret.encode(), b"mpesa-wsgi console sessions",
                                 hashlib.sha256).digest()

    @property
    def enabled(self):
        return bool(self._keys)

    def person_of_key(self, presented):
        """The `person@owner` a key belongs to, or None; every key compared in constant
        time."""
        found = None
        for label, key in self._keys:
            if hmac.compare_digest(presented.encode(), key.encode()):
                found = label
        return found

    def sign_in(self, presented):
        """A new session for the key's person: (Person, cookie value), or None."""
        label = self.person_of_key(presented)
        if label is None:
            return None
        session_id = secrets.token_urlsafe(24)
        self._ledger.start_session(session_id, label, self.key_hash(presented),
                                   self._lifetime_s)
        return _person(label, session_id), f"{session_id}.{self._mac(session_id)}"

    def current(self, environ):
        """The Person whose live session the request's cookie names, or None."""
        session_id = self._session_id(environ)
        if session_id is None:
            return None
        row = self._ledger.session(session_id)
        if row is None or not any(label == row["person"] and hmac.compare_digest(
                self.key_hash(key), row["key_hash"]) for label, key in self._keys):
            return None  # ended, expired, or its key is no longer configured
        return _person(row["person"], session_id)

    def sign_out(self, environ):
        session_id = self._session_id(environ)
        if session_id is not None:
            self._ledger.end_session(session_id)

    def _session_id(self, environ):
        """The session id the request's cookie names, if its MAC is ours. Read by hand:
        another site's malformed cookie beside it must not hide it."""
        value = ""
        for part in environ.get("HTTP_COOKIE", "").split(";"):
            name, _, found = part.strip().partition("=")
            if name == COOKIE:
                value = found.strip().strip('"')  # (a client may quote it)
                break
        session_id, _, mac = value.partition(".")
        if not session_id or not hmac.compare_digest(mac.encode(),
                                                     self._mac(session_id).encode()):
            return None
        return session_id

    def csrf_token(self, person):
        """The token every action form of this session carries: an HMAC of its session id,
        so a page of another site (or an old session's) cannot post one."""
        return hmac.new(self._mac_key, b"csrf:" + person.session_id.encode(),
                        hashlib.sha256).hexdigest()[:32]

    def csrf_ok(self, person, token):
        return bool(token) and hmac.compare_digest(token.encode(),
                                                   self.csrf_token(person).encode())

    def key_hash(self, key):
        """Which key a session was started with, as the ledger keeps it: an HMAC under the
        secret-derived key, so the ledger alone never tells a key."""
        return hmac.new(self._mac_key, b"key:" + key.encode(), hashlib.sha256).hexdigest()[:32]

    def _mac(self, session_id):
        return hmac.new(self._mac_key, session_id.encode(), hashlib.sha256).hexdigest()[:32]

    def cookie(self, environ, value):
        """The Set-Cookie header value that keeps `value` (a sign-in's) in the browser."""
        return (f"{COOKIE}={value}; Path={PATH}; Max-Age={int(self._lifetime_s)}; HttpOnly;"
                f" SameSite=Strict{self._secure(environ)}")

    def cleared(self, environ):
        return (f"{COOKIE}=; Path={PATH}; Max-Age=0; HttpOnly; SameSite=Strict"
                f"{self._secure(environ)}")

    def _secure(self, environ):
        return "; Secure" if sources.over_https(environ, self._trusted) else ""


def _person(label, session_id):
    name, _, owner = label.partition("@")
    return Person(name, None if owner == "*" else owner, session_id)
