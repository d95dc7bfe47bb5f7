"""Gateway configuration: read once from the environment, validated, frozen.

This module owns the table of every setting (environment name, Config field,
converter, default or required, secret or not), the frozen `Config` made from that
table (like waitress's `Adjustments`, each name is written once), the one pass that
turns an environment mapping into a `Config`, and the values derived from it (Daraja
base URL, the OAuth Basic header, till vs paybill). Every missing or invalid variable
is reported in one `ConfigError`; secret values are never echoed, in errors or in
`repr`.
"""

import base64
import difflib
import ipaddress
import os
import re
from dataclasses import fields, make_dataclass
from urllib.parse import unquote, urlsplit

VERSION = "0.1.0"

BASE_URLS = {
    "sandbox": "https://sandbox.safaricom.co.ke",
    "production": "https://api.safaricom.co.ke",
}
PAYBILL = "CustomerPayBillOnline"
TILL = "CustomerBuyGoodsOnline"

# Callback source addresses circulating in SDKs; the union, since Safaricom publishes none
# and callbacks were observed from 196.201.212.69 (daraja_api.md §9).
SAFARICOM_CALLBACK_IPS = (
    "196.201.214.200", "196.201.214.206", "196.201.213.114", "196.201.214.207",
    "196.201.214.208", "196.201.213.44", "196.201.212.127", "196.201.212.138",
    "196.201.212.129", "196.201.212.136", "196.201.212.74", "196.201.212.69",
    "196.201.212.128", "196.201.212.132", "196.201.214.212",
)

REQUIRED = object()  # table marker: the variable has no default
MIN_RESERVE_THREADS = 4  # threads never given to pushes
MAX_CPU = 4095
WINDOWS_MAX_CONNECTIONS = 400
MASK = "********"
# Prefixes we own: a variable under them that the table does not name is a typo
# (MPESA_READ_TIMOUT=30 silently ignored is worse than a failed start).
OWN_PREFIXES = ("MPESA_", "GATEWAY_")  # not LOG_: too generic to claim for ourselves
FOREIGN = ("MPESA_SIM_",)  # the simulator's settings share the prefix

_SHORTCODE = re.compile(r"[0-9]{5,7}")
_TEXT = re.compile(r"[A-Za-z0-9 _-]+")


class ConfigError(Exception):
    """Startup configuration is unusable; the message names every variable at fault."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__(
            "invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)
        )


# --- converters: raise ValueError with a sentence that never contains the value
#     of a secret (the caller adds the variable name) ---------------------------


def text(raw):
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _number(raw, convert, what):
    try:
        return convert(raw.strip())
    except ValueError:
        raise ValueError(f"must be {what}") from None


def positive_int(raw):
    value = _number(raw, int, "a whole number")
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def port(raw):
    value = positive_int(raw)
    if value > 65535:
        raise ValueError("must be a port number (1-65535)")
    return value


def positive_float(raw):
    value = _number(raw, float, "a number of seconds")
    if not 0 < value < float("inf"):
        raise ValueError("must be greater than 0")
    return value


def non_negative_float(raw):
    value = _number(raw, float, "a number of seconds")
    if not 0 <= value < float("inf"):
        raise ValueError("must be 0 or more")
    return value


def at_most(convert, limit, floor=None):
    """`convert`, then a ceiling (and a floor): an absurd value (a typo, an extra digit, a
    rate so small its waits overflow) fails at start-up, naming the allowed range,
    instead of sizing something by it."""
    allowed = (f"from {floor:g} to" if floor is not None else
               {positive_int: "from 1 to", positive_float: "more than 0 and at most",
                non_negative_float: "from 0 to"}[convert])

    def bounded(raw):
        value = convert(raw)
        if value > limit or (floor is not None and value < floor):
            raise ValueError(f"must be {allowed} {limit:,}".replace(",", "_"))
        return value

    return bounded


def one_of(*choices):
    def convert(raw):
        value = raw.strip()
        if value not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return value

    return convert


def shortcode(raw):
    value = raw.strip()
    if not _SHORTCODE.fullmatch(value):
        raise ValueError("must be a 5 to 7 digit shortcode")
    return value


def http_url(raw):
    """An absolute http(s) URL without trailing slash, spaces or an upper-case host."""
    value = raw.strip().rstrip("/")
    if any(c.isspace() for c in value):
        raise ValueError("must not contain spaces")  # Daraja: Invalid CallBackURL
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if parts.netloc != parts.netloc.lower():
        raise ValueError("must have a lower-case host")  # Daraja rejected upper-case hosts
    return value


_OWNER = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
DEFAULT_OWNER = "default"


def named_values(raw, split, bad_name):
    """`name:value,…` → ((name, value), ...): empty items skipped, each item cut in two by
    `split(item)` (each list has its own rule for a bare value, named `default`), each name
    1 to 32 characters of a-z 0-9 _ - (else ValueError(`bad_name`)). The values are the
    caller's to check."""
    pairs = []
    for item in (i.strip() for i in raw.split(",")):
        if item:
            name, value = split(item)
            if not _OWNER.fullmatch(name):
                raise ValueError(bad_name)
            pairs.append((name, value))
    return tuple(pairs)


