"""Errors a caller can act on: each names what is wrong with which input, and carries a stable code.

The service maps ``code`` to an HTTP status; the CLI prints the message. Every one of them is
raised before a fold writes any output.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint, parameter or fold state that cannot be folded, with a message a person can act on."""

    code = "invalid_checkpoint"

    def __init__(self, message: str, *, tensor: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.tensor = tensor


class NotSafetensors(CheckpointError):
    code = "not_safetensors"


class TruncatedCheckpoint(CheckpointError):
    code = "truncated"


class HeaderTooLarge(CheckpointError):
    code = "header_too_large"


class KeyMismatch(CheckpointError):
    code = "key_mismatch"


class ShapeMismatch(CheckpointError):
    code = "shape_mismatch"


class DtypeMismatch(CheckpointError):
    code = "dtype_mismatch"


class UnsupportedDtype(CheckpointError):
    """A floating dtype folds cannot compute on (float8)."""

    code = "unsupported_dtype"


class NonFiniteTensor(CheckpointError):
    code = "non_finite"


class InvalidParams(CheckpointError, ValueError):
    code = "invalid_params"


class InvalidState(CheckpointError, ValueError):
    """The carried fold state does not belong to this stream's previous version."""

    code = "invalid_state"


class MemoryBudgetExceeded(CheckpointError):
    """A tensor's fold cannot fit the fold's memory budget (``MERGELINE_FOLD_MEMORY_BYTES``), even in blocks."""

    code = "memory_budget_exceeded"
