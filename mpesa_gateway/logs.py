"""Logging for the serving process: request ids, text or JSON lines, redaction.

Owns the logging setup done once by the entry point (library modules only call
`logging.getLogger(__name__)`): one stderr handler whose filters stamp every
record with the current request id and redact secrets, full phone numbers
and the phone digits of CheckoutRequestIDs from the formatted message, and a text or JSON formatter. The request id lives
in a `contextvars.ContextVar` set by the WSGI callable for the duration of one
request, so lines logged deep in the client or the ledger carry it too without
passing it through every call.
"""

import contextvars
import json
import logging
import random
import re
import sys
import time

REQUEST_ID = contextvars.ContextVar("request_id", default="-")
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_GENERATED_ID = re.compile(r"[0-9a-f]{16}|-")  # ours (request_id_from), or none: nothing to scrub
# 2547XXXXXXXX / 07XXXXXXXX / +254… not inside a longer number.
# Not inside a longer token: a transaction id's random hex can hold such a run of digits.
_MSISDN = re.compile(r"(?<![0-9A-Za-z])(\+?254|0)([17])[0-9]{5}([0-9]{3})(?![0-9A-Za-z])")
# A caller's request id is its own token: a phone number inside it, glued to letters or cut
# by separators (tel254712345678, 0712-345-678), hides the whole id from the log.
_ID_SEPARATORS = re.compile(r"[._:-]")
_PHONE_IN_ID = re.compile(r"(?<![0-9])(?:254|0)[17][0-9]{8}(?![0-9])")
# A callback path keeps its template shape but loses the signature.
_CALLBACK_PATH = re.compile(r"(/callback/[^/\s]+/)[0-9A-Fa-f]{8,}")
# A CheckoutRequestID ends with the last 9 digits of the customer's phone.
_CHECKOUT_ID = re.compile(r"(ws_CO_[0-9]{5,})[0-9]{6}([0-9]{3})(?![0-9])")


def request_id_from(header):
    """The caller's X-Request-Id when it is a sane token, else a new one."""
    if header and _SANE_ID.fullmatch(header):
        return header
    # A correlation id, not a secret: no need for a getrandom() syscall per request.
    return f"{random.getrandbits(64):016x}"


class ContextFilter(logging.Filter):
    def filter(self, record):
        record.request_id = REQUEST_ID.get()
        return True


