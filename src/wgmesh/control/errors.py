"""Control-plane failures, each with the HTTP status and the short code the API returns.

The server turns any :class:`ControlError` into ``{"error": code, "message": ...}``
with its status; the client raises :class:`ControlAPIError` from such a body, so
both ends speak the same vocabulary.
"""

from __future__ import annotations

from typing import Any, ClassVar

from wgmesh.errors import WgmeshError

__all__ = ["BadRequest", "Conflict", "ControlAPIError", "ControlError", "Forbidden",
           "NotFound", "ResourcesExhausted", "StorageFull", "TooLarge", "TooManyRequests",
           "Unauthorized", "Unprocessable"]


class ControlError(WgmeshError):
    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class BadRequest(ControlError):
    pass


class Unauthorized(ControlError):
    status, code = 401, "unauthorized"


class Forbidden(ControlError):
    status, code = 403, "forbidden"


class NotFound(ControlError):
    status, code = 404, "not_found"


class Conflict(ControlError):
    status, code = 409, "conflict"


class Unprocessable(ControlError):
    """Well-formed but refused on its merits (a lock update that does not verify)."""

    status, code = 422, "unprocessable"


class TooLarge(ControlError):
    status, code = 413, "too_large"


class TooManyRequests(ControlError):
    """Refused for now; ``retry_after_s`` becomes the ``Retry-After`` header."""

    status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StorageFull(ControlError):
    """The database's disk is full: the transaction was rolled back, nothing changed."""

    status, code = 507, "insufficient_storage"

    def __init__(self) -> None:
        super().__init__("the control database is out of disk space; nothing was changed")


class ResourcesExhausted(ControlError):
    """The database is out of memory, connections or another limit: nothing changed, and
    unlike a full disk it usually passes by itself, so the caller may try again."""

    status, code = 503, "database_unavailable"

    def __init__(self, what: str) -> None:
        super().__init__(f"the control database is out of resources ({what}); nothing was "
                         "changed, try again")


class ControlAPIError(WgmeshError):
    """The server answered with an error (client side)."""

    def __init__(self, status: int, code: str, message: str,
                 details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{message} (HTTP {status} {code})")
        self.status, self.code, self.message = status, code, message
        self.details = details or []
