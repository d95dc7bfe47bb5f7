"""Prometheus metrics, hand-written: counters, histograms and callback gauges.

Owns the gateway's metric families and their rendering in the Prometheus text
exposition format (version 0.0.4). Each family has one lock and a dict keyed by
its label values, so recording is a few dict operations on the hot path; all
formatting happens at scrape time. No client library: the format is small,
stable and fully covered by tests that parse it with `prometheus_client`.
"""

import threading
from bisect import bisect_left

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a fast local answer to Daraja's ~1 s and its 15 s read timeout.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names, values, extra=()):
    pairs = [*zip(names, values), *extra]
    if not pairs:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in pairs) + "}"


def _number(value):
    return repr(float(value)) if value != int(value) else f"{int(value)}.0"


class Counter:
    kind = "counter"

    def __init__(self, name, help_text, labelnames=()):
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._lock = threading.Lock()
        self._values = {}

    def inc(self, *labels, amount=1.0):
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels):
        with self._lock:
            return self._values.get(labels, 0.0)

    def samples(self):
        with self._lock:
            items = sorted(self._values.items())
        return [(self.name, _labels(self.labelnames, k), v) for k, v in items]


class Histogram:
    kind = "histogram"

    def __init__(self, name, help_text, labelnames=(), buckets=BUCKETS):
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._series = {}  # labels → [counts per bucket (+Inf last), sum]

    def observe(self, seconds, *labels):
        index = bisect_left(self._buckets, seconds)
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = [[0] * (len(self._buckets) + 1), 0.0]
            series[0][index] += 1
            series[1] += seconds

    def samples(self):
        with self._lock:
            items = sorted((k, (list(c), s)) for k, (c, s) in self._series.items())
        out = []
        for labels, (counts, total) in items:
            running = 0
            for bound, count in zip((*self._buckets, "+Inf"), counts):
                running += count
                le = ("le", bound if bound == "+Inf" else _number(bound))
                out.append((f"{self.name}_bucket", _labels(self.labelnames, labels, [le]),
                            running))
            out.append((f"{self.name}_sum", _labels(self.labelnames, labels), total))
            out.append((f"{self.name}_count", _labels(self.labelnames, labels), running))
        return out


def _one(value):
    """A label-less gauge's samples: none when the value cannot be read (None)."""
    return {} if value is None else {(): value}


class Gauge:
    """A gauge read at scrape time from `read()`, which returns {label values: number}."""

    kind = "gauge"

    def __init__(self, name, help_text, labelnames, read):
        self.name, self.help, self.labelnames, self._read = name, help_text, tuple(labelnames), read

    def samples(self):
        return [(self.name, _labels(self.labelnames, k), v) for k, v in sorted(self._read().items())]


class CounterReading(Gauge):
    """A counter kept elsewhere (the ledger's), read at scrape time like a gauge."""

    kind = "counter"


