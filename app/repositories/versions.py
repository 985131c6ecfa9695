"""Queries on versions, including the fold lease that keeps a stream's folds in order."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from app.models import Version, VersionStatus

S = VersionStatus


def add(session: Session, version: Version) -> Version:
    session.add(version)
    session.flush()
    return version


def get(session: Session, version_id: str) -> Version | None:
    return session.get(Version, version_id)


def by_number(session: Session, stream_id: str, number: int) -> Version | None:
    return session.scalar(select(Version).where(Version.stream_id == stream_id, Version.number == number))


def by_expert(session: Session, expert_id: str) -> Version | None:
    return session.scalar(select(Version).where(Version.expert_id == expert_id))


def latest_succeeded(session: Session, stream_id: str) -> Version | None:
    return session.scalar(
        select(Version)
        .where(Version.stream_id == stream_id, Version.status == S.succeeded)
        .order_by(Version.number.desc())
        .limit(1)
    )


def latest_succeeded_for(session: Session, stream_ids: list[str]) -> dict[str, Version]:
    if not stream_ids:
        return {}
    newest = (
        select(Version.stream_id, func.max(Version.number).label("number"))
        .where(Version.stream_id.in_(stream_ids), Version.status == S.succeeded)
        .group_by(Version.stream_id)
        .subquery()
    )
    rows = session.scalars(
        select(Version).join(
            newest, and_(Version.stream_id == newest.c.stream_id, Version.number == newest.c.number)
        )
    )
    return {v.stream_id: v for v in rows}


def list_for_stream(session: Session, stream_id: str) -> list[Version]:
    return list(session.scalars(select(Version).where(Version.stream_id == stream_id).order_by(Version.number)))


def numbers_by_id(session: Session, ids: list[str]) -> dict[str, int]:
    if not ids:
        return {}
    return dict(session.execute(select(Version.id, Version.number).where(Version.id.in_(ids))).all())


def claim(session: Session, version_id: str, *, owner: str, now: float, lease_seconds: float) -> bool:
    """Take the fold lease on a version: atomically, and only if it is its stream's turn.

    It is the version's turn when it is queued (or running under an expired lease,
    i.e. its worker died) and its parent has succeeded. A single conditional UPDATE
    decides, so two workers can never both win, on PostgreSQL or SQLite alike.
    """
    parent = aliased(Version)
    parent_done = exists().where(parent.id == Version.parent_id, parent.status == S.succeeded)
    result = session.execute(
        update(Version)
        .where(
            Version.id == version_id,
            or_(
                Version.status == S.queued,
                and_(Version.status == S.running, Version.lease_expires_at < now),
            ),
            parent_done,
        )
        .values(
            status=S.running,
            lease_owner=owner,
            lease_expires_at=now + lease_seconds,
            attempts=Version.attempts + 1,
            started_at=func.coalesce(Version.started_at, func.current_timestamp()),
            error=None,
            error_code=None,
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def heartbeat(session: Session, version_id: str, *, owner: str, until: float, progress: float | None) -> bool:
    """Extend the lease (and record progress); False if this owner no longer holds it."""
    values: dict[str, Any] = {"lease_expires_at": until}
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Version)
        .where(Version.id == version_id, Version.lease_owner == owner, Version.status == S.running)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def finish(session: Session, version_id: str, *, owner: str, **values: Any) -> bool:
    """Move a leased version to its final status; False if the lease was lost meanwhile."""
    result = session.execute(
        update(Version)
        .where(Version.id == version_id, Version.lease_owner == owner, Version.status == S.running)
        .values(lease_owner=None, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def release(session: Session, version_id: str, *, owner: str) -> bool:
    """Give the lease back (a transient failure): the version is queued again."""
    result = session.execute(
        update(Version)
        .where(Version.id == version_id, Version.lease_owner == owner, Version.status == S.running)
        .values(status=S.queued, lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def next_after(session: Session, stream_id: str, number: int) -> Version | None:
    return by_number(session, stream_id, number + 1)


def runnable(session: Session, *, now: float) -> list[Version]:
    """Versions whose turn it is (parent succeeded) but that no live worker holds."""
    parent = aliased(Version)
    return list(
        session.scalars(
            select(Version)
            .join(parent, parent.id == Version.parent_id)
            .where(
                parent.status == S.succeeded,
                or_(
                    Version.status == S.queued,
                    and_(Version.status == S.running, Version.lease_expires_at < now),
                ),
            )
            .order_by(Version.stream_id, Version.number)
        )
    )
