"""Upload session I/O models (DESIGN §3.1)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from app.schemas.streams import NAME_PATTERN, _utc


class DeclaredFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Paths are checked by the service's path rules (with a sentence per rule); this bound only
    # keeps absurd strings out of the error messages.
    path: str = Field(
        max_length=4096, description="relative, '/'-separated; no '..', '.', empty parts, NUL, '\\\\' or drive letters"
    )
    size: int = Field(ge=0, description="bytes")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256 of the file's bytes")


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["base", "expert"]
    name: str | None = Field(default=None, max_length=200, pattern=NAME_PATTERN, description="a label for the expert")
    files: list[DeclaredFile] = Field(min_length=1, description="every file of the checkpoint, declared up front")


class UploadFilePublic(BaseModel):
    path: str
    size: int
    sha256: str
    received: int = Field(description="bytes staged: a resumed PUT sends Content-Range: bytes {received}-{size-1}/{size}")
    complete: bool


class UploadSessionPublic(BaseModel):
    id: str
    stream_id: str
    role: str
    name: str | None
    kind: str = Field(description="file, model_folder or adapter")
    status: str = Field(description="open, completed, abandoned or expired")
    files: list[UploadFilePublic]
    created_at: datetime
    expires_at: datetime

    _ser = field_serializer("created_at", "expires_at")(lambda self, v: _utc(v))


class FileProgress(BaseModel):
    path: str
    received: int
    complete: bool
