"""Errors that cross module boundaries; each knows its API code and HTTP status."""

from __future__ import annotations


class SigmaError(Exception):
    """Base error: a machine-readable code, a message for people, an optional field path."""

    code = "internal"
    status = 500

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, object]:
        """The API error body: `{"error": {"code", "message", "field"}}`."""
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class SpecError(SigmaError):
    """A spec or request body is invalid; `field` is the path of the bad field."""

    code = "invalid"
    status = 400

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason, field or None)


class NotFound(SigmaError):
    code = "not_found"
    status = 404


class Conflict(SigmaError):
    """A compare-and-swap lost against a concurrent writer."""

    code = "conflict"
    status = 409


class Unauthorized(SigmaError):
    code = "unauthorized"
    status = 401


class Forbidden(SigmaError):
    """The token is valid but its role or namespaces do not allow the call."""

    code = "forbidden"
    status = 403


class TooManyRequests(SigmaError):
    """A per-token cap (requests in flight, event streams) is reached."""

    code = "too_many_requests"
    status = 429


class StoreUnavailable(SigmaError):
    """etcd could not be reached within the retry budget."""

    code = "store_unavailable"
    status = 503


class EngineError(SigmaError):
    """A Docker engine call failed; `status` carries the engine's HTTP status if any."""

    code = "engine"
    status = 502

    def __init__(self, message: str, engine_status: int = 0) -> None:
        super().__init__(message)
        self.engine_status = engine_status
