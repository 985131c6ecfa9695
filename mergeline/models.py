"""What the API answers, as typed objects (DESIGN §3). Unknown fields are kept (``extra="allow"``):
the server may add fields, and an older client must still read the answer."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class Expert(_Answer):
    id: str
    name: str
    sha256: str
    size: int
    metadata: dict[str, Any] | None = None
    created_at: datetime | None = None


class VersionError(_Answer):
    code: str | None = None
    message: str = ""


class Evaluation(_Answer):
    evaluator: str
    metrics: dict[str, float] | None = None
    status: str | None = None  # queued, running, succeeded or failed
    created_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None


class Version(_Answer):
    number: int
    status: str
    parent: int | None = None
    expert: Expert | None = None
    progress: float = 0.0
    metrics: dict[str, Any] | None = None
    error: VersionError | None = None
    attempts: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    sha256: str | None = None
    size: int | None = None
    stream_id: str | None = None  # the stream it belongs to (an @alias may name a replay's)
    evaluations: list[Evaluation] = []

    @property
    def done(self) -> bool:
        """True once the version will change no more (succeeded, failed or skipped)."""
        return self.status in ("succeeded", "failed", "skipped")


class Base(_Answer):
    sha256: str
    size: int


class Stream(_Answer):
    id: str
    name: str
    method: str
    params: dict[str, Any] = {}
    base: Base | None = None
    version_count: int = 0
    latest_version: Version | None = None
    created_at: datetime | None = None
    replay_of: str | None = None
    evaluator: dict[str, Any] | None = None
    champion: dict[str, Any] | None = None


class Accepted(_Answer):
    """An expert upload's answer: the expert and the version that folds it."""

    expert: Expert
    version: Version
    created: bool | None = None  # set by the client: True for a 202 (new), False for a 200 (these bytes were known)


class SessionFile(_Answer):
    path: str
    size: int
    sha256: str
    received: int = 0


class UploadSession(_Answer):
    id: str
    status: str
    files: list[SessionFile] = []
    expires_at: datetime | None = None


class FileReceived(_Answer):
    path: str
    received: int
    complete: bool


class VersionFile(_Answer):
    path: str
    size: int
    sha256: str
    url: str | None = None


class Alias(_Answer):
    """A name for a version (``@name`` wherever a version is asked for), with every move kept (§3.2)."""

    name: str
    stream_id: str
    version: int
    updated_at: datetime | None = None
    history: list[dict[str, Any]] = []  # {"who", "at", "from": {"stream_id", "number"} | null, "to": {...}}
