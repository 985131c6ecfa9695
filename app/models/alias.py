"""Aliases: names for versions (``@production``, ``@champion``), and every move of each one."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, new_id, utcnow


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("stream_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    stream_id: Mapped[str] = mapped_column(ForeignKey("streams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    # A succeeded version of this stream or of one of its replays.
    version_id: Mapped[str] = mapped_column(ForeignKey("versions.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AliasMove(Base):
    """One move of an alias (its creation has no ``from``): kept forever, oldest first."""

    __tablename__ = "alias_moves"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    alias_id: Mapped[str] = mapped_column(ForeignKey("aliases.id", ondelete="CASCADE"), index=True)
    from_version_id: Mapped[str | None] = mapped_column(ForeignKey("versions.id"))
    to_version_id: Mapped[str] = mapped_column(ForeignKey("versions.id"))
    # The tenant's name for a PUT, "champion-policy" for the policy's moves.
    who: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
