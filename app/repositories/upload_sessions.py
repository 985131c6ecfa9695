"""Queries on upload sessions and their files."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.models import UploadFile, UploadSession, UploadStatus


def add(session: Session, upload: UploadSession, files: list[UploadFile]) -> UploadSession:
    session.add(upload)
    session.flush()
    session.add_all(files)
    session.flush()
    return upload


def get(session: Session, stream_id: str, upload_id: str) -> UploadSession | None:
    return session.scalar(select(UploadSession).where(UploadSession.id == upload_id, UploadSession.stream_id == stream_id))


def files(session: Session, upload_id: str) -> list[UploadFile]:
    return list(session.scalars(select(UploadFile).where(UploadFile.session_id == upload_id).order_by(UploadFile.path)))


def file_by_path(session: Session, upload_id: str, path: str) -> UploadFile | None:
    return session.scalar(select(UploadFile).where(UploadFile.session_id == upload_id, UploadFile.path == path))


def set_status(session: Session, upload_id: str, *, old: str, new: str, **values: Any) -> bool:
    """Move the session from ``old`` to ``new`` (a conditional UPDATE: one request wins)."""
    result = session.execute(
        update(UploadSession)
        .where(UploadSession.id == upload_id, UploadSession.status == old)
        .values(status=new, **values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def extend(session: Session, upload_id: str, expires_at: datetime) -> None:
    session.execute(
        update(UploadSession)
        .where(UploadSession.id == upload_id, UploadSession.status == UploadStatus.open.value)
        .values(expires_at=expires_at)
        .execution_options(synchronize_session=False)
    )


def acquire_file(session: Session, file_id: str, *, start: int, owner: str, until: float, now: float) -> bool:
    """Take the write lease of a file that has exactly ``start`` bytes and no live writer."""
    result = session.execute(
        update(UploadFile)
        .where(
            UploadFile.id == file_id,
            UploadFile.received == start,
            UploadFile.complete.is_(False),
            or_(UploadFile.lease_owner.is_(None), UploadFile.lease_expires_at < now),
        )
        .values(lease_owner=owner, lease_expires_at=until)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def update_leased(session: Session, file_id: str, owner: str, **values: Any) -> bool:
    """Write the leased file's row; False if ``owner`` no longer holds the lease (abandoned, or taken over)."""
    result = session.execute(
        update(UploadFile)
        .where(UploadFile.id == file_id, UploadFile.lease_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def reset_files(session: Session, upload_id: str) -> None:
    """Forget every file's staged bytes (the session was abandoned or expired)."""
    session.execute(
        update(UploadFile)
        .where(UploadFile.session_id == upload_id)
        .values(received=0, complete=False, staging=None, tail=None, lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )


def expired(session: Session, now: datetime, limit: int) -> list[UploadSession]:
    return list(
        session.scalars(
            select(UploadSession)
            .where(UploadSession.status == UploadStatus.open.value, UploadSession.expires_at < now)
            .order_by(UploadSession.expires_at)
            .limit(limit)
        )
    )
