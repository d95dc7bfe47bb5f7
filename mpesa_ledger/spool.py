"""The local spool: what Daraja already did, kept on local disk while the ledger is away.

Owns an append-only file of JSON lines, one entry a line, each written and fsynced
before `append()` returns; one file per running process, made at its first entry (mode
0600, in GATEWAY_SPOOL_DIR; the folder is fsynced too, so the file survives a power
cut) and held with an exclusive lock for the life of the process (`fcntl.flock` on
POSIX, `msvcrt.locking` on Windows: the same code serves on both); a write that fails
half-way is cut back to the last whole entry; the entries not yet applied, oldest first,
in memory too; emptying the file once every entry has been applied; reading a spool file
(a torn last line, from a crash in the middle of a write, is skipped with a log line);
adopting the spools no live process holds; and setting aside, in a quarantine file, an
entry that can never be applied. What an entry means, and how it is applied to the
ledger, is the gateway's: the spool keeps and hands back plain dicts, in written order.
"""

import glob
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict

log = logging.getLogger(__name__)

PREFIX = "mpesa-spool-"
SUFFIX = ".jsonl"
QUARANTINE = "mpesa-spool-quarantine.jsonl"  # entries set aside for an operator


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


def _sync_folder(directory):
    """Make a new or removed name in `directory` durable (POSIX; Windows has no way to
    open a folder for that, and its file system journals names)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _line(entry):
    return (json.dumps(entry, separators=(",", ":")) + "\n").encode()


def parse(data, name):
    """The entries in a spool file's bytes, in written order. A last line without its
    newline (torn by a crash mid-write) or a line that is not JSON is skipped and logged."""
    lines = data.split(b"\n")
    if lines[-1]:
        log.warning("spool torn_last_line skipped file=%s bytes=%d", name, len(lines[-1]))
    entries = []
    for n, line in enumerate(lines[:-1], 1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            log.error("spool unreadable_line skipped file=%s line=%d", name, n)
    return entries


def read_entries(path):
    """The entries of the spool file at `path` (an operator's look; see `parse`)."""
    with open(path, "rb") as f:
        return parse(f.read(), os.path.basename(path))


def _read_fd(fd):
    """All of a file through `fd` (the locked one: Windows lets no other handle read a
    region this process has locked)."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _private(st):
    """Is this (os.stat) this process's user's, and nobody else's to write? Always on
    Windows, which has no such modes (its folder permissions are the operator's)."""
    if not hasattr(os, "getuid"):
        return True
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def spool_files(directory):
    return sorted(glob.glob(os.path.join(directory, PREFIX + "[0-9]*" + SUFFIX)))


class Spool:
    """This process's spool. `fsync` is injectable (a test's full disk)."""

    def __init__(self, directory, *, clock=time.time, fsync=os.fsync):
        self.directory = os.path.abspath(directory)
        self.path = None  # made at the first entry
        self._fd = None
        self._size = 0  # bytes of whole, durable entries in the file
        self._clock, self._fsync = clock, fsync
        self._lock = threading.Lock()
        self._entries = OrderedDict()  # id → entry, not yet applied, oldest first

    def probe(self):
        """Can this spool be written, and is its folder this user's alone? None, or why
        not (said at start-up, not first found during an outage)."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            if not _private(os.stat(self.directory)):
                return "it is not this user's alone (others may write to it)"
            probe = os.path.join(self.directory, f".probe-{os.getpid()}-{secrets.token_hex(4)}")
            with open(probe, "wb") as f:
                f.write(b"x")
            os.remove(probe)
        except OSError as exc:
            return exc.strerror or str(exc)
        return None

    def append(self, entry):
        """Keep `entry` (a JSON-able dict; given an `id` and `spooled_at`). True once it is
        durable on disk; False if it could not be written (a full disk, a missing
        directory): then it is kept in memory only, and lost if this process dies."""
        entry = dict(entry, id="sp_" + secrets.token_hex(12), spooled_at=self._clock())
        with self._lock:
            self._entries[entry["id"]] = entry
            try:
                self._write(_line(entry))
            except OSError as exc:
                log.critical("spool write_failed error=%s: the entry is kept in memory only and"
                             " is lost if this process dies; free the disk or fix"
                             " GATEWAY_SPOOL_DIR", exc.strerror or exc)
                return False
        return True

    def _write(self, data):
        """Append `data` and make it durable; on failure, cut the file back to the last
        whole entry (or give it up), so no fragment swallows the next entry."""
        if self._fd is None:
            self._open()
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(28, "short write to the spool")
            self._fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)
                self._fsync(self._fd)
            except OSError:  # the next write starts a new file; this one keeps its entries
                os.close(self._fd)
                self._fd = None
            raise
        self._size += len(data)

    def _open(self):
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        if not _private(os.stat(self.directory)):
            # Another user could plant entries that a later start would adopt as money.
            raise PermissionError(1, "the spool folder is not this user's alone")
        path = os.path.join(self.directory,
                            f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags, 0o600)
        try:
            _hold(fd)
        except OSError:
            os.close(fd)
            raise
        _sync_folder(self.directory)
        self._fd, self.path, self._size = fd, path, 0

    def pending(self):
        """The entries not yet applied, oldest first (a copy)."""
        with self._lock:
            return list(self._entries.values())

    def applied(self, entry):
        """`entry` is in the ledger now. Once none is left, the file is emptied."""
        with self._lock:
            self._entries.pop(entry.get("id"), None)
            if not self._entries and self._fd is not None:
                try:
                    os.ftruncate(self._fd, 0)
                    self._fsync(self._fd)
                    self._size = 0
                except OSError as exc:  # a later start replays them; each applies once
                    log.error("spool truncate_failed error=%s", exc.strerror or exc)

    def set_aside(self, entry, why):
        """An entry that can never be applied (a bug, a row the ledger refuses for good):
        moved to the quarantine file beside the spools, so the entries behind it go on.
        The operator reads it with the spool command."""
        path = os.path.join(self.directory, QUARANTINE)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0),
                         0o600)
            try:
                os.write(fd, _line(dict(entry, quarantined_because=why)))
                self._fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.critical("spool quarantine_failed id=%s error=%s: the entry stays first in the"
                         " spool", entry.get("id"), exc.strerror or exc)
            return False
        log.critical("spool entry set aside id=%s kind=%s tx=%s because=%s: see %s",
                     entry.get("id"), entry.get("kind"), entry.get("tx_id"), why, QUARANTINE)
        self.applied(entry)
        return True

    def depth(self):
        with self._lock:
            return len(self._entries)

    def oldest_age(self):
        """Seconds the oldest entry not yet applied has waited, or None."""
        with self._lock:
            oldest = min((e.get("spooled_at") or 0 for e in self._entries.values()),
                         default=None)
        return None if oldest is None else max(0.0, self._clock() - oldest)

    def adopt_orphans(self):
        """Take over the entries of every spool in the directory that no live process
        holds (its process died or was stopped with entries left): they are written into
        this spool, oldest first, and their files removed. Returns how many were adopted."""
        taken = []  # (path, entries)
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
            if entries is not None:
                taken.append((path, entries))
        found_all = [e for _, found in taken for e in found]
        entries = [e for e in found_all if isinstance(e, dict) and isinstance(e.get("id"), str)]
        for odd in (e for e in found_all if e not in entries):  # valid JSON, not an entry
            self.set_aside({"line": odd}, "not an entry")
        entries.sort(key=lambda e: e.get("spooled_at") if isinstance(
            e.get("spooled_at"), (int, float)) else 0)
        if not entries:
            for path, _ in taken:
                self._remove(path)
            return 0
        with self._lock:
            try:
                for entry in entries:
                    self._entries[entry["id"]] = entry
                    self._write(_line(entry))
            except OSError as exc:
                log.critical("spool adopt_failed error=%s: the orphans are left as they are"
                             " and tried again at the next start", exc.strerror or exc)
                return 0
        _sync_folder(self.directory)  # their copies are durable before the orphans go
        for path, found in taken:
            self._remove(path)
            if found:
                log.warning("spool adopted=%d file=%s", len(found), os.path.basename(path))
        return len(entries)

    def _take(self, path):
        """An orphan's entries, read through its lock; None if a live process holds it.
        The lock is released before the caller removes it (Windows cannot remove an open
        file)."""
        fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0))
        try:
            try:
                _hold(fd)
            except OSError:
                return None
            st = os.fstat(fd)
            if not (_private(st) and (st.st_mode & 0o077) == 0):
                # Only what this user wrote, mode 0600: anything else is not a spool of ours.
                log.critical("spool not_adopted file=%s: not this user's, or readable or"
                             " writable by others", os.path.basename(path))
                return None
            return parse(_read_fd(fd), os.path.basename(path))
        finally:
            os.close(fd)

    @staticmethod
    def _remove(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # Windows: someone has it open; each entry applies once
            log.error("spool remove_failed file=%s error=%s: adopted again at the next"
                      " start", os.path.basename(path), exc.strerror or exc)

    def close(self):
        """Release the file: removed when empty, kept (for the next start) when not."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            os.close(fd)
            if not self._entries:
                self._remove(self.path)
            else:
                log.warning("spool left entries=%d file=%s: the next start applies them",
                            len(self._entries), os.path.basename(self.path))