def _key_item(item):
    """`name:KEY` (a key may hold colons after the first), or a bare KEY."""
    name, sep, key = item.partition(":")
    return (name.strip(), key.strip()) if sep else (DEFAULT_OWNER, item)


def named_keys(raw):
    """`name:KEY,name:KEY` (a bare KEY is named `default`) → ((name, key), ...).

    The name owns the payments made with the key; two keys with one name share them
    (key rotation)."""
    pairs = named_values(raw, _key_item,
                         "names must be 1 to 32 characters of a-z 0-9 _ - (name:KEY)")
    if not pairs:
        raise ValueError("must list at least one key (comma-separated, name:KEY or KEY)")
    if any(len(key) < 16 for _, key in pairs):
        raise ValueError("each key must be at least 16 characters")
    if len({key for _, key in pairs}) != len(pairs):
        raise ValueError("must not list the same key twice")
    return pairs


_PERSON = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


def console_keys(raw):
    """`person@owner:KEY,…` → (("person@owner", key), ...): a person's own key to the
    console, reading one owner's payments (`person@*`: every owner's, like an admin key)."""
    pairs = []
    for item in (i.strip() for i in raw.split(",") if i.strip()):
        who, sep, key = item.partition(":")
        person, at, owner = who.strip().partition("@")
        if not sep or not at or not _PERSON.fullmatch(person) or not (
                owner == "*" or _OWNER.fullmatch(owner)):
            raise ValueError("items must be person@owner:KEY (person: 1 to 32 letters, digits,"
                             " . _ -; owner: a key name of GATEWAY_API_KEYS, or *)")
        pairs.append((f"{person}@{owner}", key.strip()))
    if any(len(key) < 16 for _, key in pairs):
        raise ValueError("each key must be at least 16 characters")
    if len({key for _, key in pairs}) != len(pairs):
        raise ValueError("must not list the same key twice")
    if len({who for who, _ in pairs}) != len(pairs):
        raise ValueError("must not name the same person@owner twice")
    return tuple(pairs)


def _display_item(item):
    name, sep, shown = item.partition(":")
    if not sep:
        raise ValueError("items must be name:Display Name")
    shown = shown.strip()
    if not 0 < len(shown) <= 40 or not shown.isprintable():
        raise ValueError("each display name must be 1 to 40 printable characters")
    return name.strip(), shown


def owner_names(raw):
    """`name:Display Name,…`: what a customer's pay page calls each owner."""
    return named_values(raw, _display_item,
                        "names must be 1 to 32 characters of a-z 0-9 _ - (name:Display Name)")


def endpoint_url(raw):
    """A merchant's absolute http(s) URL, kept exactly as written (path, trailing slash and
    query: frameworks redirect when they differ, and redirects are never followed)."""
    value = raw.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment \
            or any(c.isspace() for c in value):
        raise ValueError("must be absolute http:// or https:// URLs")
    try:
        parts.port  # noqa: B018 - raises for a port out of range
        parts.hostname.encode("idna")  # raises for a label too long or empty
    except (ValueError, UnicodeError):
        raise ValueError("must be URLs with a valid host name and port") from None
    return value


_QUERY_PASSWORD = re.compile(r"(^|&)((?:ssl)?password)=([^&]*)", re.I)


def masked_url(url):
    """A URL with its passwords (in the user part, or as ?password= / ?sslpassword=) masked,
    for messages and --check-config."""
    password = urlsplit(url).password
    if password:
        url = url.replace(f":{password}@", f":{MASK}@", 1)  # the first: the user part's
    head, mark, query = url.partition("?")  # the string itself: urlunsplit drops a "//"
    return head + mark + _QUERY_PASSWORD.sub(rf"\1\2={MASK}", query)


def url_passwords(url):
    """Every password a ledger URL holds, as written and as libpq decodes it: for the log
    filter, and to scrub a driver's message that quotes part of the URL."""
    found = [urlsplit(url).password] + [m[2] for m in _QUERY_PASSWORD.findall(
        urlsplit(url).query)]
    return [v for p in found if p for v in {p, unquote(p)}]


