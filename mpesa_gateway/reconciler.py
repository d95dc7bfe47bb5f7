"""Reconciliation: settle payments whose callback never came, by STK query.

Owns the schedule and the loop that runs it, in a background thread or once
for cron:
- a `pending` row is first queried `after_s` after creation, then with backoff
  doubling from `backoff_s` up to 5 minutes;
- only a definite "not yet" (`4999`, or `500.001.1001` "being processed" /
  "does not exist" / empty) past `deadline_s` ends a row as `unknown`, reason
  `no_final_result`, with an ERROR line; a transport error, spike arrest or 5xx
  only reschedules it;
- an `unknown` row with a CheckoutRequestID is queried again hourly for 72 hours,
  so a payment whose callback was lost in a Daraja incident still settles;
- permanent query refusals (wrong credentials, merchant does not exist, ...)
  are logged at ERROR with Daraja's message once per pass and counted;
- one row at a time is claimed (with a lease as long as one query can take,
  from the call policy), queried and settled, so processes sharing the ledger
  never query the same row at once; queries are paced (`qps`), and a pass ends
  early on spike arrest.

A terminal answer goes through settlement's one step, the same a callback uses.
"""

import logging
import threading
import time
from collections import Counter

import mpesa_ledger as store
from mpesa_gateway import daraja, initiator, monitoring, settlement

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0
UNKNOWN_RECHECK_S = 3600.0  # how often an `unknown` row is queried again
UNKNOWN_WINDOW_S = 72 * 3600.0  # and for how long after its creation
MAX_ROWS_PER_PASS = 1000  # a pass ends; the next one carries on


