"""Merchant webhooks: signed payment events from the ledger's outbox (Standard Webhooks).

Owns what an event is (`Outbox.event_for`: the type and body written in the same
ledger commit as the status change it reports), how it is signed (`sign`: the
Standard Webhooks `v1` HMAC-SHA256 over "id.timestamp.body", stdlib `hmac`), where
it may go (`address_allowed`: never loopback, private, link-local or metadata
addresses unless GATEWAY_WEBHOOK_ALLOW_PRIVATE), and the background sender that
delivers them at least once: a few attempts at once (WORKERS), at most one per owner
so one merchant's slow endpoint never delays another's events, each event under a
lease, `2xx` = delivered,
10 s of wall time per attempt, no redirects, backoff with jitter (5 s, 30 s, 2 min,
10 min, 1 h, then every 6 h) for 3 days, then `dead`. It opens its own connection per
attempt: a slow or dead merchant endpoint never holds a Daraja connection, a payment
or a callback; and
an owner whose endpoint just failed rests (5 s, doubling with each failure in a row up
to 5 min), so one dead endpoint costs the other merchants one attempt per rest, not one
per event.
"""

import base64
import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import logging
import random
import socket
import ssl
import threading
import time
from urllib.parse import unquote, urlsplit

import mpesa_ledger as store
from mpesa_gateway import monitoring, resources, wire

log = logging.getLogger(__name__)

EVENT_TYPES = {store.SUCCEEDED: "payment.succeeded", store.FAILED: "payment.failed",
               store.UNKNOWN: "payment.unknown"}
RECEIPT_RECEIVED = "receipt.received"  # a Paybill/Till payment, matched to a payment or not
# A refund's end (by payment id, or by receipt for a Paybill/Till one), a code check's answer
REFUND_EVENTS = {store.SUCCEEDED: "payment.refunded", store.FAILED: "payment.refund_failed"}
RECEIPT_VERIFIED = "receipt.verified"
SCHEDULE_S = (5, 30, 120, 600, 3600)  # then every EVERY_S
EVERY_S = 6 * 3600
GIVE_UP_AFTER_S = 3 * 24 * 3600
TIMEOUT_S = 10.0
JITTER = 0.1  # ± this share of each wait, so retries of many events do not march together
MAX_ANSWER_BYTES = 1024  # a merchant's answer is read this far, then dropped
LEASE_S = 30.0  # one attempt (10 s of HTTP, the address lookup), with a wide margin
REST_S = SCHEDULE_S[0]  # an owner whose endpoint just failed waits this long, doubling
MAX_REST_S = 300.0  # with each failure in a row up to this; a delivery ends the rest
KEEP_S = 30 * 24 * 3600  # delivered and dead events are forgotten after 30 days
WORKERS = 4  # attempts in flight at once, at most one per owner
POLL_S = 0.5  # an idle worker looks again this often while another is still sending
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NEVER = tuple(ipaddress.ip_network(n) for n in ("192.0.0.0/24", "100.64.0.0/10"))


def sign(secret, msg_id, timestamp, body):
    """The `webhook-signature` value for one delivery: `v1,<base64 HMAC-SHA256>`."""
    key = base64.b64decode(secret[len("whsec_"):])
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret, headers, body, now, tolerance_s=300):
    """A receiver's check (the demo's; merchants use a Standard Webhooks library): the
    event's id, or ValueError. Constant-time; the timestamp must be within tolerance."""
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not stamp.isdigit() or abs(now - int(stamp)) > tolerance_s:
        raise ValueError("timestamp missing or too far from now")
    expected = sign(secret, msg_id, stamp, body)
    offered = headers.get("webhook-signature", "").split()
    if not any(hmac.compare_digest(expected, s) for s in offered):
        raise ValueError("signature does not match")
    return msg_id


