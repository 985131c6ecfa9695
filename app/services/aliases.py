"""Aliases: names for succeeded versions of a stream or of its replays, with every move kept.

An alias never points at a version that has not succeeded: the move is refused (409), and
versions never leave ``succeeded``. ``@champion`` on a stream with a champion policy is moved
by the policy only.
"""

from __future__ import annotations

import re

from sqlalchemy.orm import Session

from app.models import Alias, AliasMove, Stream, Version, utcnow
from app.repositories import aliases as aliases_repo
from app.repositories import streams as streams_repo
from app.repositories import tenants as tenants_repo
from app.repositories import versions as versions_repo
from app.schemas.aliases import ALIAS_PATTERN, AliasList, AliasMovePublic, AliasPublic, AliasSet, VersionRef
from app.services.errors import Conflict, NotFound, ServiceError
from app.services.evaluations import must_have_succeeded
from app.services.versions import resolve_version

CHAMPION = "champion"
MAX_ALIASES_PER_STREAM = 1000
POLICY = "champion-policy"
_ALIAS = re.compile(ALIAS_PATTERN)


def check_name(name: str) -> None:
    if not _ALIAS.fullmatch(name):
        raise ServiceError(
            f"alias {name[:80]!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            code="invalid_alias",
            status_code=422,
        )


def _target_stream(session: Session, stream: Stream, stream_id: str | None) -> Stream:
    if stream_id is None or stream_id == stream.id:
        return stream
    target = streams_repo.get(session, stream_id) if re.fullmatch(r"[0-9a-f]{32}", stream_id) else None
    if target is None or target.replay_of != stream.id or target.tenant_id != stream.tenant_id:
        raise NotFound(f"stream {stream.id} has no replay {stream_id[:80]!r}")
    return target


def set_alias(session: Session, tenant_id: str, stream: Stream, name: str, body: AliasSet) -> Alias:
    """Point ``name`` at a succeeded version of the stream or of one of its replays (PUT)."""
    check_name(name)
    if name == CHAMPION and stream.champion:
        raise Conflict("@champion of this stream is moved by its champion policy only", code="alias_managed")
    target = _target_stream(session, stream, body.stream_id)
    ref = str(body.version)
    if isinstance(body.version, int) and body.version < 0:
        raise NotFound(f"stream {target.id} has no version {body.version}")
    version = resolve_version(session, target, ref)
    must_have_succeeded(version, "aliased")
    who = tenants_repo.name_of(session, tenant_id) or tenant_id
    return move(session, stream, name, version, who=who)


def move(session: Session, stream: Stream, name: str, version: Version, *, who: str) -> Alias:
    """Move (or create) the alias and record the move; pointing it where it already points records nothing."""
    must_have_succeeded(version, "aliased")
    streams_repo.lock(session, stream.id)  # one move at a time per stream: the history has a single order
    alias = aliases_repo.get(session, stream.id, name)
    now = utcnow()
    if alias is not None and alias.version_id == version.id:
        return alias
    previous = alias.version_id if alias is not None else None
    if alias is None:
        if aliases_repo.count_for_stream(session, stream.id) >= MAX_ALIASES_PER_STREAM:
            raise Conflict(f"stream {stream.id} already has {MAX_ALIASES_PER_STREAM} aliases, the most one stream keeps",
                           code="too_many_aliases")  # fmt: skip
        alias = aliases_repo.add(session, Alias(stream_id=stream.id, name=name, version_id=version.id, created_at=now))
    alias.version_id, alias.updated_at = version.id, now
    aliases_repo.add_move(
        session, AliasMove(alias_id=alias.id, from_version_id=previous, to_version_id=version.id, who=who, at=now)
    )
    session.flush()
    return alias


def alias_views(session: Session, stream: Stream, aliases: list[Alias]) -> list[AliasPublic]:
    moves = aliases_repo.moves_for(session, [a.id for a in aliases])
    ids = {a.version_id for a in aliases} | {m.to_version_id for m in moves} | {m.from_version_id for m in moves}
    refs = {
        v.id: VersionRef(stream_id=v.stream_id, number=v.number)
        for v in (versions_repo.get(session, i) for i in ids if i is not None)
        if v is not None
    }
    history: dict[str, list[AliasMovePublic]] = {}
    for m in moves:
        history.setdefault(m.alias_id, []).append(
            AliasMovePublic(who=m.who, at=m.at, from_=refs.get(m.from_version_id) if m.from_version_id else None,
                            to=refs[m.to_version_id])  # fmt: skip
        )
    return [
        AliasPublic(
            name=a.name,
            stream_id=refs[a.version_id].stream_id,
            version=refs[a.version_id].number,
            updated_at=a.updated_at,
            history=history.get(a.id, []),
        )
        for a in aliases
    ]


def list_aliases(session: Session, stream: Stream) -> AliasList:
    return AliasList(aliases=alias_views(session, stream, aliases_repo.list_for_stream(session, stream.id)))
