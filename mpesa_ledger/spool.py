"""The local spool: what Daraja already did, kept on local disk while the ledger is away.

Owns an append-only file of JSON lines, one entry a line, each written and fsynced
before `append()` returns; one file per running process, made at its first entry (mode
0600, in GATEWAY_SPOOL_DIR) and held with an exclusive lock for the life of the process
(`fcntl.flock` on POSIX, `msvcrt.locking` on Windows: the same code serves on both);
the entries not yet applied, oldest first, in memory too; emptying the file once every
entry has been applied; reading a spool file (a torn last line, from a crash in the
middle of a write, is skipped with a log line); and adopting the spools no live process
holds. What an entry means, and how it is applied to the ledger, is the gateway's: the
spool keeps and hands back plain dicts, in written order.
"""

import glob
import json
import logging
import os
import secrets
import threading
import time

log = logging.getLogger(__name__)

PREFIX = "mpesa-spool-"
SUFFIX = ".jsonl"


def _hold(fd):
    """Take the file's exclusive lock without waiting; OSError if a process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # the first byte stands for the file
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def read_entries(path):
    """The entries of a spool file, in written order. A last line without its newline
    (torn by a crash mid-write) or a line that is not JSON is skipped and logged."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines[-1]:
        log.warning("spool torn_last_line skipped file=%s bytes=%d", os.path.basename(path),
                    len(lines[-1]))
    entries = []
    for n, line in enumerate(lines[:-1], 1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            log.error("spool unreadable_line skipped file=%s line=%d", os.path.basename(path),
                      n)
    return entries


def spool_files(directory):
    return sorted(glob.glob(os.path.join(directory, PREFIX + "*" + SUFFIX)))


class Spool:
    """This process's spool. `fsync` is injectable (a test's full disk)."""

    def __init__(self, directory, *, clock=time.time, fsync=os.fsync):
        self.directory = os.path.abspath(directory)
        self.path = None  # made at the first entry
        self._fd = None
        self._clock, self._fsync = clock, fsync
        self._lock = threading.Lock()
        self._entries = []  # not yet applied, oldest first

    def append(self, entry):
        """Keep `entry` (a JSON-able dict; given an `id` and `spooled_at`). True once it is
        durable on disk; False if it could not be written (a full disk, a missing
        directory): then it is kept in memory only, and lost if this process dies."""
        entry = dict(entry, id=secrets.token_hex(16), spooled_at=self._clock())
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self._entries.append(entry)
            try:
                self._write(line)
            except OSError as exc:
                log.critical("spool write_failed error=%s: the entry is kept in memory only and"
                             " is lost if this process dies; free the disk or fix"
                             " GATEWAY_SPOOL_DIR", exc.strerror or exc)
                return False
        return True

    def _write(self, data):
        if self._fd is None:
            self._open()
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(28, "short write to the spool")
        self._fsync(self._fd)

    def _open(self):
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = os.path.join(self.directory,
                            f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags, 0o600)
        try:
            _hold(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd, self.path = fd, path

    def pending(self):
        """The entries not yet applied, oldest first (a copy)."""
        with self._lock:
            return list(self._entries)

    def applied(self, entry):
        """`entry` is in the ledger now. Once none is left, the file is emptied."""
        with self._lock:
            self._entries = [e for e in self._entries if e["id"] != entry["id"]]
            if not self._entries and self._fd is not None:
                try:
                    os.ftruncate(self._fd, 0)
                    self._fsync(self._fd)
                except OSError as exc:  # a later start replays them; each applies once
                    log.error("spool truncate_failed error=%s", exc.strerror or exc)

    def depth(self):
        with self._lock:
            return len(self._entries)

    def oldest_age(self):
        """Seconds the oldest entry not yet applied has waited, or None."""
        with self._lock:
            oldest = self._entries[0]["spooled_at"] if self._entries else None
        return None if oldest is None else max(0.0, self._clock() - oldest)

    def adopt_orphans(self):
        """Take over the entries of every spool in the directory that no live process
        holds (its process died or was stopped with entries left): they are written into
        this spool, in order, and their file removed. Returns how many were adopted."""
        adopted = 0
        for path in spool_files(self.directory):
            if path == self.path:
                continue
            try:
                entries = self._take(path)
            except FileNotFoundError:
                continue  # another process adopted it meanwhile
            except OSError as exc:
                log.critical("spool adopt_failed file=%s error=%s: it is left as it is and"
                             " tried again at the next start", os.path.basename(path),
                             exc.strerror or exc)
                continue
            if entries is None:
                continue  # a live process holds it
            try:
                os.remove(path)  # only once its entries are durable in this spool
            except FileNotFoundError:
                pass
            adopted += len(entries)
            if entries:
                log.warning("spool adopted=%d file=%s", len(entries), os.path.basename(path))
        return adopted

    def _take(self, path):
        """An orphan's entries, written into this spool; None if a live process holds it.
        Its lock is released before the caller removes it (Windows cannot remove an open
        file)."""
        fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
        try:
            try:
                _hold(fd)
            except OSError:
                return None
            entries = read_entries(path)
            with self._lock:
                for entry in entries:
                    self._entries.append(entry)
                    self._write((json.dumps(entry, separators=(",", ":")) + "\n").encode())
            return entries
        finally:
            os.close(fd)

    def close(self):
        """Release the file: removed when empty, kept (for the next start) when not."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            os.close(fd)
            if not self._entries:
                try:
                    os.remove(self.path)
                except OSError:
                    pass
            else:
                log.warning("spool left entries=%d file=%s: the next start applies them",
                            len(self._entries), os.path.basename(self.path))
