"""The wire: the JSON codec and the HTTP errors, as every web layer speaks them.

Owns the strict JSON decoder and the compact encoder, the error classes the flows
raise (each carrying its status, code and headers) and the one shape they render to
(`{"error":{"code","message","field"?}}`, SPEC §2), and the status lines. Handlers
return only success; anything else is raised and turned into a response in one place
by each web layer.
"""

import json
from dataclasses import dataclass
from http import HTTPStatus

STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


@dataclass(frozen=True, slots=True)
class Reply:
    """A flow's success: status, body (a dict to encode, or bytes as they are), headers,
    and what the access line should say about it (the transaction and the phone)."""

    status: int
    body: object
    headers: tuple = ()
    tx_id: str | None = None
    phone: str | None = None


class ApiError(Exception):
    """An answer other than success, raised: status, code, message, headers, and (like a
    Reply) the transaction and phone the access line should name, once known."""

    status = 500
    code = "internal_error"
    message = "the gateway failed to handle the request"

    def __init__(self, message=None, *, code=None, field=None, headers=()):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.code = code or self.code
        self.field = field
        self.headers = list(headers)
        self.tx_id = None
        self.phone = None

    def about(self, tx_id=None, phone=None):
        """Name the transaction and phone this answer concerns (those not named yet)."""
        self.tx_id = self.tx_id or tx_id
        self.phone = self.phone or phone
        return self

    def body(self):
        error = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class BadRequest(ApiError):
    status, code, message = 400, "invalid_request", "the request is invalid"


class Unauthorized(ApiError):
    status, code, message = 401, "unauthorized", "a valid 'Authorization: Bearer <key>' is required"


class Forbidden(ApiError):
    status, code, message = 403, "forbidden", "not allowed"


class NotFound(ApiError):
    status, code, message = 404, "not_found", "no such resource"


class MethodNotAllowed(ApiError):
    status, code, message = 405, "method_not_allowed", "method not allowed on this path"


class Conflict(ApiError):
    status, code, message = 409, "conflict", "the request conflicts with the current state"


class PayloadTooLarge(ApiError):
    status, code, message = 413, "payload_too_large", "the request body is too large"


class UnsupportedMediaType(ApiError):
    status, code, message = 415, "unsupported_media_type", "send 'Content-Type: application/json'"


class Unprocessable(ApiError):
    status, code, message = 422, "unprocessable", "the request cannot be processed"


class TooManyRequests(ApiError):
    status, code, message = 429, "rate_limited", "too many requests for this API key"


class NotConfigured(ApiError):
    status, code, message = 501, "not_configured", "this gateway is not configured for that"


class UpstreamRejected(ApiError):
    status, code, message = 502, "daraja_rejected", "Daraja refused the request"


class ServiceUnavailable(ApiError):
    status, code, message = 503, "upstream_unavailable", "Daraja cannot be reached; try again later"


def retry_after(seconds):
    """A Retry-After header for `seconds`, rounded up to a whole second (at least 1)."""
    return [("Retry-After", str(max(1, int(-(-seconds // 1)))))]


# --- the JSON codec -------------------------------------------------------------------


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def decode_json(raw):
    """Strict UTF-8 JSON (no NaN/Infinity); any failure is 400 invalid_json."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("the body is not valid UTF-8 JSON", code="invalid_json") from None


def dumps(body):
    """Compact UTF-8 JSON, the bytes every answer and webhook body is sent as."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
