"""What an operator does about a failed fold: retry it once the cause is fixed, or skip its expert.

A failed version stops its stream: later versions stay queued, because each folds from
the one before. ``retry`` queues the failed version again; ``skip`` leaves its expert out
for good -- the version stays in the lineage as ``skipped`` (with the error that led to it)
and its successor is folded from the last succeeded version instead.
"""

from __future__ import annotations

import re

from sqlalchemy.orm import Session

from app.models import Stream, Version, VersionStatus, utcnow
from app.repositories import aliases as aliases_repo
from app.repositories import streams as streams_repo
from app.repositories import versions as versions_repo
from app.schemas.aliases import ALIAS_PATTERN
from app.services.errors import Conflict, NotFound, ServiceError
from app.services.queue import FoldQueue, fold_after_commit

# Version numbers are stored as 32-bit integers; a larger one names no version.
_VERSION_NUMBER = re.compile(r"-?[0-9]{1,10}")
MAX_VERSION_NUMBER = 2**31 - 1
_ALIAS = re.compile(ALIAS_PATTERN)


def resolve_version(session: Session, stream: Stream, ref: str) -> Version:
    """The version ``ref`` names in ``stream``: a number, ``latest`` (the newest succeeded) or ``@alias``.

    The one resolver behind every route that takes ``{n}``. An alias may point at a version of
    one of the stream's replays (``@champion`` does): the version returned then belongs to that
    replay, which is the same tenant's.
    """
    if ref.startswith("@"):
        name = ref[1:]
        if not _ALIAS.fullmatch(name):
            raise ServiceError(
                f"{ref[:80]!r} is not an alias: after '@' come 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
                code="invalid_version",
            )
        alias = aliases_repo.get(session, stream.id, name)
        if alias is None:
            raise NotFound(f"stream {stream.id} has no alias @{name}")
        return versions_repo.get(session, alias.version_id)
    if ref == "latest":
        version = versions_repo.latest_succeeded(session, stream.id)
        if version is None:
            raise NotFound(f"stream {stream.id} has no succeeded version yet (upload a base first)")
        return version
    if not ref.lstrip("-").isdecimal() or not ref.isascii():
        raise ServiceError(f"version must be a number, 'latest' or '@alias', not {ref[:80]!r}", code="invalid_version")
    if not _VERSION_NUMBER.fullmatch(ref) or not 0 <= int(ref) <= MAX_VERSION_NUMBER:
        raise NotFound(f"stream {stream.id} has no version {ref[:80]}")
    number = int(ref)
    version = versions_repo.by_number(session, stream.id, number)
    if version is None:
        raise NotFound(f"stream {stream.id} has no version {number}")
    return version


def _must_be_failed(version: Version, action: str) -> None:
    if version.number == 0:
        raise Conflict("version 0 is the base; there is no fold to " + action, code="version_not_failed")
    if version.status != VersionStatus.failed:
        raise Conflict(
            f"version {version.number} is {version.status}; only a failed version can be {action}",
            code="version_not_failed",
        )


def retry(session: Session, queue: FoldQueue, stream: Stream, version: Version) -> Version:
    """Queue a failed version's fold again (after its cause -- a lost object, say -- was fixed)."""
    _must_be_failed(version, "retried")
    streams_repo.lock(session, version.stream_id)  # serialize with uploads and skips on this stream
    if not versions_repo.requeue_failed(session, version.id):
        raise Conflict(f"version {version.number} is no longer failed", code="version_not_failed")
    fold_after_commit(session, queue, version.id)
    session.refresh(version)
    return version


def skip(session: Session, queue: FoldQueue, stream: Stream, version: Version) -> Version:
    """Leave a failed version's expert out and let the stream continue from the last good version."""
    _must_be_failed(version, "skipped")
    streams_repo.lock(session, version.stream_id)  # an upload racing us must see the skip before it picks a parent
    following = versions_repo.skip_failed(session, version, finished_at=utcnow())
    session.refresh(version)
    if version.status != VersionStatus.skipped:
        raise Conflict(f"version {version.number} is no longer failed", code="version_not_failed")
    if following is not None and following.status == VersionStatus.queued:
        fold_after_commit(session, queue, following.id)
    return version
