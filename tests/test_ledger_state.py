"""Ledger invariants under random sequences of operations (Hypothesis state machine).

Whatever order pushes, Daraja answers, callbacks (good, duplicate, forged amounts),
query results and crash recoveries arrive in:

- a final state never changes, except a success with a receipt overriding a failure;
- a `succeeded` row came from a verified result: a callback with a receipt and the
  stored amount, or an STK query;
- one idempotency key never holds two transactions: it stays with the payment it started
  (nothing here releases or expires a key);
- a row's amount and phone never change.
"""

import atexit
import os
import tempfile

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
)

import mpesa_ledger as store
import postgres_server
from helpers import FakeClock, read_only, soak_examples
from mpesa_gateway import settlement
from mpesa_gateway.settlement import CallbackRecord, Outcome
from mpesa_ledger import FINAL, REJECTED, Idempotency, SqliteLedger

PHONES = ["254712000001", "254712000002", "254712000003"]
KEYS = ["k1", "k2", "k3", None]


class LedgerMachine(RuleBasedStateMachine):
    txs = Bundle("txs")

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.clock = FakeClock(1_790_000_000.0)
        self.ledger = self.open_ledger()
        self.seen = {}  # tx id → last status seen
        self.origin = {}  # tx id → (phone, amount)
        self.verified_success = set()  # tx ids a verifiable success was offered for
        self.key_tx = {}  # idempotency key → the one transaction it started

    def open_ledger(self):
        return SqliteLedger(f"{self.dir.name}/state.db", clock=self.clock)

    def keys_on_disk(self):
        """The idempotency keys as committed, seen from outside the ledger."""
        with read_only(self.ledger.path) as conn:
            return dict(conn.execute(
                "SELECT key, tx_id FROM idempotency_keys WHERE scope = 'scope'").fetchall())

    def teardown(self):
        self.ledger.close()
        self.dir.cleanup()

    @rule(target=txs, phone=st.sampled_from(PHONES), amount=st.integers(1, 3),
          key=st.sampled_from(KEYS))
    def begin(self, phone, amount, key):
        idem = Idempotency("scope", key, f"{phone}:{amount}") if key else None
        begun = self.ledger.begin_push(phone=phone, amount=amount, reference="R",
                                       description="D", idempotency=idem, phone_lock_s=0)
        if begun.kind == "new":
            assert key not in self.key_tx, "a claimed key started a second payment"
            if key:
                self.key_tx[key] = begun.row["id"]
            self.origin[begun.row["id"]] = (phone, amount)
            return begun.row["id"]
        if begun.kind in ("replay", "in_flight"):
            assert begun.row["id"] == self.key_tx[key]  # the key still points at its payment
            assert self.origin[begun.row["id"]] == (phone, amount)
        return multiple()  # no new transaction

    @rule(tx=txs)
    def accepted(self, tx):
        self.ledger.mark_accepted(tx, f"ws_{tx}", "m")

    @rule(tx=txs, status=st.sampled_from(["unknown", "rejected"]))
    def not_accepted(self, tx, status):
        self.ledger.mark_not_accepted(tx, status, "test")

    @rule(tx=txs, code=st.sampled_from(["0", "1032", "1037"]), amount_ok=st.booleans(),
          receipt=st.booleans())
    def callback(self, tx, code, amount_ok, receipt):
        amount = self.origin[tx][1] + (0 if amount_ok else 100)
        success = code == "0"
        if success and amount_ok and receipt:
            self.verified_success.add(tx)
        settlement.apply(self.ledger, tx, Outcome(
            status="succeeded" if success else "failed", reason=None if success else "x",
            result_code=code, result_desc="d", checkout_request_id=f"ws_{tx}",
            receipt="UKQ0000001" if receipt else None, amount=amount),
            callback=CallbackRecord(b"{}", None))

    @rule(tx=txs, code=st.sampled_from(["0", "1032"]))
    def query_result(self, tx, code):
        row = self.ledger.get(tx)
        if row["checkout_request_id"] is None:
            return  # nothing to query
        if code == "0":
            self.verified_success.add(tx)
        settlement.apply(self.ledger, tx, Outcome(
            status="succeeded" if code == "0" else "failed", reason=None, result_code=code,
            result_desc="d", checkout_request_id=row["checkout_request_id"], source="query"))

    @rule(seconds=st.sampled_from([1, 1000]))
    def time_passes_and_recovery_runs(self, seconds):
        self.clock.now += seconds
        self.ledger.recover_interrupted(100)

    @precondition(lambda self: self.origin)
    @invariant()
    def states_only_move_forward(self):
        for tx, (phone, amount) in self.origin.items():
            row = self.ledger.get(tx)
            assert (row["phone"], row["amount"]) == (phone, amount)
            before, now = self.seen.get(tx), row["status"]
            if before == "succeeded":
                assert now == "succeeded"
            elif before == REJECTED:
                assert now == REJECTED  # nothing was sent: no result moves it
            elif before in FINAL and now != before:
                assert now == "succeeded" and row["receipt"] is not None
            if now == "succeeded":
                assert tx in self.verified_success
            self.seen[tx] = now

    @invariant()
    def one_transaction_per_key(self):
        assert self.keys_on_disk() == self.key_tx


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=soak_examples(60), stateful_step_count=30,
                                     deadline=None)

_CLUSTER = []  # one throwaway PostgreSQL cluster for this module, started on first use


def _postgres_url():
    if not _CLUSTER:
        _CLUSTER.append(postgres_server.Cluster())
        atexit.register(_CLUSTER[0].close)
        _CLUSTER.append(_CLUSTER[0].new_database())
    return _CLUSTER[1]


class PostgresLedgerMachine(LedgerMachine):
    """The same machine on the PostgreSQL ledger: one database, emptied per example."""

    def open_ledger(self):
        import psycopg

        url = _postgres_url()
        ledger = store.open_ledger(url, clock=self.clock, pool_size=2)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("TRUNCATE transactions, idempotency_keys, callbacks, events,"
                         " event_attempts")
        return ledger

    def keys_on_disk(self):
        import psycopg

        with psycopg.connect(_postgres_url()) as conn:
            return dict(conn.execute(
                "SELECT key, tx_id FROM idempotency_keys WHERE scope = 'scope'").fetchall())


if postgres_server.missing() is None:
    TestPostgresLedgerMachine = PostgresLedgerMachine.TestCase
    TestPostgresLedgerMachine.settings = settings(
        # A fiftieth of the SQLite machine's examples under `make soak` (200 of 10,000):
        # each step is a round trip to a server here.
        max_examples=max(10, soak_examples(10) // 50), stateful_step_count=30,
        deadline=None)
else:
    def test_the_postgresql_ledger_machine():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {postgres_server.missing()}")
        pytest.skip(postgres_server.missing())
