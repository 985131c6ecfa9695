"""Queries on experts."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Expert, Version


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


def stored(session: Session, expert: Expert) -> Expert:
    """The expert row that holds ``expert``'s objects: itself, or for a replay's expert its source's.

    A replay references its source's rows, never copies keys, so whatever the source stores
    for an expert (one file, or a folder's manifest) serves the replay as it is.
    """
    current, hops = expert, 0
    while current.source_expert_id is not None:
        current = session.get(Expert, current.source_expert_id)
        hops += 1
        if current is None or hops > 64:  # pragma: no cover - rows are created pointing at an origin
            raise RuntimeError(f"broken source chain at expert {expert.id}")
    return current


def for_stream_in_arrival_order(session: Session, stream_id: str) -> list[Expert]:
    """The stream's experts in the order their versions were numbered."""
    return list(
        session.scalars(
            select(Expert)
            .join(Version, Version.expert_id == Expert.id)
            .where(Expert.stream_id == stream_id)
            .order_by(Version.number)
        )
    )


def lineage(session: Session, stream_id: str, number: int) -> list[dict[str, str]]:
    """Name and sha256 of the expert of each version 1..number of a stream (skipped ones left out), in order."""
    from app.models import Version, VersionStatus

    rows = session.execute(
        select(Expert.name, Expert.sha256)
        .join(Version, Version.expert_id == Expert.id)
        .where(Version.stream_id == stream_id, Version.number >= 1, Version.number <= number,
               Version.status != VersionStatus.skipped.value)
        .order_by(Version.number)
    ).all()
    return [{"name": name, "sha256": sha256} for name, sha256 in rows]
