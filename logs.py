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

    def filter(self, record):
        # The request id may be the caller's X-Request-Id: scrubbed like a message (once
        # per request: the last one is remembered).
        rid = getattr(record, "request_id", None)
        if rid is not None and not _GENERATED_ID.fullmatch(rid):
            if rid != self._last_id[0]:
                self._last_id = (rid, self.scrub(rid))
            record.request_id = self._last_id[1]
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


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, separators=(",", ":"), default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s %(message)s"


def configure(level="INFO", fmt="text", secret_values=(), stream=None):
    """Install the one handler on the root logger (idempotent)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter(secret_values))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_mpesa_wsgi", False)]:
        root.removeHandler(old)
    handler._mpesa_wsgi = True
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # its DEBUG lines carry URLs
    # Per-record work nobody reads here (logging HOWTO, "Optimization"): caller frame,
    # thread and process names.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    return handler
