"""Stream, expert and version I/O models (DESIGN §3)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer

# Names are labels shown back to people: printable text only (PostgreSQL also refuses NUL in text).
NAME_PATTERN = r"^[^\x00-\x1f\x7f]*$"


def _utc(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive datetimes; we store UTC
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


class StreamCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN, description="a label; no control characters")
    method: str = Field(default="opcm", description='"opcm" (default) or a baseline: average, task_arithmetic, ties, magmax')
    params: dict[str, Any] = Field(default_factory=dict, description="method hyper-parameters; defaults filled in")


class ExpertPublic(BaseModel):
    id: str
    name: str
    sha256: str
    size: int
    metadata: dict[str, Any] | None = None
    created_at: datetime

    _ser = field_serializer("created_at")(lambda self, v: _utc(v))


class BasePublic(BaseModel):
    sha256: str
    size: int


class VersionError(BaseModel):
    code: str | None
    message: str


class VersionPublic(BaseModel):
    number: int
    status: str = Field(description="queued, running, succeeded, failed or skipped (left out by an operator)")
    parent: int | None = Field(description="number of the version this one was folded from")
    expert: ExpertPublic | None = Field(description="the expert folded in (null for version 0, the base)")
    progress: float
    metrics: dict[str, Any] | None = None
    error: VersionError | None = None
    attempts: int = 0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    sha256: str | None = None
    size: int | None = None

    _ser = field_serializer("created_at", "started_at", "finished_at")(lambda self, v: _utc(v))


class StreamPublic(BaseModel):
    id: str
    name: str
    method: str
    params: dict[str, Any]
    base: BasePublic | None
    version_count: int = Field(description="highest version number handed out (queued ones included)")
    latest_version: VersionPublic | None = Field(description="the newest succeeded version")
    created_at: datetime

    _ser = field_serializer("created_at")(lambda self, v: _utc(v))


class StreamList(BaseModel):
    streams: list[StreamPublic]


class VersionList(BaseModel):
    versions: list[VersionPublic]


class UploadAccepted(BaseModel):
    expert: ExpertPublic
    version: VersionPublic
