"""Queries on evaluations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.models import Evaluation, EvaluationStatus

E = EvaluationStatus


def add(session: Session, evaluation: Evaluation) -> Evaluation:
    session.add(evaluation)
    session.flush()
    return evaluation


def get(session: Session, evaluation_id: str) -> Evaluation | None:
    return session.get(Evaluation, evaluation_id)


_COLUMNS = (
    Evaluation.version_id,
    Evaluation.evaluator,
    Evaluation.metrics,
    Evaluation.status,
    Evaluation.created_at,
    Evaluation.finished_at,
    Evaluation.error,
)


def rows_for_versions(conn: Connection | Session, version_ids: list[str]) -> list[Any]:
    """The evaluations of these versions, oldest first (plain rows: the listing and the hot path share it)."""
    if not version_ids:
        return []
    return list(
        conn.execute(
            select(*_COLUMNS)
            .where(Evaluation.version_id.in_(version_ids))
            .order_by(Evaluation.created_at, Evaluation.id)
        ).all()
    )


def count_for_version(session: Session, version_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Evaluation).where(Evaluation.version_id == version_id)) or 0


def for_version(session: Session, version_id: str) -> list[Evaluation]:
    return list(
        session.scalars(
            select(Evaluation).where(Evaluation.version_id == version_id).order_by(Evaluation.created_at, Evaluation.id)
        )
    )


def claim(session: Session, evaluation_id: str, *, owner: str, now: float, lease_seconds: float) -> bool:
    """Take an evaluation (queued, or running under a lapsed lease): one conditional UPDATE decides."""
    result = session.execute(
        update(Evaluation)
        .where(
            Evaluation.id == evaluation_id,
            or_(
                Evaluation.status == E.queued,
                and_(Evaluation.status == E.running, Evaluation.lease_expires_at < now),
            ),
        )
        .values(status=E.running, lease_owner=owner, lease_expires_at=now + lease_seconds, attempts=Evaluation.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def finish(session: Session, evaluation_id: str, *, owner: str, **values: Any) -> bool:
    result = session.execute(
        update(Evaluation)
        .where(Evaluation.id == evaluation_id, Evaluation.lease_owner == owner, Evaluation.status == E.running)
        .values(lease_owner=None, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def runnable(session: Session, *, now: float) -> list[str]:
    """Evaluations no live worker holds: queued ones, and running ones whose worker died."""
    return list(
        session.scalars(
            select(Evaluation.id)
            .where(
                or_(
                    Evaluation.status == E.queued,
                    and_(Evaluation.status == E.running, Evaluation.lease_expires_at < now),
                )
            )
            .order_by(Evaluation.created_at)
        )
    )


def take_stalled(session: Session, *, now: float, quiet_for: float) -> list[str]:
    """Evaluations no live worker runs: running under a lapsed lease (a dead worker), or queued for
    longer than ``quiet_for`` (a lost message). Each is handed out once per ``quiet_for`` seconds
    (the conditional UPDATE lets one sweeper take it), as the fold sweep does."""
    cutoff = datetime.fromtimestamp(now - quiet_for, UTC)
    expired = and_(Evaluation.status == E.running, Evaluation.lease_expires_at < now)
    forgotten = and_(
        Evaluation.status == E.queued, func.coalesce(Evaluation.lease_expires_at, 0) < now, Evaluation.created_at < cutoff
    )
    taken = []
    candidates = session.scalars(select(Evaluation.id).where(or_(expired, forgotten)).order_by(Evaluation.created_at)).all()
    for evaluation_id in candidates:
        result = session.execute(
            update(Evaluation)
            .where(Evaluation.id == evaluation_id, or_(expired, forgotten))
            .values(status=E.queued, lease_owner=None, lease_expires_at=now + quiet_for)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            taken.append(evaluation_id)
    return taken
