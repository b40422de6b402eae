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
    """Bad configuration: a setting, the configuration file, a missing tool or master key."""

    code = "invalid_config"
    http_status = 500
    exit_code = 2
    error_type = "server_error"


class InvalidRequest(GarrisonError):
    """Bad arguments or input (the request, the file, the parameters)."""

    code = "invalid_request"
    http_status = 400
    exit_code = 2
    error_type = "invalid_request_error"


class AuthenticationError(GarrisonError):
    """No API key, or one that is wrong, revoked or expired."""

    code = "invalid_api_key"
    http_status = 401
    exit_code = 3
    error_type = "invalid_request_error"


class PermissionDenied(GarrisonError):
    """The key lacks the scope or the grant, or the transport is not private enough."""

    code = "permission_denied"
    http_status = 403
    exit_code = 3
    error_type = "invalid_request_error"


class NotFound(GarrisonError):
    """No such model, dataset, job, key or file."""

    code = "not_found"
    http_status = 404
    exit_code = 4
    error_type = "invalid_request_error"


class Conflict(GarrisonError):
    """Conflicts with the current state: it exists already, it is in use or finished, a daemon runs."""

    code = "conflict"
    http_status = 409
    exit_code = 5
    error_type = "invalid_request_error"


class RequestTimeout(GarrisonError):
    """The request (its body) did not arrive within the server's time limit."""

    code = "request_timeout"
    http_status = 408
    exit_code = 2
    error_type = "invalid_request_error"


class PayloadTooLarge(GarrisonError):
    """An upload larger than `max_upload_mb`."""

    code = "payload_too_large"
    http_status = 413
    exit_code = 2
    error_type = "invalid_request_error"


class RateLimited(GarrisonError):
    """Too many requests waiting for the model: retry after `Retry-After`."""

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
    """Integrity failure: the audit chain, an artifact's hash or signature, a vault chunk."""

    code = "integrity_error"
    http_status = 500
    exit_code = 8


class JobFailed(GarrisonError):
    """The job failed (its error code says why)."""

    code = "job_failed"
    http_status = 500
    exit_code = 9


class Unavailable(GarrisonError):
    """The daemon or a model cannot answer now: not running, shutting down, out of memory, crashed."""

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
    408: RequestTimeout, 413: PayloadTooLarge, 429: RateLimited, 503: Unavailable, 504: Unavailable,
}


# Codes raised with a class whose HTTP status another class shares (500): the status alone cannot
# tell them apart, so the client maps these codes back to their class, and a command acting through
# the daemon exits as it would in process (`garrison run` on a tampered model: 8, not 1).
# tests/test_errors.py reads every raise site in garrison/ and keeps this table complete.
CODES_SHARING_A_STATUS: dict[type[GarrisonError], tuple[str, ...]] = {
    ConfigError: ("config_invalid_value", "config_not_found", "config_syntax", "config_unknown_key",
                  "config_unreadable", "converter_missing", "llama_cpp_missing", "master_key_exposed",
                  "master_key_invalid", "master_key_missing", "master_key_readonly", "tls_certificate_invalid"),
    CatalogError: ("catalog_schema_newer",),
    IntegrityError: ("artifact_file_missing", "artifact_hash_mismatch", "artifact_unsigned", "audit_anchor_invalid",
                     "audit_chain_broken", "audit_rewritten", "audit_truncated", "backup_invalid",
                     "checkpoint_unreadable", "identity_unreadable", "master_key_mismatch",
                     "response_corrupt", "rotation_key_missing", "rotation_verify_failed", "signature_invalid",
                     "vault_chunk_corrupt",
                     "vault_chunk_count_mismatch",
                     "vault_chunk_reordered", "vault_file_missing", "vault_header_invalid", "vault_key_unwrap_failed",
                     "vault_record_invalid", "vault_size_mismatch", "vault_trailing_data", "vault_truncated"),
    JobFailed: ("adapter_base_missing", "base_parity_failed", "distill_no_output", "finetune_no_output",
                "parity_failed", "tokenizer_mismatch", "training_failed"),
}
_BY_CODE: dict[str, type[GarrisonError]] = {
    code: cls for cls, codes in CODES_SHARING_A_STATUS.items() for code in (cls.code, *codes)}


def from_http(status: int, body: Any) -> GarrisonError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return GarrisonError(f"HTTP {status}: {str(body)[:200]}")
    code = error.get("code") or None
    by_code = _BY_CODE.get(str(code))
    cls = by_code if by_code is not None and by_code.http_status == status else _BY_STATUS.get(status, GarrisonError)
    return cls(str(error.get("message", "")), code=code, param=error.get("param"))
