"""The services: everything the flows run over, built once, in named steps.

Owns `Services` (config, ledger, spool, Daraja client, metrics, admission, signer, the
initiator, console sessions, export slots, clock and the background workers) and
`build_services`, which builds them in order: the webhook outbox, the ledger (given the
outbox, so a status change and its event are one commit), the spool (adopting and
replaying what processes that died left in theirs), the metrics, the Daraja client and the
rate limit (the fleet's, when the ledger is shared by hosts), start-up repairs (and the
initiator's credential), then, if asked, the spool replayer, reconciler and webhook sender
threads. The raw WSGI app, the command line and the Flask
and Falcon versions in bench/ all build their services here.
"""

import atexit
import functools
import json
import logging
import os

import config as settings
import mpesa_ledger as store
from mpesa_gateway import (
    admission,
    daraja,
    exports,
    fleet,
    initiator,
    metrics,
    monitoring,
    paypage,
    reconciler,
    recording,
    sessions,
    webhooks,
)
from mpesa_gateway.auth import CallbackSigner, legacy_scope
from mpesa_gateway.clock import SystemClock
from mpesa_ledger.spool import Spool

log = logging.getLogger(__name__)

# A Paybill receipt matches a payment made this recently whose reference is its account.
RECEIPT_MATCH_S = 30 * 24 * 3600
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")


class Services:
    """Everything the flows need, built once by `build_services` and passed in."""

    def __init__(self, config, ledger, client, metrics_registry, *, clock=None, slots=None,
                 limiter=None, spool=None):
        self.config = config
        self.ledger = ledger
        self.spool = spool or Spool(config.spool_dir)
        self.daraja = client
        self.metrics = metrics_registry
        self.clock = clock or SystemClock()
        self.limiter = limiter or admission.RateLimiter(config.rate, config.burst,
                                                        clock=self.clock.monotonic)
        self.slots = slots or admission.PushSlots(config.push_slots)
        self.redeliveries = admission.RateLimiter(admission.REDELIVERIES_PER_S,
                                                  admission.REDELIVERY_BURST,
                                                  clock=self.clock.monotonic)
        # Console "ask Daraja again": a few a second per owner, like redeliveries.
        self.requeries = admission.RateLimiter(admission.REDELIVERIES_PER_S,
                                               admission.REDELIVERY_BURST,
                                               clock=self.clock.monotonic)
        self.signer = CallbackSigner(config.secret, config.callback_base_url)
        # Daraja's initiator (refunds, code checks, the balance), or None when not set up.
        self.initiator = initiator.from_config(config)
        self.exports = exports.Slots()  # CSV exports running at once
        # The pay page's prompts: a few a second per payment link and per client address.
        self.pay_per_link = admission.RateLimiter(paypage.PER_LINK_PER_S,
                                                  paypage.PER_LINK_BURST,
                                                  clock=self.clock.monotonic, max_keys=10_000)
        self.pay_per_address = admission.RateLimiter(paypage.PER_ADDRESS_PER_S,
                                                     paypage.PER_ADDRESS_BURST,
                                                     clock=self.clock.monotonic,
                                                     max_keys=10_000)
        # People's sign-ins to the console, and how often an address may try one.
        self.sessions = sessions.Sessions(config, ledger)
        self.sign_ins = admission.RateLimiter(sessions.SIGN_IN_PER_S, sessions.SIGN_IN_BURST,
                                              clock=self.clock.monotonic, max_keys=10_000)
        # The shortcodes whose Paybill/Till confirmations are this gateway's: the paybill,
        # and a till's number.
        self.c2b_shortcodes = frozenset({config.shortcode, config.party_b,
                                         config.c2b_shortcode})
        with open(OPENAPI_PATH, "rb") as f:
            spec = json.load(f)
        spec["info"]["version"] = settings.VERSION  # the one version source
        self.openapi = json.dumps(spec, ensure_ascii=False).encode()
        self.reconciler = None  # the background workers, once started
        self.sender = None
        self.replayer = None
        self.health = monitoring.Health(self)  # /health's checks and its answer
        # One WARNING per ledger outage, one INFO at its end; failures counted.
        self.ledger_watch = monitoring.LedgerWatch(metrics_registry.ledger_failures.inc,
                                                   clock=self.clock.monotonic)

    def record(self, entry):
        """Keep what Daraja did (a recording entry) in the spool because the ledger cannot
        take it now; True once it is durable. The replayer puts it in the ledger."""
        durable = self.spool.append(entry)
        if self.replayer is not None:
            self.replayer.wake()
        return durable

    def replay_spool(self):
        return recording.replay(self.spool, self.ledger, self.ledger_watch)

    def adopt_and_replay(self):
        """Every reconcile pass: spools a dead sibling left (sharing this folder) are
        adopted, then the spool is replayed, before any claim."""
        self.spool.adopt_orphans()
        return self.replay_spool()

    def new_reconciler(self, **seams):
        """A reconciler over these services (a thread's, or one pass's for cron); each
        pass first replays the spool, so no claim sees a row the spool would change."""
        return reconciler.Reconciler(self.ledger, self.daraja, self.config,
                                     clock=self.clock.wall, observer=self.metrics.reconcile.inc,
                                     on_refusal=self.metrics.reconcile_refusals.inc,
                                     before_pass=self.adopt_and_replay,
                                     watch=self.ledger_watch,
                                     **seams)

    def new_sender(self):
        """A webhook sender over these services (a thread's, or one pass's for cron)."""
        return webhooks.Sender(self.ledger, self.config, clock=self.clock.wall,
                               observer=self.metrics.webhook_deliveries.inc,
                               watch=self.ledger_watch)

    def start_background(self):
        """The spool replayer, and the reconciler and the webhook sender threads as
        configured. Under waitress-serve --call or gunicorn nobody calls close(): they are
        stopped (the current query or delivery finishes) when the process exits."""
        self.replayer = recording.Replayer(self.spool, self.ledger, self.ledger_watch)
        self.replayer.start()
        if self.config.reconcile:
            self.reconciler = self.new_reconciler()
            self.reconciler.start()
        if self.config.webhook_urls and self.config.webhook_sender:
            self.sender = self.new_sender()
            self.sender.start()
        atexit.register(self.close_background)

    def close_background(self):
        """Stop the reconciler and the webhook sender, letting the current query and the
        current delivery finish (each bounded)."""
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.sender is not None:
            self.sender.stop()
        if self.replayer is not None:
            self.replayer.stop()

    def close(self):
        self.close_background()
        atexit.unregister(self.close_background)
        try:
            self.replay_spool()  # the last chance this process has; what is left stays on disk
        except Exception:  # noqa: BLE001 - closing must go on: the spool file keeps them
            log.exception("spool replay at close failed")
        self.spool.close()
        self.ledger.close()
        self.daraja.close()


