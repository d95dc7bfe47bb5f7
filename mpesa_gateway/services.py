"""The services: everything the flows run over, built once, in named steps.

Owns `Services` (config, ledger, Daraja client, metrics, admission, signer, clock and the
background workers) and `build_services`, which builds them in order: the webhook outbox,
the ledger (given the outbox, so a status change and its event are one commit), the
metrics, the Daraja client and the rate limit (the fleet's, when the ledger is shared by
hosts), start-up repairs, then, if asked, the reconciler and webhook sender threads. The
raw WSGI app, the command line and the Flask and Falcon versions in bench/ all build
their services here.
"""

import atexit
import logging
import os

import config as settings
import mpesa_ledger as store
from mpesa_gateway import admission, daraja, fleet, metrics, monitoring, reconciler, webhooks
from mpesa_gateway.auth import CallbackSigner, legacy_scope
from mpesa_gateway.clock import SystemClock

log = logging.getLogger(__name__)

OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")


class Services:
    """Everything the flows need, built once by `build_services` and passed in."""

    def __init__(self, config, ledger, client, metrics_registry, *, clock=None, slots=None,
                 limiter=None):
        self.config = config
        self.ledger = ledger
        self.daraja = client
        self.metrics = metrics_registry
        self.clock = clock or SystemClock()
        self.limiter = limiter or admission.RateLimiter(config.rate, config.burst,
                                                        clock=self.clock.monotonic)
        self.slots = slots or admission.PushSlots(config.push_slots)
        self.signer = CallbackSigner(config.secret, config.callback_base_url)
        with open(OPENAPI_PATH, "rb") as f:
            self.openapi = f.read()
        self.reconciler = None  # the background workers, once started
        self.sender = None
        self.health = monitoring.Health(self)  # /health's checks and its answer

    def new_reconciler(self, **seams):
        """A reconciler over these services (a thread's, or one pass's for cron)."""
        return reconciler.Reconciler(self.ledger, self.daraja, self.config,
                                     clock=self.clock.wall, observer=self.metrics.reconcile.inc,
                                     on_refusal=self.metrics.reconcile_refusals.inc, **seams)

    def new_sender(self):
        """A webhook sender over these services (a thread's, or one pass's for cron)."""
        return webhooks.Sender(self.ledger, self.config, clock=self.clock.wall,
                               observer=self.metrics.webhook_deliveries.inc)

    def start_background(self):
        """The reconciler and the webhook sender threads, as configured. Under
        waitress-serve --call or gunicorn nobody calls close(): they are stopped (the
        current query or delivery finishes) when the process exits."""
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

    def close(self):
        self.close_background()
        atexit.unregister(self.close_background)
        self.ledger.close()
        self.daraja.close()


# --- the steps ---------------------------------------------------------------------------


def open_ledger(config, clock, outbox):
    """The ledger GATEWAY_DB names, pooled (PostgreSQL) to one connection per server thread
    and background worker, writing each status change's webhook event in its commit."""
    return store.open_ledger(config.db_path, clock=clock.wall, events=outbox.event_for,
                             pool_size=config.threads + 4, wait_s=config.db_wait_s)


def gateway_metrics(ledger, clock, slots):
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

    return metrics.GatewayMetrics(settings.VERSION, by_status, slots, oldest_undelivered_s,
                                  commit_counts=lambda: ledger.commit_counts)


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
    (never re-sent), and idempotency keys stored before owner names stay findable."""
    ledger.recover_interrupted(client.longest_push_s)
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
    slots = admission.PushSlots(config.push_slots)
    registry = gateway_metrics(ledger, clock, slots)
    client = daraja_client(config, ledger, registry, clock)
    repair_on_start(config, ledger, client)
    warn_about(config)
    services = Services(config, ledger, client, registry, clock=clock, slots=slots,
                        limiter=rate_limiter(config, ledger, clock))
    if background:
        services.start_background()
    return services
