"""Queries on versions, including the fold lease that keeps a stream's folds in order."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, and_, bindparam, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from app.models import Expert, Stream, Version, VersionStatus

S = VersionStatus


def add(session: Session, version: Version) -> Version:
    """Insert a version. A skipped parent is replaced by its own parent: nothing folds from a skip."""
    if version.parent_id is not None:
        parent = session.get(Version, version.parent_id)
        if parent is not None and parent.status == S.skipped:
            version.parent_id = parent.parent_id
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


def release(
    session: Session,
    version_id: str,
    *,
    owner: str,
    quiet_until: float | None = None,
    error_code: str | None = None,
    error: str | None = None,
) -> bool:
    """Give the lease back (a transient failure): the version is queued again, the error kept for users to see.

    On a queued version ``lease_expires_at`` means "the stall sweep leaves it alone until then":
    its own retry is already scheduled.
    """
    result = session.execute(
        update(Version)
        .where(Version.id == version_id, Version.lease_owner == owner, Version.status == S.running)
        .values(status=S.queued, lease_owner=None, lease_expires_at=quiet_until, error_code=error_code, error=error)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def requeue_failed(session: Session, version_id: str) -> bool:
    """Put a failed version back in the queue (an operator's retry); False if it is not failed."""
    result = session.execute(
        update(Version)
        .where(Version.id == version_id, Version.status == S.failed)
        .values(status=S.queued, progress=0.0, lease_owner=None, lease_expires_at=None, finished_at=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def skip_failed(session: Session, version: Version, *, finished_at: Any) -> Version | None:
    """Mark a failed version skipped and fold its successor from its parent instead.

    Returns the successor (if one exists). The skipped row keeps its expert and error,
    so the lineage says which expert was left out and why; its parent, always a
    succeeded version, becomes the successor's parent.
    """
    result = session.execute(
        update(Version)
        .where(Version.id == version.id, Version.status == S.failed)
        .values(status=S.skipped, lease_owner=None, lease_expires_at=None, finished_at=finished_at)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    session.execute(
        update(Version)
        .where(Version.parent_id == version.id)
        .values(parent_id=version.parent_id)
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    return by_number(session, version.stream_id, version.number + 1)


def folds_before(session: Session, parent: Version) -> int:
    """How many experts are merged into ``parent``: its succeeded ancestors with an expert, itself included.

    The fold index the engine needs (t); it is the version number unless a version was skipped.
    """
    if parent.number == 0:
        return 0
    return session.scalar(
        select(func.count())
        .select_from(Version)
        .where(
            Version.stream_id == parent.stream_id,
            Version.number >= 1,
            Version.number <= parent.number,
            Version.status == S.succeeded,
        )
    ) or 0


def merged_expert_names(session: Session, version: Version) -> list[str]:
    """The names of the experts merged into ``version``, in fold order: its succeeded versions up to it.

    A skipped version's expert is left out (its successor was folded from its parent), so the
    list is what the checkpoint holds, the same count as :func:`folds_before`.
    """
    if version.number == 0:
        return []
    rows = session.execute(
        select(Expert.name)
        .join(Version, Version.expert_id == Expert.id)
        .where(
            Version.stream_id == version.stream_id,
            Version.number >= 1,
            Version.number <= version.number,
            Version.status == S.succeeded,
        )
        .order_by(Version.number)
    )
    return [name for (name,) in rows]


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


def take_stalled(session: Session, *, now: float, quiet_for: float) -> list[str]:
    """Versions whose turn it is but that no live worker is folding; each is handed out once.

    Stalled: running under a lease that expired (its worker died), or queued for longer
    than ``quiet_for`` seconds since both it and its parent's success (its message was
    lost). Each is put back to ``queued`` and left alone for another ``quiet_for``
    seconds; the conditional UPDATE lets only one sweeper take it, on any database.
    """
    parent = aliased(Version)
    cutoff = datetime.fromtimestamp(now - quiet_for, UTC)
    expired = and_(Version.status == S.running, Version.lease_expires_at < now)
    forgotten = and_(
        Version.status == S.queued,
        func.coalesce(Version.lease_expires_at, 0) < now,
        Version.created_at < cutoff,
    )
    candidates = session.scalars(
        select(Version.id)
        .join(parent, parent.id == Version.parent_id)
        .where(parent.status == S.succeeded, or_(expired, and_(forgotten, parent.finished_at < cutoff)))
        .order_by(Version.stream_id, Version.number)
    ).all()
    taken = []
    for version_id in candidates:
        result = session.execute(
            update(Version)
            .where(Version.id == version_id, or_(expired, forgotten))
            .values(status=S.queued, lease_owner=None, lease_expires_at=now + quiet_for)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            taken.append(version_id)
    return taken


# --- The read hot path: GET /v1/streams/{id}/versions/{number|latest} in one query. ---------
#
# One statement, built once (a Core select over the tables, bound parameters only), answers
# "the tenant's stream, its version (a number, or the newest succeeded one), that version's
# expert and its parent's number". A stream row with NULL version columns means the stream
# exists but has no such version; no row means no stream (for this tenant).
_streams = Stream.__table__
_v = Version.__table__.alias("v")
_parent = Version.__table__.alias("p")
_expert = Expert.__table__.alias("e")
_newest = Version.__table__.alias("newest")

_VIEW_COLUMNS = (
    _v.c.id.label("version_id"),
    _v.c.stream_id,
    _v.c.number,
    _v.c.status,
    _parent.c.number.label("parent_number"),
    _v.c.progress,
    _v.c.metrics,
    _v.c.error_code,
    _v.c.error,
    _v.c.attempts,
    _v.c.created_at,
    _v.c.started_at,
    _v.c.finished_at,
    _v.c.sha256,
    _v.c.size,
    _expert.c.id.label("expert_id"),
    _expert.c.name.label("expert_name"),
    _expert.c.sha256.label("expert_sha256"),
    _expert.c.size.label("expert_size"),
    _expert.c.metadata.label("expert_metadata"),
    _expert.c.created_at.label("expert_created_at"),
)


def _view_statement(version_on):  # noqa: ANN001, ANN202
    joined = (
        _streams.outerjoin(_v, version_on)
        .outerjoin(_expert, _expert.c.id == _v.c.expert_id)
        .outerjoin(_parent, _parent.c.id == _v.c.parent_id)
    )
    return (
        select(*_VIEW_COLUMNS)
        .select_from(joined)
        .where(_streams.c.id == bindparam("stream_id"), _streams.c.tenant_id == bindparam("tenant_id"))
    )


_LATEST_VIEW = _view_statement(
    _v.c.id
    == select(_newest.c.id)
    .where(_newest.c.stream_id == _streams.c.id, _newest.c.status == S.succeeded.value)
    .order_by(_newest.c.number.desc())
    .limit(1)
    .scalar_subquery()
)
_NUMBER_VIEW = _view_statement(and_(_v.c.stream_id == _streams.c.id, _v.c.number == bindparam("number")))


def view_row(conn: Connection | Session, tenant_id: str, stream_id: str, number: int | None) -> Row | None:
    """The row behind a version's public view: ``number``, or the newest succeeded version if None.

    None: the tenant has no such stream. A row whose ``version_id`` is None: the stream exists
    but has no such version.
    """
    params: dict[str, Any] = {"stream_id": stream_id, "tenant_id": tenant_id}
    if number is None:
        return conn.execute(_LATEST_VIEW, params).one_or_none()
    params["number"] = number
    return conn.execute(_NUMBER_VIEW, params).one_or_none()


def by_source_expert(session: Session, stream_id: str, source_expert_id: str) -> Version | None:
    """The version of ``stream_id`` (a replay) that folds the replay's copy of expert ``source_expert_id``."""
    return session.scalar(
        select(Version)
        .join(Expert, Expert.id == Version.expert_id)
        .where(Version.stream_id == stream_id, Expert.source_expert_id == source_expert_id)
    )