# --- the steps ---------------------------------------------------------------------------


def open_ledger(config, clock, outbox):
    """The ledger GATEWAY_DB names, pooled (PostgreSQL) to one connection per server thread
    and background worker, writing each status change's webhook event in its commit, and
    matching each Paybill receipt to its payment (or owner) with its event."""
    rules = store.ReceiptRules(recent_s=RECEIPT_MATCH_S,
                               default_reference=config.default_reference,
                               owner_for=functools.partial(receipt_owner, config),
                               event=outbox.receipt_event)
    return store.open_ledger(config.db_path, clock=clock.wall, events=outbox.event_for,
                             receipt_rules=rules, request_events=outbox.request_event,
                             pool_size=config.threads + 4,
                             wait_s=config.db_wait_s)


def receipt_owner(config, account):
    """The owner of a Paybill receipt no payment claims: the longest GATEWAY_C2B_ACCOUNT_
    PREFIXES prefix its account number starts with (any case), else default."""
    account = account.strip().lower()
    named = [(len(prefix), name) for name, prefix in config.c2b_account_prefixes
             if account.startswith(prefix.lower())]
    return max(named)[1] if named else settings.DEFAULT_OWNER


def open_spool(config, ledger, clock):
    """This process's spool; what processes that died left in theirs is adopted and
    replayed now, before crash recovery and before any reconcile claim."""
    spool = Spool(config.spool_dir, clock=clock.wall)
    problem = spool.probe()
    if problem is not None:
        log.critical("GATEWAY_SPOOL_DIR %s cannot be written (%s): while the ledger is away,"
                     " what Daraja does is kept in memory only", spool.directory, problem)
    if spool.adopt_orphans():
        recording.replay(spool, ledger)
    return spool


