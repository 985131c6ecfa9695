"""Replays: a stream rebuilt from another's base and experts, with its own method, params, order or subset.

Nothing is re-uploaded or copied. The replay's version 0 is the source's base object, and each
of its experts is a row that references the source's expert row (``source_expert_id``), whose
stored objects -- one file, or a folder's manifest -- the fold reads as they are. The replay's
versions are ordinary versions of its own stream, so they fold beside the source's under the
same lease, ordering and crash guarantees.

A plain replay is fixed at creation: experts the source accepts later are not added to it.
Champion candidates (``follows_source``) are the exception: each new expert of the source is
appended to every candidate in the same transaction that accepts it.
"""

from __future__ import annotations

from collections import Counter

from sqlalchemy.orm import Session

from app.models import Expert, Stream, Version, VersionStatus, utcnow
from app.repositories import experts as experts_repo
from app.repositories import streams as streams_repo
from app.repositories import versions as versions_repo
from app.schemas.replays import ChampionPolicy, ReplayCreate
from app.services.errors import Conflict, ServiceError
from app.services.queue import FoldQueue, fold_after_commit


def _validated(method: str, params: dict) -> dict:
    from app.merging import METHODS, validate_params

    if method not in METHODS:
        raise ServiceError(
            f"unknown merge method {method!r}; choose one of: {', '.join(sorted(METHODS))}",
            code="invalid_method",
            status_code=422,
        )
    return validate_params(method, params)


def _chosen_experts(session: Session, source: Stream, ids: list[str] | None) -> list[Expert]:
    experts = experts_repo.for_stream_in_arrival_order(session, source.id)
    if ids is None:
        if not experts:
            raise Conflict(f"stream {source.id} has no experts yet: there is nothing to replay", code="nothing_to_replay")
        return experts
    by_id = {e.id: e for e in experts}
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ServiceError(
            f"experts lists {duplicates[0][:40]!r} more than once; each expert folds at most once",
            code="invalid_replay",
            status_code=422,
        )
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ServiceError(
            f"stream {source.id} has no expert {unknown[0][:40]!r}"
            + (f" (and {len(unknown) - 1} more unknown ids)" if len(unknown) > 1 else ""),
            code="invalid_replay",
            status_code=422,
        )
    return [by_id[i] for i in ids]


def create_replay(session: Session, queue: FoldQueue, source: Stream, body: ReplayCreate) -> Stream:
    """A new stream folding the chosen experts of ``source`` (default: all, in arrival order) with its own method."""
    params = _validated(body.method, body.params)
    if not source.base_sha256:
        raise Conflict(f"stream {source.id} has no base yet: there is nothing to replay", code="nothing_to_replay")
    streams_repo.lock(session, source.id)  # a consistent set of experts (an upload waits for us, or we for it)
    experts = _chosen_experts(session, source, body.experts)
    replay = _new_replay(session, source, name=body.name, method=body.method, params=params, follows_source=False)
    _copy_base(session, source, replay)
    first = None
    for expert in experts:
        version = _append(session, replay, expert)
        first = first or version
    if first is not None:
        fold_after_commit(session, queue, first.id)  # each fold sends the next one when it succeeds
    session.refresh(replay)
    return replay


def _new_replay(session: Session, source: Stream, *, name: str, method: str, params: dict, follows_source: bool) -> Stream:
    return streams_repo.add(
        session,
        Stream(
            tenant_id=source.tenant_id,
            name=name,
            method=method,
            params=params,
            replay_of=source.id,
            follows_source=follows_source,
            evaluator=source.evaluator,
            version_count=0,
        ),
    )


def _copy_base(session: Session, source: Stream, replay: Stream) -> Version:
    """Version 0 of the replay: the source's base, the same stored object (only the row is new)."""
    base = versions_repo.by_number(session, source.id, 0)
    assert base is not None and source.base_sha256, "a stream with a base has its version 0"
    streams_repo.set_base(session, replay.id, sha256=source.base_sha256, size=source.base_size or 0, header=source.base_header)
    now = utcnow()
    return versions_repo.add(
        session,
        Version(
            stream_id=replay.id,
            number=0,
            status=VersionStatus.succeeded,
            progress=1.0,
            object_key=base.object_key,
            sha256=base.sha256,
            size=base.size,
            created_at=now,
            started_at=now,
            finished_at=now,
        ),
    )


def _append(session: Session, replay: Stream, source_expert: Expert) -> Version:
    """Add one expert of the source to the replay (a row referencing it) and queue its version."""
    number = streams_repo.allocate_version_number(session, replay.id)
    parent = versions_repo.by_number(session, replay.id, number - 1)
    expert = experts_repo.add(
        session,
        Expert(
            stream_id=replay.id,
            name=source_expert.name,
            sha256=source_expert.sha256,
            size=source_expert.size,
            object_key=None,
            source_expert_id=source_expert.id,
            meta=source_expert.meta,
        ),
    )
    return versions_repo.add(session, Version(stream_id=replay.id, number=number, parent_id=parent.id, expert_id=expert.id))


# --- champion candidates: replays that follow their source --------------------------------------


def create_candidates(session: Session, source: Stream, policy: ChampionPolicy) -> None:
    """One following replay per candidate; the policy, with each candidate's stream id, is kept on the source."""
    candidates = []
    for i, candidate in enumerate(policy.candidates):
        params = _validated(candidate.method, candidate.params)
        name = candidate.name or f"{source.name} / champion candidate {i + 1}: {candidate.method}"
        replay = _new_replay(session, source, name=name[:200], method=candidate.method, params=params, follows_source=True)
        candidates.append({"name": name[:200], "method": candidate.method, "params": params, "stream_id": replay.id})
    source.champion = {"metric": policy.metric, "mode": policy.mode, "min_gain": policy.min_gain, "candidates": candidates}
    session.flush()


def follow_base(session: Session, source: Stream) -> None:
    """The source just got its base: so do its candidates (called in the same transaction)."""
    session.refresh(source)
    for follower in streams_repo.followers(session, source.id):
        _copy_base(session, source, follower)


def follow_expert(session: Session, queue: FoldQueue, source: Stream, expert: Expert) -> None:
    """The source just accepted ``expert``: append it to every candidate (same transaction, source lock held)."""
    for follower in streams_repo.followers(session, source.id):
        version = _append(session, follower, expert)
        fold_after_commit(session, queue, version.id)
