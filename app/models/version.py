"""A version of a stream's merge: 0 is the base, n folds the n-th expert into n-1."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class VersionStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    # An operator left this version's expert out (after it failed); its successor folds from its parent.
    skipped = "skipped"


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("stream_id", "number"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    stream_id: Mapped[str] = mapped_column(ForeignKey("streams.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("versions.id"))
    expert_id: Mapped[str | None] = mapped_column(ForeignKey("experts.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=VersionStatus.queued.value, index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # Fold state handed to the next fold (for OPCM: lambda and the expert norms).
    state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    object_key: Mapped[str | None] = mapped_column(String(400))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    # A folder version: its files as [path, size, sha256] (null: one .safetensors object).
    files: Mapped[list[Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A fold split over workers: the reduction's global outcome (OPCM's λ_t) its write phase reads.
    fold_outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The fold lease: which worker attempt holds the version, until when (unix seconds).
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
