"""Stream, expert and version I/O models (DESIGN §3)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from app.schemas.common import NAME_PATTERN
from app.schemas.common import utc_iso as _utc
from app.schemas.evaluations import EvaluationPublic, EvaluatorSpec
from app.schemas.replays import ChampionPolicy

__all__ = ["NAME_PATTERN"]


class StreamCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN, description="a label; no control characters")
    method: str = Field(default="opcm", description='"opcm" (default) or a baseline: average, task_arithmetic, ties, magmax')
    params: dict[str, Any] = Field(default_factory=dict, description="method hyper-parameters; defaults filled in")
    evaluator: EvaluatorSpec | None = Field(default=None, description="run on each succeeded version by the worker")
    champion: ChampionPolicy | None = Field(
        default=None, description="candidates run as replays; @champion follows the best (needs `evaluator`)"
    )
    fold_parts: int | None = Field(
        default=None, ge=1, le=4096,
        description="split every fold into about this many parts over the workers (default: by MERGELINE_FOLD_SHARD_BYTES)",
    )


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
    stream_id: str | None = Field(default=None, description="the stream it belongs to (an @alias may name a replay's)")
    evaluations: list[EvaluationPublic] = Field(default_factory=list, description="oldest first")

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
    replay_of: str | None = Field(default=None, description="the stream this one replays")
    evaluator: dict[str, Any] | None = None
    champion: dict[str, Any] | None = Field(default=None, description="the policy, with each candidate's stream_id")
    fold_parts: int | None = Field(default=None, description="how many parts each fold is split into (null: by size)")

    _ser = field_serializer("created_at")(lambda self, v: _utc(v))


class StreamList(BaseModel):
    streams: list[StreamPublic]


class VersionList(BaseModel):
    versions: list[VersionPublic]


class UploadAccepted(BaseModel):
    expert: ExpertPublic
    version: VersionPublic
