"""One part of a version's fold split over workers (app.merging.parts): its phase, its tensors, its progress."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class FoldPartStatus(enum.StrEnum):
    pending = "pending"
    running = "running"
    done = "done"


class FoldPart(Base):
    __tablename__ = "fold_parts"
    __table_args__ = (UniqueConstraint("version_id", "phase", "index"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    version_id: Mapped[str] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    # "fold" (a one-pass method), or "update" then "write" (a method with a global step, OPCM)
    phase: Mapped[str] = mapped_column(String(16))
    index: Mapped[int] = mapped_column(Integer)
    # the part as app.merging.parts.FoldPart: {"file", "names" (storage order), "span", "whole"};
    # and the object its phase writes (deterministic: a redone part overwrites the same bytes)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    object_key: Mapped[str] = mapped_column(String(400))
    status: Mapped[str] = mapped_column(String(16), default=FoldPartStatus.pending.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # like a fold's lease: a worker that died mid-part stops holding it once this passes
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    # per-tensor float64 sums and the method's share, for the reduction and the metrics
    partial: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    seconds: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