def gateway_metrics(ledger, clock, slots, spool):
    """The metrics registry, with the gauges read from the ledger at scrape time."""

    def by_status():  # no series while the ledger cannot be read
        try:
            counts = ledger.count_by_status()
        except ledger.Error:
            return {}
        counts.setdefault(store.PENDING, 0)  # the series a dashboard watches, even at 0
        return {(status,): n for status, n in counts.items()}

    def oldest_undelivered_s():
        try:
            _, oldest = ledger.outbox_backlog()
        except ledger.Error:
            return None
        return 0.0 if oldest is None else max(0.0, clock.wall() - oldest)

    def balances():  # the last Account Balance result's accounts
        try:
            row = ledger.latest_request("balance", status=store.SUCCEEDED)
        except ledger.Error:
            return {}
        accounts = json.loads(row["details"] or "{}").get("accounts") or [] if row else []
        return {(a["name"],): a["available"] for a in accounts if a["available"] is not None}

    return metrics.GatewayMetrics(settings.VERSION, by_status, slots, oldest_undelivered_s,
                                  commit_counts=lambda: ledger.commit_counts, spool=spool,
                                  balances=balances, round_trips=lambda: ledger.round_trips)


def daraja_client(config, ledger, registry, clock):
    """The one Daraja client; its OAuth token is the fleet's when hosts share the ledger."""
    shared_tokens = None
    if ledger.shared_by_hosts:
        oauth_s = daraja.call_policies(config)["oauth"].longest_s
        shared_tokens = fleet.SharedTokens(ledger, config.token_margin_s, oauth_s)
    return daraja.DarajaClient(config, daraja.build_pool(config), clock=clock.monotonic,
                               observer=registry.daraja_call, shared_tokens=shared_tokens)


def rate_limiter(config, ledger, clock):
    """Per owner; one bucket for every host when they share the ledger."""
    if ledger.shared_by_hosts:
        return fleet.SharedRateLimiter(ledger, config.rate, config.burst)
    return admission.RateLimiter(config.rate, config.burst, clock=clock.monotonic)


def repair_on_start(config, ledger, client):
    """What a start-up owes the ledger: rows cut off mid-push by a crash become `unknown`
    (never re-sent), initiator requests likewise, and idempotency keys stored before owner
    names stay findable."""
    ledger.recover_interrupted(client.longest_push_s)
    ledger.settle_stale_requests(interrupted_after_s=client.longest_initiator_s,
                                 no_result_after_s=initiator.RESULT_WAIT_S)
    for name, key in config.api_keys:
        ledger.rename_scope(legacy_scope(key), name)


def warn_about(config):
    bare = sum(1 for name, _ in config.api_keys if name == settings.DEFAULT_OWNER)
    if bare > 1:
        log.warning("GATEWAY_API_KEYS has %d keys named default: they share their payments,"
                    " rate limit and idempotency keys; name each merchant's (name:KEY)", bare)


def build_services(config=None, *, clock=None, background=True):
    """Build the services once: config (from the environment unless given), then each step
    above; `background`: start the reconciler and webhook sender threads as configured
    (a one-off command asks for none)."""
    if config is None:
        config = settings.load_config(os.environ)
    clock = clock or SystemClock()
    outbox = webhooks.Outbox(config)
    ledger = open_ledger(config, clock, outbox)
    spool = open_spool(config, ledger, clock)
    slots = admission.PushSlots(config.push_slots)
    registry = gateway_metrics(ledger, clock, slots, spool)
    client = daraja_client(config, ledger, registry, clock)
    repair_on_start(config, ledger, client)
    warn_about(config)
    services = Services(config, ledger, client, registry, clock=clock, slots=slots,
                        limiter=rate_limiter(config, ledger, clock), spool=spool)
    if background:
        services.start_background()
    return services
