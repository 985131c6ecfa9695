"""Streams and their versions: creation, lookups scoped to a tenant, and the public views."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import Expert, Stream, Version
from app.repositories import evaluations as evaluations_repo
from app.repositories import experts as experts_repo
from app.repositories import streams as streams_repo
from app.repositories import versions as versions_repo
from app.schemas.streams import (
    BasePublic,
    EvaluationPublic,
    ExpertPublic,
    StreamCreate,
    StreamPublic,
    VersionError,
    VersionPublic,
)
from app.services.errors import NotFound, ServiceError
from app.services.versions import MAX_VERSION_NUMBER, resolve_version


def create_stream(session: Session, tenant_id: str, body: StreamCreate, settings: Settings | None = None) -> Stream:
    from app.merging import METHODS, validate_params

    if body.method not in METHODS:
        raise ServiceError(
            f"unknown merge method {body.method!r}; choose one of: {', '.join(sorted(METHODS))}",
            code="invalid_method",
            status_code=422,
        )
    params = validate_params(body.method, body.params)  # InvalidParams -> 422 via the error handler
    evaluator = None
    if body.evaluator is not None:
        from app.services.evaluators import check_evaluator_allowed

        check_evaluator_allowed(body.evaluator.name, settings)
        evaluator = body.evaluator.model_dump()
    if body.champion is not None and evaluator is None:
        raise ServiceError(
            "a champion policy needs an evaluator: name one in `evaluator` (its metrics choose the champion)",
            code="invalid_champion",
            status_code=422,
        )
    stream = streams_repo.add(
        session, Stream(tenant_id=tenant_id, name=body.name, method=body.method, params=params, evaluator=evaluator,
                        fold_parts=body.fold_parts)
    )
    if body.champion is not None:
        from app.services.replays import create_candidates

        create_candidates(session, stream, body.champion)
    return stream


# Stream ids are new_id()s. Anything else names no stream, and is answered without a query:
# a NUL byte or a 10 kB id must not reach the database driver (PostgreSQL refuses NUL in text).
_STREAM_ID = re.compile(r"[0-9a-f]{32}")

def get_stream(session: Session, tenant_id: str, stream_id: str) -> Stream:
    """The tenant's stream, or 404 (another tenant's stream is indistinguishable from none)."""
    stream = streams_repo.get_for_tenant(session, stream_id, tenant_id) if _STREAM_ID.fullmatch(stream_id) else None
    if stream is None:
        raise NotFound(f"no stream {stream_id[:80]!r}")
    return stream


def get_version(session: Session, stream: Stream, ref: str) -> Version:
    """Version ``ref`` of the stream: see ``app.services.versions.resolve_version``."""
    return resolve_version(session, stream, ref)


def expert_public(expert: Expert) -> ExpertPublic:
    return ExpertPublic(
        id=expert.id,
        name=expert.name,
        sha256=expert.sha256,
        size=expert.size,
        metadata=expert.meta,
        created_at=expert.created_at,
    )


def version_views(session: Session, versions: list[Version]) -> list[VersionPublic]:
    experts = experts_repo.by_ids(session, [v.expert_id for v in versions if v.expert_id])
    known = {v.id: v.number for v in versions}
    missing = [v.parent_id for v in versions if v.parent_id and v.parent_id not in known]
    known.update(versions_repo.numbers_by_id(session, missing))
    evaluations = evaluation_views(session, [v.id for v in versions])
    return [
        version_public(
            v,
            parent=known.get(v.parent_id) if v.parent_id else None,
            expert=expert_public(experts[v.expert_id]) if v.expert_id in experts else None,
            evaluations=evaluations.get(v.id, []),
        )
        for v in versions
    ]


def evaluation_views(conn: Connection | Session, version_ids: list[str]) -> dict[str, list[EvaluationPublic]]:
    """version id -> its evaluations, oldest first."""
    views: dict[str, list[EvaluationPublic]] = {}
    for row in evaluations_repo.rows_for_versions(conn, version_ids):
        views.setdefault(row.version_id, []).append(
            EvaluationPublic(
                evaluator=row.evaluator,
                metrics=row.metrics,
                status=row.status,
                created_at=row.created_at,
                finished_at=row.finished_at,
                error=row.error,
            )
        )
    return views


def version_public(
    v: Any, *, parent: int | None, expert: ExpertPublic | None, evaluations: list[EvaluationPublic] | None = None
) -> VersionPublic:
    """A version as the API shows it, from an ORM ``Version`` or a Core row with the same column names."""
    return VersionPublic(
        number=v.number,
        status=v.status,
        parent=parent,
        expert=expert,
        progress=v.progress,
        metrics=v.metrics,
        error=VersionError(code=v.error_code, message=v.error) if v.error else None,
        attempts=v.attempts,
        created_at=v.created_at,
        started_at=v.started_at,
        finished_at=v.finished_at,
        sha256=v.sha256,
        size=v.size,
        stream_id=v.stream_id,
        evaluations=evaluations or [],
    )


def version_view_by_number(conn: Connection, tenant: str, stream_id: str, number: int | None) -> VersionPublic:
    """One version (``None``: the newest succeeded) in one Core query: the polling hot path.

    Same answers and errors as ``get_version`` + ``version_view``, for a well-formed stream id
    and version number (see ``plain_version_ref``).
    """
    row = versions_repo.view_row(conn, tenant, stream_id, number)
    if row is None:
        raise NotFound(f"no stream {stream_id[:80]!r}")
    if row.version_id is None:
        if number is None:
            raise NotFound(f"stream {stream_id} has no succeeded version yet (upload a base first)")
        raise NotFound(f"stream {stream_id} has no version {number}")
    expert = None
    if row.expert_id is not None:
        expert = ExpertPublic(
            id=row.expert_id,
            name=row.expert_name,
            sha256=row.expert_sha256,
            size=row.expert_size,
            metadata=row.expert_metadata,
            created_at=row.expert_created_at,
        )
    evaluations = evaluation_views(conn, [row.version_id]).get(row.version_id, [])
    return version_public(row, parent=row.parent_number, expert=expert, evaluations=evaluations)


def plain_version_ref(stream_id: str, ref: str) -> int | None | bool:
    """For the hot path: ``None`` for ``latest``, the number for a valid version number, and
    False for a malformed stream id or ref (left to the general path, which words every error)."""
    if not _STREAM_ID.fullmatch(stream_id):
        return False
    if ref == "latest":
        return None
    if ref.isascii() and ref.isdecimal() and len(ref) <= 10 and int(ref) <= MAX_VERSION_NUMBER:
        return int(ref)
    return False


def version_view(session: Session, version: Version) -> VersionPublic:
    return version_views(session, [version])[0]


def stream_views(session: Session, streams: list[Stream]) -> list[StreamPublic]:
    latest = versions_repo.latest_succeeded_for(session, [s.id for s in streams])
    latest_views = dict(zip(latest, version_views(session, list(latest.values())), strict=True))
    return [
        StreamPublic(
            id=s.id,
            name=s.name,
            method=s.method,
            params=s.params,
            base=BasePublic(sha256=s.base_sha256, size=s.base_size or 0) if s.base_sha256 else None,
            version_count=s.version_count,
            latest_version=latest_views.get(s.id),
            created_at=s.created_at,
            replay_of=s.replay_of,
            evaluator=s.evaluator,
            champion=s.champion,
            fold_parts=s.fold_parts,
        )
        for s in streams
    ]


def list_streams(session: Session, tenant_id: str) -> list[StreamPublic]:
    return stream_views(session, streams_repo.list_for_tenant(session, tenant_id))
