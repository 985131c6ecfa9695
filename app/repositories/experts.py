"""Queries on experts."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Expert


def add(session: Session, expert: Expert) -> Expert:
    session.add(expert)
    session.flush()
    return expert


def get(session: Session, expert_id: str) -> Expert | None:
    return session.get(Expert, expert_id)


def by_sha256(session: Session, stream_id: str, sha256: str) -> Expert | None:
    return session.scalar(select(Expert).where(Expert.stream_id == stream_id, Expert.sha256 == sha256))


def by_ids(session: Session, ids: list[str]) -> dict[str, Expert]:
    if not ids:
        return {}
    return {e.id: e for e in session.scalars(select(Expert).where(Expert.id.in_(ids)))}
