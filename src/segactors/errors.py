"""The error tree. Every rejection carries an HTTP status and the contract's error code."""

from __future__ import annotations

from typing import Any


class SegactorsError(Exception):
    """Root of every error the server raises on purpose."""

    status = 500
    code = "internal"

    def __init__(self, message: str, details: list[Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        return {"error": err}


class BadJSON(SegactorsError):
    status, code = 400, "bad_json"


class Unauthorized(SegactorsError):
    status, code = 401, "unauthorized"


class Forbidden(SegactorsError):
    status, code = 403, "forbidden"


class NotFound(SegactorsError):
    status, code = 404, "not_found"


class Conflict(SegactorsError):
    status, code = 409, "conflict"


class Gone(SegactorsError):
    status, code = 410, "gone"


class TooLarge(SegactorsError):
    status, code = 413, "too_large"


class UnsupportedMediaType(SegactorsError):
    status, code = 415, "unsupported_media_type"


class Invalid(SegactorsError):
    """Valid JSON that breaks the contract (422)."""

    status, code = 422, "invalid"


class Unavailable(SegactorsError):
    """The store cannot make data durable; nothing was acknowledged (503)."""

    status, code = 503, "unavailable"
