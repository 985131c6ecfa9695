"""What an operator does about a failed fold: retry it once the cause is fixed, or skip its expert.

A failed version stops its stream: later versions stay queued, because each folds from
the one before. ``retry`` queues the failed version again; ``skip`` leaves its expert out
for good -- the version stays in the lineage as ``skipped`` (with the error that led to it)
and its successor is folded from the last succeeded version instead.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.models import Stream, Version, VersionStatus, utcnow
from app.repositories import streams as streams_repo
from app.repositories import versions as versions_repo
from app.services.errors import Conflict
from app.services.queue import FoldQueue, fold_after_commit


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
    streams_repo.lock(session, stream.id)  # serialize with uploads and skips on this stream
    if not versions_repo.requeue_failed(session, version.id):
        raise Conflict(f"version {version.number} is no longer failed", code="version_not_failed")
    fold_after_commit(session, queue, version.id)
    session.refresh(version)
    return version


def skip(session: Session, queue: FoldQueue, stream: Stream, version: Version) -> Version:
    """Leave a failed version's expert out and let the stream continue from the last good version."""
    _must_be_failed(version, "skipped")
    streams_repo.lock(session, stream.id)  # an upload racing us must see the skip before it picks a parent
    following = versions_repo.skip_failed(session, version, finished_at=utcnow())
    session.refresh(version)
    if version.status != VersionStatus.skipped:
        raise Conflict(f"version {version.number} is no longer failed", code="version_not_failed")
    if following is not None and following.status == VersionStatus.queued:
        fold_after_commit(session, queue, following.id)
    return version
