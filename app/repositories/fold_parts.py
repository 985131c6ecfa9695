"""Queries on the parts of a version's fold split over workers: created once, claimed and finished by conditional UPDATEs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import FoldPart, FoldPartStatus, Version, VersionStatus

S = FoldPartStatus


def ensure(session: Session, version_id: str, rows: list[dict[str, Any]]) -> None:
    """Create the version's part rows that are not there yet (a redone plan finds the same parts and keeps their progress)."""
    have = {(p.phase, p.index) for p in session.scalars(select(FoldPart).where(FoldPart.version_id == version_id))}
    for row in rows:
        if (row["phase"], row["index"]) in have:
            continue
        try:
            with session.begin_nested():
                session.add(FoldPart(version_id=version_id, **row))
        except IntegrityError:  # another coordinator created it meanwhile: the same row
            pass


def of_version(session: Session, version_id: str, phase: str | None = None) -> list[FoldPart]:
    query = select(FoldPart).where(FoldPart.version_id == version_id)
    if phase is not None:
        query = query.where(FoldPart.phase == phase)
    return list(session.scalars(query.order_by(FoldPart.phase, FoldPart.index)))


def get(session: Session, version_id: str, phase: str, index: int) -> FoldPart | None:
    return session.scalar(
        select(FoldPart).where(FoldPart.version_id == version_id, FoldPart.phase == phase, FoldPart.index == index)
    )


def claim(session: Session, part_id: str, *, owner: str, now: float, lease_seconds: float) -> bool:
    """Take a part: pending, or running under an expired lease (its worker died). One conditional UPDATE decides."""
    result = session.execute(
        update(FoldPart)
        .where(
            FoldPart.id == part_id,
            or_(FoldPart.status == S.pending, and_(FoldPart.status == S.running, FoldPart.lease_expires_at < now)),
        )
        .values(status=S.running, lease_owner=owner, lease_expires_at=now + lease_seconds,
                attempts=FoldPart.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def _update_held(session: Session, part_id: str, owner: str, **values: Any) -> bool:
    """One conditional UPDATE of a running part whose lease ``owner`` still holds; False if it was lost."""
    result = session.execute(
        update(FoldPart)
        .where(FoldPart.id == part_id, FoldPart.lease_owner == owner, FoldPart.status == S.running)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def heartbeat(session: Session, part_id: str, *, owner: str, until: float) -> bool:
    return _update_held(session, part_id, owner, lease_expires_at=until)


def finish(session: Session, part_id: str, *, owner: str, **values: Any) -> bool:
    """Record a part done; False if its lease was lost meanwhile (another worker redoes it, with the same bytes)."""
    return _update_held(session, part_id, owner, status=S.done, lease_owner=None, lease_expires_at=None,
                        finished_at=func.current_timestamp(), **values)


def release(session: Session, part_id: str, *, owner: str) -> None:
    """Give a part back (a transient failure): pending again, for its retry."""
    _update_held(session, part_id, owner, status=S.pending, lease_owner=None, lease_expires_at=None)


def done_fraction(session: Session, version_id: str) -> float:
    total = session.scalar(select(func.count()).where(FoldPart.version_id == version_id)) or 0
    done = session.scalar(select(func.count()).where(FoldPart.version_id == version_id, FoldPart.status == S.done)) or 0
    return done / total if total else 0.0


def set_outcome(session: Session, version_id: str, *, owner: str, outcome: dict[str, Any]) -> bool:
    """Record the reduction's outcome on the version, while this plan's owner holds it."""
    result = session.execute(
        update(Version)
        .where(Version.id == version_id, Version.lease_owner == owner, Version.status == VersionStatus.running)
        .values(fold_outcome=outcome)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def forget(session: Session, version_id: str) -> None:
    """Drop a version's part rows (a failed fold redone from scratch re-plans them)."""
    session.execute(delete(FoldPart).where(FoldPart.version_id == version_id))
