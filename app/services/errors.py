"""Errors a service raises; the API turns each into ``{"error": {"code", "message"}}`` with its status."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.extra: dict[str, object] = {}

    def with_extra(self, **extra: object) -> ServiceError:
        """Add fields beside ``code`` and ``message`` in the error body (what a client acts on, e.g. ``received``)."""
        self.extra.update(extra)
        return self


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class Unavailable(ServiceError):
    status_code = 503
    code = "unavailable"


# CheckpointError.code (app.merging) -> HTTP status.
CHECKPOINT_STATUS = {
    "not_safetensors": 400,
    "truncated": 400,
    "header_too_large": 413,
    "key_mismatch": 422,
    "shape_mismatch": 422,
    "dtype_mismatch": 422,
    "unsupported_dtype": 422,
    "non_finite": 422,
    "invalid_params": 422,
    "invalid_state": 422,
    "trailing_data": 400,
    "invalid_checkpoint": 400,
    "invalid_folder": 422,
    "invalid_path": 400,
    "invalid_adapter": 422,
}
