"""Upload sessions (DESIGN §3.1): a declared list of files, sent one at a time and resumably,
accepted as a checkpoint only at ``complete``, all at once."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class UploadStatus(enum.StrEnum):
    open = "open"
    completed = "completed"
    abandoned = "abandoned"
    expired = "expired"


class UploadSession(Base):
    __tablename__ = "upload_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    stream_id: Mapped[str] = mapped_column(ForeignKey("streams.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))  # "base" or "expert"
    name: Mapped[str | None] = mapped_column(String(200))
    # What the declared file list is: "file" (one .safetensors), "model_folder" or "adapter".
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=UploadStatus.open.value, index=True)
    file_count: Mapped[int] = mapped_column(Integer)
    total_size: Mapped[int] = mapped_column(BigInteger)
    # What ``complete`` answered (expert id, version number), so a retried complete answers the same.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Moved forward by every write; past it, the sweep removes the session's files.
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class UploadFile(Base):
    __tablename__ = "upload_files"
    __table_args__ = (UniqueConstraint("session_id", "path"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    session_id: Mapped[str] = mapped_column(ForeignKey("upload_sessions.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # Bytes durably staged: where the next PUT continues (S3: whole parts only).
    received: Mapped[int] = mapped_column(BigInteger, default=0)
    # Whole, its sha256 verified and its content validated: staged at its key, waiting for complete.
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    # The store's state of the partial file (S3: the multipart upload id and its parts).
    staging: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The last few durable bytes (hex): a resumed NaN/Inf scan restarts at an element boundary with them.
    tail: Mapped[str | None] = mapped_column(String(64))
    # A .safetensors file's JSON header, once it has arrived (a resumed PUT validates against it).
    header: Mapped[str | None] = mapped_column(Text)
    # One request writes a file at a time: it holds the file under a lease renewed as bytes arrive.
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