class GatewayMetrics:
    """Every metric the gateway exports; one instance lives on the app."""

    def __init__(self, version, transactions_by_status, slots=None, outbox=None,
                 commit_counts=None, spool=None, balances=None, round_trips=None):
        p = "mpesa_gateway_"
        self.requests = Counter(p + "http_requests_total", "HTTP requests handled.",
                                ("route", "method", "status"))
        self.request_seconds = Histogram(p + "http_request_duration_seconds",
                                         "Time to handle an HTTP request.", ("route",))
        self.daraja_calls = Counter(p + "daraja_calls_total", "Calls to Daraja by outcome.",
                                    ("api", "outcome"))
        self.daraja_seconds = Histogram(p + "daraja_call_duration_seconds",
                                        "Time of a Daraja call, retries included.", ("api",))
        self.token_fetches = Counter(p + "oauth_token_fetches_total",
                                     "OAuth token fetches by outcome.", ("outcome",))
        self.callbacks = Counter(p + "callbacks_total", "STK callbacks received by outcome.",
                                 ("outcome",))
        self.c2b_confirmations = Counter(
            p + "c2b_confirmations_total",
            "Paybill and Till confirmations received by outcome.", ("outcome",))
        self.reconcile = Counter(p + "reconcile_queries_total",
                                 "Reconciliation STK queries by result.", ("result",))
        self.reconcile_refusals = Counter(
            p + "reconcile_query_refusals_total",
            "STK queries Daraja refused for good (credentials, merchant): needs an operator.")
        self.transactions = Gauge(p + "transactions", "Transactions in the ledger by status.",
                                  ("status",), transactions_by_status)
        self.build = Gauge(p + "build_info", "The running version.", ("version",),
                           lambda: {(version,): 1})
        self.slots_in_use = Gauge(p + "push_slots_in_use", "Pushes at Daraja right now.", (),
                                  lambda: {(): slots.in_use() if slots else 0})
        self.slots_total = Gauge(p + "push_slots", "Pushes allowed at Daraja at once.", (),
                                 lambda: {(): slots.total if slots else 0})
        self.busy = Counter(p + "push_busy_total",
                            "Pushes answered 503 gateway_busy: every push slot was taken.")
        self.webhook_deliveries = Counter(
            p + "webhook_deliveries_total",
            "Webhook delivery attempts by the event's state after it.", ("outcome",))
        self.webhook_oldest = Gauge(
            p + "webhook_oldest_undelivered_seconds",
            "Age of the oldest webhook event not yet delivered (0: none).", (),
            lambda: _one(outbox() if outbox else 0.0))
        counts = commit_counts or (lambda: (0, 0))
        self.ledger_commits = CounterReading(
            p + "ledger_commits_total", "Ledger writes made durable.", (),
            lambda: {(): counts()[0]})
        self.ledger_batches = CounterReading(
            p + "ledger_batches_total",
            "Ledger COMMITs (fsyncs) that made them so: fewer than writes when concurrent"
            " writes share one (group commit).", (), lambda: {(): counts()[1]})
        trips = round_trips or dict
        self.ledger_statements = CounterReading(
            p + "ledger_statements_total",
            "Statements sent to the ledger's server (PostgreSQL), by ledger step.", ("step",),
            lambda: {(step,): n for step, (n, _, _) in trips().items()})
        self.ledger_round_trips = CounterReading(
            p + "ledger_round_trips_total",
            "Network round trips to the ledger's server (PostgreSQL: a pipelined step's"
            " statements share one), by ledger step.", ("step",),
            lambda: {(step,): n for step, (_, n, _) in trips().items()})
        self.ledger_steps = CounterReading(
            p + "ledger_steps_total",
            "Ledger steps taken (calls) on a ledger with a server (PostgreSQL), by step.",
            ("step",), lambda: {(step,): n for step, (_, _, n) in trips().items()})
        self.ledger_failures = Counter(
            p + "ledger_failures_total",
            "Ledger calls that failed (the ledger away: a PostgreSQL server down, a SQLite"
            " file locked past GATEWAY_DB_WAIT_S), by where.", ("where",))
        self.spool_entries = Gauge(
            p + "spool_entries",
            "Entries in the local spool the ledger has not taken yet (what Daraja did while"
            " the ledger was away).", (), lambda: {(): spool.depth() if spool else 0})
        self.spool_oldest = Gauge(
            p + "spool_oldest_seconds",
            "Age of the oldest entry in the local spool (0: none).", (),
            lambda: _one((spool.oldest_age() if spool else None) or 0.0))
        self.initiator_results = Counter(
            p + "initiator_results_total",
            "Initiator results and queue timeouts received (refunds, code checks, balance),"
            " by kind and outcome.", ("kind", "outcome"))
        # {(account,): available shillings} of the last Account Balance result ({}: none yet)
        self.account_balance = Gauge(
            p + "account_balance_kes",
            "Available shillings per account at the last Account Balance result (GET /balance"
            " refreshes it at most every 10 minutes).", ("account",),
            balances or (lambda: {}))
        self._families = (self.requests, self.request_seconds, self.daraja_calls,
                          self.daraja_seconds, self.token_fetches, self.callbacks,
                          self.c2b_confirmations, self.reconcile, self.reconcile_refusals,
                          self.transactions, self.slots_in_use, self.slots_total, self.busy,
                          self.webhook_deliveries, self.webhook_oldest, self.ledger_commits,
                          self.ledger_batches, self.ledger_statements,
                          self.ledger_round_trips, self.ledger_steps, self.ledger_failures, self.spool_entries,
                          self.spool_oldest, self.initiator_results, self.account_balance,
                          self.build)

    def daraja_call(self, api, outcome, seconds):
        """The Daraja client's observer: one call finished with `outcome`."""
        self.daraja_calls.inc(api, outcome)
        self.daraja_seconds.observe(seconds, api)
        if api == "oauth":
            self.token_fetches.inc(outcome)

    def render(self):
        lines = []
        for family in self._families:
            lines.append(f"# HELP {family.name} {family.help}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            lines.extend(f"{name}{labels} {_number(value)}"
                         for name, labels, value in family.samples())
        return "\n".join(lines) + "\n"