# RFC 3986: what a user name, password, database name or query value may hold unencoded.
_USERINFO = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*")
_DATABASE = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:-]|%[0-9A-Fa-f]{2})+")
_QUERY_ITEM = re.compile(r"[A-Za-z_]+=(?:[A-Za-z0-9._~!$'()*+,;:@/?-]|%[0-9A-Fa-f]{2})*")
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._%-]*)(?::[0-9]{1,5})?")


def postgres_url(raw):
    """A `postgresql://` URL that reads one way only. A password holding an unencoded `@`,
    `/`, `:`, `?`, `#`, `[` or space splits differently for urllib and libpq, and would be
    half shown where it is masked; a query value with a bad `%` escape is quoted whole in
    the driver's error. The message never holds the value."""
    rest = raw.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    authority, _, database = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    user, _, password = userinfo.partition(":")
    if "#" in raw or any(c.isspace() for c in raw) \
            or (at and not (user and _USERINFO.fullmatch(user)
                            and _USERINFO.fullmatch(password))) \
            or not _DATABASE.fullmatch(database) \
            or not all(_HOST.fullmatch(h) for h in hosts.split(",")) \
            or not all(_QUERY_ITEM.fullmatch(item) for item in query.split("&") if query) \
            or not (hosts.strip(",") or re.search(r"(^|&)host=", query)):
        raise ValueError(
            "must be postgresql://user:password@host:port/database (host:port,… for several"
            " hosts; ?host=/run/postgresql for a socket), with any @ / : ? # [ ] % or space"
            " in the user name, the password or a query value percent-encoded (@ as %40,"
            " / as %2F, : as %3A)")
    return raw


def ledger_target(raw):
    """A SQLite path (`sqlite:///path` too) or a `postgresql://` URL naming a database."""
    raw = raw.strip()
    if raw.startswith("sqlite:///"):
        raw = raw[len("sqlite:///"):]
    elif raw.startswith(("postgresql://", "postgres://")):
        return postgres_url(raw)
    elif "://" in raw:
        raise ValueError("must be a file path, sqlite:///path or postgresql://…")
    elif "@" in raw or "=" in raw:  # user:pw@host/db, or libpq's "host=… password=…"
        raise ValueError("looks like a PostgreSQL connection string, not a SQLite file path:"
                         " write it as postgresql://user:password@host:port/database (a"
                         " SQLite path holds no @ or =)")
    if not raw:
        raise ValueError("must name a file")
    return raw


def _url_item(item):
    """`name:https://…`, or a bare URL (its own scheme's colon is no name's)."""
    if item.startswith(("http://", "https://")):
        return DEFAULT_OWNER, item
    name, _, url = item.partition(":") if ":" in item else ("", "", item)
    return name.strip(), url


def owner_urls(raw):
    """`name:https://…,…` (a bare URL is named `default`) → ((name, url), ...)."""
    pairs = tuple((name, endpoint_url(url)) for name, url in named_values(
        raw, _url_item, "must be name:URL pairs (names a-z 0-9 _ -)"))
    if len({n for n, _ in pairs}) != len(pairs):
        raise ValueError("must name each owner once")
    return pairs


def _prefix_item(item):
    """`name:PREFIX`: the owner of unmatched Paybill receipts whose account starts so."""
    name, _, prefix = item.partition(":")
    return name.strip(), prefix.strip()


def account_prefixes(raw):
    """`name:PREFIX,…` → ((name, prefix), ...): each prefix 1 to 20 characters."""
    pairs = named_values(raw, _prefix_item, "must be name:PREFIX pairs (names a-z 0-9 _ -)")
    if any(not 0 < len(prefix) <= 20 for _, prefix in pairs):
        raise ValueError("each PREFIX must be 1 to 20 characters (an account number's start)")
    return pairs


def _secret_item(item):
    """`name:whsec_…` (cut at the last colon), or a bare secret; an empty name is default."""
    name, _, secret = item.rpartition(":") if ":" in item else ("", "", item)
    return name or DEFAULT_OWNER, secret


def webhook_secrets(raw):
    """`name:whsec_<base64>,…` (Standard Webhooks secrets) → ((name, secret), ...)."""
    pairs = named_values(raw, _secret_item, "must be name:whsec_<base64> pairs")
    for _, secret in pairs:
        if not secret.startswith("whsec_"):
            raise ValueError("must be name:whsec_<base64> pairs")
        try:
            key = base64.b64decode(secret[len("whsec_"):], validate=True)
        except ValueError:
            raise ValueError("each secret must be whsec_ and base64") from None
        if len(key) < 24:
            raise ValueError("each secret must hold at least 24 random bytes")
    return pairs


