"""A stream: one base model, the experts folded into it, and the versions that result."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Integer, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class Stream(Base):
    __tablename__ = "streams"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The base checkpoint (version 0); null until PUT /base.
    base_sha256: Mapped[str | None] = mapped_column(String(64))
    base_size: Mapped[int | None] = mapped_column(BigInteger)
    # The base's raw safetensors header JSON, kept so expert uploads are checked without a store read.
    base_header: Mapped[str | None] = mapped_column(Text)
    # A folder base: its files as [path, size, sha256] (null: one .safetensors object).
    base_files: Mapped[list[Any] | None] = mapped_column(JSON)
    # Highest version number handed out; bumped with an atomic UPDATE, which also serializes uploads.
    version_count: Mapped[int] = mapped_column(Integer, default=0)
    # Split every fold into this many parts over the workers (null: by MERGELINE_FOLD_SHARD_BYTES).
    fold_parts: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # A replay rebuilds another stream (this one) with its own method, params, order or subset of experts.
    replay_of: Mapped[str | None] = mapped_column(ForeignKey("streams.id", ondelete="CASCADE"), index=True)
    # A champion candidate: every expert accepted later on ``replay_of`` is appended here too.
    follows_source: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # {"name", "params"}: the evaluator plugin the worker runs on each succeeded version.
    evaluator: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # {"metric", "mode", "candidates": [{"method", "params", "stream_id"}]}: who @champion points at.
    champion: Mapped[dict[str, Any] | None] = mapped_column(JSON)