class RedactFilter(logging.Filter):
    """Last line of defence: scrub secrets and phone numbers from the final message."""

    def __init__(self, secret_values=()):
        super().__init__()
        self._secrets = tuple(s for s in secret_values if s and len(s) >= 6)
        self._last_id = (None, None)  # (request id, scrubbed); replaced whole

    def scrub(self, text):
        for value in self._secrets:
            if value in text:
                text = text.replace(value, "[REDACTED]")
        text = _MSISDN.sub(r"\1\2******\3", text)
        text = _CHECKOUT_ID.sub(r"\1******\2", text)
        return _CALLBACK_PATH.sub(r"\1[REDACTED]", text)

    def clean_request_id(self, rid):
        """The request id may be the caller's X-Request-Id: scrubbed like a message (once
        per request: the last one is remembered)."""
        if rid is None or _GENERATED_ID.fullmatch(rid):
            return rid
        if rid != self._last_id[0]:
            hides_a_phone = _PHONE_IN_ID.search(_ID_SEPARATORS.sub("", rid))
            self._last_id = (rid, "[REDACTED]" if hides_a_phone else self.scrub(rid))
        return self._last_id[1]

    def filter(self, record):
        rid = getattr(record, "request_id", None)
        if rid is not None:
            record.request_id = self.clean_request_id(rid)
        if getattr(record, "sanitized", False):
            return True  # built only from templates, numbers, ids and masked phones
        message = record.getMessage()
        clean = self.scrub(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


def json_line(ts, level, logger, request_id, msg, fields, exc=None):
    """One JSON log line (the formatter's, and the access fast path's)."""
    entry = {"ts": ts, "level": level, "logger": logger, "request_id": request_id, "msg": msg}
    entry.update(fields)
    if exc:
        entry["exc"] = exc
    return json.dumps(entry, separators=(",", ":"), default=str)


class JsonFormatter(logging.Formatter):
    def format(self, record):
        return json_line(
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z", record.levelname, record.name,
            getattr(record, "request_id", "-"), record.getMessage(),
            getattr(record, "fields", {}), record.exc_text)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s %(message)s"
ACCESS = "mpesa_wsgi.access"
_ours = None  # the _Lines of the handler configure() installed, for the access fast path


class _Lines:
    """The access line's fast path: the same bytes the handler would write for it (text or
    JSON, the request id scrubbed, the time with its milliseconds), made without a
    LogRecord, a filter chain or a per-line strftime, and written under the handler's
    lock. Used only while that handler is the root's only one and the access logger is
    plainly enabled (anything else, e.g. a test's capture, takes the logging path)."""

    def __init__(self, handler, redact, json_lines):
        self.handler, self._redact, self._json = handler, redact, json_lines
        self._stamp = (None, "")  # (second, its text): replaced whole
        self._access = logging.getLogger(ACCESS)
        self._root = logging.getLogger()
        self._filters, self._formatter = list(handler.filters), handler.formatter

    def usable(self):
        """Would logging write exactly this line to exactly this handler?"""
        handler = self.handler
        if (self._root.handlers != [handler] or self._root.filters
                or handler.filters != self._filters or handler.formatter is not self._formatter
                or handler.level > logging.INFO or not self._access.isEnabledFor(logging.INFO)):
            return False
        logger = self._access
        while logger is not self._root:  # the access logger and its parents: plain
            if logger.handlers or logger.filters or logger.disabled or not logger.propagate:
                return False
            logger = logger.parent
        return True

    def _time(self, now):
        second = int(now)
        seen, stamp = self._stamp
        if second != seen:  # one strftime a second, not one a line
            stamp = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                     if self._json else
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
            self._stamp = (second, stamp)
        return stamp, int((now - second) * 1000)

    def access(self, message, fields):
        stamp, ms = self._time(time.time())
        rid = self._redact.clean_request_id(REQUEST_ID.get())
        if self._json:
            line = json_line(f"{stamp}.{ms:03d}Z", "INFO", ACCESS, rid, message, fields)
        else:
            line = f"{stamp},{ms:03d} INFO {ACCESS} request_id={rid} {message}"
        handler = self.handler
        handler.acquire()
        try:
            handler.stream.write(line + handler.terminator)
            try:
                handler.stream.flush()
            except Exception:  # noqa: BLE001 - written; a failed flush must not repeat it
                pass
        finally:
            handler.release()


def access(message, fields):
    """Write the access line: the fast way when logging is ours alone, else through
    logging (same text). `message` is sanitized (templates, numbers, masked phones)."""
    lines = _ours
    if lines is not None and lines.usable():
        try:
            return lines.access(message, fields)
        except Exception:  # noqa: BLE001 - a broken stream: let logging report it
            pass
    logging.getLogger(ACCESS).info(message, extra={"sanitized": True, "fields": fields})


def configure(level="INFO", fmt="text", secret_values=(), stream=None):
    """Install the one handler on the root logger (idempotent)."""
    global _ours
    handler = logging.StreamHandler(stream or sys.stderr)
    redact = RedactFilter(secret_values)
    handler.addFilter(ContextFilter())
    handler.addFilter(redact)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_mpesa_wsgi", False)]:
        root.removeHandler(old)
    handler._mpesa_wsgi = True
    root.addHandler(handler)
    _ours = _Lines(handler, redact, fmt == "json")
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # its DEBUG lines carry URLs
    # psycopg's pool warns at every failed reconnect while a PostgreSQL server is down,
    # and psycopg at every pipeline it cannot end on a lost connection; the gateway says
    # it once (monitoring.LedgerWatch) and counts the failures.
    if level != "DEBUG":
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        logging.getLogger("psycopg").setLevel(logging.ERROR)
    # The logging module's process-wide switches (logging._srcfile, logThreads,
    # logProcesses, logMultiprocessing) stay as they are: other code in this process
    # formats with them (gunicorn's own lines carry %(process)d, which would fail on the
    # None they leave). Turning them off saved about 1.6 µs per record; the hot line, the
    # access line, makes no LogRecord at all (`access` above).
    return handler
