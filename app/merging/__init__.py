"""mergeline's merging library: fold expert checkpoints into a running merge, streaming safetensors.

Pure: it imports torch, safetensors, pydantic and the standard library only, and nothing else
from ``app``. The service calls :func:`fold_checkpoint`; ``python -m app.merging.cli`` runs it
offline.
"""

from app.merging.engine import FoldResult, fold_checkpoint, fold_state_dicts
from app.merging.errors import (
    CheckpointError,
    DtypeMismatch,
    HeaderTooLarge,
    InvalidParams,
    InvalidState,
    KeyMismatch,
    NonFiniteTensor,
    NotSafetensors,
    ShapeMismatch,
    TruncatedCheckpoint,
)
from app.merging.registry import METHODS, validate_params

__all__ = [
    "METHODS",
    "CheckpointError",
    "DtypeMismatch",
    "FoldResult",
    "HeaderTooLarge",
    "InvalidParams",
    "InvalidState",
    "KeyMismatch",
    "NonFiniteTensor",
    "NotSafetensors",
    "ShapeMismatch",
    "TruncatedCheckpoint",
    "fold_checkpoint",
    "fold_state_dicts",
    "validate_params",
]
