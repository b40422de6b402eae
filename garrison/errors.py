"""The one exception hierarchy of Garrison.

Every failure a user can see is a `GarrisonError` with a stable `code` (part of the
API: clients and scripts match on it), an HTTP status and a CLI exit code. The HTTP
middleware and the CLI each map it once, from these attributes; nothing else
translates errors.
"""

from __future__ import annotations

from typing import Any


class GarrisonError(Exception):
    """Base of every user-visible error; subclasses fix code, status and exit code."""

    code: str = "internal_error"
    http_status: int = 500
    exit_code: int = 1
    # OpenAI's error shape carries a "type"; keep theirs where they have the concept.
    error_type: str = "server_error"
    #: Seconds a client should wait before retrying (the Retry-After header), where that is known.
    retry_after_s: float | None = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.details = details or {}

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's error body, so the official client raises its own exception classes."""
        body: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return {"error": body}


class ConfigError(GarrisonError):
    code = "invalid_config"
    http_status = 500
    exit_code = 2
    error_type = "server_error"


class InvalidRequest(GarrisonError):
    code = "invalid_request"
    http_status = 400
    exit_code = 2
    error_type = "invalid_request_error"


class AuthenticationError(GarrisonError):
    code = "invalid_api_key"
    http_status = 401
    exit_code = 3
    error_type = "invalid_request_error"


class PermissionDenied(GarrisonError):
    code = "permission_denied"
    http_status = 403
    exit_code = 3
    error_type = "invalid_request_error"


class NotFound(GarrisonError):
    code = "not_found"
    http_status = 404
    exit_code = 4
    error_type = "invalid_request_error"


class Conflict(GarrisonError):
    code = "conflict"
    http_status = 409
    exit_code = 5
    error_type = "invalid_request_error"


class PayloadTooLarge(GarrisonError):
    code = "payload_too_large"
    http_status = 413
    exit_code = 2
    error_type = "invalid_request_error"


class RateLimited(GarrisonError):
    code = "rate_limit_exceeded"
    http_status = 429
    exit_code = 6
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class CatalogError(GarrisonError):
    """The catalog cannot be opened or migrated (newer schema, corruption)."""

    code = "catalog_error"
    http_status = 500
    exit_code = 7


class IntegrityError(GarrisonError):
    code = "integrity_error"
    http_status = 500
    exit_code = 8


class JobFailed(GarrisonError):
    code = "job_failed"
    http_status = 500
    exit_code = 9


class Unavailable(GarrisonError):
    code = "unavailable"
    http_status = 503
    exit_code = 10
    error_type = "server_error"


def exit_code_for(exc: BaseException) -> int:
    """The CLI's single mapping from an exception to a process exit code."""
    if isinstance(exc, GarrisonError):
        return exc.exit_code
    return 1


# An error body received over HTTP becomes the same exception class again (CLI client side).
_BY_STATUS: dict[int, type[GarrisonError]] = {
    400: InvalidRequest, 401: AuthenticationError, 403: PermissionDenied, 404: NotFound, 409: Conflict,
    413: PayloadTooLarge, 429: RateLimited, 503: Unavailable, 504: Unavailable,
}


def from_http(status: int, body: Any) -> GarrisonError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return GarrisonError(f"HTTP {status}: {str(body)[:200]}")
    cls = _BY_STATUS.get(status, GarrisonError)
    return cls(str(error.get("message", "")), code=error.get("code") or None, param=error.get("param"))