def address_allowed(address, allow_private=False):
    """May an event be sent to this resolved address? Loopback, private, link-local (the
    cloud metadata service lives there), shared, multicast, reserved and site-local ones,
    and IPv6 forms that wrap any of them (mapped, compatible, 6to4, Teredo, NAT64), only
    when allowed."""
    if allow_private:
        return True
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates = [ip]
    if ip.version == 6:
        wrapped = [ip.ipv4_mapped, ip.sixtofour, ip.teredo and ip.teredo[1]]
        if ip in _NAT64 or int(ip) >> 32 == 0:  # NAT64, or the old IPv4-compatible form
            wrapped.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        candidates += [w for w in wrapped if w]
    return all(c.is_global and not (c.is_multicast or c.is_reserved or c.is_unspecified
                                    or getattr(c, "is_site_local", False)
                                    or any(c in n for n in _NEVER if c.version == n.version))
               for c in candidates)


def next_attempt_in(attempts, rng=random.random):
    """Seconds until the next try after `attempts` failed ones, with jitter."""
    base = SCHEDULE_S[attempts - 1] if attempts <= len(SCHEDULE_S) else EVERY_S
    return base * (1 + JITTER * (2 * rng() - 1))


class Outbox:
    """Builds the event a status change produces, for the owners that have an endpoint."""

    def __init__(self, config):
        self._owners = {name for name, _ in config.webhook_urls}

    def event_for(self, before, after, outcome):
        """An mpesa_ledger.NewEvent for a payment's new status, or None (no endpoint, or a status
        merchants are not told about)."""
        owner = after.get("owner") or "default"
        event_type = EVENT_TYPES.get(after["status"])
        if owner not in self._owners or event_type is None:
            return None
        previous = before["status"] if outcome == "override" else None
        body = resources.event_body(event_type, after, after["updated_at"], previous)
        data = wire.dumps(body)
        return store.NewEvent(tx_id=after["id"], owner=owner, type=event_type, body=data)


    def receipt_event(self, receipt):
        """The `receipt.received` NewEvent of a Paybill/Till receipt (ordered by its own
        number), or None when its owner has no endpoint."""
        if receipt["owner"] not in self._owners:
            return None
        body = {"type": RECEIPT_RECEIVED, "timestamp": receipt["received_at"],
                "data": resources.receipt_resource(dict(
                    receipt, channel="c2b", reference=receipt["account"],
                    at=receipt["received_at"], tx_id=receipt["matched_tx_id"]))}
        return store.NewEvent(tx_id=receipt["receipt"], owner=receipt["owner"],
                              type=RECEIPT_RECEIVED, body=wire.dumps(body))


    def request_event(self, before, after):
        """The NewEvent of an initiator request's new status: a refund done or failed, a
        code check answered; None for the rest, or when its owner has no endpoint. Ordered
        with the payment's events (a refund of one), else with its receipt's."""
        del before
        if after["owner"] not in self._owners:
            return None
        if after["kind"] == "refund":
            event_type = REFUND_EVENTS.get(after["status"])
        elif after["kind"] == "verify" and after["status"] in (store.SUCCEEDED, store.FAILED):
            event_type = RECEIPT_VERIFIED
        else:
            event_type = None
        if event_type is None:
            return None
        body = resources.request_event_body(event_type, after, after["updated_at"])
        return store.NewEvent(tx_id=after["tx_id"] or after["receipt"], owner=after["owner"],
                              type=event_type, body=wire.dumps(body))


class _Pass:
    """What one run_once's workers share: how many events they claimed, their results,
    and the first error that stopped one (raised by the pass)."""

    def __init__(self, limit):
        self.limit, self.claimed, self.results, self.error = limit, 0, {}, None
        self.busy = 0  # workers sending right now


