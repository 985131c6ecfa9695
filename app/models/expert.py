"""An accepted expert checkpoint (a fine-tune of the stream's base)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class Expert(Base):
    __tablename__ = "experts"
    # A re-sent expert (same bytes) is recognised by its digest: one row per (stream, sha256).
    __table_args__ = (UniqueConstraint("stream_id", "sha256"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    stream_id: Mapped[str] = mapped_column(ForeignKey("streams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    # Null for an expert of a replay: its objects are those of ``source_expert_id`` (nothing is copied).
    object_key: Mapped[str | None] = mapped_column(String(400))
    # The expert row (of the source stream) whose stored objects this replay's expert reuses.
    source_expert_id: Mapped[str | None] = mapped_column(ForeignKey("experts.id"), index=True)
    # The safetensors ``__metadata__`` of the upload (string -> string).
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    # A folder or LoRA adapter expert: its files as [path, size, sha256] (null: one .safetensors object).
    files: Mapped[list[Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
