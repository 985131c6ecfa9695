"""Queries on streams."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import Stream


def add(session: Session, stream: Stream) -> Stream:
    session.add(stream)
    session.flush()
    return stream


def get(session: Session, stream_id: str) -> Stream | None:
    return session.get(Stream, stream_id)


def get_for_tenant(session: Session, stream_id: str, tenant_id: str) -> Stream | None:
    return session.scalar(select(Stream).where(Stream.id == stream_id, Stream.tenant_id == tenant_id))


def list_for_tenant(session: Session, tenant_id: str) -> list[Stream]:
    return list(session.scalars(select(Stream).where(Stream.tenant_id == tenant_id).order_by(Stream.created_at)))


def set_base(session: Session, stream_id: str, *, sha256: str, size: int, header: str) -> bool:
    """Record the base once: False if the stream already has one (an atomic check-and-set)."""
    result = session.execute(
        update(Stream)
        .where(Stream.id == stream_id, Stream.base_sha256.is_(None))
        .values(base_sha256=sha256, base_size=size, base_header=header, version_count=0)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def allocate_version_number(session: Session, stream_id: str) -> int:
    """Hand out the next version number.

    The UPDATE takes the stream's row lock (PostgreSQL) or the database write lock
    (SQLite) until commit, so concurrent uploads to one stream are serialized here
    and each sees its predecessor's rows.
    """
    return session.execute(
        update(Stream)
        .where(Stream.id == stream_id)
        .values(version_count=Stream.version_count + 1)
        .returning(Stream.version_count)
        .execution_options(synchronize_session=False)
    ).scalar_one()


def lock(session: Session, stream_id: str) -> None:
    """Hold the stream's row lock until commit (the same lock ``allocate_version_number`` takes)."""
    session.execute(
        update(Stream)
        .where(Stream.id == stream_id)
        .values(version_count=Stream.version_count)
        .execution_options(synchronize_session=False)
    )


def origin_id(session: Session, stream: Stream) -> str:
    """The stream whose stored base object this one uses: itself, or the first stream of its replay chain."""
    current, seen = stream, {stream.id}
    while current.replay_of is not None:
        current = session.get(Stream, current.replay_of)
        if current is None or current.id in seen:  # pragma: no cover - a chain is created acyclic
            raise RuntimeError(f"broken replay chain at stream {stream.id}")
        seen.add(current.id)
    return current.id


def followers(session: Session, stream_id: str) -> list[Stream]:
    """The replays of ``stream_id`` that take each of its new experts (champion candidates)."""
    return list(
        session.scalars(
            select(Stream)
            .where(Stream.replay_of == stream_id, Stream.follows_source.is_(True))
            .order_by(Stream.created_at, Stream.id)
        )
    )


def replays_of(session: Session, stream_id: str) -> list[Stream]:
    return list(session.scalars(select(Stream).where(Stream.replay_of == stream_id).order_by(Stream.created_at, Stream.id)))