class Sender:
    """Delivers due events, a few at once (one per owner), in a thread or once for cron."""

    def __init__(self, ledger, config, *, clock=time.time, resolve=None, rng=random.random,
                 observer=None, timeout_s=TIMEOUT_S, watch=None):
        self._ledger = ledger
        # An outage is told once, not per pass.
        self._watch = watch or monitoring.LedgerWatch()
        self._observer = observer or (lambda state: None)  # metrics: one call per attempt
        self._urls = dict(config.webhook_urls)
        self._secrets = dict(config.webhook_secrets)
        self._allow_private = config.webhook_allow_private
        self._clock = clock
        self._rng = rng
        self._resolve = resolve or _resolve  # test seam: the addresses a host name has
        self._timeout_s = timeout_s  # wall time per attempt (a test seam too)
        self._tls = ssl.create_default_context()  # certificates and host names verified
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()  # the two below, shared by a pass's workers
        self._attempt_ended = threading.Condition(self._lock)
        self._resting = {}  # owner → when its endpoint may be tried again (after a failure)
        self._in_flight = set()  # owners with an attempt under way

    def run_once(self, limit=500):
        """Send every due event once, then forget old ones (KEEP_S); return counts by
        result. WORKERS attempts run at once, at most one per owner, so one merchant's slow
        endpoint holds only its own events. An owner whose endpoint fails rests REST_S,
        doubling with each failure in a row up to MAX_REST_S, so a dead endpoint costs the
        others little and a recovered one waits at most that."""
        batch = _Pass(limit)
        first = self._claim(batch)
        if first is not None:  # only then the other workers: an idle pass starts no thread
            helpers = [threading.Thread(target=self._work, args=(batch,),
                                        name="webhooks-attempt", daemon=True)
                       for _ in range(WORKERS - 1)]
            for t in helpers:
                t.start()
            self._work(batch, first)  # this thread is one of the workers
            for t in helpers:
                t.join()
        if batch.error is not None:
            raise batch.error
        self._ledger.prune_events(KEEP_S)
        return batch.results

    def _claim(self, batch):
        """The most due event of an owner nobody is sending to and that is not resting
        (marked in flight), or None. Claims are made one at a time, so the in-flight set
        stays true."""
        with self._lock:
            if batch.claimed >= batch.limit or batch.error is not None or self._stop.is_set():
                return None
            now = self._clock()
            skip = self._in_flight | {o for o, (until, _) in self._resting.items()
                                      if until > now}
            event = self._ledger.claim_event(LEASE_S, skip_owners=tuple(sorted(skip)))
            if event is not None:
                self._in_flight.add(event["owner"])
                batch.claimed += 1
                batch.busy += 1  # until its attempt is recorded
            return event

    def _work(self, batch, event=None):
        """One worker: send `event` (or the next one claimed), again, until none is left
        (or the pass's limit). While another worker is still sending, one that finds
        nothing looks again every POLL_S: an event that arrives during a pass does not
        wait for one owner's slow backlog."""
        try:
            while True:
                if event is None:
                    event = self._claim(batch)
                if event is None:
                    with self._lock:
                        if not batch.busy or batch.error is not None:
                            return
                        # Until an attempt ends (or POLL_S: a new event may come meanwhile).
                        self._attempt_ended.wait(POLL_S)
                    if self._stop.is_set():
                        return
                    continue
                owner, started = event["owner"], self._clock()
                try:
                    state = self._deliver(event)
                except BaseException:
                    with self._lock:
                        self._attempt_ended.notify_all()
                        batch.busy -= 1
                        self._in_flight.discard(owner)
                    raise
                with self._lock:  # one step: the owner never looks free before it rests
                    self._attempt_ended.notify_all()
                    batch.busy -= 1
                    self._in_flight.discard(owner)
                    batch.results[state] = batch.results.get(state, 0) + 1
                    if state == "delivered":
                        self._resting.pop(owner, None)
                    elif state != "lost_lease":
                        failures = self._resting.get(owner, (0, 0))[1] + 1
                        rest = min(REST_S * 2 ** (failures - 1), MAX_REST_S)
                        # From the attempt's start: the rest never outlasts the event's own
                        # backoff, which counts from its end.
                        self._resting[owner] = (started + rest, failures)
                event = None
        except BaseException as exc:  # noqa: BLE001 - the pass raises it (a ledger outage)
            with self._lock:
                batch.error = batch.error or exc

    def _deliver(self, event):
        url = self._urls.get(event["owner"])
        started = time.monotonic()
        status, error = None, None
        try:
            status, error = self._post(url, event)
        except Exception as exc:  # noqa: BLE001 - one bad event must not stop the pass
            log.exception("webhook event=%s attempt failed unexpectedly", event["id"])
            error = type(exc).__name__
        delivered = status is not None and 200 <= status < 300
        if not delivered and error is None:
            error = f"HTTP {status}"
        attempts = event["attempts"] + 1
        age = self._clock() - event["created_at"]
        next_at = None
        if not delivered and age < GIVE_UP_AFTER_S:
            next_at = self._clock() + next_attempt_in(attempts, self._rng)
        state = self._ledger.record_attempt(
            event["id"], event["claimed_until"], due_at=event["next_attempt_at"],
            status_code=status,
            duration_ms=round((time.monotonic() - started) * 1000, 1), error=error,
            delivered=delivered, next_attempt_at=next_at)
        self._observer(state)
        log.info("webhook event=%s tx=%s type=%s state=%s status=%s attempt=%d", event["id"],
                 event["tx_id"], event["type"], state, status, attempts)
        if state == "dead":
            log.error("webhook event=%s tx=%s dead after %d attempts", event["id"],
                      event["tx_id"], attempts)
        return state

    def _post(self, url, event):
        """One POST; (status or None, error or None)."""
        if url is None:
            return None, "no endpoint configured for this owner"
        parts = urlsplit(url)
        try:
            addresses = self._resolve(parts.hostname)
        except OSError:
            return None, "the endpoint's host name does not resolve"
        if not addresses or not all(address_allowed(a, self._allow_private)
                                    for a in addresses):
            return None, "refused: the endpoint resolves to a private or local address"
        timestamp = str(int(self._clock()))
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        headers = {"Content-Type": "application/json",
                   "Host": host + (f":{parts.port}" if parts.port else ""),
                   "webhook-id": event["id"], "webhook-timestamp": timestamp,
                   "webhook-signature": sign(self._secrets[event["owner"]], event["id"],
                                             timestamp, event["body"])}
        if parts.username is not None:  # https://user:password@… : HTTP Basic, as written
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return self._send(parts, addresses, path, headers, event["body"])

    def _send(self, parts, addresses, path, headers, body):
        """POST to the first of the checked addresses that accepts a connection (never to a
        second lookup of the name, which the endpoint's DNS could answer differently; TLS
        still checks the name), all within the timeout of wall time: a watchdog closes the
        socket of an endpoint that drips its answer. (status or None, error or None)."""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        deadline = time.monotonic() + self._timeout_s
        sock, error = None, "no address accepted a connection"
        for address in sorted(addresses, key=lambda a: ":" in a):  # IPv4 first
            try:
                sock = socket.create_connection(
                    (address, port), timeout=max(0.01, deadline - time.monotonic()))
                break
            except OSError as exc:
                error = f"connect failed: {type(exc).__name__}"
        if sock is None:
            return None, error
        expired = threading.Event()

        def abort():
            expired.set()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), abort)
        watchdog.start()
        try:
            conn = http.client.HTTPConnection(parts.hostname, port)
            conn.sock = (self._tls.wrap_socket(sock, server_hostname=parts.hostname)
                         if parts.scheme == "https" else sock)
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read(MAX_ANSWER_BYTES)  # never the merchant's whole answer
            return resp.status, None
        except (OSError, http.client.HTTPException) as exc:
            if expired.is_set():
                return None, f"timed out after {self._timeout_s:g} s"
            return None, type(exc).__name__
        finally:
            watchdog.cancel()
            sock.close()  # what is left unread is dropped with the connection

    # --- background thread ------------------------------------------------------

    def start(self, interval=1.0):
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="webhooks",
                                        daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._timeout_s + 5)  # the attempt in flight ends by its deadline

    def _loop(self, interval):
        while not self._stop.wait(interval):
            monitoring.one_pass(self.run_once, self._ledger, self._watch, "webhooks")


def _resolve(host):
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
