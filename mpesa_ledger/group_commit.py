"""Group commit for the SQLite ledger: concurrent writes share one transaction and one fsync.

Owns the ledger's one writing connection and when it commits. A write runs its
statements on that connection inside a SAVEPOINT of the transaction that is open (the
first writer of a batch opens it with BEGIN IMMEDIATE), then waits until that
transaction has committed. Writers that arrive while a COMMIT (its fsync) is under way
wait, then go in one after another; the last one in, when nobody else is waiting,
commits for all of them. So the promises do not weaken: still WAL + synchronous=FULL, a
write returns only after the COMMIT that made it durable, and a write whose statements
fail is rolled back to its savepoint, failing only its own caller. An error that cancels
the whole transaction (a full disk, an I/O error, an interrupt) or a COMMIT that fails
fails every write of its batch: none of them is durable, and no later write joins it.
A BEGIN that cannot get the file's lock (another process holds it past the busy
timeout) fails every writer that was waiting for it at once, not one after another.

No thread of its own: the last writer of a batch commits it. A batch holds at most
MAX_BATCH writes, so a steady stream of writers cannot keep one waiting forever. A
write started from inside another write's statements is refused at once (it could never
go in).
"""

import threading
import time
from contextlib import contextmanager

MAX_BATCH = 64


class _Batch:
    __slots__ = ("writes", "ok", "done", "error")

    def __init__(self):
        self.writes = 0  # writers that went in (at most MAX_BATCH)
        self.ok = 0  # of them, those whose statements succeeded
        self.done = False
        self.error = None  # set: nothing of this batch will be durable; nobody joins it


class GroupCommit:
    def __init__(self, connect, rollback, error_type):
        self._connect = connect  # opens the writing connection (autocommit mode)
        self._rollback = rollback  # ends a failed transaction; False: the connection is gone
        self._error_type = error_type
        self._conn = None
        self._cv = threading.Condition()
        self._inside = False  # a writer is running its statements
        self._waiting = 0  # writers waiting to go in
        self._committing = False
        self._batch = None  # the open transaction
        self._begin_failed = (None, float("-inf"))  # (error, when): BEGIN's last failure
        self._writing = threading.local()  # this thread is inside a write
        self.commits = 0  # writes made durable
        self.batches = 0  # COMMITs (fsyncs) that made them so

    @contextmanager
    def write(self):
        """One write: its statements in a savepoint of the batch's transaction; returns
        once that transaction has committed (raises its failure, or this write's own)."""
        if getattr(self._writing, "active", False):
            raise RuntimeError("a ledger write started inside another write")
        batch, conn = self._enter()
        failure = None
        self._writing.active = True
        try:
            conn.execute("SAVEPOINT w")
            yield conn
            conn.execute("RELEASE w")
            batch.ok += 1
        except BaseException as exc:
            failure = exc
            self._undo(conn, batch, exc)
        finally:
            self._writing.active = False
            with self._cv:
                self._inside = False
                self._cv.notify_all()
        # Even a failed write waits for its batch: the last one in ends the transaction.
        committed = self._await_commit(batch)
        if failure is not None:
            raise failure
        if committed is not None:
            raise committed

    def _enter(self):
        arrived = time.monotonic()
        with self._cv:
            self._waiting += 1
            try:
                while self._inside or self._committing or (
                        self._batch is not None and (self._batch.writes >= MAX_BATCH
                                                     or self._batch.error is not None)):
                    self._cv.wait()
            finally:
                self._waiting -= 1
            self._inside = True
            try:
                if self._batch is None:
                    error, failed_at = self._begin_failed
                    if failed_at >= arrived:  # it failed while this writer waited for it
                        raise error
                    if self._conn is None:
                        self._conn = self._connect()
                    try:
                        self._conn.execute("BEGIN IMMEDIATE")  # waits out other processes
                    except self._error_type as exc:
                        self._begin_failed = (exc, time.monotonic())
                        raise
                    self._batch = _Batch()
            except BaseException:
                self._inside = False
                self._cv.notify_all()
                raise
            self._batch.writes += 1
            return self._batch, self._conn

    def _undo(self, conn, batch, exc):
        """Roll this write back to its savepoint. If that fails, or the error already
        ended the whole transaction, the batch is lost: its COMMIT becomes a rollback for
        every write in it, and nobody else joins it."""
        try:
            conn.execute("ROLLBACK TO w")
            conn.execute("RELEASE w")
        except self._error_type as undo_error:
            batch.error = batch.error or undo_error
        if not conn.in_transaction and batch.error is None:
            batch.error = exc

    def _await_commit(self, batch):
        """Wait for the batch's COMMIT, or make it if this writer is the last one in;
        the COMMIT's error (None if it committed)."""
        with self._cv:
            while not batch.done:
                if (not self._inside and not self._committing and self._batch is batch
                        and (self._waiting == 0 or batch.writes >= MAX_BATCH
                             or batch.error is not None)):
                    self._committing = True
                    break
                self._cv.wait()
            else:
                return batch.error
        self._commit(batch)
        return batch.error

    def _commit(self, batch):
        conn = self._conn
        try:
            if batch.error is not None:
                raise batch.error
            if conn is None:
                raise self._error_type("the ledger was closed")
            conn.execute("COMMIT")
        except BaseException as exc:  # nothing of this batch is durable
            batch.error = batch.error or exc
            try:
                if conn is not None and not self._rollback(conn):
                    self._conn = None  # discarded: the next batch opens a new one
            except BaseException:  # noqa: BLE001 - the bookkeeping below must happen
                self._conn = None
        finally:
            with self._cv:
                if batch.error is None and batch.ok:
                    self.commits += batch.ok
                    self.batches += 1
                batch.done = True
                self._batch = None
                self._committing = False
                self._cv.notify_all()

    def close(self):
        with self._cv:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
