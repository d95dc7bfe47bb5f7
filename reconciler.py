"""Reconciliation: settle payments whose callback never came, by STK query.

Owns the schedule (first query `after_s` after creation, then backoff doubling
from `backoff_s` up to 5 minutes), the deadline (no terminal answer within
`deadline_s` of creation: `unknown`, reason `no_final_result`, an ERROR line),
and the loop that runs it in a background thread or once for cron.  `4999` and
`500.001.1001` mean "not yet", never failure; so does any Daraja error.  A
terminal answer goes through the ledger's one settle step, the same one a
callback uses.  Rows are claimed with a lease in the ledger, so processes that
share the ledger never query the same row at once.
"""

import logging
import threading
import time
from collections import Counter

import daraja
import ledger as store

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0


class Reconciler:
    def __init__(self, ledger, client, config, *, clock=time.time, observer=None):
        self._ledger = ledger
        self._observer = observer or (lambda result: None)
        self._client = client
        self._after_s = config.reconcile_after_s
        self._deadline_s = config.reconcile_deadline_s
        self._backoff_s = config.reconcile_backoff_s
        # Long enough for one query with its retries; a crashed holder's lease lapses.
        self._lease_s = client.longest_call_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread = None

    def run_once(self, limit=50):
        """Query every due row once (in batches of `limit`); return counts by result."""
        results = Counter()
        # Rows abandoned mid-push by a process that died (this one or another sharing the
        # ledger) become `unknown` without waiting for a restart.
        results["interrupted"] = self._ledger.recover_interrupted(self._client.longest_call_s)
        while True:
            rows = self._ledger.claim_due(older_than_s=self._after_s, lease_s=self._lease_s,
                                          limit=limit)
            for row in rows:
                result = self._check(row)
                self._observer(result)
                results[result] += 1
            if len(rows) < limit or self._stop.is_set():
                return +results  # drop zero counts

    def _check(self, row):
        try:
            answer = self._client.stk_query(row["checkout_request_id"])
        except daraja.DarajaError as exc:
            log.warning("reconcile tx=%s query_failed reason=%s", row["id"], exc.reason)
            answer = None
        if answer is not None and not answer.pending:
            status, reason = daraja.result_status(answer.result_code)
            outcome = self._ledger.apply_result(row["id"], store.Settlement(
                status=status, reason=reason, result_code=answer.result_code,
                result_desc=answer.result_desc, checkout_request_id=answer.checkout_request_id,
                merchant_request_id=answer.merchant_request_id, source="query"))
            log.info("reconcile tx=%s outcome=%s status=%s", row["id"], outcome, status)
            return status
        now = self._clock()
        if now >= store.epoch(row["created_at"]) + self._deadline_s:
            if self._ledger.give_up(row["id"]):
                log.error("reconcile tx=%s status=unknown reason=no_final_result attempts=%d",
                          row["id"], row["check_attempts"] + 1)
            return "expired"
        delay = min(MAX_BACKOFF_S, self._backoff_s * 2 ** row["check_attempts"])
        self._ledger.reschedule(row["id"], now + delay)
        return "not_yet"

    # --- background thread ------------------------------------------------------

    def start(self):
        interval = min(5.0, self._backoff_s)
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="reconciler",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout=10.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self, interval):
        while not self._stop.wait(interval):
            try:
                self.run_once()
                self._ledger.prune_idempotency()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad pass
                log.exception("reconcile pass failed")