def key_list(raw):
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    if not keys:
        raise ValueError("must list at least one key (comma-separated)")
    if any(len(k) < 16 for k in keys):
        raise ValueError("each key must be at least 16 characters")
    return keys


def secret_key(raw):
    value = raw.strip()
    if len(value) < 16:
        raise ValueError("must be at least 16 characters")
    return value


def on_off(raw):
    value = raw.strip().lower()
    if value not in ("on", "off"):
        raise ValueError("must be on or off")
    return value == "on"


def address_list(raw):
    """Comma-separated IP addresses or CIDR networks."""
    networks = []
    for item in (i.strip() for i in raw.split(",")):
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError("must be comma-separated IP addresses or networks") from None
    return tuple(networks)


def cpu_choice(raw):
    value = raw.strip().lower()
    if value == "auto":
        return value
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_CPU:
        raise ValueError(f"must be a CPU number (0 to {MAX_CPU}) or auto")
    return int(value)


def short_text(limit):
    def convert(raw):
        value = raw.strip()
        if not _TEXT.fullmatch(value) or len(value) > limit:
            raise ValueError(f"must be 1 to {limit} characters of A-Z a-z 0-9 space _ -")
        return value

    return convert


# --- the table ----------------------------------------------------------------
# (environment variable, Config field, converter, default or REQUIRED, secret?)
SETTINGS = (
    # Daraja credentials and shortcode (Daraja portal, "My apps" / Go-Live mail).
    ("MPESA_CONSUMER_KEY", "consumer_key", text, REQUIRED, True),
    ("MPESA_CONSUMER_SECRET", "consumer_secret", text, REQUIRED, True),
    ("MPESA_SHORTCODE", "shortcode", shortcode, REQUIRED, False),
    ("MPESA_PASSKEY", "passkey", text, REQUIRED, True),
    # Public URL Safaricom posts callbacks to; /callback/<tx>/<sig> is appended.
    ("MPESA_CALLBACK_BASE_URL", "callback_base_url", http_url, REQUIRED, False),
    # sandbox | production: picks the Daraja base URL.
    ("MPESA_ENVIRONMENT", "environment", one_of("sandbox", "production"), "sandbox", False),
    # Overrides the base URL (the simulator, tests). None: from MPESA_ENVIRONMENT.
    ("MPESA_BASE_URL", "base_url", http_url, None, False),
    # Paybill by default; a till sets CustomerBuyGoodsOnline and MPESA_PARTY_B.
    ("MPESA_TRANSACTION_TYPE", "transaction_type", one_of(PAYBILL, TILL), PAYBILL, False),
    # Paybill: the shortcode (the default). Till: the till number.
    ("MPESA_PARTY_B", "party_b", shortcode, None, False),
    # The shortcode whose Paybill/Till payments (C2B) come here: its URLs are registered
    # for it. None: MPESA_SHORTCODE (the sandbox's 174379 cannot register: use 600984).
    ("MPESA_C2B_SHORTCODE", "c2b_shortcode", shortcode, None, False),
    # What M-Pesa does when the validation URL does not answer in time: Completed
    # (the payment goes through) or Cancelled. Sent when the URLs are registered.
    ("MPESA_C2B_RESPONSE_TYPE", "c2b_response_type", one_of("Completed", "Cancelled"),
     "Completed", False),
    # The name a payer sees when they scan a payment's QR code (POST /qr).
    ("MPESA_QR_MERCHANT_NAME", "qr_merchant_name", short_text(40), "Merchant", False),
    # What the validation URL answers (only asked when Safaricom turned External Validation
    # on for the shortcode): off accepts every payment; reference accepts a Paybill payment
    # only when its account number is one recent payment's reference, at its amount.
    ("GATEWAY_C2B_VALIDATION", "c2b_validation", one_of("off", "reference"), "off", False),
    # Who owns a Paybill receipt no payment's reference matches: name:PREFIX,… by the start
    # of its account number (INV… to shop). None: the owner named default.
    ("GATEWAY_C2B_ACCOUNT_PREFIXES", "c2b_account_prefixes", account_prefixes, (), False),
    # Daraja's initiator APIs (refunds by Reversal, Transaction Status, Account Balance):
    # the API operator's name (portal: Organisation → Operators). None: those features off.
    ("MPESA_INITIATOR_NAME", "initiator_name", text, None, False),
    # The SecurityCredential as the Daraja portal generates it (base64), or leave it
    # empty and give the password and Safaricom's certificate to have it made at start-up.
    ("MPESA_SECURITY_CREDENTIAL", "security_credential", text, None, True),
    ("MPESA_INITIATOR_PASSWORD", "initiator_password", text, None, True),
    # Safaricom's public-key certificate of the environment (PEM or DER .cer), for the
    # password above; needs the optional `cryptography` package (the `initiator` extra).
    ("MPESA_CERT_FILE", "cert_file", text, None, False),
    # Seconds to open a connection to Daraja; nothing is sent before it succeeds.
    ("MPESA_CONNECT_TIMEOUT", "connect_timeout", at_most(positive_float, 60), 5.0, False),
    # Seconds to wait for Daraja's answer; past it a push becomes "unknown".
    ("MPESA_READ_TIMEOUT", "read_timeout", at_most(positive_float, 120), 15.0, False),
    # Refresh the OAuth token this many seconds before it expires (55 min of 3599 s).
    ("MPESA_TOKEN_MARGIN_S", "token_margin_s", at_most(non_negative_float, 3000), 300.0, False),
    # Largest amount accepted, whole KES (Daraja's per-transaction limit).
    ("MPESA_MAX_AMOUNT", "max_amount", at_most(positive_int, 1_000_000), 250_000, False),
    # AccountReference / TransactionDesc when the merchant sends none (customer-visible).
    ("MPESA_DEFAULT_REFERENCE", "default_reference", short_text(12), "Payment", False),
    ("MPESA_DEFAULT_DESCRIPTION", "default_description", short_text(13), "Payment", False),
    # Where waitress listens; behind nginx keep it on loopback.
    ("GATEWAY_HOST", "host", text, "127.0.0.1", False),
    ("GATEWAY_PORT", "port", port, 8000, False),
    # Worker threads; also the size of the Daraja connection pool. Each push holds one for
    # Daraja's whole answer (~1 s): threads ≈ peak pushes/s × latency + reserve.
    ("GATEWAY_THREADS", "threads", at_most(positive_int, 1024), 32, False),
    # Pushes at Daraja at once; the rest of the threads stay free for callbacks, reads and
    # health. None: GATEWAY_THREADS minus a reserve (a quarter, at least 4).
    ("GATEWAY_PUSH_SLOTS", "push_slots", at_most(positive_int, 1024), None, False),
    # Open client connections waitress keeps (each is a file descriptor; on Windows
    # waitress's select() handles at most 512 sockets in all).
    ("GATEWAY_CONNECTION_LIMIT", "connection_limit", at_most(positive_int, 100_000), 250, False),
    # Seconds a request (line, headers and body) may take to arrive, from its first byte,
    # when waitress serves directly: a client trickling it is cut off (nginx:
    # client_header_timeout and client_body_timeout).
    ("GATEWAY_REQUEST_READ_TIMEOUT", "request_read_timeout", at_most(positive_float, 300), 20.0,
     False),
    # Seconds an idle or half-sent connection is kept before waitress closes it.
    ("GATEWAY_CHANNEL_TIMEOUT", "channel_timeout", at_most(positive_int, 3600), 30, False),
    # The ledger: a SQLite file on local disk (a path or sqlite:///path), or
    # postgresql://user:password@host:5432/db for several processes on several hosts.
    ("GATEWAY_DB", "db_path", ledger_target, "mpesa_gateway.db", False),
    # Seconds a ledger call waits before it fails: SQLite, for another process's lock on
    # the file; PostgreSQL, for a pooled connection (the server is down or every one busy).
    ("GATEWAY_DB_WAIT_S", "db_wait_s", at_most(positive_float, 300), 5.0, False),
    # Where this process's spool lives: what Daraja already did, kept while the ledger
    # cannot take it. None: a `spool` folder beside a SQLite ledger; ./spool for PostgreSQL.
    ("GATEWAY_SPOOL_DIR", "spool_dir", text, None, False),
    # Bearer keys of the merchant systems: name:KEY,… (a bare KEY is named default).
    ("GATEWAY_API_KEYS", "api_keys", named_keys, REQUIRED, True),
    # Operator keys that read every owner's payments (never start one). None: no admins.
    ("GATEWAY_ADMIN_KEYS", "admin_keys", key_list, (), True),
    # People's keys to the read-only console at /console: person@owner:KEY,… (person@*
    # reads every owner). None: the console is off. Never a merchant's API key.
    ("GATEWAY_CONSOLE_KEYS", "console_keys", console_keys, (), True),
    # What a customer's pay page (/pay/<link>) calls each owner: name:Mama Mboga Shop,…
    # None: MPESA_QR_MERCHANT_NAME.
    ("GATEWAY_OWNER_NAMES", "owner_names", owner_names, (), False),
    # Hours a console sign-in lasts.
    ("GATEWAY_CONSOLE_SESSION_HOURS", "console_session_hours", at_most(positive_float, 720),
     12.0, False),
    # Where each owner's payment events are POSTed (Standard Webhooks): name:URL,…
    ("GATEWAY_WEBHOOK_URLS", "webhook_urls", owner_urls, (), True),  # may carry a token
    # The signing secret of each owner's endpoint: name:whsec_<base64>,…
    ("GATEWAY_WEBHOOK_SECRETS", "webhook_secrets", webhook_secrets, (), True),
    # Deliver to loopback, private and link-local addresses too (tests, demo, on-premises).
    ("GATEWAY_WEBHOOK_ALLOW_PRIVATE", "webhook_allow_private", on_off, False, False),
    # Run the webhook sender thread in the serving process (off: `deliver` from cron).
    ("GATEWAY_WEBHOOK_SENDER", "webhook_sender", on_off, True, False),
    # Key of the HMAC that signs each transaction's callback URL.
    ("GATEWAY_SECRET", "secret", secret_key, REQUIRED, True),
    # Largest request body in bytes; larger bodies get 413.
    ("GATEWAY_MAX_BODY", "max_body", at_most(positive_int, 10 * 1024 * 1024), 16_384, False),
    # A second push to a phone with a pending payment younger than this → 409.
    ("GATEWAY_PHONE_LOCK_S", "phone_lock_s", at_most(non_negative_float, 3600), 60.0, False),
    # Token bucket per API key on POST /stkpush: requests per second, and burst size.
    ("GATEWAY_RATE", "rate", at_most(positive_float, 1_000_000, floor=0.001), 5.0, False),
    ("GATEWAY_BURST", "burst", at_most(positive_int, 1_000_000), 20, False),
    # Run the reconciler thread inside the serving process (off: use `reconcile` from cron).
    ("GATEWAY_RECONCILE", "reconcile", on_off, True, False),
    # Query pending payments older than this (Safaricom does not retry callbacks).
    ("MPESA_RECONCILE_AFTER_S", "reconcile_after_s", at_most(non_negative_float, 86_400), 60.0,
     False),
    # Give up after this long from creation: the payment becomes unknown/no_final_result.
    ("MPESA_RECONCILE_DEADLINE_S", "reconcile_deadline_s", at_most(positive_float, 259_200),
     900.0, False),
    # First wait between queries of one payment; doubles each time, at most 300 s.
    ("MPESA_RECONCILE_BACKOFF_S", "reconcile_backoff_s", at_most(positive_float, 3600), 10.0,
     False),
    # STK queries per second at most, per reconciling process (Daraja publishes no limit).
    ("MPESA_RECONCILE_QPS", "reconcile_qps", at_most(positive_float, 100, floor=0.001), 2.0, False),
    # off | log | enforce: what to do with callbacks from outside MPESA_CALLBACK_IPS.
    ("MPESA_CALLBACK_IP_POLICY", "callback_ip_policy", one_of("off", "log", "enforce"), "log",
     False),
    # Safaricom's callback addresses (daraja_api.md §9); None: the built-in list.
    ("MPESA_CALLBACK_IPS", "callback_ips", address_list, None, False),
    # Proxies (nginx) whose X-Forwarded-For is believed; the last hop is the client.
    ("GATEWAY_TRUSTED_PROXY", "trusted_proxies", address_list, (), False),
    # Pin the serving process to one CPU (Linux; ignored elsewhere): a number, or auto.
    ("GATEWAY_CPU_AFFINITY", "cpu_affinity", cpu_choice, None, False),
    # Bearer token GET /metrics requires; None: /metrics is open (keep it off the internet).
    ("GATEWAY_METRICS_TOKEN", "metrics_token", secret_key, None, True),
    # DEBUG | INFO | WARNING | ERROR
    ("LOG_LEVEL", "log_level", one_of("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", False),
    # text: key=value lines; json: one JSON object per line.
    ("LOG_FORMAT", "log_format", one_of("text", "json"), "text", False),
)
SECRET_FIELDS = frozenset(f for _, f, _, _, secret in SETTINGS if secret) | {"oauth_header"}


# Values _derive computes from the settings: (Config field, what it holds).
DERIVED = (("oauth_header", '"Basic base64(key:secret)" for Daraja\'s OAuth call'),)


def _as_written(value):
    """A setting's value in the form its variable takes: on/off, empty for none."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "" if value is None or value == () else str(value)


class _ConfigViews:
    """What a Config shows of itself: masked, its secrets for the log filter, its repr."""

    def masked(self):
        """The settings as a dict, secrets replaced by a mask (safe to print or log)."""
        view = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("api_keys", "console_keys") and value:
                value = ",".join(f"{name}:{MASK}" for name, _ in value)  # names are not secret
            elif f.name in SECRET_FIELDS:
                value = MASK if value else value
            elif f.name == "db_path":
                value = masked_url(value)
            elif isinstance(value, tuple):  # address lists
                value = ",".join(str(v) for v in value)
            view[f.name] = value
        return view

    def secret_values(self):
        """Every secret string, for the log redaction filter."""
        values = []
        for name in sorted(SECRET_FIELDS):
            value = getattr(self, name)
            for item in value if isinstance(value, tuple) else [value]:
                values.append(item[1] if isinstance(item, tuple) else item)  # (name, key)
        values += url_passwords(self.db_path)  # a PostgreSQL password
        return tuple(v for v in values if v)

    def by_variable(self):
        """The settings by the environment variables that set them, secrets masked (what
        --check-config prints)."""
        view = self.masked()
        return {name: _as_written(view[field]) for name, field, *_ in SETTINGS}

    def __repr__(self):
        inner = ", ".join(f"{k}={v!r}" for k, v in self.masked().items())
        return f"Config({inner})"

    __str__ = __repr__


Config = make_dataclass(
    "Config", [field for _, field, *_ in SETTINGS] + [field for field, _ in DERIVED],
    bases=(_ConfigViews,), frozen=True, repr=False)  # repr: _ConfigViews's, secrets masked
Config.__module__ = __name__
Config.__doc__ = "The gateway's settings: one field per row of SETTINGS, plus DERIVED."


# Names people carry over from other tools, and what this gateway calls them.
ALIASES = {"DATABASE_URL": "GATEWAY_DB", "MPESA_ENV": "MPESA_ENVIRONMENT",
           "GATEWAY_DATABASE": "GATEWAY_DB", "MPESA_CALLBACK_URL": "MPESA_CALLBACK_BASE_URL"}


def _did_you_mean(name, cutoff=0.8):
    """' (did you mean MPESA_READ_TIMEOUT?)' for a near miss of a setting's name (any
    case, or a known alias), or ''."""
    if name.upper() in ALIASES:
        return f" (did you mean {ALIASES[name.upper()]}?)"
    near = difflib.get_close_matches(name.upper(), [n for n, *_ in SETTINGS], n=1,
                                     cutoff=cutoff)
    return f" (did you mean {near[0]}?)" if near else ""


def near_misses(environ):
    """Variables outside our prefixes that look like a misspelt setting (GATWAY_SECRET,
    gateway_port, DATABASE_URL): hints, not errors, since the environment is shared with
    everything else."""
    known = {name for name, *_ in SETTINGS}
    return [f"{name} is not a setting{hint}" for name in sorted(environ)
            if name not in known and not name.startswith(OWN_PREFIXES)
            and (hint := _did_you_mean(name))]


def load_config(environ, only=None):
    """Build the Config from an environment mapping, or raise one ConfigError.

    `only`: the variables a command needs (`migrate` needs only the ledger's); the
    others are left at their defaults, required or not, and are not checked."""
    problems, values = [], {}
    known = {name for name, *_ in SETTINGS}
    for name in sorted(environ):
        if name.startswith(OWN_PREFIXES) and not name.startswith(FOREIGN) and name not in known:
            problems.append(f"{name} is not a known setting{_did_you_mean(name)}")
    for name, field, convert, default, _secret in SETTINGS:
        if only is not None and name not in only:
            values[field] = None if default is REQUIRED else default
            continue
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            if default is REQUIRED:
                problems.append(f"{name} is required")
            values[field] = default
            continue
        try:
            values[field] = convert(raw)
        except ValueError as exc:
            # The message names the variable and the rule, never the value.
            problems.append(f"{name} {exc}")
    if not problems and only is None:
        problems.extend(_derive(values))
    if problems:
        raise ConfigError(problems)
    if only is not None:
        values.update(dict.fromkeys((field for field, _ in DERIVED), None))
    return Config(**values)


def _derive(values):
    """Fill derived values in place; return cross-field problems."""
    problems = []
    if values["base_url"] is None:
        values["base_url"] = BASE_URLS[values["environment"]]
    if values["spool_dir"] is None:
        values["spool_dir"] = (os.path.abspath("spool") if values["db_path"].startswith(
            ("postgresql://", "postgres://")) else os.path.join(
            os.path.dirname(os.path.abspath(values["db_path"])), "spool"))
    if values["callback_ips"] is None:
        values["callback_ips"] = address_list(",".join(SAFARICOM_CALLBACK_IPS))
    reserve = max(MIN_RESERVE_THREADS, values["threads"] // 4)
    if values["threads"] <= MIN_RESERVE_THREADS:
        problems.append(f"GATEWAY_THREADS must be more than {MIN_RESERVE_THREADS}: that many"
                        " are kept for callbacks, reads and health")
    elif values["push_slots"] is None:
        values["push_slots"] = values["threads"] - reserve
    elif values["push_slots"] > values["threads"] - MIN_RESERVE_THREADS:
        problems.append(f"GATEWAY_PUSH_SLOTS must leave at least {MIN_RESERVE_THREADS} of"
                        " GATEWAY_THREADS for callbacks, reads and health")
    if os.name == "nt" and values["connection_limit"] > WINDOWS_MAX_CONNECTIONS:
        problems.append(f"GATEWAY_CONNECTION_LIMIT must be at most {WINDOWS_MAX_CONNECTIONS}"
                        " on Windows (waitress's select() handles 512 sockets in all)")
    secret_names = {n for n, _ in values["webhook_secrets"] or ()}
    for name, _ in values["webhook_urls"] or ():
        if name not in secret_names:
            problems.append(f"GATEWAY_WEBHOOK_SECRETS has no secret for {name}")
    key_names = {name for name, _ in values["api_keys"] or ()}
    for name, _ in values["c2b_account_prefixes"] or ():
        if name not in key_names:
            problems.append(f"GATEWAY_C2B_ACCOUNT_PREFIXES names {name}, which no key of"
                            " GATEWAY_API_KEYS has (its receipts could not be read)")
    admin = set(values["admin_keys"] or ())
    if admin & {key for _, key in values["api_keys"] or ()}:
        problems.append("GATEWAY_ADMIN_KEYS must not repeat a key of GATEWAY_API_KEYS")
    machine_keys = admin | {key for _, key in values["api_keys"] or ()}
    if machine_keys & {key for _, key in values["console_keys"] or ()}:
        problems.append("GATEWAY_CONSOLE_KEYS must not repeat an API or admin key: a"
                        " person's key is their own, and an API key never goes into a browser")
    for who, _ in values["console_keys"] or ():
        owner = who.split("@", 1)[1]
        if owner != "*" and owner not in key_names:
            problems.append(f"GATEWAY_CONSOLE_KEYS names {who}, but no key of GATEWAY_API_KEYS"
                            f" is named {owner}")
    if values["c2b_shortcode"] is None:
        values["c2b_shortcode"] = values["shortcode"]
    if values["party_b"] is None:
        if values["transaction_type"] == TILL:
            problems.append("MPESA_PARTY_B is required for a till (CustomerBuyGoodsOnline)")
        values["party_b"] = values["shortcode"]
    if values["environment"] == "production":
        if not values["callback_base_url"].startswith("https://"):
            problems.append("MPESA_CALLBACK_BASE_URL must be https:// in production")
        if not values["base_url"].startswith("https://"):
            problems.append("MPESA_BASE_URL must be https:// in production")
    problems.extend(_initiator_problems(values))
    credentials = f"{values['consumer_key']}:{values['consumer_secret']}".encode()
    values["oauth_header"] = "Basic " + base64.b64encode(credentials).decode("ascii")
    return problems


def _initiator_problems(values):
    """The initiator settings go together: a name and one credential (as the portal made
    it, or a password and the certificate to make it with), or none of them."""
    name, credential = values["initiator_name"], values["security_credential"]
    password, cert = values["initiator_password"], values["cert_file"]
    if not (name or credential or password or cert):
        return []
    problems = []
    if not name:
        problems.append("MPESA_INITIATOR_NAME is required with MPESA_SECURITY_CREDENTIAL,"
                        " MPESA_INITIATOR_PASSWORD or MPESA_CERT_FILE")
    if credential and (password or cert):
        problems.append("MPESA_SECURITY_CREDENTIAL and MPESA_INITIATOR_PASSWORD/MPESA_CERT_FILE"
                        " are two ways to give one credential: set one of them")
    elif not credential and not (password and cert):
        problems.append("the initiator needs MPESA_SECURITY_CREDENTIAL, or both"
                        " MPESA_INITIATOR_PASSWORD and MPESA_CERT_FILE")
    elif cert and not os.path.isfile(cert):
        problems.append("MPESA_CERT_FILE is not a readable file")
    return problems