class Reconciler:
    def __init__(self, ledger, client, config, *, clock=time.time, observer=None,
                 on_refusal=None, wait=None, before_pass=None, watch=None):
        self._ledger = ledger
        # An outage is told once, not per pass.
        self._watch = watch or monitoring.LedgerWatch()
        # Run first in every pass (the spool's replay): what Daraja already did is in the
        # ledger before recovery or a claim looks at a row.
        self._before_pass = before_pass or (lambda: None)
        self._client = client
        self._observer = observer or (lambda result: None)
        self._on_refusal = on_refusal or (lambda: None)
        self._after_s = config.reconcile_after_s
        self._deadline_s = config.reconcile_deadline_s
        self._backoff_s = config.reconcile_backoff_s
        self._pace_s = 1.0 / config.reconcile_qps
        # One query with its token fetch and retries; a crashed holder's lease lapses.
        self._lease_s = client.longest_query_s
        self._clock = clock
        self._stop = threading.Event()
        # Pacing waits on the stop event, so stopping is prompt (a seam for tests).
        self._wait = wait or self._stop.wait
        self._thread = None
        self._stop_requested_at = None
        # Permanent query refusals since Daraja last gave a real answer (/health): it stays
        # up while the configuration is wrong, whatever the backoff between passes.
        self.refusals = 0

    def run_once(self):
        """Query every due row once, one claim at a time; return counts by result."""
        results = Counter()
        refusals = Counter()  # (error_code, message) → rows
        self._before_pass()
        # Rows abandoned mid-push by a process that died (this one or another sharing the
        # ledger) become `unknown` without waiting for a restart.
        results["interrupted"] = self._ledger.recover_interrupted(self._client.longest_push_s)
        # Initiator requests (refunds, code checks) cut off, or whose result never came,
        # become `unknown`: never re-sent, never left pending.
        results["requests_unknown"] = self._ledger.settle_stale_requests(
            interrupted_after_s=self._client.longest_initiator_s,
            no_result_after_s=initiator.RESULT_WAIT_S)
        started = self._clock()  # rows rescheduled during this pass wait for the next one
        for n in range(MAX_ROWS_PER_PASS):
            if n:
                self._wait(self._pace_s)  # at most `qps` queries a second; before the claim,
                #                           so the wait never eats into a lease
            if self._stop.is_set():
                break
            row = self._ledger.claim_next(older_than_s=self._after_s, lease_s=self._lease_s,
                                          unknown_window_s=UNKNOWN_WINDOW_S, due_by=started)
            if row is None:
                break
            result, error = self._check(row)
            self._observer(result)
            results[result] += 1
            if result == "refused":
                refusals[(error.error_code, error.error_message or "")] += 1
                self._on_refusal()
            if result == "throttled":
                log.warning("reconcile spike_arrest action=end_pass")
                break
        for (code, message), rows in refusals.items():
            log.error("reconcile query_refused rows=%d error_code=%s error_message=%r:"
                      " check MPESA_SHORTCODE, MPESA_PASSKEY and the app's credentials",
                      rows, code, message)
        return +results  # drop zero counts

    def check_now(self, tx_id):
        """Query one transaction at once, whatever its schedule (operator tool). It claims
        the row like a pass does, so it never queries a row another process is querying."""
        row = self._ledger.get(tx_id)
        if row is None:
            return "not_found", None
        if row["checkout_request_id"] is None or row["status"] in store.FINAL:
            return "nothing_to_query", row
        row = self._ledger.claim(row["id"], self._lease_s)  # `tx_id` may be its checkout id
        if row is None:
            return "busy", self._ledger.get(tx_id)
        result, error = self._check(row)
        if result == "refused":
            log.error("reconcile tx=%s query_refused error_code=%s error_message=%r",
                      tx_id, error.error_code, error.error_message)
        return result, self._ledger.get(tx_id)

    def _check(self, row):
        """Query one row and settle or reschedule it; return (result, DarajaError or None)."""
        lease = row["claimed_until"]  # ours: every write below is fenced by it
        try:
            answer = self._client.stk_query(row["checkout_request_id"])
        except daraja.DarajaError as exc:
            if exc.reason == "throttled":
                result = "throttled"
            elif exc.outcome == daraja.REJECTED:
                result = "refused"  # permanent: configuration, not weather
                self.refusals += 1
            else:
                result = "query_failed"
                log.warning("reconcile tx=%s query_failed reason=%s", row["id"], exc.reason)
            self._reschedule(row, self._clock())
            return result, exc
        self.refusals = 0  # Daraja answered: whatever was wrong has been fixed
        if not answer.pending:
            outcome = settlement.from_query(answer.checkout_request_id, answer.result_code,
                                            answer.result_desc, answer.merchant_request_id)
            name, _ = settlement.apply(self._ledger, row["id"], outcome, release_claim=lease)
            log.info("reconcile tx=%s outcome=%s status=%s", row["id"], name, outcome.status)
            return outcome.status, None
        now = self._clock()
        past_deadline = now >= store.epoch(row["created_at"]) + self._deadline_s
        if row["status"] == store.PENDING and past_deadline:
            # Only a definite "not yet" may end a row: Daraja answered, and had no result.
            if self._ledger.give_up(row["id"], now + UNKNOWN_RECHECK_S, lease):
                log.error("reconcile tx=%s status=unknown reason=no_final_result attempts=%d",
                          row["id"], row["check_attempts"] + 1)
            return "expired", None
        self._reschedule(row, now)
        return "not_yet", None

    def _reschedule(self, row, now):
        if row["status"] == store.UNKNOWN:
            delay = UNKNOWN_RECHECK_S
        else:
            delay = min(MAX_BACKOFF_S, self._backoff_s * 2 ** row["check_attempts"])
        self._ledger.reschedule(row["id"], now + delay, row["claimed_until"])

    # --- background thread ------------------------------------------------------

    def start(self):
        interval = min(5.0, self._backoff_s)
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="reconciler",
                                        daemon=True)
        self._thread.start()

    def request_stop(self):
        """Ask the loop to stop after its current query; do not wait."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        self._stop.set()

    def stop(self):
        """Stop, waiting for the current query at most as long as one query can take from
        when the stop was first asked for."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(max(0.0, self._stop_requested_at + self._lease_s
                                  - time.monotonic()))
            if not self._thread.is_alive():
                self._thread = None  # a second stop (close, then the exit hook) is silent
                log.info("reconciler stopped")

    def _loop(self, interval):
        while not self._stop.wait(interval):
            monitoring.one_pass(self._pass, self._ledger, self._watch, "reconcile")

    def _pass(self):
        self.run_once()
        self._ledger.prune_idempotency()
